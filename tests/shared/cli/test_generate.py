"""distill generate / encode / decode / regenerate on a tiny random model (plumbing)."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import typer
from typer.testing import CliRunner

from distill.shared.audio.export import headroom_gain, read_export_metadata
from distill.shared.cli import generate
from distill.shared.model import inference
from distill.shared.model.modelfile import save_model
from tests.workers.test_infer import Q, tiny_model

torch.set_num_threads(1)
app = typer.Typer()
generate.register(app)
runner = CliRunner()


@pytest.fixture
def model_file(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.distill"
    save_model(path, tiny_model())
    return path


def run(*args: str) -> str:
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result.output


def test_generate_writes_files_with_metadata_and_regenerate_is_bit_identical(
    model_file: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    text = run("generate", model_file, "-n", "3", "--seconds", "0.3", "--seed", "7",
               "--temperature", "0.9", "-o", out, "--quality", "fast")  # fmt: skip
    files = sorted(out.glob("*.wav"))
    assert len(files) == 3 and "seed=7" in text and "temperature=0.9" in text
    meta = read_export_metadata(files[2])
    assert meta.kind == "generate" and meta.data["index"] == 2 and meta.data["count"] == 3
    audios = [sf.read(f)[0] for f in files]
    assert not np.array_equal(audios[0], audios[1])
    again = run("regenerate", files[2], "--model", model_file)
    assert "identical to" in again
    regenerated = files[2].with_name(f"{files[2].stem}.regenerated.wav")
    assert np.array_equal(sf.read(regenerated)[0], audios[2])


def test_generate_takes_the_change_temperature_and_records_it(model_file: Path, tmp_path: Path) -> None:
    apart = run("generate", model_file, "-n", "1", "--seconds", "0.3", "--change-temperature",
                "0.5", "-o", tmp_path / "apart", "--quality", "preview")  # fmt: skip
    default = run("generate", model_file, "-n", "1", "--seconds", "0.3", "-o", tmp_path / "off",
                  "--quality", "preview")  # fmt: skip
    assert "change_temperature=0.5" in apart and "change_temperature=1.0" in default
    (made,) = sorted((tmp_path / "apart").glob("*.wav"))
    assert read_export_metadata(made).data["change_temperature"] == 0.5
    assert "identical to" in run("regenerate", made, "--model", model_file)
    chosen = tmp_path / "chosen.distill"  # a model whose training chose 0.5
    save_model(chosen, dataclasses.replace(tiny_model(), summary={"sampling": {"change_temperature": 0.5}}))
    assert "change_temperature=0.5" in run("generate", chosen, "-n", "1", "--seconds", "0.3", "-o",
                                           tmp_path / "chosen", "--quality", "preview")  # fmt: skip
    assert "change_temperature=1.0" in run("generate", chosen, "-n", "1", "--seconds", "0.3",
                                           "--change-temperature", "1", "-o", tmp_path / "given",
                                           "--quality", "preview")  # fmt: skip
    bad = runner.invoke(app, ["generate", str(model_file), "--change-temperature", "0", "-o",
                              str(tmp_path / "bad")])  # fmt: skip
    assert bad.exit_code == 1 and "change_temperature must be > 0" in bad.output
    assert not (tmp_path / "bad").exists()


def test_generate_says_how_many_draws_were_drawn_again(
    model_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    text = run("generate", model_file, "-n", "2", "--seconds", "0.2", "-o", tmp_path / "a",
               "--quality", "preview")  # fmt: skip
    assert "drawn again" not in text  # a random model's draws are loud
    monkeypatch.setattr(inference, "SILENT_PEAK_DB", 20.0)  # every draw counts as silent
    text = run("generate", model_file, "-n", "2", "--seconds", "0.2", "-o", tmp_path / "b",
               "--quality", "preview")  # fmt: skip
    assert ("2 of 2 draws came out silent (peak under 20 dBFS, or 30 dB under the loudest "
            "draw) and were drawn again") in " ".join(text.split())


def test_generate_writes_each_sound_as_it_is_made_the_quiet_ones_replaced(
    model_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The files are the in-memory path's sounds, a quiet draw's file holding its redraw, and
    no more than a batch of audio is held (it kept every sound: 256 of 60 s were 2.9 GB)."""
    import tracemalloc

    from distill.shared.model.modelfile import load_model

    model = load_model(model_file, "cpu")
    params = generate._params(model, 1.0, 0, 1.0, None, 5, None, False)  # as the command does
    plain = inference.generate(model, count=64, seconds=0.5, params=params, quality="preview")
    peaks = 20 * np.log10(np.abs(plain.audio).max(axis=-1))
    monkeypatch.setattr(inference, "SILENT_PEAK_DB", float(np.median(peaks)))  # half redrawn
    kept = inference.generate(model, count=64, seconds=0.5, params=params, quality="preview")
    assert kept.redrawn >= 32  # in batches of 8
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        paths = generate.generate_files(model, tmp_path / "out", count=64, seconds=0.5,
                                        temperature=1.0, top_k=0, top_p=1.0, seed=5,
                                        quality="preview", fmt="wav", bits="float", show=False)  # fmt: skip
        peak = tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [p.name for p in paths]
    for i, path in enumerate(paths):  # as exported: a peak over full scale scaled down
        want = kept.audio[i] * headroom_gain(float(np.abs(kept.audio[i]).max()))
        np.testing.assert_allclose(sf.read(path, dtype="float32")[0], want, rtol=1e-6, atol=1e-7)
    assert peak < kept.audio.nbytes / 2, f"peak {peak} bytes for {kept.audio.nbytes} of audio"


