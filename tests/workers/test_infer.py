"""distill.infer: every op through the worker's request handler, bad requests, the model cache.

A tiny model with random weights, built here and saved with ``save_model``: plumbing, not
quality. One slow test goes through a real broker and worker.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
import torch

from distill.shared.audio.mel import MelConfig
from distill.shared.audio.phase import QUALITY_PRESETS
from distill.shared.errors import BAD_REQUEST, MODEL_FORMAT, DistillError, code_of
from distill.shared.ids import sha256_file
from distill.shared.model import inference
from distill.shared.model.codes import CodeGrid, EditSession, edit_from_dict
from distill.shared.model.inference import CPU_RENDER_FRAMES, QUIET_UNDER_LOUDEST_DB
from distill.shared.model.modelfile import DistillModel, load_model, save_model
from distill.shared.model.prior import Prior, PriorConfig
from distill.shared.model.vqvae import VQVAE, VQVAEConfig
from distill.workers import infer
from distill.workers.runtime.context import JobInfo

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

Q, K = 3, 16
RATE = 48000


def tiny_model(with_prior: bool = True) -> DistillModel:
    torch.manual_seed(0)
    vqvae = VQVAE(VQVAEConfig(channels=16, latent_dim=8, blocks=1, codebook_size=K, levels=Q))
    prior = (
        Prior(PriorConfig(levels=Q, codebook_size=K, embed_dim=8, hidden=16))
        if with_prior
        else None
    )
    return DistillModel(mel_config=MelConfig(), vqvae=vqvae.eval(),
                        prior=None if prior is None else prior.eval(), summary={"test": True})  # fmt: skip


class FakeArtifacts:
    def __init__(self) -> None:
        self.files: dict[str, Path] = {}
        self.stored: dict[str, bytes] = {}
        self.put_folders: set[Path] = set()  # where put_file found its files

    def add(self, path: Path) -> str:
        sha = sha256_file(path)
        self.files[sha] = path
        return sha

    def get_file(self, sha: str) -> Path:
        if sha not in self.files:
            raise DistillError(f"artifact {sha[:12]} not found")
        return self.files[sha]

    def get_bytes(self, sha: str) -> bytes:
        return self.get_file(sha).read_bytes()

    def put_bytes(self, data: bytes, *, kind: str, name: str, job: str | None = None) -> str:
        sha = hashlib.sha256(data).hexdigest()
        self.stored[sha] = data
        return sha

    def put_file(self, path: Path, *, kind: str, name: str, job: str | None = None) -> str:
        self.put_folders.add(path.parent)
        return self.put_bytes(path.read_bytes(), kind=kind, name=name, job=job)


class FakeContext:
    def __init__(self, params: dict[str, Any] | None = None) -> None:
        self.info = JobInfo(job_id="j1", service=infer.SERVICE, params=params or {})
        self.device = "cpu"
        self.artifacts = FakeArtifacts()
        self.progressed: list[float | None] = []

    @property
    def cancelled(self) -> bool:
        return False

    def check_cancel(self) -> None:
        pass

    def progress(self, fraction: float | None = None, **fields: Any) -> None:
        self.progressed.append(fraction)


@pytest.fixture
def ctx(tmp_path: Path) -> FakeContext:
    infer.CACHE = infer.ModelCache()
    return FakeContext()


@pytest.fixture
def model_sha(ctx: FakeContext, tmp_path: Path) -> str:
    path = tmp_path / "tiny.distill"
    save_model(path, tiny_model())
    return ctx.artifacts.add(path)


def call(ctx: FakeContext, op: str, sha: str, **body: Any) -> dict[str, Any]:
    return infer.handle_request(ctx, {"op": op, "model": sha, **body})  # type: ignore[arg-type]


def sound(seconds: float = 0.5, hz: float = 220.0) -> np.ndarray:
    t = np.arange(int(seconds * RATE)) / RATE
    return (0.5 * np.sin(2 * math.pi * hz * t) * np.exp(-4 * t)).astype(np.float32)


def test_encode_decode_round_trip_and_cache(ctx: FakeContext, model_sha: str) -> None:
    enc = call(ctx, "encode", model_sha, audio=sound(), sample_rate=RATE)
    codes = enc["codes"]
    assert codes.shape[0] == Q and codes.dtype == np.int64 and enc["codebook_size"] == K
    assert codes.shape[1] == int(0.5 * RATE) // 512 + 1 and (codes >= 0).all()
    dec = call(ctx, "decode", model_sha, codes=codes)
    assert dec["audio"].dtype == np.float32 and dec["sample_rate"] == RATE
    assert dec["phase"] == [4, "vocoder"]  # the preset 'fast' names, for an export's recipe
    assert dec["audio"].shape == ((codes.shape[1] - 1) * 512,)
    assert dec["mel"].shape == (128, codes.shape[1]) and np.isfinite(dec["audio"]).all()
    again = call(ctx, "decode", model_sha, codes=codes)
    assert np.array_equal(again["audio"], dec["audio"])
    assert infer.CACHE.loads == 1  # the second and third request loaded nothing
    prog = call(ctx, "progressive", model_sha, audio=sound(), sample_rate=RATE)
    assert prog["audio"].shape == (Q, dec["audio"].shape[0])
    assert np.array_equal(prog["audio"][-1], dec["audio"])
    coarse = call(ctx, "decode", model_sha, codes=codes, levels=1)
    assert np.array_equal(prog["audio"][0], coarse["audio"])


def test_encode_resamples_and_mixes_down(ctx: FakeContext, model_sha: str) -> None:
    stereo = np.stack([sound(0.5), sound(0.5, 330.0)])
    low = stereo[:, ::2].copy()  # (2, samples) at 24 kHz
    out = call(ctx, "encode", model_sha, audio=low, sample_rate=RATE // 2)
    assert out["codes"].shape == (Q, int(0.5 * RATE) // 512 + 1)


def test_generate_is_seeded_and_carries_its_params(ctx: FakeContext, model_sha: str) -> None:
    a = call(ctx, "generate", model_sha, count=3, seconds=0.3, seed=5, temperature=0.9)
    b = call(ctx, "generate", model_sha, count=3, seconds=0.3, seed=5, temperature=0.9)
    # exactly 0.3 s: 14400 samples need 30 frames ((30 - 1) x 512 >= 14400), cut to 14400
    assert a["audio"].shape == (3, round(0.3 * RATE)) and a["codes"].shape == (3, Q, 30)
    assert np.array_equal(a["audio"], b["audio"]) and np.array_equal(a["codes"], b["codes"])
    assert a["params"] == {"temperature": 0.9, "top_k": 0, "top_p": 1.0, "min_p": 0.01,
                           "change_temperature": 1.0, "seed": 5, "count": 3, "seconds": 0.3,
                           "quiet_under_loudest_db": QUIET_UNDER_LOUDEST_DB,
                           "exact_length": True, "render_frames": CPU_RENDER_FRAMES,
                           "phase": [4, "vocoder"]}  # fmt: skip
    assert a["quality"] == "fast"
    assert a["model_id"] and len(a["model_id"]) == 64
    primed = call(ctx, "generate", model_sha, seconds=0.1, prime=a["codes"][0][:, :5])
    assert np.array_equal(primed["codes"][0][:, :5], a["codes"][0][:, :5])
    assert a["lengths"] == [round(0.3 * RATE)] * 3


def test_generate_with_trim_gives_each_sounds_length_and_records_it(ctx: FakeContext,
                                                                     model_sha: str) -> None:  # fmt: skip
    """Each sound ended by ``trim_tail``, zero past its length in the (count, samples) array;
    the params a client's export records name the trim (and replay it: inference.replay)."""
    from distill.shared.audio.io import trim_tail

    whole = call(ctx, "generate", model_sha, count=3, seconds=0.3, seed=5)
    cut = call(ctx, "generate", model_sha, count=3, seconds=0.3, seed=5, trim=10.0)
    assert cut["params"] == {**whole["params"], "trim": 10.0}
    assert cut["audio"].shape == whole["audio"].shape and len(cut["lengths"]) == 3
    for i in range(3):
        want = trim_tail(whole["audio"][i], RATE, 10.0)
        assert cut["lengths"][i] == len(want)
        assert np.array_equal(cut["audio"][i, : len(want)], want)
        assert not cut["audio"][i, len(want):].any()
    # a sound that fades: the array is cut where the trim says, the rest zero
    model = infer.CACHE.get(model_sha, "cpu", ctx.artifacts.get_file)
    recipe = {**cut["params"], "index": 2, "quality": cut["quality"], "threads": cut["threads"]}
    assert np.array_equal(inference.replay(model, "generate", recipe),
                          cut["audio"][2, : cut["lengths"][2]])  # fmt: skip
    with pytest.raises(inference.BadInput, match="trim must be in"):
        call(ctx, "generate", model_sha, seconds=0.3, trim=200)


