"""``distill.infer``: a trained ``.distill`` model made to sound — generate, encode, decode, edit.

Request schema (a direct MDP request to ``distill.infer``; one msgpack map)
-------------------------------------------------------------------------
Every request is ``{"op": OP, "model": MODEL, ...}``. ``MODEL`` is the model's **artifact id**
(sha256 hex of the ``.distill`` file in the artifact store: upload it first with
``ArtifactClient.put_file(path, kind="model", name=...)``, a no-op when it is already there).
Audio travels as float32 ndarrays (mono, the model's sample rate, given in every reply as
``sample_rate``); code grids as int64 ndarrays ``(Q, T)``, ``-1`` meaning "no code at this
level". ``quality`` (optional everywhere audio comes back) picks the phase reconstruction:
``"preview"`` (Griffin-Lim 2 iterations from a phase-vocoder start: the editor's coarse
preview), ``"fast"`` (4 iterations; the default), ``"best"`` (32; for export).
Every reply also holds ``model_id`` (the model's own hash, what exported files record) and
``threads`` (the worker's torch thread count: replaying a result bit for bit needs the same).

=================  ==============================================  =============================
op                 params                                          result
=================  ==============================================  =============================
generate           count (1..16, default 1), seconds (<= 60),      audio (count, samples) f32,
                   temperature, top_k, top_p, seed (sampling:      lengths (count: each sound's
                   see SamplingParams), prime: (Q, T0) codes to    samples; zeros past them),
                   continue (optional), quality, trim (optional:   codes (count, Q, T) i64,
                   dB under its peak where each sound ends,        params {the sampling params,
                   10..120; see inference.finish)                  count, seconds}, sample_rate
encode             audio (samples,) or (channels, samples) float,  codes (Q, T) i64, levels,
                   sample_rate (resampled to the model's), search  codebook_size, sample_rate
                   (codes tried per level and step, chosen by
                   what they decode to; default 16; 0: the
                   quantizer's nearest)
decode             codes (Q, T) (exactly the model's Q levels),    audio (samples,) f32,
                   levels (1..Q: decode the first k; default Q),   mel (n_mels, frames) f32,
                   quality                                         sample_rate
progressive        audio, sample_rate, quality, search             codes (Q, T), audio (Q,
                                                                   samples): row k-1 decodes the
                                                                   first k levels
blend              a, b (audio), sample_rate, amount (0: a, 1: b), codes (Q, T), audio
                   quality; the shorter is padded with silence
resample_region    codes (Q, T), t0, t1 (steps [t0, t1) drawn      codes (Q, T), audio
                   again by the prior), temperature, top_k,
                   top_p, seed, quality
codebook           dataset (a dataset artifact id)                 levels: [{usage (K,) i64,
                                                                   entropy_bits, perplexity,
                                                                   used, dead (i64 ids)}],
                                                                   codes_counted, codebook_size
edit               session (an EditSession dict: base grid,        session (the new dict),
                   edits, undone; see shared/model/codes.py),      codes (Q, T), audio, mel,
                   action ("apply" with edit, "undo", "redo",      sample_rate, can_undo,
                   "none": just decode), edit (an edit dict, e.g.  can_redo
                   {"op": "reverse", "region": [l0, l1, t0, t1]}),
                   levels, quality (default "preview")
=================  ==============================================  =============================

Limits: sounds and grids up to :data:`~distill.shared.model.inference.MAX_SECONDS` (60 s);
``count`` up to 16 as a request, as many as fit one reply (16 MiB: checked before the work);
``encode``'s ``search`` times the sound's seconds at most 16 x 60. Errors are the usual ``{"ok": false, "error": {code, message}}``:
``bad_request`` for a missing, mistyped or out-of-range field (a code outside 0..K-1, a grid
with the wrong number of levels, a 10-hour length, an unknown op), ``model_format`` for a corrupt
model file, ``artifact`` for an unknown artifact id. The worker keeps serving after any of them.

Jobs (``distill.jobs`` submit to service ``distill.infer``) run long batches:
``{"op": "generate", "model", "count" (1..256), "seconds", sampling params, "quality", "prime"
(optional: (Q, T0) codes every sound continues), "format": "wav"|"flac", "trim" (optional: dB
under its peak where each sound ends, 10..120; see ``inference.finish``)}`` stores each sound as an exported file (artifact kind ``audio``, with
regenerable metadata), publishes progress per batch decoded (16 sounds, fewer when long), and
returns ``{"sounds": [{"index", "artifact", "name", "seed"}], "model_id", "params",
"sample_rate", "redrawn"}``. It holds one batch's audio at a time: each sound is written to a
file in a scratch folder of the worker's artifact cache as it is decoded (one a killed worker
leaves goes when the next worker starts), and all are stored at the end (the files' size on
disk there: 256 sounds of 60 s as float WAV, 2.9 GB).

Models are cached per worker by artifact id (LRU, :data:`MODEL_CACHE_SIZE`): a second request
on the same model loads nothing.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from distill.shared.audio.dataset import Dataset
from distill.shared.audio.export import ExportMetadata, export_audio
from distill.shared.bus import protocol as P
from distill.shared.bus.cache import scratch_folder
from distill.shared.errors import ModelFormatError
from distill.shared.ids import is_sha256
from distill.shared.model import inference as inf
from distill.shared.model.modelfile import DistillModel, load_model
from distill.shared.model.sampling import SamplingParams
from distill.workers.runtime.context import JobContext

SERVICE = "distill.infer"
MODEL_CACHE_SIZE = 4  # a few models: the editor's and a comparison; each is 10-50 MB
MAX_DIRECT_COUNT = 16  # more sounds than this go as a job (one request should answer in seconds)
# A generate job's progress: drawing the codes counts as this share of the work, decoding
# them the rest, by quality. Measured on a CPU thread (the demo's model, 1-256 sounds of 2-10
# s): drawing took 3-8% of a `best` job (32 phase iterations), 10-21% of a `fast` one and
# 22-25% of a `preview` one (a single sound: up to 41%); the default pipeline's larger prior
# about a sixth of a `fast` job.
DRAW_SHARE = {"preview": 0.25, "fast": 0.17, "best": 0.05}
# What a reply's arrays may take, checked before the work: the reply must fit one message
# (16 sounds of 60 s were drawn for 24 s and 2.1 GB, then refused as a 184-MiB reply).
REPLY_BYTES = P.MAX_MESSAGE_BYTES - 256 * 1024
SAMPLING_KEYS = ("temperature", "top_k", "top_p", "min_p", "change_temperature", "seed")


class ModelCache:
    """Loaded models by artifact id, least recently used dropped first. Thread-safe."""

    def __init__(self, size: int = MODEL_CACHE_SIZE) -> None:
        self.size = size
        self.loads = 0  # how many times a model was read from disk (tests and the bench)
        self._models: OrderedDict[tuple[str, str], DistillModel] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, sha: str, device: str, path_of: Callable[[str], Path]) -> DistillModel:
        key = (sha, device)
        with self._lock:
            if key in self._models:
                self._models.move_to_end(key)
                return self._models[key]
        path = path_of(sha)
        try:
            model = load_model(path, device)
        except ModelFormatError as e:  # named by its artifact id, not the cache's file name
            raise ModelFormatError(str(e).replace(path.name, f"model {sha}", 1)) from e
        with self._lock:
            self.loads += 1
            self._models[key] = model
            while len(self._models) > self.size:
                self._models.popitem(last=False)
        return model


CACHE = ModelCache()


def _model(ctx: JobContext, body: dict[str, Any]) -> DistillModel:
    sha = body.get("model")
    if not is_sha256(sha):
        raise inf.BadInput(f"model must be a model artifact id (sha256 hex), got {sha!r}")
    return CACHE.get(str(sha), ctx.device, ctx.artifacts.get_file)


def _sampling(body: dict[str, Any], model: DistillModel) -> Any:
    """The request's sampling settings; a change temperature left out is the model's."""
    return inf.sampling_params({k: body[k] for k in SAMPLING_KEYS if k in body}, model)


def _quality(body: dict[str, Any], default: str = "fast") -> str:
    return inf.check_quality(body.get("quality", default))


def _generate(ctx: JobContext, model: DistillModel, body: dict[str, Any]) -> dict[str, Any]:
    count = inf.check_int(body.get("count", 1), "count", 1, MAX_DIRECT_COUNT)
    params = _sampling(body, model)
    seconds = inf.check_number(body.get("seconds", 2.0), "seconds", inf.MIN_SECONDS, inf.MAX_SECONDS)
    quality = _quality(body)
    per_sound = _audio_bytes(model, seconds) + _codes_bytes(model, seconds)
    if count * per_sound > REPLY_BYTES:
        most = REPLY_BYTES // per_sound
        raise inf.BadInput(
            f"generate: {count} sounds of {seconds:g} s make a reply of "
            f"{count * per_sound / 2**20:.1f} MiB, over the {REPLY_BYTES / 2**20:.1f} MiB one "
            f"message carries: ask for {'at most ' + str(most) if most else 'shorter'} sounds "
            "of this length, or submit a generate job (distill.jobs), which stores each sound "
            "as an artifact")  # fmt: skip
    trim = inf.check_trim(body.get("trim"))
    out = inf.generate(model, count=count, seconds=seconds, params=params, quality=quality,
                       prime=body.get("prime"))  # fmt: skip
    # params: what made the sounds, as a recipe records it (a client's export replays with
    # the same redraw and length rules); the prime and the thread count go apart
    recipe = inf.generate_recipe(params, count=count, seconds=seconds, quality=quality, index=0,
                                 render_frames=out.render_frames, trim=trim)  # fmt: skip
    made = {k: v for k, v in recipe.items() if k not in ("index", "threads", "quality")}
    # sounds ended where they fade (trim) keep their place in one (count, samples) array,
    # zero past their length
    audio, lengths = out.audio, [out.audio.shape[-1]] * count
    if trim is not None:
        # (a prime stays whole: what the reply's params leave out, the cut needs)
        prime = body.get("prime")
        ending = recipe if prime is None else {**recipe, "prime": np.asarray(prime)}
        audio = np.zeros_like(out.audio)
        for i, one in enumerate(out.audio):
            ended = inf.finish(model, ending, one)
            audio[i, : ended.shape[-1]], lengths[i] = ended, ended.shape[-1]
    return {"audio": audio, "lengths": lengths, "codes": out.codes, "sample_rate": out.sample_rate,
            "params": made, "quality": quality, "redrawn": out.redrawn}  # fmt: skip


def _audio_bytes(model: DistillModel, seconds: float) -> int:
    return int(seconds * model.mel_config.sample_rate + 1) * 4  # float32 samples


def _codes_bytes(model: DistillModel, seconds: float) -> int:
    return inf.steps_for(model, seconds) * (model.vqvae.config.levels or 1) * 8  # int64 codes


def _encode(ctx: JobContext, model: DistillModel, body: dict[str, Any]) -> dict[str, Any]:
    audio = inf.model_audio(model, body.get("audio"), body.get("sample_rate"))
    codes = inf.encode(model, audio, body.get("search", inf.SEARCH_CANDIDATES))
    return {"codes": codes, "levels": codes.shape[0],
            "codebook_size": model.vqvae.config.codebook_size,
            "sample_rate": model.mel_config.sample_rate}  # fmt: skip


def _decode(ctx: JobContext, model: DistillModel, body: dict[str, Any]) -> dict[str, Any]:
    quality = _quality(body)
    audio, mel = inf.decode(model, body.get("codes"), body.get("levels"), quality)
    # phase: what a client's export records, so a later Distill replays it the same
    return {"audio": audio, "mel": mel, "sample_rate": model.mel_config.sample_rate,
            "phase": inf.phase_record(quality)}  # fmt: skip


def _progressive(ctx: JobContext, model: DistillModel, body: dict[str, Any]) -> dict[str, Any]:
    audio = inf.model_audio(model, body.get("audio"), body.get("sample_rate"))
    levels = model.vqvae.config.levels or 1
    if levels * audio.shape[-1] * 4 > REPLY_BYTES:  # a reconstruction per level
        rate = model.mel_config.sample_rate
        raise inf.BadInput(
            f"progressive: {levels} reconstructions of {audio.shape[-1] / rate:.1f} s make a "
            f"reply of {levels * audio.shape[-1] * 4 / 2**20:.1f} MiB, over the "
            f"{REPLY_BYTES / 2**20:.1f} MiB one message carries: send at most "
            f"{REPLY_BYTES / (levels * 4 * rate):.1f} s of sound")  # fmt: skip
    codes, outs = inf.progressive(model, audio, _quality(body),
                                  body.get("search", inf.SEARCH_CANDIDATES))  # fmt: skip
    return {"codes": codes, "audio": outs, "sample_rate": model.mel_config.sample_rate}


def _blend(ctx: JobContext, model: DistillModel, body: dict[str, Any]) -> dict[str, Any]:
    a = inf.model_audio(model, body.get("a"), body.get("sample_rate"))
    b = inf.model_audio(model, body.get("b"), body.get("sample_rate"))
    codes, audio = inf.blend(model, a, b, body.get("amount", 0.5), _quality(body))  # type: ignore[arg-type]
    return {"codes": codes, "audio": audio, "sample_rate": model.mel_config.sample_rate}


def _resample_region(ctx: JobContext, model: DistillModel, body: dict[str, Any]) -> dict[str, Any]:
    codes, audio = inf.resample_region(model, body.get("codes"), body.get("t0"),  # type: ignore[arg-type]
                                       body.get("t1"), _sampling(body, model), _quality(body))  # type: ignore[arg-type]  # fmt: skip
    return {"codes": codes, "audio": audio, "sample_rate": model.mel_config.sample_rate}


def _codebook(ctx: JobContext, model: DistillModel, body: dict[str, Any]) -> dict[str, Any]:
    sha = body.get("dataset")
    if not is_sha256(sha):
        raise inf.BadInput(f"dataset must be a dataset artifact id (sha256 hex), got {sha!r}")
    dataset = Dataset.from_bytes(ctx.artifacts.get_bytes(str(sha)))
    if dataset.mel_config != model.mel_config:
        raise inf.BadInput("the dataset's mel settings differ from the model's")
    return inf.codebook_usage(model, dataset.mels)


def _edit(ctx: JobContext, model: DistillModel, body: dict[str, Any]) -> dict[str, Any]:
    session = inf.edit_session(model, body.get("session"), body.get("action", "none"),
                               body.get("edit"))  # fmt: skip
    audio, mel = inf.decode(model, session.grid.codes, body.get("levels"),
                            _quality(body, "preview"))  # fmt: skip
    return {"session": session.to_dict(), "codes": session.grid.codes, "audio": audio,
            "mel": mel, "sample_rate": model.mel_config.sample_rate,
            "can_undo": bool(session.history), "can_redo": bool(session.redo_stack)}  # fmt: skip


OPS: dict[str, Callable[[JobContext, DistillModel, dict[str, Any]], dict[str, Any]]] = {
    "generate": _generate,
    "encode": _encode,
    "decode": _decode,
    "progressive": _progressive,
    "blend": _blend,
    "resample_region": _resample_region,
    "codebook": _codebook,
    "edit": _edit,
}


# The keys each op reads, beside "op" and "model": any other is refused, naming it (a script's
# "temprature" was ignored without a word, and the sound drawn at the default).
OP_KEYS: dict[str, frozenset[str]] = {
    "generate": frozenset({"count", "seconds", "prime", "quality", "trim", *SAMPLING_KEYS}),
    "encode": frozenset({"audio", "sample_rate", "search"}),
    "decode": frozenset({"codes", "levels", "quality"}),
    "progressive": frozenset({"audio", "sample_rate", "quality", "search"}),
    "blend": frozenset({"a", "b", "sample_rate", "amount", "quality"}),
    "resample_region": frozenset({"codes", "t0", "t1", "quality", *SAMPLING_KEYS}),
    "codebook": frozenset({"dataset"}),
    "edit": frozenset({"session", "action", "edit", "levels", "quality"}),
}
JOB_KEYS = frozenset({"format"})  # a generate job's own, beside the op's


def _check_keys(op: str, body: dict[str, Any], extra: frozenset[str] = frozenset()) -> None:
    known = OP_KEYS[op] | extra
    unknown = sorted(str(k) for k in body if k not in known and k not in ("op", "model"))
    if unknown:
        raise inf.BadInput(f"{op}: unknown keys {unknown}; it reads {sorted(known)}")


def handle_request(ctx: JobContext, body: dict[str, Any]) -> dict[str, Any]:
    op = body.get("op")
    handler = OPS.get(op) if isinstance(op, str) else None
    if handler is None:
        raise inf.BadInput(f"unknown op {op!r}; ops: {', '.join(OPS)}")
    _check_keys(str(op), body)
    model = _model(ctx, body)
    # threads: what a replay needs to make the same samples (see inference.generate_recipe)
    return {**handler(ctx, model, body), "model_id": model.model_id,
            "threads": torch.get_num_threads()}  # fmt: skip


# --- jobs: long batches -------------------------------------------------------------------------


class SoundFiles:
    """A generate job's sounds as exported files in ``folder`` (with their regenerable
    metadata), one per sound: a sound drawn again overwrites its file."""

    def __init__(self, folder: Path, model: DistillModel, params: SamplingParams, *, count: int,
                 seconds: float, quality: str, fmt: str, prime: np.ndarray | None,
                 trim: float | None = None) -> None:  # fmt: skip
        self.folder, self.model, self.params, self.prime = folder, model, params, prime
        self.trim = trim  # dB under its peak where each sound ends (inference.finish), or None
        self.count, self.seconds, self.quality = count, seconds, quality
        self.subtype = "FLOAT" if fmt == "wav" else "PCM_24"
        # the frames budget of the model's device, decided here: each recipe records it
        self.render_frames = inf.render_frames_for(model)
        self.names = [f"gen-{params.seed}-{i:03d}.{fmt}" for i in range(count)]

    def write(self, indices: np.ndarray, audio: np.ndarray) -> None:
        """Sounds ``indices`` (a sink of ``inference.generate_each``): a first draw and the
        draw that replaces it have the same recipe, name and file."""
        for i, one in zip(indices.tolist(), audio, strict=True):
            recipe = inf.generate_recipe(self.params, count=self.count, seconds=self.seconds,
                                         quality=self.quality, index=i,
                                         render_frames=self.render_frames, prime=self.prime,
                                         trim=self.trim)  # fmt: skip
            meta = ExportMetadata(kind="generate", model_id=self.model.model_id,
                                  title=self.names[i], data=recipe)  # fmt: skip
            rate = self.model.mel_config.sample_rate
            export_audio(self.folder / self.names[i], inf.finish(self.model, recipe, one), rate,
                         subtype=self.subtype, metadata=meta)  # type: ignore[arg-type]  # fmt: skip

    def store(self, ctx: JobContext, i: int) -> str:
        """Sound ``i``'s file in the artifact store (streamed from the file); its sha256."""
        return ctx.artifacts.put_file(self.folder / self.names[i], kind="audio",
                                      name=self.names[i], job=ctx.info.job_id)  # fmt: skip