def test_regenerate_with_another_model_says_so(model_file: Path, tmp_path: Path) -> None:
    run("generate", model_file, "-n", "1", "--seconds", "0.2", "-o", tmp_path / "o")
    other = tmp_path / "other.distill"
    model = tiny_model()
    model.summary["other"] = True  # a different header, so a different model id
    save_model(other, model)
    result = runner.invoke(app, ["regenerate", str(next((tmp_path / "o").glob("*.wav"))),
                                 "--model", str(other)])  # fmt: skip
    assert result.exit_code == 1 and "pass the model that made it" in result.output


def test_regenerate_out_takes_a_folder_and_refuses_a_bad_name(model_file: Path,
                                                              tmp_path: Path) -> None:
    run("generate", model_file, "-n", "1", "--seconds", "0.2", "-o", tmp_path / "o")
    made = next((tmp_path / "o").glob("*.wav"))
    before = made.read_bytes()
    folder = tmp_path / "again"
    folder.mkdir()
    assert "identical to" in run("regenerate", made, "--model", model_file, "-o", folder)
    assert np.array_equal(sf.read(folder / made.name)[0], sf.read(made)[0])
    for out, says in ((tmp_path / "regen", "a name with no suffix"),
                      (tmp_path / "regen.mp3", "'.mp3' files"),
                      (made, "the file being regenerated")):  # fmt: skip
        result = runner.invoke(app, ["regenerate", str(made), "--model", str(model_file),
                                     "-o", str(out)])  # fmt: skip
        assert result.exit_code == 1 and says in result.output, result.output
        assert not out.with_suffix(".mp3").exists() and not (tmp_path / "regen").exists()
    assert made.read_bytes() == before  # the sound asked about is never overwritten
    # a folder written as one (a trailing slash) that does not exist is made, as generate's
    # -o is (before: refused, "no folder")
    result = runner.invoke(app, ["regenerate", str(made), "--model", str(model_file),
                                 "-o", f"{tmp_path / 'new' / 'dir'}/"])  # fmt: skip
    assert result.exit_code == 0 and "identical to" in result.output, result.output
    assert (tmp_path / "new" / "dir" / made.name).is_file()
    (tmp_path / "file").write_text("x")
    result = runner.invoke(app, ["regenerate", str(made), "--model", str(model_file),
                                 "-o", f"{tmp_path / 'file'}/"])  # fmt: skip
    assert result.exit_code == 1 and "that is a file, not a folder" in result.output


def test_encode_decode_round_trip_and_regenerate_a_decode(model_file: Path, tmp_path: Path) -> None:
    t = np.arange(24000) / 48000
    wav = tmp_path / "in.wav"
    sf.write(wav, 0.5 * np.sin(2 * math.pi * 300 * t) * np.exp(-3 * t), 48000)
    codes = tmp_path / "codes.npz"
    assert f"{Q} levels" in run("encode", wav, "--model", model_file, "-o", codes)
    with np.load(codes, allow_pickle=False) as npz:
        assert npz["codes"].shape[0] == Q
    out = tmp_path / "out.flac"
    run("decode", codes, "--model", model_file, "-o", out, "--levels", "2", "--bits", "16")
    audio, rate = sf.read(out)
    assert rate == 48000 and np.isfinite(audio).all() and audio.size > 0
    assert read_export_metadata(out).data["levels"] == 2
    assert "identical to" in run("regenerate", out, "--model", model_file)


def test_encode_and_decode_name_the_file_they_refuse(model_file: Path, tmp_path: Path) -> None:
    (tmp_path / "notes.npz").write_text("not codes")
    long = tmp_path / "long.wav"  # a steady tone: nothing for preparation to trim
    sf.write(long, 0.3 * np.sin(2 * math.pi * 220 * np.arange(61 * 48000) / 48000), 48000)
    for args, says in (
        (["decode", tmp_path / "notes.npz"], "notes.npz: not a codes file from `distill encode` "
                                             "(not an .npz archive)"),
        (["encode", long], "long.wav: audio is 61.0 s long; at most 60 s"),
    ):  # fmt: skip
        result = runner.invoke(app, [str(a) for a in args] + ["--model", str(model_file), "-o",
                                                              str(tmp_path / "x.wav")])  # fmt: skip
        assert result.exit_code == 1 and says in result.output, result.output
        assert "pickle" not in result.output


def test_decode_refuses_codes_of_another_model(model_file: Path, tmp_path: Path) -> None:
    codes = tmp_path / "c.npz"
    np.savez(codes, codes=np.zeros((Q, 5), dtype=np.int64), model_id=np.array("f" * 64))
    result = runner.invoke(app, ["decode", str(codes), "--model", str(model_file),
                                 "-o", str(tmp_path / "x.wav")])  # fmt: skip
    assert result.exit_code == 1 and "encoded with model ffffffffffff" in result.output


def test_bad_values_are_refused_clearly(model_file: Path, tmp_path: Path) -> None:
    result = runner.invoke(app, ["generate", str(model_file), "--seconds", "36000",
                                 "-o", str(tmp_path)])  # fmt: skip
    assert result.exit_code == 1 and "seconds must be in" in result.output
    for args, says in ((["--seconds", "0"], "--seconds must be in [0.05, 60]"),
                       (["--seconds", "0.001"], "--seconds must be in [0.05, 60]"),
                       (["--quality", "ultra"], "quality must be one of")):  # fmt: skip
        result = runner.invoke(app, ["generate", str(model_file), *args, "-o",
                                     str(tmp_path / "none")])  # fmt: skip
        assert result.exit_code == 1 and says in result.output, result.output
        assert result.exception is None or isinstance(result.exception, SystemExit)
        assert "generating" not in result.output  # refused before any draw
    assert not (tmp_path / "none").exists()
    result = runner.invoke(app, ["generate", str(tmp_path / "none.distill")])
    assert result.exit_code == 1 and "no such file" in result.output