def test_blend_at_0_and_1_equals_the_decodes(ctx: FakeContext, model_sha: str) -> None:
    a, b = sound(0.4, 200.0), sound(0.4, 900.0)
    for amount, source in ((0.0, a), (1.0, b)):
        blended = call(ctx, "blend", model_sha, a=a, b=b, amount=amount, sample_rate=RATE)
        # blend mixes latents and quantizes them: the quantizer's own codes (no search)
        codes = call(ctx, "encode", model_sha, audio=source, sample_rate=RATE, search=0)["codes"]
        decoded = call(ctx, "decode", model_sha, codes=codes)
        assert np.array_equal(blended["codes"], codes)
        assert np.array_equal(blended["audio"], decoded["audio"])
    mid = call(ctx, "blend", model_sha, a=a, b=b, amount=0.5, sample_rate=RATE)
    assert mid["codes"].shape == codes.shape


def test_resample_region_keeps_the_outside(ctx: FakeContext, model_sha: str) -> None:
    codes = call(ctx, "encode", model_sha, audio=sound(), sample_rate=RATE)["codes"]
    out = call(ctx, "resample_region", model_sha, codes=codes, t0=10, t1=20, seed=1)
    assert np.array_equal(out["codes"][:, :10], codes[:, :10])
    assert np.array_equal(out["codes"][:, 20:], codes[:, 20:])
    assert out["audio"].shape[0] == (codes.shape[1] - 1) * 512


