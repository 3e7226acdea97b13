"""A generate job (``infer.run_job``): the files it stores are the in-memory path's, byte for
byte, a quiet draw drawn again included; it holds one batch's audio, not all of it; a cancel
stores nothing and leaves no file; its progress ends at the end.

The tiny random model of ``test_infer``; a draw is made "quiet" by raising the silent floor to
the median peak of the request's first draws, as ``tests/shared/model/test_inference.py`` does.
"""

from __future__ import annotations

import hashlib
import tempfile
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from distill.shared.audio.export import ExportMetadata, export_audio, read_export_metadata
from distill.shared.errors import JobCancelled
from distill.shared.model import inference as inf
from distill.shared.model.modelfile import DistillModel, load_model, save_model
from distill.workers import infer
from tests.workers.test_infer import FakeArtifacts, FakeContext, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

# 8 sounds of 1 s: three a batch on a CPU (CPU_RENDER_FRAMES), so the first draws come in three
# batches and the quiet half drawn again in two
COUNT, SECONDS, SEED = 8, 1.0, 3


class ProgressContext(FakeContext):
    def __init__(self, params: dict[str, Any] | None = None) -> None:
        super().__init__(params)
        self.events: list[dict[str, Any]] = []  # each progress call's fields, with its fraction

    def progress(self, fraction: float | None = None, **fields: Any) -> None:
        super().progress(fraction, **fields)
        self.events.append({"fraction": fraction, **fields})


def job(tmp_path: Path, ctx: FakeContext, fmt: str = "wav", **params: Any) -> DistillModel:
    """``ctx`` set up for a generate job on the tiny model; the model as the worker loads it."""
    infer.CACHE = infer.ModelCache()
    path = tmp_path / "tiny.distill"
    save_model(path, tiny_model())
    sha = ctx.artifacts.add(path)
    ctx.info.params.update({"op": "generate", "model": sha, "count": COUNT, "seconds": SECONDS,
                            "seed": SEED, "quality": "preview", "format": fmt, **params})  # fmt: skip
    return load_model(path, "cpu")


def quiet_half(model: DistillModel, monkeypatch: pytest.MonkeyPatch, count: int = COUNT
               ) -> np.ndarray:  # fmt: skip
    """Raise the silent floor to the median peak of the request's first draws: the quieter
    half of them are drawn again (and some of those again). Returns the first draws' audio."""
    plain = inf.generate(model, count=count, seconds=SECONDS, params=params_of(model),
                         quality="preview")  # fmt: skip
    assert plain.redrawn == 0  # a random model is loud enough for the usual floor
    peaks = 20 * np.log10(np.abs(plain.audio).max(axis=-1))
    monkeypatch.setattr(inf, "SILENT_PEAK_DB", float(np.median(peaks)))
    return plain.audio


def params_of(model: DistillModel) -> Any:
    return inf.sampling_params({"seed": SEED}, model)


def exported(model: DistillModel, audio: np.ndarray, index: int, fmt: str, folder: Path) -> bytes:
    """Sound ``index`` of the in-memory path exported as a generate job's file."""
    name = f"gen-{SEED}-{index:03d}.{fmt}"
    recipe = inf.generate_recipe(params_of(model), count=COUNT, seconds=SECONDS,
                                 quality="preview", index=index,
                                 render_frames=inf.CPU_RENDER_FRAMES)  # fmt: skip
    meta = ExportMetadata(kind="generate", model_id=model.model_id, title=name, data=recipe)
    export_audio(folder / name, audio, model.mel_config.sample_rate,
                 subtype="FLOAT" if fmt == "wav" else "PCM_24", metadata=meta)  # fmt: skip
    return (folder / name).read_bytes()


@pytest.mark.parametrize("fmt", ["wav", "flac"])
def test_a_job_stores_the_in_memory_sounds_with_the_quiet_ones_drawn_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fmt: str
) -> None:
    ctx = ProgressContext()
    model = job(tmp_path, ctx, fmt)
    first = quiet_half(model, monkeypatch)
    kept = inf.generate(model, count=COUNT, seconds=SECONDS, params=params_of(model),
                        quality="preview")  # fmt: skip
    assert kept.redrawn > 3  # drawn again in more than one batch (3 a batch)
    result = infer.run_job(ctx)  # type: ignore[arg-type]
    sounds = result["sounds"]
    assert [s["name"] for s in sounds] == [f"gen-{SEED}-{i:03d}.{fmt}" for i in range(COUNT)]
    assert [s["index"] for s in sounds] == list(range(COUNT))
    assert result["redrawn"] == kept.redrawn
    (tmp_path / "ref").mkdir()
    for i, s in enumerate(sounds):
        want = exported(model, kept.audio[i], i, fmt, tmp_path / "ref")
        got = ctx.artifacts.stored[s["artifact"]]
        assert got == want, f"sound {i} differs"
    # the first draws that were drawn again were never stored: the store holds the result
    assert set(ctx.artifacts.stored) == {s["artifact"] for s in sounds}
    # a file drawn again replays from its own recipe to its samples (distill regenerate)
    again = [i for i in range(COUNT) if not np.array_equal(first[i], kept.audio[i])]
    assert len(again) == kept.redrawn
    path = tmp_path / sounds[again[-1]]["name"]
    path.write_bytes(ctx.artifacts.stored[sounds[again[-1]]["artifact"]])
    replayed = inf.replay(model, "generate", read_export_metadata(path).data)
    np.testing.assert_array_equal(replayed, kept.audio[again[-1]])
    # progress: never back, and at the end at the end
    fractions = [e["fraction"] for e in ctx.events]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    decoding = [e for e in ctx.events if e["stage"] == "decoding"]
    assert [e["done"] for e in decoding] == [3, 6, 8] and decoding[-1]["total"] == COUNT
    assert ctx.events[-1]["stage"] == "redrawing"