def test_regenerate_uses_the_thread_count_the_sound_was_made_with(
    model_file: Path, tmp_path: Path
) -> None:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run("generate", model_file, "-n", "2", "--seconds", "0.5", "-o", tmp_path / "o")
        made = sorted((tmp_path / "o").glob("*.wav"))[1]
        assert read_export_metadata(made).data["threads"] == 1
        torch.set_num_threads(2)  # kernels split sums by thread: the last bits would differ
        assert "identical to" in run("regenerate", made, "--model", model_file)
        assert torch.get_num_threads() == 2  # restored after the replay
    finally:
        torch.set_num_threads(before)


def _old_export(model_file: Path, path: Path, data: dict[str, object], **made: object) -> Path:
    """A file as an older Distill exported it: its samples made under the rules of its time
    (``made``: generate's arguments), its recipe holding only what was recorded then."""
    from distill.shared.audio.export import ExportMetadata, export_audio
    from distill.shared.model.modelfile import load_model

    model = load_model(model_file)
    params = inference.sampling_params({"temperature": 1.0, "top_k": 0, "top_p": 1.0, "seed": 5,
                                        "min_p": 0.0, "change_temperature": 1.0})  # fmt: skip
    out = inference.generate(model, count=2, seconds=0.3, params=params, **made)  # type: ignore[arg-type]
    recipe = {**{k: v for k, v in params.to_dict().items() if k in ("temperature", "top_k",
              "top_p", "seed")}, "count": 2, "seconds": 0.3, "index": 1, **data}  # fmt: skip
    export_audio(path, out.audio[1], out.sample_rate, subtype="FLOAT",
                 metadata=ExportMetadata(kind="generate", model_id=model.model_id, data=recipe))
    return path


def test_a_recipe_that_predates_a_rule_regenerates_under_the_rule_of_its_time(
    model_file: Path, tmp_path: Path
) -> None:
    """Before: a 'fast' export of the earliest versions (8 phase iterations; the preset has
    been 4 since) said only "DIFFERS". Recipes now record the preset they were made with."""
    from distill.shared.audio.phase import PhasePreset

    old_rules = {"quiet_under_loudest_db": None, "exact_length": False, "render_frames": None}
    old = _old_export(model_file, tmp_path / "old-fast.wav", {"quality": "fast"},
                      quality=PhasePreset(n_iter=8, init="vocoder"), **old_rules)
    text = run("regenerate", old, "--model", model_file)
    assert "identical to old-fast.wav (read with 'fast' as 8 phase iterations" in text, text
    # a recipe of today records the preset: read as written, whatever 'fast' means later
    run("generate", model_file, "-n", "1", "--seconds", "0.3", "-o", tmp_path / "new",
        "--quality", "fast")  # fmt: skip
    (new,) = sorted((tmp_path / "new").glob("*.wav"))
    assert read_export_metadata(new).data["phase"] == [4, "vocoder"]
    text = run("regenerate", new, "--model", model_file, "-o", tmp_path / "again.wav")
    assert text.strip().endswith("identical to " + new.name)


def test_a_sound_that_no_reading_makes_says_how_far_it_is(model_file: Path, tmp_path: Path) -> None:
    run("generate", model_file, "-n", "1", "--seconds", "0.3", "-o", tmp_path / "o")
    (made,) = sorted((tmp_path / "o").glob("*.wav"))
    audio, rate = sf.read(made, dtype="float32")
    meta = read_export_metadata(made)
    from distill.shared.audio.export import export_audio

    audio[100] += 0.01  # a changed sample: no reading of its recipe makes it
    export_audio(made, audio, rate, subtype="FLOAT", metadata=meta)
    result = runner.invoke(app, ["regenerate", str(made), "--model", str(model_file)])
    assert result.exit_code == 1, result.output
    assert "DIFFERS from" in result.output and "largest difference 0.01 (" in result.output
    assert "dB under its peak" in result.output and "also tried" not in result.output


def test_readings_of_older_recipes() -> None:
    """A sound the UI exported from a worker whose reply did not name the quiet-draw rule
    (change_temperature recorded, the rule not) is also read with the rule; a recipe without
    a thread count is read with other counts; one of today is read as written only."""
    ui = {"quality": "fast", "phase": [4, "vocoder"], "threads": 2, "change_temperature": 0.5}
    hows = [how for how, _ in inference.readings("generate", ui)]
    assert hows[0] == "as written" and len(hows) == 2 and "quiet-draw rule (30 dB)" in hows[1]
    assert inference.readings("generate", {**ui, "quiet_under_loudest_db": 30.0})[1:] == []
    threadless = inference.readings("decode", {"quality": "best"})  # made with any count
    assert len(threadless) >= 2 and all(r["threads"] != torch.get_num_threads()
                                        for _, r in threadless[1:])  # fmt: skip
    bad = {"quality": "fast", "phase": [4, "magic"], "codes": [[1]], "levels": None}
    with pytest.raises(inference.BadInput, match="phase must be"):
        inference.replay(tiny_model(), "decode", bad)


def _tone(path: Path, seconds: float = 1.0) -> Path:
    t = np.arange(int(48000 * seconds)) / 48000
    sf.write(path, 0.5 * np.sin(2 * math.pi * 300 * t) * np.exp(-2 * t), 48000)
    return path