EDITS: list[dict[str, Any]] = [
    {"op": "set_cell", "level": 1, "t": 3, "code": 7},
    {"op": "replace", "level": 0, "t": 2, "codes": [[1, 2, 3]], "source": "paste"},
    {"op": "shift", "region": [0, 2, 0, 10], "offset": 3},
    {"op": "repeat", "region": [0, Q, 0, 4], "times": 3},
    {"op": "reverse", "region": [0, Q, 5, 15]},
    {"op": "keep_levels", "k": 1},
]


@pytest.mark.parametrize("edit", EDITS, ids=[e["op"] for e in EDITS])
def test_every_edit_and_its_undo_through_the_worker(ctx: FakeContext, model_sha: str,
                                                    edit: dict[str, Any]) -> None:  # fmt: skip
    codes = np.random.default_rng(1).integers(0, K, (Q, 40))  # every edit changes something
    session = EditSession(CodeGrid(codes, K)).to_dict()
    base = call(ctx, "edit", model_sha, session=session)
    edited = call(ctx, "edit", model_sha, session=base["session"], action="apply", edit=edit)
    assert edited["can_undo"] and not edited["can_redo"]
    assert not np.array_equal(edited["codes"], codes)
    want = EditSession(CodeGrid(codes, K))
    want.apply(edit_from_dict(edit))
    assert np.array_equal(edited["codes"], want.grid.codes)
    assert np.array_equal(edited["audio"], call(ctx, "decode", model_sha, codes=want.grid.codes,
                                                quality="preview")["audio"])  # fmt: skip
    undone = call(ctx, "edit", model_sha, session=edited["session"], action="undo")
    assert np.array_equal(undone["codes"], codes) and undone["can_redo"]
    assert np.array_equal(undone["audio"], base["audio"])
    redone = call(ctx, "edit", model_sha, session=undone["session"], action="redo")
    assert np.array_equal(redone["codes"], edited["codes"])


