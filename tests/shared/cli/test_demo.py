"""distill demo in a short configuration: a real local cluster, a tiny model, 8 sounds."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import psutil
import pytest
import soundfile as sf
import typer
from typer.testing import CliRunner

from distill.shared.audio.export import read_export_metadata
from distill.shared.cli import demo

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_bundled_sounds_are_small_and_licensed() -> None:
    sounds = demo.bundled_sounds()
    assert 6 <= len(sounds) <= 10
    assert sum(p.stat().st_size for p in sounds) <= 2_000_000
    note = sounds[0].parent / "LICENSE_NOTE.txt"
    assert "CC0" in note.read_text()


def test_demo_short_configuration(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DISTILL_LOG_JSON", "1")
    app = typer.Typer()
    demo.register(app)
    app.command("noop")(lambda: None)  # two commands: typer keeps the "demo" name
    out = tmp_path / "distill-demo"
    # an earlier demo killed with kill -9 left its cluster's folder (~40 MB) in the system's
    # temporary folder; this one removes it, and leaves nothing of its own
    system_tmp = tmp_path / "system-tmp"
    dead = system_tmp / "distill-demo.999999999.x1y2z3.dir"
    (dead / "broker").mkdir(parents=True)
    other = system_tmp / "distill-demo-notes.dir"  # not a demo's folder: stays
    other.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(system_tmp))
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    cache_before = os.environ.get("DISTILL_CACHE")
    result = CliRunner().invoke(app, [
        "demo", "--minutes", "0.6", "-o", str(out), "--seconds", "1",
        "--vqvae-opt", "channels=32", "--vqvae-opt", "latent_dim=16", "--vqvae-opt", "blocks=1",
        "--prior-opt", "hidden=32", "--prior-opt", "embed_dim=16",
        "--train-opt", "vqvae.epochs=15", "--train-opt", "prior.epochs=15",
    ])  # fmt: skip
    assert result.exit_code == 0, result.output + repr(result.exception)
    left = [p for p in psutil.Process().children(recursive=True) if p.pid not in before]
    assert not [p for p in left if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert (out / "demo.distill").is_file() and "distill tui" in result.output
    left_there = [p.name for p in system_tmp.iterdir() if p.name.startswith("distill-demo")]
    assert left_there == [other.name]  # (torch may put its own folders there)
    assert f"removed {dead}: an earlier demo's" in result.output
    assert "distill up: broker" not in result.output  # its own cluster is not `distill up`'s
    # its workers' cache variable is put back (the rest of a test run cached into a folder
    # the demo had deleted, and left it behind)
    assert os.environ.get("DISTILL_CACHE") == cache_before
    generated = sorted((out / "generated").glob("*.wav"))
    assert len(generated) == 8
    audios = [sf.read(p)[0] for p in generated]
    for a in audios:
        # finite and not silent: a peak above -80 dBFS (this tiny model, trained for seconds,
        # makes quiet sounds; a draw under -60 dBFS is drawn again, up to four times, so a
        # rare one may still end near -60)
        assert np.isfinite(a).all() and np.abs(a).max() > 1e-4
    for i in range(8):
        for j in range(i + 1, 8):
            assert not np.array_equal(audios[i], audios[j])  # distinct
    meta = read_export_metadata(generated[0])
    assert meta.kind == "generate" and meta.data["trim"] == demo.DEMO_TRIM_DB  # ended where they fade
    assert all(0 < len(a) <= 48000 for a in audios)  # at most the 1 s asked
    recon = sorted((out / "reconstructed").glob("*.wav"))
    assert len(recon) == len(demo.bundled_sounds())


def _demo_app() -> typer.Typer:
    app = typer.Typer()
    demo.register(app)
    app.command("noop")(lambda: None)  # two commands: typer keeps the "demo" name
    return app


@pytest.mark.parametrize("args, expected", [
    (["-n", "0"], "-n must be in [1, 256], got 0"),
    (["--seconds", "100"], "--seconds must be in [0.05, 60], got 100"),
    (["--seconds", "0"], "--seconds must be in [0.05, 60]"),
    (["--vqvae-opt", "chanels=3"], "unknown keys ['chanels']"),
    (["--prior-opt", "hidden=-1"], "--prior-opt: PriorConfig: hidden must be in 1..4096"),
])  # fmt: skip
def test_demo_refuses_bad_options_before_starting_a_cluster(
    tmp_path: Path, args: list[str], expected: str
) -> None:
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    result = CliRunner().invoke(_demo_app(), ["demo", "-o", str(tmp_path / "d"), *args])
    assert result.exit_code == 1 and expected in result.output, result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "d").exists()  # nothing copied, nothing started
    assert {p.pid for p in psutil.Process().children(recursive=True)} == before


def test_demo_refuses_an_unusable_folder_or_one_holding_other_sounds(tmp_path: Path) -> None:
    afile = tmp_path / "afile"
    afile.write_text("x")
    for out in (afile, afile / "sub"):
        result = CliRunner().invoke(_demo_app(), ["demo", "-o", str(out)])
        # an uncaught OSError would also exit 1 here, with no "error:" line
        assert result.exit_code == 1 and result.output.startswith("error: "), result.output
    mine = tmp_path / "d" / "sounds" / "my_own_recording.flac"
    mine.parent.mkdir(parents=True)
    mine.write_bytes(b"not touched")
    result = CliRunner().invoke(_demo_app(), ["demo", "-o", str(tmp_path / "d")])
    assert result.exit_code == 1 and "my_own_recording.flac" in result.output, result.output
    assert "give another -o" in result.output
    assert sorted(p.name for p in mine.parent.iterdir()) == ["my_own_recording.flac"]
    assert mine.read_bytes() == b"not touched"