def test_continue_keeps_the_start_of_the_sound_and_regenerates(
    model_file: Path, tmp_path: Path
) -> None:
    wav, codes = _tone(tmp_path / "in.wav"), tmp_path / "codes.npz"
    run("encode", wav, "--model", model_file, "-o", codes)
    with np.load(codes, allow_pickle=False) as npz:
        grid = npz["codes"]
    out = tmp_path / "out"
    text = run("generate", model_file, "--continue", wav, "--from", "0.5", "--seconds", "0.3",
               "-n", "2", "--seed", "3", "-o", out, "--quality", "preview")  # fmt: skip
    files = sorted(out.glob("*.wav"))
    assert [f.name for f in files] == ["tiny-in-cont-s3-000.wav", "tiny-in-cont-s3-001.wav"]
    assert "continuing=0.5" in text
    kept = inference.steps_for(generate._load(model_file, "cpu"), 0.5)
    meta = read_export_metadata(files[1])
    assert meta.data["prime"] == grid[:, :kept].tolist()  # the sound's own codes up to 0.5 s
    assert "identical to" in run("regenerate", files[1], "--model", model_file)
    # a codes file continues the same way as the sound it came from
    again = run("generate", model_file, "--continue", codes, "--from", "0.5", "--seconds",
                "0.3", "-n", "2", "--seed", "3", "-o", tmp_path / "npz", "--quality", "preview")  # fmt: skip
    assert "continuing=0.5" in again
    twin = tmp_path / "npz" / "tiny-codes-cont-s3-001.wav"
    assert np.array_equal(sf.read(twin)[0], sf.read(files[1])[0])


def test_resample_redraws_only_the_region_and_regenerates(model_file: Path, tmp_path: Path) -> None:
    wav = _tone(tmp_path / "in.wav")
    model = generate._load(model_file, "cpu")
    run("encode", wav, "--model", model_file, "-o", tmp_path / "codes.npz")
    with np.load(tmp_path / "codes.npz", allow_pickle=False) as npz:
        grid = npz["codes"]  # the sound as training prepares it, encoded
    out = tmp_path / "out"
    text = run("resample", wav, "--model", model_file, "--from", "0.25", "--to", "0.5",
               "-n", "3", "--seed", "1", "-o", out, "--quality", "preview")  # fmt: skip
    files = sorted(out.glob("*.wav"))
    assert [f.name for f in files] == [f"in-resample-s1-00{i}.wav" for i in range(3)]
    assert "region=0.2" in text
    t0, t1 = inference.steps_for(model, 0.25), inference.steps_for(model, 0.5)
    metas = [read_export_metadata(f) for f in files]
    assert all(m.kind == "resample" and (m.data["t0"], m.data["t1"]) == (t0, t1) for m in metas)
    assert metas[0].data["codes"] == grid.tolist()
    assert "identical to" in run("regenerate", files[2], "--model", model_file)
    # the same versions as the function gives, and only the region differs from the sound
    made = inference.resample_variants(model, grid, t0, t1, inference.sampling_params(
        {"seed": 1}), "preview", count=3)  # fmt: skip
    assert np.array_equal(made.codes[:, :, :t0], np.broadcast_to(grid[:, :t0], made.codes[:, :, :t0].shape))
    assert np.array_equal(made.codes[:, :, t1:], np.broadcast_to(grid[:, t1:], made.codes[:, :, t1:].shape))
    assert len({made.codes[i, :, t0:t1].tobytes() for i in range(3)}) == 3
    late = run("resample", wav, "--model", model_file, "--from", "0.5", "--to", "7", "-n", "1",
               "-o", tmp_path / "late", "--quality", "preview")  # fmt: skip
    assert "--to 7 s is past the end of in.wav (~1.0" in late and "region runs to the end" in late
    meta = read_export_metadata(next((tmp_path / "late").glob("*.wav")))
    assert (meta.data["t0"], meta.data["t1"]) == (t1, grid.shape[1])
    first, _ = inference.resample_region(model, grid, t0, t1, inference.sampling_params(
        {"seed": 1}), "preview")  # fmt: skip
    assert np.array_equal(first, inference.resample_variants(
        model, grid, t0, t1, inference.sampling_params({"seed": 1}), "preview", count=1).codes[0])  # fmt: skip


@pytest.mark.parametrize(("args", "message"), [
    (["generate", "{model}", "--from", "0.5"], "--from needs --continue"),
    (["generate", "{model}", "--continue", "{missing}"], "--continue {missing}: no such file"),
    (["generate", "{model}", "--continue", "{wav}", "--from", "0"], "keeps nothing"),
    (["resample", "{wav}", "--model", "{model}", "--from", "5"], "at or past the end of in.wav"),
    (["resample", "{wav}", "--model", "{model}", "--from", "0.5", "--to", "0.5"],
     "--to must come after --from"),
    (["resample", "{notes}", "--model", "{model}", "--from", "0"], "notes.txt: not audio"),
])  # fmt: skip
def test_continue_and_resample_refuse_what_they_cannot_use(
    model_file: Path, tmp_path: Path, args: list[str], message: str
) -> None:
    names = {"model": str(model_file), "wav": str(_tone(tmp_path / "in.wav")),
             "missing": str(tmp_path / "gone.wav"), "notes": str(tmp_path / "notes.txt")}
    (tmp_path / "notes.txt").write_text("not a sound")
    result = runner.invoke(app, [a.format(**names) for a in args] + ["-o", str(tmp_path / "o")])
    assert result.exit_code == 1 and message.format(**names) in result.output, result.output
    assert "Traceback" not in result.output