class GenerateProgress:
    """A generate job's progress and cancel checks: ``drawing`` (step, steps) the codes, then
    ``decoding`` (done, total) them, as a share of the job; then, for the draws that came out
    silent, ``redrawing`` (step, steps) at the end of the bar (a few sounds, extra work)."""

    def __init__(self, ctx: JobContext, quality: str) -> None:
        self.ctx = ctx
        self.share = DRAW_SHARE[quality]  # of the bar: drawing; decoding has the rest
        self.decoded = False  # every first draw decoded: what is drawn now is drawn again

    def on_steps(self, drawn: int, steps: int) -> None:
        self.ctx.check_cancel()
        if self.decoded:
            self.ctx.progress(1.0, stage="redrawing", step=drawn, steps=steps)
        else:
            self.ctx.progress(self.share * drawn / max(steps, 1), stage="drawing", step=drawn,
                              steps=steps)  # fmt: skip

    def on_batch(self, done: int, total: int) -> None:
        self.ctx.check_cancel()
        self.decoded = done == total
        self.ctx.progress(self.share + (1 - self.share) * done / total, stage="decoding",
                          done=done, total=total)  # fmt: skip


def run_job(ctx: JobContext) -> dict[str, Any]:
    body = dict(ctx.info.params)
    if body.get("op") != "generate":
        raise inf.BadInput(f"infer jobs run op 'generate' only, got {body.get('op')!r}")
    _check_keys("generate", body, JOB_KEYS)
    model = _model(ctx, body)
    count = inf.check_int(body.get("count", 1), "count", 1, inf.MAX_COUNT)
    seconds = inf.check_number(body.get("seconds", 2.0), "seconds", inf.MIN_SECONDS, inf.MAX_SECONDS)
    fmt = body.get("format", "wav")
    if fmt not in ("wav", "flac"):
        raise inf.BadInput(f"format must be 'wav' or 'flac', got {fmt!r}")
    params, quality = _sampling(body, model), _quality(body, "best")
    trim = inf.check_trim(body.get("trim"))
    prime = body.get("prime")  # (Q, T0) codes the sounds continue; each recipe records them
    prime = None if prime is None else inf.check_grid(model, prime, "prime")[0].cpu().numpy()
    # Each sound is exported to a file here as its batch is decoded, and stored once every
    # first draw's peak is known and the quiet ones are drawn again (a draw is judged against
    # the loudest first draw of the request): the job holds one batch's audio, not all of it
    # (256 sounds of 60 s: 2.9 GB), and stores no sound that a redraw replaces.
    with scratch_folder("distill-generate") as tmp:
        files = SoundFiles(Path(tmp), model, params, count=count, seconds=seconds,
                           quality=quality, fmt=fmt, prime=prime, trim=trim)  # fmt: skip
        progress = GenerateProgress(ctx, quality)

        def write(indices: np.ndarray, audio: np.ndarray) -> None:
            files.write(indices, audio)
            ctx.check_cancel()  # also between the batches drawn again, which report no progress

        drawn = inf.generate_each(model, write, count=count, seconds=seconds,
                                  params=params, quality=quality, prime=prime,
                                  on_batch=progress.on_batch,
                                  on_steps=progress.on_steps,
                                  render_frames=files.render_frames)  # fmt: skip
        sounds = [{"index": i, "artifact": files.store(ctx, i), "name": files.names[i],
                   "seed": params.seed} for i in range(count)]  # fmt: skip
    recipe = {**params.to_dict(), "count": count, "seconds": seconds, "quality": quality,
              "prime_steps": 0 if prime is None else prime.shape[1],
              **({} if trim is None else {"trim": trim})}  # fmt: skip
    return {"sounds": sounds, "model_id": model.model_id, "params": recipe,
            "sample_rate": drawn.sample_rate, "redrawn": drawn.redrawn}  # fmt: skip