def test_codebook_counts_a_dataset(ctx: FakeContext, model_sha: str, tmp_path: Path) -> None:
    from distill.shared.audio.dataset import Dataset, ManifestRow

    mels = np.random.default_rng(0).normal(-5, 2, (6, 128, 94)).astype(np.float32)
    row = ManifestRow(name="a.wav", sha256="0" * 64, status="ok", reason=None, duration_s=3.0,
                      sample_rate=RATE, channels=1, chunks=6, split="train")  # fmt: skip
    dataset = Dataset(mel_config=MelConfig(), mels=mels, chunk_file=np.zeros(6, dtype=np.int32),
                      manifest=[row], seed=0)  # fmt: skip
    path = tmp_path / "ds.npz"
    path.write_bytes(dataset.to_bytes())
    sha = ctx.artifacts.add(path)
    out = call(ctx, "codebook", model_sha, dataset=sha)
    assert out["codes_counted"] == 6 * 94 and len(out["levels"]) == Q
    for level in out["levels"]:
        assert level["usage"].sum() == 6 * 94 and level["used"] + len(level["dead"]) == K
        assert 0 <= level["entropy_bits"] <= math.log2(K) + 1e-9


BAD: list[tuple[str, dict[str, Any], str, str]] = [
    ("encode", {"audio": sound(), "sample_rate": RATE, "search": -1}, BAD_REQUEST,
     "search must be in"),
    ("encode", {"audio": sound(), "sample_rate": RATE, "search": "many"}, BAD_REQUEST,
     "search must be an integer"),
    ("decode", {"codes": np.full((Q, 10), K, dtype=np.int64)}, BAD_REQUEST, "outside 0..15"),
    ("decode", {"codes": np.zeros((Q + 1, 10), dtype=np.int64)}, BAD_REQUEST, "4 levels"),
    ("decode", {"codes": np.zeros((Q, 10), dtype=np.float32)}, BAD_REQUEST, "integer grid"),
    ("decode", {"codes": np.zeros((Q, 10), dtype=np.int64), "levels": 9}, BAD_REQUEST, "levels"),
    ("generate", {"seconds": 36000}, BAD_REQUEST, "seconds must be in"),
    ("generate", {"count": 17}, BAD_REQUEST, "count must be in"),
    ("generate", {"seconds": 0}, BAD_REQUEST, r"seconds must be in \[0.05, 60\]"),
    ("generate", {"seconds": 0.001}, BAD_REQUEST, r"seconds must be in \[0.05, 60\]"),
    ("generate", {"temperature": -1.0}, BAD_REQUEST, "temperature"),
    ("encode", {"audio": np.zeros(RATE * 36000 // 1000, dtype=np.float32), "sample_rate": 1000},
     BAD_REQUEST, "at most 60 s"),
    ("encode", {"audio": np.array([np.nan], dtype=np.float32), "sample_rate": RATE},
     BAD_REQUEST, "finite"),
    ("blend", {"a": sound(), "b": sound(), "sample_rate": RATE, "amount": 2.0}, BAD_REQUEST,
     "amount"),
    ("resample_region", {"codes": np.zeros((Q, 10), dtype=np.int64), "t0": 5, "t1": 50},
     BAD_REQUEST, "t1"),
    ("edit", {"session": {"nope": 1}}, BAD_REQUEST, "edit history"),
    ("explode", {}, BAD_REQUEST, "unknown op"),
    # refused before the work (they were done, then refused as too big a reply, or took hours)
    ("generate", {"count": 16, "seconds": 60}, BAD_REQUEST,
     r"16 sounds of 60 s make a reply of .* MiB, over the 15.8 MiB one message carries"),
    ("progressive", {"audio": np.zeros(RATE * 60, dtype=np.float32), "sample_rate": RATE},
     BAD_REQUEST, "send at most"),
    ("encode", {"audio": np.zeros(RATE * 5, dtype=np.float32), "sample_rate": RATE,
                "search": 256}, BAD_REQUEST, r"at this length search at most 192"),
    ("decode", {"codes": np.zeros((Q, 4), dtype=np.int64), "quality": "ultra"}, BAD_REQUEST,
     "quality"),
]  # fmt: skip


def test_each_bad_request_gets_its_error_and_the_next_succeeds(ctx: FakeContext,
                                                               model_sha: str) -> None:  # fmt: skip
    good = np.zeros((Q, 8), dtype=np.int64)
    for op, body, code, match in BAD:
        with pytest.raises(DistillError, match=match) as info:
            call(ctx, op, model_sha, **body)
        assert code_of(info.value) == code, (op, body)
        assert call(ctx, "decode", model_sha, codes=good, quality="preview")["audio"].size > 0


def test_corrupt_model_and_unknown_model(ctx: FakeContext, tmp_path: Path) -> None:
    path = tmp_path / "bad.distill"
    save_model(path, tiny_model())
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))
    sha = ctx.artifacts.add(path)
    with pytest.raises(DistillError, match="checksum") as info:
        call(ctx, "decode", sha, codes=np.zeros((Q, 4), dtype=np.int64))
    assert code_of(info.value) == MODEL_FORMAT
    assert str(info.value).startswith(f"model {sha}: ")  # its id, not the cache's file name
    with pytest.raises(DistillError, match="model artifact id"):
        call(ctx, "decode", "abc", codes=np.zeros((Q, 4), dtype=np.int64))