def test_continue_searches_only_the_kept_part_and_a_second_after_it(
    model_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 6-s drum roll continued from 0.3 s searched all 6 s (minutes); now the kept part and
    the context after it, with the same codes as the whole sound's. The search runs on one
    torch thread and leaves the process's count as it was."""
    wav = _tone(tmp_path / "long.wav", seconds=4.0)
    seen: list[tuple[int, int]] = []
    real_search = type(generate._load(model_file, "cpu").vqvae).search_codes

    def search(self: object, mel: torch.Tensor, *args: object) -> torch.Tensor:
        seen.append((int(mel.shape[-1]), torch.get_num_threads()))
        return real_search(self, mel, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(type(generate._load(model_file, "cpu").vqvae), "search_codes", search)
    torch.set_num_threads(2)
    out = tmp_path / "out"
    run("generate", model_file, "--continue", wav, "--from", "0.3", "--seconds", "0.2", "-n", "1",
        "-o", out, "--quality", "preview")  # fmt: skip
    assert torch.get_num_threads() == 2
    model = generate._load(model_file, "cpu")
    kept = inference.steps_for(model, 0.3)
    frames, threads = seen[0]
    assert threads == 1
    assert frames <= (kept + inference.steps_for(model, 1.0)) * model.vqvae.config.downsample + 1
    assert frames < inference.encoded_steps(model, 4 * 48000) / 2  # not the whole 4 s
    run("encode", wav, "--model", model_file, "-o", tmp_path / "all.npz")
    with np.load(tmp_path / "all.npz", allow_pickle=False) as npz:
        whole = npz["codes"]
    meta = read_export_metadata(next(out.glob("*.wav")))
    assert meta.data["prime"] == whole[:, :kept].tolist()


def test_encode_searches_codes_by_what_they_decode_to_unless_told_not_to(
    model_file: Path, tmp_path: Path
) -> None:
    from distill.shared.audio.io import load_audio
    from distill.shared.audio.mel import log_mel

    wav = _tone(tmp_path / "in.wav")
    model = generate._load(model_file, "cpu")
    mel = log_mel(load_audio(wav, 48000), model.mel_config)[None]  # as `encode` prepares it
    grids = {}
    for search in ("0", "16"):
        run("encode", wav, "--model", model_file, "-o", tmp_path / f"{search}.npz", "--search", search)
        with np.load(tmp_path / f"{search}.npz", allow_pickle=False) as npz:
            grids[search] = npz["codes"]
    assert np.array_equal(grids["0"], model.vqvae.encode(mel)[0].numpy())  # the nearest codes
    assert np.array_equal(grids["16"], model.vqvae.search_codes(mel, 16)[0].numpy())
    result = runner.invoke(app, ["encode", str(wav), "--model", str(model_file), "-o",
                                 str(tmp_path / "x.npz"), "--search", "-3"])  # fmt: skip
    assert result.exit_code == 1 and "search must be in [0, 256]" in result.output


def _refused(*args: object) -> str:
    """The output of a command that must fail with one `error:` line, exit code 1."""
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 1, result.output + repr(result.exception)
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "error: " in result.output and "Traceback" not in result.output
    return result.output


def test_bad_paths_devices_and_numbers_are_one_line_errors_before_any_draw(
    model_file: Path, tmp_path: Path
) -> None:
    wav, codes = _tone(tmp_path / "in.wav"), tmp_path / "codes.npz"
    run("encode", wav, "--model", model_file, "-o", codes, "--search", "0")
    afile = tmp_path / "afile.txt"
    afile.write_text("a file, not a folder")
    gen = ["generate", model_file, "-n", "1", "--seconds", "0.2"]
    cases = [
        (["generate", model_file, "--continue", wav, "--from", "nan"],
         "--from must be a number of seconds, got nan"),
        (["resample", codes, "--model", model_file, "--from", "nan"], "--from must be a number"),
        (["resample", codes, "--model", model_file, "--from", "0.1", "--to", "nan"],
         "--to must be a number"),
        (["decode", tmp_path / "gone.npz", "--model", model_file], "gone.npz: no such file"),
        (["decode", tmp_path, "--model", model_file], "that is a folder, not a file"),
        ([*gen, "-o", afile], f"-o {afile}: that is a file, not a folder"),
        ([*gen, "-o", afile / "sub"], f"-o {afile / 'sub'}: cannot make the folder"),
        (["resample", codes, "--model", model_file, "--from", "0.1", "-o", afile],
         "that is a file, not a folder"),
        (["encode", wav, "--model", model_file, "-o", tmp_path / "nodir" / "x.npz"],
         f"no folder {tmp_path / 'nodir'}"),
        ([*gen, "--device", "bogus"], "--device 'bogus' is not one of auto, cpu, cuda"),
        ([*gen, "-n", "0"], "-n must be in [1, 256], got 0"),
        ([*gen, "--seconds", "nan"], "--seconds must be a finite number"),
    ]  # fmt: skip
    if not torch.cuda.is_available():
        cases.append(([*gen, "--device", "cuda"], "--device 'cuda': CUDA is not available"))
    if not torch.backends.mps.is_available():
        cases.append(([*gen, "--device", "mps"], "--device 'mps': Metal is not available"))
    for args, says in cases:
        output = _refused(*args)
        assert says in output, (args, output)
        assert "generating" not in output and "resampling" not in output  # nothing drawn
    assert "index=0" in run(*gen, "--device", "auto", "-o", tmp_path / "auto")


def test_continue_resample_and_decode_check_every_option_before_the_sound(
    model_file: Path, tmp_path: Path
) -> None:
    """Before: `generate --continue` and `resample` checked their sampling options, --bits and
    -o only after encoding the sound (a 15-s loop: 37 s to 2 min 15 s, then the error), and
    `decode` its -o suffix and --bits after decoding. The input here is one the encoding (or
    the codes' reading) refuses: a refusal naming the option shows the option came first."""
    notes = tmp_path / "notes.wav"
    notes.write_text("not a sound")
    afile = tmp_path / "afile.txt"
    afile.write_text("a file, not a folder")
    o = tmp_path / "o"
    cases = [
        (["--temperature", "0"], "--temperature: temperature must be > 0"),
        (["--top-k", "-1"], "--top-k: top_k must be >= 0"),
        (["--top-p", "2"], "--top-p: top_p must be in (0, 1]"),
        (["--min-p", "2"], "--min-p: min_p must be in [0, 1)"),
        (["--change-temperature", "0"], "--change-temperature: change_temperature must be > 0"),
        (["--seed", "-1"], "--seed: seed must be in 0.."),
        (["--bits", "8"], "--bits must be one of 16, 24, float, got '8'"),
        (["--format", "flac", "--bits", "float"],
         "FLAC holds integer samples: use --bits 16 or 24, or --format wav"),
        (["-o", afile], f"-o {afile}: that is a file, not a folder"),
        (["-o", afile / "sub"], f"-o {afile / 'sub'}: cannot make the folder ({afile} is a file)"),
    ]  # fmt: skip
    for command in (["generate", model_file, "--continue", notes, "--seconds", "0.2"],
                    ["resample", notes, "--model", model_file, "--from", "0"]):  # fmt: skip
        for args, says in cases:
            output = _refused(*command, "-n", "1", "-o", o, *args)
            assert says in output and "not audio" not in output, (command[0], args, output)
    output = _refused("resample", notes, "--model", model_file, "--from", "0.5", "--to", "0.2",
                      "-o", o)  # fmt: skip
    assert "--to must come after --from" in output
    assert not o.exists()
    for args, says in ((["-o", tmp_path / "x.mp3"], "cannot export to '.mp3' files"),
                       (["-o", tmp_path / "x.flac", "--bits", "float"],
                        "FLAC holds integer samples: use --bits 16 or 24, or a .wav -o"),
                       (["--bits", "12", "-o", tmp_path / "x.wav"], "--bits must be one of")):  # fmt: skip
        output = _refused("decode", notes, "--model", model_file, *args)
        assert says in output and "not a codes file" not in output, output
        assert "--format" not in output  # decode has none


def test_a_new_out_folder_named_like_a_sound_file_is_refused(model_file: Path, tmp_path: Path) -> None:
    """Before: `generate -o kick.wav` made a folder named kick.wav, and `resample -o x.flac` a
    folder of .wav files. -o is a folder for these commands: a new one named like a file is
    refused before anything is made; an existing folder is used whatever its name."""
    wav = _tone(tmp_path / "in.wav")
    for command in (["generate", model_file, "--seconds", "0.2"],
                    ["resample", wav, "--model", model_file, "--from", "0.5"]):  # fmt: skip
        for name in ("kick.wav", "x.FLAC", "codes.npz"):
            output = _refused(*command, "-n", "1", "--quality", "preview", "-o", tmp_path / name)
            assert f"-o {tmp_path / name}: -o is the folder the files go in" in output, output
            assert not (tmp_path / name).exists()
    (tmp_path / "old.wav").mkdir()
    run("generate", model_file, "-n", "1", "--seconds", "0.2", "--quality", "preview", "-o",
        tmp_path / "old.wav")  # fmt: skip
    assert len(list((tmp_path / "old.wav").iterdir())) == 1


def test_tiny_temperatures_are_refused_and_the_bound_draws_cleanly(
    model_file: Path, tmp_path: Path
) -> None:
    import warnings

    from distill.shared.model.sampling import MIN_TEMPERATURE

    gen = ["generate", model_file, "-n", "1", "--seconds", "0.3", "--quality", "preview"]
    for flag in ("--temperature", "--change-temperature"):
        for tiny in ("1e-40", "1e-300"):  # float32 0 or subnormal: NaN draws, a ZeroDivisionError
            output = _refused(*gen, flag, tiny, "-o", tmp_path / "no")
            assert f"{flag}: {flag[2:].replace('-', '_')} must be > 0 (at least 1e-06)" in output
    assert not (tmp_path / "no").exists()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an overflow or NaN in the sampler is a RuntimeWarning
        for extra in ([], ["--top-p", "0.5"]):
            run(*gen, "--temperature", str(MIN_TEMPERATURE), "--change-temperature",
                str(MIN_TEMPERATURE), *extra, "-o", tmp_path / "cold")  # fmt: skip
    made = sorted((tmp_path / "cold").glob("*.wav"))
    assert len(made) == 2 and all(np.isfinite(sf.read(f)[0]).all() for f in made)
    # a model file whose stored change temperature the sampler cannot carry: drawn without it
    odd = tmp_path / "odd.distill"
    save_model(odd, dataclasses.replace(tiny_model(), summary={"sampling": {"change_temperature": 1e-300}}))
    text = run("generate", odd, "-n", "1", "--seconds", "0.3", "-o", tmp_path / "odd",
               "--quality", "preview")  # fmt: skip
    assert "stores change temperature 1e-300" in text and "change_temperature=1.0" in text


def test_encode_trims_silence_that_sits_at_a_dc_offset(model_file: Path, tmp_path: Path) -> None:
    """Before: a 0.2-s hit and 2 s of silence encoded to 20 steps, the same at +0.05 DC to 207
    (the offset counted as sound), and a file of a constant 0.5 was encoded as a sound."""
    t = np.arange(round(0.2 * 48000)) / 48000
    hit = np.concatenate([0.8 * np.sin(2 * math.pi * 80 * t) * np.exp(-t * 30), np.zeros(96000)])
    steps = {}
    for name, sound in (("hit", hit), ("dc", hit + 0.05)):
        sf.write(tmp_path / f"{name}.wav", sound.astype(np.float32), 48000, subtype="FLOAT")
        text = run("encode", tmp_path / f"{name}.wav", "--model", model_file, "-o",
                   tmp_path / f"{name}.npz", "--search", "0")  # fmt: skip
        steps[name] = text.split(" steps")[0].rsplit(" ", 1)[1]
    assert steps["dc"] == steps["hit"], steps
    sf.write(tmp_path / "only.wav", np.full(48000, 0.5, np.float32), 48000, subtype="FLOAT")
    output = _refused("encode", tmp_path / "only.wav", "--model", model_file, "-o",
                      tmp_path / "only.npz", "--search", "0")  # fmt: skip
    assert "only.wav: all silent but for a constant offset (DC +0.5)" in output


def test_a_sound_shorter_than_one_code_step_is_refused(model_file: Path, tmp_path: Path) -> None:
    """Before: 1-10 ms files encoded to one step, which decodes to a single sample, silently.
    The tiny model's step is 512 samples (10.7 ms at 48 kHz); one of exactly that is taken."""
    noise = np.random.default_rng(0).uniform(0.3, 0.6, 512) * np.resize([1, -1], 512)
    for n in (48, 511):
        sf.write(tmp_path / f"n{n}.wav", noise[:n], 48000, subtype="FLOAT")
        for command in (["encode", tmp_path / f"n{n}.wav", "--model", model_file, "--search", "0"],
                        ["generate", model_file, "--continue", tmp_path / f"n{n}.wav", "-n", "1"],
                        ["resample", tmp_path / f"n{n}.wav", "--model", model_file, "--from",
                         "0"]):  # fmt: skip
            output = _refused(*command, "-o", tmp_path / "out")
            assert (f"n{n}.wav: {n / 48:.1f} ms once its silence is trimmed; this model encodes "
                    "a sound of one code step at least, 10.7 ms (512 samples at 48000 Hz)"
                    ) in " ".join(output.split()), output  # fmt: skip
    sf.write(tmp_path / "whole.wav", noise, 48000, subtype="FLOAT")
    assert "x 2 steps" in run("encode", tmp_path / "whole.wav", "--model", model_file, "-o",
                              tmp_path / "whole.npz", "--search", "0")  # fmt: skip


def test_encode_prints_the_path_it_wrote(model_file: Path, tmp_path: Path) -> None:
    wav = _tone(tmp_path / "in.wav")
    text = run("encode", wav, "--model", model_file, "-o", tmp_path / "noext", "--search", "0")
    assert text.startswith(f"{tmp_path / 'noext.npz'}: ") and (tmp_path / "noext.npz").is_file()
    folder = tmp_path / "codes"
    folder.mkdir()
    text = run("encode", wav, "--model", model_file, "-o", f"{folder}/", "--search", "0")
    assert text.startswith(f"{folder / 'in.npz'}: ") and (folder / "in.npz").is_file()
    assert not (tmp_path / "codes.npz").exists()
    assert "no folder" in _refused("encode", wav, "--model", model_file, "-o",
                                   f"{tmp_path / 'new'}/", "--search", "0")  # fmt: skip


def test_continue_checks_the_length_before_encoding_and_notes_from_past_the_end(
    model_file: Path, tmp_path: Path
) -> None:
    long = tmp_path / "long.wav"  # a steady tone: nothing for preparation to trim
    sf.write(long, 0.3 * np.sin(2 * math.pi * 220 * np.arange(59 * 48000) / 48000), 48000)
    output = _refused("generate", model_file, "--continue", long, "-n", "1", "--seconds", "2",
                      "-o", tmp_path / "o")  # fmt: skip
    assert "--continue keeps ~59" in output and "over 60 s" in output
    output = _refused("generate", model_file, "--continue", long, "--from", "30", "-n", "1",
                      "--seconds", "40", "-o", tmp_path / "o")  # fmt: skip
    assert "s of long.wav; with --seconds 40 more that is over 60 s" in output
    assert not (tmp_path / "o").exists()
    # the estimate is the encoder's own step count: 1 s kept plus the most that fits is drawn
    wav = _tone(tmp_path / "in.wav")
    model = generate._load(model_file, "cpu")
    from distill.shared.audio.io import load_audio

    audio = load_audio(wav, model.mel_config.sample_rate)
    assert inference.encoded_steps(model, audio.shape[0]) == inference.encode(model, audio, 0).shape[1]
    text = run("generate", model_file, "--continue", wav, "--from", "100", "-n", "1", "--seconds",
               "0.2", "-o", tmp_path / "c", "--quality", "preview")  # fmt: skip
    assert "--from 100 s is past the end of in.wav (~1.0" in text and "whole sound is kept" in text


def test_a_long_input_is_refused_from_its_header(model_file: Path, tmp_path: Path) -> None:
    rate = 8000  # 200 s of silence, then a tone: trimmed, the sound would be under a second
    t = np.arange(rate // 2) / rate
    sound = np.concatenate([np.zeros(200 * rate), 0.5 * np.sin(2 * math.pi * 300 * t)])
    sf.write(tmp_path / "quiet.wav", sound, rate, subtype="PCM_16")
    output = _refused("encode", tmp_path / "quiet.wav", "--model", model_file, "-o",
                      tmp_path / "x.npz", "--search", "0")  # fmt: skip
    assert "quiet.wav: audio is 200.5 s long; at most 60 s" in output
    assert not (tmp_path / "x.npz").exists()


def test_no_file_is_replaced_unless_forced(model_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    gen = ["generate", model_file, "-n", "2", "--seconds", "0.2", "--seed", "3", "-o", out,
           "--quality", "preview"]  # fmt: skip
    run(*gen)
    first = {f.name: f.read_bytes() for f in out.glob("*.wav")}
    text = run(*gen[:5], "0.3", *gen[6:], "--temperature", "0.5")  # other settings, same names
    assert f"{out / 'tiny-s3-000-2.wav'}  index=0" in text and f"{out / 'tiny-s3-001-2.wav'}" in text
    assert all((out / name).read_bytes() == data for name, data in first.items())
    meta = read_export_metadata(out / "tiny-s3-000-2.wav")
    assert meta.data["seconds"] == 0.3 and meta.title == "tiny-s3-000-2"
    assert "identical to" in run("regenerate", out / "tiny-s3-000-2.wav", "--model", model_file)
    # single files: refused when they exist, replaced with --force
    made = out / "tiny-s3-000.wav"
    again = out / "tiny-s3-000.regenerated.wav"
    assert "identical to" in run("regenerate", made, "--model", model_file)
    before = again.stat().st_mtime_ns
    assert "or --force to replace it" in _refused("regenerate", made, "--model", model_file)
    assert "or --force to replace it" in _refused("regenerate", made, "--model", model_file, "-o",
                                      out / "tiny-s3-001.wav")  # fmt: skip
    assert (out / "tiny-s3-001.wav").read_bytes() == first["tiny-s3-001.wav"]
    assert again.stat().st_mtime_ns == before
    assert "identical to" in run("regenerate", made, "--model", model_file, "--force")
    wav, codes = _tone(tmp_path / "in.wav"), tmp_path / "codes.npz"
    run("encode", wav, "--model", model_file, "-o", codes, "--search", "0")
    assert "or --force to replace it" in _refused("encode", wav, "--model", model_file, "-o", codes)
    run("encode", wav, "--model", model_file, "-o", codes, "--search", "0", "--force")
    run("decode", codes, "--model", model_file, "-o", tmp_path / "d.wav", "--quality", "preview")
    kept = (tmp_path / "d.wav").read_bytes()
    assert "or --force to replace it" in _refused("decode", codes, "--model", model_file, "-o",
                                      tmp_path / "d.wav")  # fmt: skip
    assert (tmp_path / "d.wav").read_bytes() == kept
    run("decode", codes, "--model", model_file, "-o", tmp_path / "d.wav", "--force")


def test_trim_is_recorded_applied_and_replayed_by_generate_and_resample(
    model_file: Path, tmp_path: Path
) -> None:
    """--trim ends each sound as ``inference.finish`` does and records it, and regenerate ends
    it the same way. (This random model's sounds ring to their end, so here nothing is cut: a
    trained model's are, in tests/shared/train/test_prior_small_data.py.)"""
    wav = _tone(tmp_path / "in.wav")
    model = generate._load(model_file, "cpu")
    rate = model.mel_config.sample_rate
    for command in (["generate", model_file, "-n", "2", "--seconds", "0.3"],
                    ["resample", wav, "--model", model_file, "--from", "0.2", "-n", "2"]):  # fmt: skip
        args = [*command, "--seed", "4", "--quality", "preview", "--bits", "float"]
        text = run(*args, "--trim", "10", "-o", tmp_path / f"{command[0]}-trimmed")
        run(*args, "-o", tmp_path / f"{command[0]}-whole")
        trimmed = sorted((tmp_path / f"{command[0]}-trimmed").glob("*.wav"))
        whole = sorted((tmp_path / f"{command[0]}-whole").glob("*.wav"))
        assert len(trimmed) == len(whole) == 2 and "trim=10.0" in text
        for cut, full in zip(trimmed, whole, strict=True):
            a, b = sf.read(cut, dtype="float32")[0], sf.read(full, dtype="float32")[0]
            want = inference.finish(model, read_export_metadata(cut).data, b)
            assert len(a) == len(want) and f"length={len(a) / rate:.2f}s" in text
            np.testing.assert_allclose(a, want, rtol=1e-6, atol=1e-7)
            assert read_export_metadata(cut).data["trim"] == 10.0
        assert "trim" not in read_export_metadata(whole[0]).data  # off: not recorded, as before it
        assert "identical to" in run("regenerate", trimmed[1], "--model", model_file)

@pytest.mark.parametrize("command", ["generate", "resample"])
def test_a_bad_trim_is_refused_before_anything_is_drawn(model_file: Path, tmp_path: Path,
                                                        command: str) -> None:  # fmt: skip
    args = (["generate", str(model_file)] if command == "generate"
            else ["resample", str(_tone(tmp_path / "in.wav")), "--model", str(model_file),
                  "--from", "0"])  # fmt: skip
    for bad, why in (("5", "must be in [10, 120], got 5.0"), ("nan", "must be a finite number")):
        result = runner.invoke(app, [*args, "--trim", bad, "-o", str(tmp_path / "out")])
        assert result.exit_code == 1 and f"--trim {why}" in result.output, result.output
    assert not (tmp_path / "out").exists()