def test_a_job_continues_its_prime_and_each_file_records_it(tmp_path: Path) -> None:
    """A job with ``prime`` continues it, as a request does (the job dropped it: every sound
    was drawn from nothing); each file's recipe holds the codes it continued and replays."""
    ctx = FakeContext()
    model = job(tmp_path, ctx, count=3)
    q = model.vqvae.config.levels
    prime = np.random.default_rng(0).integers(0, model.vqvae.config.codebook_size, (q, 12))
    ctx.info.params["prime"] = prime.tolist()
    want = inf.generate(model, count=3, seconds=SECONDS, params=params_of(model),
                        quality="preview", prime=prime)  # fmt: skip
    np.testing.assert_array_equal(want.codes[:, :, :12], np.broadcast_to(prime, (3, q, 12)))
    result = infer.run_job(ctx)  # type: ignore[arg-type]
    for i, s in enumerate(result["sounds"]):
        path = tmp_path / s["name"]
        path.write_bytes(ctx.artifacts.stored[s["artifact"]])
        data = read_export_metadata(path).data
        assert data["prime"] == prime.tolist()
        np.testing.assert_array_equal(inf.replay(model, "generate", data), want.audio[i])
    assert result["params"]["prime_steps"] == 12


class HashedArtifacts(FakeArtifacts):
    """A store that keeps the sha256 of what it is given, not the bytes (which would be the
    whole request's audio in this process)."""

    def put_bytes(self, data: bytes, *, kind: str, name: str, job: str | None = None) -> str:
        sha = hashlib.sha256(data).hexdigest()
        self.stored[sha] = b""
        return sha


def test_a_job_holds_one_batch_of_audio_not_the_whole_request(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before: the job kept every sound's audio until the last was decoded (256 sounds of 60
    s: 2.9 GB). Counted by tracemalloc, which sees numpy's arrays: a batch is 3 of 32 sounds."""
    ctx = FakeContext()
    ctx.artifacts = HashedArtifacts()
    model = job(tmp_path, ctx, count=32)
    infer.CACHE.get(ctx.info.params["model"], "cpu", ctx.artifacts.get_file)  # loaded before
    quiet_half(model, monkeypatch, count=32)  # drawn again: their batches too
    whole = 32 * round(SECONDS * model.mel_config.sample_rate) * 4  # the request's float32
    tracing = tracemalloc.is_tracing()  # already (python -X tracemalloc): measured from here
    if not tracing:
        tracemalloc.start()
    before, _ = tracemalloc.get_traced_memory()
    tracemalloc.reset_peak()
    try:
        result = infer.run_job(ctx)  # type: ignore[arg-type]
        peak = tracemalloc.get_traced_memory()[1] - before
    finally:
        if not tracing:
            tracemalloc.stop()
    assert len(result["sounds"]) == 32 and result["redrawn"] > 0
    assert peak < whole / 2, f"peak {peak / 2**20:.1f} MiB of {whole / 2**20:.1f} MiB of audio"


@pytest.mark.parametrize("stage", ["decoding", "redrawing"])
def test_a_job_cancelled_while_it_decodes_or_draws_again_stores_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stage: str
) -> None:
    class CancelledAt(ProgressContext):
        def check_cancel(self) -> None:
            if any(e["stage"] == stage for e in self.events):
                raise JobCancelled("cancelled by user")

    ctx = CancelledAt()
    model = job(tmp_path, ctx)
    quiet_half(model, monkeypatch)
    spool = tmp_path / "tmp"
    spool.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(spool))
    with pytest.raises(JobCancelled):
        infer.run_job(ctx)  # type: ignore[arg-type]
    assert ctx.events[-1]["stage"] == stage
    if stage == "decoding":  # heard after the first batch, not after the last
        assert ctx.events[-1]["done"] < COUNT
    assert not ctx.artifacts.stored  # nothing stored (the model is the only file it knows)
    assert not list(spool.iterdir())  # and the sounds written so far are gone