def test_a_model_without_prior_cannot_generate(ctx: FakeContext, tmp_path: Path) -> None:
    path = tmp_path / "vq.distill"
    save_model(path, tiny_model(with_prior=False))
    sha = ctx.artifacts.add(path)
    with pytest.raises(DistillError, match="no prior"):
        call(ctx, "generate", sha, seconds=0.2)


def test_generate_job_exports_regenerable_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from distill.shared.audio.export import headroom_gain, read_export_metadata

    monkeypatch.setenv("DISTILL_CACHE", str(tmp_path / "cache"))
    infer.CACHE = infer.ModelCache()
    path = tmp_path / "tiny.distill"
    model_id = save_model(path, tiny_model())
    ctx = FakeContext()
    sha = ctx.artifacts.add(path)
    ctx.info.params.update({"op": "generate", "model": sha, "count": 18, "seconds": 0.2,
                            "seed": 3, "quality": "preview"})  # fmt: skip
    result = infer.run_job(ctx)  # type: ignore[arg-type]
    # drawing 19 steps (one chunk of noise: its share of the bar at preview), then two batches
    # decoded; every quality has its share
    share = infer.DRAW_SHARE["preview"]
    assert len(result["sounds"]) == 18 and ctx.progressed == [0.0, share + (1 - share) * 16 / 18, 1.0]
    assert sorted(infer.DRAW_SHARE) == sorted(QUALITY_PRESETS)
    first = tmp_path / "first.wav"
    first.write_bytes(ctx.artifacts.stored[result["sounds"][1]["artifact"]])
    meta = read_export_metadata(first)
    assert meta.kind == "generate" and meta.model_id == model_id
    assert meta.data["index"] == 1 and meta.data["count"] == 18 and meta.data["seed"] == 3
    # the sounds waited in a scratch folder of the worker's cache (one a killed worker leaves
    # is removed when the next starts), gone once they are stored
    (folder,) = ctx.artifacts.put_folders
    assert folder.parent == tmp_path / "cache" / "tmp" and folder.name.endswith(".dir")
    assert not folder.exists()
    # with trim: each file ended as its recipe says, which replays it
    ctx = FakeContext()
    ctx.artifacts.add(path)
    ctx.info.params.update({"op": "generate", "model": sha, "count": 2, "seconds": 0.2,
                            "seed": 3, "quality": "preview", "trim": 10})  # fmt: skip
    result = infer.run_job(ctx)  # type: ignore[arg-type]
    assert result["params"]["trim"] == 10
    first.write_bytes(ctx.artifacts.stored[result["sounds"][1]["artifact"]])
    meta = read_export_metadata(first)
    stored = sf.read(first, dtype="float32")[0]
    assert meta.data["trim"] == 10 and 0 < len(stored) <= round(0.2 * RATE)
    again = inference.replay(load_model(path), "generate", meta.data)
    np.testing.assert_allclose(again * headroom_gain(float(np.abs(again).max())), stored,
                               rtol=1e-6, atol=1e-7)  # as exported: scaled under full scale


def test_a_generate_job_hears_a_cancel_while_it_draws(tmp_path: Path) -> None:
    """256 sounds of 60 s drew for two minutes before the first check of a cancel (after the
    first batch was decoded): now the draw asks every 64 steps, and stops there."""
    from distill.shared.errors import JobCancelled

    class CancelledMidDraw(FakeContext):
        def check_cancel(self) -> None:
            if len(self.progressed) >= 2:  # after the second chunk of steps began
                raise JobCancelled("cancelled by user")

    infer.CACHE = infer.ModelCache()
    path = tmp_path / "tiny.distill"
    save_model(path, tiny_model())
    ctx = CancelledMidDraw()
    sha = ctx.artifacts.add(path)
    ctx.info.params.update({"op": "generate", "model": sha, "count": 4, "seconds": 3.0,
                            "seed": 3, "quality": "preview"})  # fmt: skip
    with pytest.raises(JobCancelled):
        infer.run_job(ctx)  # type: ignore[arg-type]
    assert len(ctx.progressed) == 2 and all(f is not None and f < 0.5 for f in ctx.progressed)
    assert not ctx.artifacts.stored  # no sound was decoded or stored


def test_model_cache_is_lru(tmp_path: Path) -> None:
    cache = infer.ModelCache(size=2)
    paths = {}
    for i in range(3):
        p = tmp_path / f"m{i}.distill"
        save_model(p, tiny_model())
        paths[f"{i}" * 64] = p
    for sha in ["0" * 64, "1" * 64, "0" * 64, "2" * 64, "0" * 64]:
        cache.get(sha, "cpu", paths.__getitem__)
    assert cache.loads == 3  # "1" was dropped, "0" stayed (used most recently)
    cache.get("1" * 64, "cpu", paths.__getitem__)
    assert cache.loads == 4


def test_a_key_the_op_does_not_read_is_refused_naming_it(ctx: FakeContext, model_sha: str) -> None:
    """Before: a script's misspelt "temprature" was ignored, and its sounds drawn at 1."""
    with pytest.raises(DistillError, match=r"generate: unknown keys \['temprature'\]") as info:
        call(ctx, "generate", model_sha, count=1, seconds=0.2, temprature=0.5)
    assert code_of(info.value) == BAD_REQUEST and "temperature" in str(info.value)
    with pytest.raises(DistillError, match=r"decode: unknown keys \['sample_rate'\]"):
        call(ctx, "decode", model_sha, codes=np.zeros((Q, 5), dtype=np.int64), sample_rate=48000)
    ok = call(ctx, "generate", model_sha, count=1, seconds=0.2, temperature=0.5, seed=3)
    assert ok["params"]["temperature"] == 0.5
