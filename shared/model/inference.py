"""Inference on a loaded :class:`DistillModel`: sample, encode, decode, blend, resample, count.

Pure functions of the model, shared by the inference worker (``distill.infer``) and the CLI
(``distill generate/encode/decode/regenerate``), so both make the same audio from the same
request. Inputs from outside (a request, a file) are checked here and refused with a
:class:`BadInput` naming the field and the reason; lengths are bounded by :data:`MAX_SECONDS`.

Audio is mono float32 at the model's sample rate, ``(samples,)`` or ``(B, samples)``; code grids
are int64 ``(Q, T)`` (``-1``: no code at this level); log-mels ``(n_mels, frames)``. The prior
may model only the RVQ-VAE's first P of Q levels (``PRIOR_LEVELS``): what it draws, generated
or resampled, holds -1 at the finer levels, which decode as no code.
Generation is prior sampling -> RVQ-VAE decode -> phase (:mod:`distill.shared.audio.phase`):
the same model, seed, count, length and quality on the same device give the same samples. A new
sound that comes out silent, or far quieter than the loudest of its request, is drawn again
(see :data:`SILENT_PEAK_DB` and :data:`QUIET_UNDER_LOUDEST_DB`).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from distill.shared.audio.io import peak_db, resample, to_mono, trim_tail
from distill.shared.audio.mel import log_mel
from distill.shared.audio.metrics import Envelope, envelope, envelope_distance
from distill.shared.audio.phase import QUALITY_PRESETS, PhasePreset, mel_to_audio_quality, preset
from distill.shared.errors import BAD_REQUEST, DistillError
from distill.shared.model.codes import CodeGrid, CodeGridError, EditSession, edit_from_dict
from distill.shared.model.modelfile import DistillModel
from distill.shared.model.sampling import (
    CHANGE_TEMPERATURE,
    MAX_SEED,
    MIN_TEMPERATURE,
    SamplingParams,
)
from distill.shared.model.sampling import resample_region as prior_resample_region
from distill.shared.model.sampling import sample as prior_sample
from distill.shared.model.vqvae import SEARCH_CANDIDATES

# 60 s: ten times the longest sound in a percussion collection; a 10-hour request is refused
# instead of swapping the worker. Measured (`distill generate -n 16 --seconds 60 --quality
# preview`, a percussion model): 1.7 GB at its peak, ~0.9 GB of it the process with the model
# loaded; the decoder and Griffin-Lim's batch (see RENDER_FRAMES) hold the rest. -n 1: ~1.3 GB.
MAX_SECONDS = 60.0
# An input sound's length is checked against MAX_SECONDS after its silence is trimmed; a header
# that states more than this much longer is refused before anything is decoded (a 10-minute
# 192 kHz file took 4.5 GB to decode, trim and resample just to be refused).
INPUT_SLACK_S = 60.0
# The shortest sound asked for anew (the CLI, the inference worker's ops): a request of a few
# ms drew one code step, which renders as a single sample (a click). Recipes of shorter sounds
# written before still replay.
MIN_SECONDS = 0.05
MAX_COUNT = 256  # sounds per generate call; the worker answers up to 16 directly (see infer.py)
MAX_CHANNELS = 64  # more is a (samples, channels) array sent the wrong way round
MAX_SEARCH = 256  # candidates per level and step when encoding (cost grows with it)
# ... and search x seconds of sound: no more work than the default search over the longest
# sound (2-7 minutes on one CPU thread); search 256 then goes up to 3.75 s of sound
MAX_SEARCH_SECONDS = SEARCH_CANDIDATES * MAX_SECONDS
# Sounds decoded together: bounds memory at any count, and fixes how a batch is split, so the
# same request decodes the same way whether it came as a request, a job or a regenerate (the
# phase reconstruction's last bits depend on the batch's shape: ~1e-9).
RENDER_BATCH = 16
# ... and at most this many mel frames in a batch (16 sounds of 7.5 s at the default hop; a
# longer sound goes in fewer): 16 sounds of 60 s peaked at 5.8 GB decoded 16 at a time, 1.7 GB
# 2 at a time, as fast. Sounds up to 7.5 s split as before; recipes record the budget, and one
# without it (made before) replays 16 at a time, as its file was made.
RENDER_FRAMES = 16 * 704
# On a CPU, smaller batches: Griffin-Lim's STFTs over a batch of 16 fall out of the caches.
# Measured (one thread, decode + `fast` phase, CPU time; 16 sounds): of 2 s, 65x real time one
# at a time, 70x two at a time, 61x sixteen; of 7.5 s, 64x, 71x, 41x; the `best` phase alone
# on 4-s sounds 16.6x one at a time against 7.6x sixteen at once. So two sounds of 2 s a batch
# (four of 1 s, eight of 0.5 s). Accelerators keep RENDER_FRAMES. The budget used is recorded
# in recipes (batches change the last bits), so a sound made either way replays as it was made.
CPU_RENDER_FRAMES = 2 * 188
BY_DEVICE = 0  # render_frames: the budget of the model's device (see render_frames_for)
# A new sound whose peak stays under this is not a sound: every training file is peak-normalised
# to -1 dBFS, and a prior trained briefly starts a few draws in the silent state its sounds end
# in and holds it there (2 of 64 draws of the demo's CI-size model peaked under -80 dBFS). Such
# a draw is drawn again, up to MAX_REDRAWS times, with a seed derived from the request's, so the
# same request still gives the same sounds. Continuations are left alone: a prime may end.
SILENT_PEAK_DB = -60.0
# Nor is one that stays this far under the loudest draw of its request: a draw whose first step
# leads straight into that silent state, a 20-ms blip and then nothing. The demo's model drew
# one in its 8 (peak -41.7 dBFS, 52 dB under the loudest; 128 other draws of that model peaked
# at -25.5 dBFS and above, the median at 0.7). Judged against the first draws of the request,
# so that whether a draw is kept depends on the request alone; a request of one sound has only
# the absolute floor.
QUIET_UNDER_LOUDEST_DB = 30.0
MAX_REDRAWS = 4
# A sound may end where it fades (``trim``: the dB under its peak it must stay under from there
# on, see audio.io.trim_tail): a drawn one-shot is its hit, not the hit and the rest of the
# seconds asked for in silence. Off unless asked (each sound then keeps exactly its length).
# 10 dB cuts a decay short; past 120 dB nothing a 24-bit file holds is cut.
TRIM_DB_RANGE = (10.0, 120.0)


class BadInput(DistillError):
    """A request's field is missing, of the wrong type or out of range; says which and why."""

    code = BAD_REQUEST


@dataclass(frozen=True)
class Generated:
    audio: np.ndarray  # (B, samples) float32
    codes: np.ndarray  # (B, Q, T) int64, the prime's steps included
    sample_rate: int
    redrawn: int = 0  # draws that came out silent and were drawn again (see quiet_draws)
    render_frames: int | None = None  # the frames budget its batches were decoded with


def render_frames_for(model: DistillModel) -> int:
    """The frames budget of a decoding batch on the model's device (see CPU_RENDER_FRAMES)."""
    return CPU_RENDER_FRAMES if _device(model).type == "cpu" else RENDER_FRAMES


def redraw_note(redrawn: int, count: int) -> str | None:
    """What to tell a user whose request had ``redrawn`` of ``count`` draws drawn again."""
    if redrawn <= 0:
        return None
    return (f"{redrawn} of {count} draws came out silent (peak under {SILENT_PEAK_DB:g} dBFS, or "
            f"{QUIET_UNDER_LOUDEST_DB:g} dB under the loudest draw) "
            "and were drawn again with a seed derived from yours: the same request still "
            "gives the same sounds")  # fmt: skip


# --- checking inputs -----------------------------------------------------------------------------


def check_number(value: object, name: str, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise BadInput(f"{name} must be a finite number, got {value!r}")
    if not low <= float(value) <= high:
        raise BadInput(f"{name} must be in [{low:g}, {high:g}], got {value!r}")
    return float(value)


def check_int(value: object, name: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise BadInput(f"{name} must be an integer, got {value!r}")
    if not low <= int(value) <= high:
        raise BadInput(f"{name} must be in [{low}, {high}], got {int(value)}")
    return int(value)


# A phase quality: a preset's name, or (replaying a recipe that recorded it) the preset itself
Quality = str | PhasePreset


def check_trim(value: object) -> float | None:
    """A ``trim`` setting (dB under the peak, see TRIM_DB_RANGE), or None: off."""
    return None if value is None else check_number(value, "trim", *TRIM_DB_RANGE)


def finish(model: DistillModel, data: Mapping[str, Any], audio: np.ndarray) -> np.ndarray:
    """A made sound as its recipe ``data`` ends it: cut where it has faded (``trim``), if the
    recipe asks, but never before what the prior drew has ended: a continuation keeps its
    prime (``prime``, the (Q, T0) codes) whole, and a resampled sound its region up to ``t1``,
    however quiet they are against the sound's peak (a loud prime before a quiet continuation
    would otherwise end inside the prime, the draw cut away). Every path that makes a sound from
    a recipe, the first time and when it is made again, ends it here."""
    under = check_trim(data.get("trim"))
    if under is None:
        return audio
    return trim_tail(audio, model.mel_config.sample_rate, under, keep=trim_floor(model, data))


def trim_floor(model: DistillModel, data: Mapping[str, Any]) -> int:
    """The samples :func:`finish` never cuts of a sound made by recipe ``data``: a
    continuation's prime, a resampled sound up to its region's end, nothing of a new one."""
    hop = model.mel_config.hop_length * model.vqvae.config.downsample
    if data.get("prime") is not None:
        return (len(data["prime"][0]) - 1) * hop  # the prime's own samples (see generate)
    if isinstance(data.get("t1"), int):
        return int(data["t1"]) * hop  # the region's last step, and what it reaches
    return 0


def check_quality(value: object) -> str:
    if not isinstance(value, str) or value not in QUALITY_PRESETS:
        raise BadInput(f"quality must be one of {sorted(QUALITY_PRESETS)}, got {value!r}")
    return str(value)


PHASE_INITS = ("random", "vocoder")
# The most phase iterations a recipe may record: no Distill wrote more than its presets' (2; 4,
# 8 in the earliest 'fast'; 32): 10 000 took ~20 minutes a reading of a 60-s sound
MAX_PHASE_ITERATIONS = max(p.n_iter for p in QUALITY_PRESETS.values())


def phase_record(quality: str) -> list[Any]:
    """What a recipe records of its phase quality: the preset's iterations and start, so that
    a later Distill whose preset of that name differs still replays the file (``fast`` was 8
    iterations in the earliest versions, 4 since)."""
    p = preset(quality)
    return [p.n_iter, p.init]


def recorded_phase(data: Mapping[str, Any]) -> Quality:
    """A recipe's phase: the preset it recorded, else the one its quality names now."""
    quality = check_quality(data["quality"])
    record = data.get("phase")
    if record is None:
        return quality
    if (not isinstance(record, (list, tuple)) or len(record) != 2
            or record[1] not in PHASE_INITS):  # fmt: skip
        raise BadInput(f"the recipe's phase must be [iterations, one of {list(PHASE_INITS)}], "
                       f"got {record!r}")
    return PhasePreset(n_iter=check_int(record[0], "phase iterations", 0, MAX_PHASE_ITERATIONS),
                       init=record[1])


def steps_for(model: DistillModel, seconds: float) -> int:
    """Code steps for ``seconds`` of audio (at least one)."""
    check_number(seconds, "seconds", 0.0, MAX_SECONDS)
    per_second = model.mel_config.frames_per_second
    return max(1, round(seconds * per_second / model.vqvae.config.downsample))


def exact_steps(model: DistillModel, seconds: float, prime_steps: int = 0) -> tuple[int, int]:
    """(code steps to draw, samples to keep) for a new sound of exactly ``seconds`` after
    ``prime_steps`` steps of a sound it continues. T frames of a centred STFT render as
    (T - 1) x hop samples, so ``steps_for``'s round(seconds x frames per second) steps came
    out up to a hop short (2 s: 1.995 s); this draws enough steps for the whole length and
    the rendered sound is cut to it (after a prime: its (T0 - 1) x hop samples and then
    exactly ``seconds``)."""
    check_number(seconds, "seconds", 0.0, MAX_SECONDS)
    cfg, down = model.mel_config, model.vqvae.config.downsample
    new = max(1, round(float(seconds) * cfg.sample_rate))
    keep = (prime_steps * down - 1) * cfg.hop_length + new if prime_steps else new
    frames = -(-keep // cfg.hop_length) + 1  # (frames - 1) x hop >= keep
    return -(-frames // down) - prime_steps, keep


def encoded_steps(model: DistillModel, samples: int) -> int:
    """The code steps :func:`encode` gives for ``samples`` of audio at the model's rate (its
    centred STFT's frames, the encoder's steps rounded up): known before the encoding's
    search, which takes 2-7 s a second of sound."""
    frames = samples // model.mel_config.hop_length + 1
    return -(-frames // model.vqvae.config.downsample)


def model_audio(model: DistillModel, audio: object, sample_rate: object) -> torch.Tensor:
    """Audio from outside -> mono float32 ``(samples,)`` at the model's rate, bounded."""
    if not isinstance(audio, np.ndarray) or audio.ndim not in (1, 2) or audio.size == 0:
        shape = getattr(audio, "shape", type(audio).__name__)
        raise BadInput(f"audio must be a non-empty float array (samples,) or (channels, "
                       f"samples), got {shape}")  # fmt: skip
    if not np.issubdtype(audio.dtype, np.floating) or not np.isfinite(audio).all():
        raise BadInput(f"audio must be finite floating point samples, got dtype {audio.dtype}")
    rate = check_int(sample_rate, "sample_rate", 1000, 768_000)
    if audio.ndim == 2 and audio.shape[0] > MAX_CHANNELS:
        raise BadInput(f"audio is (channels, samples); got {audio.shape[0]} channels of "
                       f"{audio.shape[1]} samples: is it (samples, channels), soundfile's "
                       "layout? Send its transpose")  # fmt: skip
    if audio.shape[-1] > MAX_SECONDS * rate:
        raise BadInput(f"audio is {audio.shape[-1] / rate:.1f} s long; at most {MAX_SECONDS:g} s")
    mono = to_mono(torch.from_numpy(np.ascontiguousarray(audio, dtype=np.float32)))
    return resample(mono, rate, model.mel_config.sample_rate).contiguous()  # (samples,)


def check_grid(model: DistillModel, codes: object, name: str = "codes") -> torch.Tensor:
    """A (Q, T) grid from outside -> LongTensor (1, Q, T) on the model's device, checked."""
    q, k = model.vqvae.config.levels, model.vqvae.config.codebook_size
    assert q is not None and k is not None  # a loaded model's config is resolved
    try:
        array = np.asarray(codes) if isinstance(codes, (np.ndarray, list)) else None
    except ValueError:  # ragged lists
        array = None
    if array is None or array.ndim != 2 or not np.issubdtype(array.dtype, np.integer):
        got = (type(codes).__name__ if array is None else f"{array.dtype} {array.shape}"
               if array.ndim == 2 else f"shape {array.shape}")  # fmt: skip
        raise BadInput(f"{name} must be an integer grid (levels, steps), got {got}")
    if array.shape[0] != q:
        raise BadInput(f"{name} has {array.shape[0]} levels; this model has {q}")
    max_steps = steps_for(model, MAX_SECONDS)
    if not 1 <= array.shape[1] <= max_steps:
        raise BadInput(f"{name} has {array.shape[1]} steps; 1..{max_steps} ({MAX_SECONDS:g} s)")
    bad = (array < -1) | (array >= k)
    if bad.any():
        level, t = (int(i) for i in np.argwhere(bad)[0])
        raise BadInput(f"{name}: code {int(array[level, t])} at level {level}, step {t} is "
                       f"outside 0..{k - 1} (or -1 for none)")  # fmt: skip
    return torch.from_numpy(array.astype(np.int64))[None].to(_device(model))  # (1, Q, T)


def sampling_params(d: Mapping[str, Any], model: DistillModel | None = None) -> SamplingParams:
    """SamplingParams from a request or options; with ``model``, a change temperature left out
    is the one chosen for the model when its prior was trained (:func:`model_change_temperature`)."""
    d = dict(d)
    if model is not None and "change_temperature" not in d:
        d["change_temperature"] = model_change_temperature(model)
    try:
        return SamplingParams.from_dict(d)
    except DistillError as e:
        raise BadInput(str(e)) from e


# The change temperatures a prior's training tries (see choose_change_temperature), and how many
# sounds of how many seconds it draws with each: 48 chose as 96 did on the four models measured
# (the first percussion run 0.5, 0.20 against 0.56; the others 1), in ~2.4 s on one CPU thread
# for both; a second run of the default percussion pipeline chose 1 (0.50 against 0.55).
CHANGE_TEMPERATURE_CHOICES = (1.0, 0.5)
CHOICE_DRAWS = 48
CHOICE_SECONDS = 2.0
ENVELOPE_BATCH = 48  # sounds drawn at once when their envelopes are measured


def model_change_temperature(model: DistillModel) -> float:
    """The change temperature chosen for ``model`` when its prior was trained (the summary's
    ``sampling``), or CHANGE_TEMPERATURE (off) for a model without one, or with one that is no
    number in [MIN_TEMPERATURE, 100] (a hand-edited file: refusing it would refuse every draw
    that does not name its own; :func:`stored_change_temperature_note` says so)."""
    chosen = _stored_change_temperature(model)
    if (isinstance(chosen, (int, float)) and not isinstance(chosen, bool)
            and MIN_TEMPERATURE <= chosen <= 100):  # fmt: skip
        return float(chosen)
    return CHANGE_TEMPERATURE


def _stored_change_temperature(model: DistillModel) -> object:
    sampling = model.summary.get("sampling")
    return sampling.get("change_temperature") if isinstance(sampling, dict) else None


def stored_change_temperature_note(model: DistillModel) -> str | None:
    """A note when ``model`` stores a change temperature that :func:`model_change_temperature`
    does not use (out of range or not a number); None when it stores a usable one or none."""
    stored = _stored_change_temperature(model)
    if stored is None or (model_change_temperature(model) == stored
                          and not isinstance(stored, bool)):  # fmt: skip
        return None
    return (f"note: the model stores change temperature {stored!r}, which is not a number in "
            f"[{MIN_TEMPERATURE:g}, 100]: drawn with {CHANGE_TEMPERATURE:g} (off) where "
            "no change temperature is given")  # fmt: skip


@torch.no_grad()
def drawn_envelopes(model: DistillModel, *, change_temperature: float, draws: int,
                    seconds: float) -> list[Envelope]:  # fmt: skip
    """The envelopes of ``draws`` sounds of ``seconds`` drawn at ``change_temperature`` (seeds
    0.., the other settings at their defaults), from their decoded log-mels (no phase)."""
    prior, fps = _prior(model), model.mel_config.frames_per_second
    steps, out = steps_for(model, seconds), []
    for first in range(0, draws, ENVELOPE_BATCH):
        params = SamplingParams(seed=first, change_temperature=change_temperature)
        codes = prior_sample(prior, batch=min(ENVELOPE_BATCH, draws - first), steps=steps,
                             params=params)  # fmt: skip
        out += [envelope(m, fps) for m in model.vqvae.decode_codes(codes, prior.config.levels).cpu()]
    return out


def file_envelopes(model: DistillModel, mels: list[torch.Tensor], seconds: float) -> list[Envelope]:
    """The envelopes of sounds' log-mels ((M, T) each), each cut to its first ``seconds`` (as
    long as a draw: a longer file rings past what a draw can)."""
    frames = steps_for(model, seconds) * model.vqvae.config.downsample
    fps = model.mel_config.frames_per_second
    return [envelope(mel[:, :frames].float().cpu(), fps) for mel in mels if mel.shape[1]]


def choose_change_temperature(model: DistillModel, mels: list[torch.Tensor]) -> dict[str, Any]:
    """Which of CHANGE_TEMPERATURE_CHOICES draws sounds shaped most like the training files:
    CHOICE_DRAWS sounds of CHOICE_SECONDS at each, their envelopes against those of ``mels``
    (the training files' log-mels) by :func:`envelope_distance`. Drawing apart at 0.5 brought
    one model's hits from twice as long as its files to as long, and made most of four others'
    ring longer (see sampling.CHANGE_TEMPERATURE): a choice per model, not a default. Returns the
    summary's ``sampling`` entry: the choice, each setting's distance, the draws and files."""
    files = file_envelopes(model, mels, CHOICE_SECONDS)
    if not files:
        raise BadInput("choose_change_temperature: no training sounds to compare draws with")
    distances = {c: envelope_distance(drawn_envelopes(model, change_temperature=c,
                                                      draws=CHOICE_DRAWS, seconds=CHOICE_SECONDS),
                                      files) for c in CHANGE_TEMPERATURE_CHOICES}  # fmt: skip
    best = min(CHANGE_TEMPERATURE_CHOICES, key=lambda c: (distances[c], c != CHANGE_TEMPERATURE))
    return {"change_temperature": best,
            "distances": {f"{c:g}": round(d, 4) for c, d in distances.items()},
            "draws": CHOICE_DRAWS, "files": len(files)}  # fmt: skip


def _device(model: DistillModel) -> torch.device:
    return model.vqvae.mel_mean.device


def _prior(model: DistillModel) -> Any:
    if model.prior is None:
        raise BadInput("this model has no prior (an RVQ-VAE only): it cannot generate or resample")
    return model.prior


# --- the operations ------------------------------------------------------------------------------


def render(model: DistillModel, codes: torch.Tensor, quality: Quality, levels: int | None = None
           ) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Codes (B, Q, T) -> audio (B, samples) float32 and log-mel (B, M, frames) float32."""
    with torch.inference_mode():
        mel = model.vqvae.decode_codes(codes, levels)  # (B, M, frames)
        audio = mel_to_audio_quality(mel, model.mel_config, quality)  # (B, samples)
    return audio.cpu().numpy().astype(np.float32), mel.cpu().numpy().astype(np.float32)


def encode(model: DistillModel, audio: torch.Tensor, search: int = SEARCH_CANDIDATES
           ) -> np.ndarray:  # fmt: skip
    """Mono audio (samples,) at the model's rate -> codes (Q, T) int64, chosen by what they
    decode to among ``search`` candidates per level and step (``VQVAE.search_codes``: on
    sounds unlike the training set, ~1.3x the Griffin-Lim floor where the quantizer's own
    codes give ~2.1x, at 2-7 s per second of sound on one CPU thread, which it runs on); 0 or
    1: the quantizer's nearest codes, at once."""
    search = check_int(search, "search", 0, MAX_SEARCH)
    seconds = audio.shape[-1] / model.mel_config.sample_rate
    if search * seconds > MAX_SEARCH_SECONDS:
        # each bound alone allowed 60 s at search 256: ~80 minutes of one worker's time
        raise BadInput(
            f"search {search} over {seconds:.1f} s of sound is more work than the default "
            f"search ({SEARCH_CANDIDATES}) over the longest sound ({MAX_SECONDS:g} s), itself "
            f"minutes: at this length search at most {int(MAX_SEARCH_SECONDS // seconds)}, "
            "or encode a shorter sound")  # fmt: skip
    with torch.inference_mode(), _one_cpu_thread(_device(model)):
        mel = log_mel(audio.to(_device(model)), model.mel_config)[None]  # (1, M, frames)
        codes = model.vqvae.search_codes(mel, max(search, 1))  # (1, Q, T)
    return codes[0].cpu().numpy().astype(np.int64)  # (Q, T)


@contextmanager
def _one_cpu_thread(device: torch.device) -> Iterator[None]:
    """The search on a CPU runs on one torch thread: thousands of ops on a few frames each,
    where more threads only add their synchronisation. Measured (a 1.8-s one-shot, 6 x 128
    codes, 2 cores): 4.1 s on one thread every time; on two 2.9 s with the machine idle and
    22-73 s with training beside it (the threads spin-wait for a busy core). The codes are the
    same either way."""
    if device.type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def decode(model: DistillModel, codes: object, levels: int | None, quality: Quality
           ) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """A (Q, T) grid -> audio (samples,) and log-mel (M, frames) from its first ``levels``."""
    grid = check_grid(model, codes)
    q = grid.shape[1]
    k = q if levels is None else check_int(levels, "levels", 1, q)
    audio, mel = render(model, grid, quality, k)
    return audio[0], mel[0]


def generate(model: DistillModel, *, count: int, seconds: float, params: SamplingParams,
             quality: Quality, prime: object = None,
             on_batch: Callable[[int, int], None] | None = None,
             on_steps: Callable[[int, int], None] | None = None,
             quiet_under_loudest_db: float | None = QUIET_UNDER_LOUDEST_DB,
             exact_length: bool = True,
             render_frames: int | None = BY_DEVICE) -> Generated:  # fmt: skip
    """``count`` new sounds of ``seconds`` each (continuing ``prime``, a (Q, T0) grid, if
    given). Sound i depends on (model, params.seed, count, seconds, prime, quality):
    regenerate with the same values and take item i. ``on_batch(done, count)`` is called
    after each batch of sounds (:func:`render_batch`) is decoded (progress, cancellation), and
    ``on_steps(drawn, steps)`` while the codes are drawn (``sampling.sample``).
    ``quiet_under_loudest_db`` None: only the absolute floor picks draws to draw again (how
    sounds were drawn before the relative rule; their recipes replay that way).
    ``exact_length`` (see :func:`exact_steps`) False: ``steps_for``'s steps, a hop short at
    most, and ``render_frames`` (see :data:`RENDER_FRAMES`) None: RENDER_BATCH sounds decoded
    together whatever their length (how sounds were made before; their recipes replay so).
    Every sound's audio is kept, count x samples of float32: what stores each sound as it is
    made (a generate job) runs :func:`generate_each`, the same sounds bit for bit."""
    kept: list[np.ndarray] = []  # the (count, samples) array, made with the first batch

    def keep(indices: np.ndarray, audio: np.ndarray) -> None:
        if not kept:
            kept.append(np.empty((int(count), audio.shape[1]), dtype=audio.dtype))
        kept[0][indices] = audio

    drawn = generate_each(model, keep, count=count, seconds=seconds, params=params,
                          quality=quality, prime=prime, on_batch=on_batch, on_steps=on_steps,
                          quiet_under_loudest_db=quiet_under_loudest_db,
                          exact_length=exact_length, render_frames=render_frames)  # fmt: skip
    return Generated(kept[0], drawn.grids(), drawn.sample_rate, drawn.redrawn,
                     drawn.render_frames)  # fmt: skip


# What a generate call hands out as it decodes: ``sink(indices, audio)``, the audio (b, samples)
# of the request's sounds ``indices`` (b,) int64, in that order
Sink = Callable[[np.ndarray, np.ndarray], None]


@dataclass(frozen=True)
class Drawn:
    """What :func:`generate_each` drew (its audio went to the sink)."""

    codes: np.ndarray  # (B, P, T) int64: the prior's levels of each sound's kept draw, new steps
    prefix: np.ndarray | None  # (Q, T0) int64: the prime the sounds continue
    levels: int  # the RVQ-VAE's Q (the levels past the prior's P hold no code)
    sample_rate: int
    redrawn: int
    render_frames: int | None

    def grids(self) -> np.ndarray:
        """Each sound's whole grid (B, Q, T0 + T) int64, the prime's steps first."""
        b, p, t = self.codes.shape
        t0 = 0 if self.prefix is None else self.prefix.shape[1]
        out = np.full((b, self.levels, t0 + t), -1, dtype=np.int64)
        if self.prefix is not None:
            out[:, :, :t0] = self.prefix
        out[:, :p, t0:] = self.codes
        return out


def generate_each(model: DistillModel, sink: Sink, *, count: int, seconds: float,
                  params: SamplingParams, quality: Quality, prime: object = None,
                  on_batch: Callable[[int, int], None] | None = None,
                  on_steps: Callable[[int, int], None] | None = None,
                  quiet_under_loudest_db: float | None = QUIET_UNDER_LOUDEST_DB,
                  exact_length: bool = True, render_frames: int | None = BY_DEVICE) -> Drawn:  # fmt: skip
    """:func:`generate`'s sounds handed to ``sink`` batch by batch as they are decoded, none
    kept: one batch's audio at a time (see :func:`render_batch`) and each draw's codes and
    peak, whatever the count (256 sounds of 60 s kept are 2.9 GB). The first draws come in
    order, ``on_batch(done, count)`` after each batch; then the batches drawn again (see
    :func:`quiet_draws`, judged once every first draw's peak is known): a sound handed out
    again replaces what it was. The arguments are :func:`generate`'s."""
    prior = _prior(model)
    count = check_int(count, "count", 1, MAX_COUNT)
    # the quality before the draws, not after them
    quality = quality if isinstance(quality, PhasePreset) else check_quality(quality)
    if render_frames == BY_DEVICE:
        render_frames = render_frames_for(model)
    prefix, steps, keep = _to_draw(model, seconds, prime, exact_length)
    p, q = prior.config.levels, model.vqvae.config.levels  # the prior draws the first p of q
    assert q is not None  # a loaded model's config is resolved
    new = prior_sample(prior, batch=count, steps=steps, params=params,
                       prefix=None if prefix is None else prefix[:, :p], on_steps=on_steps)  # (B, P, T)  # fmt: skip
    peaks = [0.0] * count  # dBFS, each sound's as handed out: what the redraw rule reads

    def hand_out(indices: np.ndarray, audio: np.ndarray) -> None:
        audio = audio[:, :keep]
        for i, one in zip(indices.tolist(), audio, strict=True):
            peaks[i] = peak_db(torch.from_numpy(one))
        sink(indices, audio)

    def first(rows: slice, audio: np.ndarray) -> None:
        hand_out(np.arange(rows.start, rows.stop), audio)
        if on_batch is not None:
            on_batch(rows.stop, count)

    _render_each(model, lambda rows: _with_prefix(prefix, _all_levels(new[rows], q)), count,
                 new.shape[2] + (0 if prefix is None else prefix.shape[2]), quality,
                 render_frames, first)  # fmt: skip
    codes = new.cpu().numpy()  # (B, P, T); a draw made again replaces its row
    loudest = max(peaks)  # of the first draws
    redrawn = np.zeros(count, dtype=bool)
    for attempt in range(1, (MAX_REDRAWS if prefix is None else 0) + 1):
        silent = np.flatnonzero(quiet_draws(peaks, loudest, quiet_under_loudest_db))
        if not len(silent):
            break
        redrawn[silent] = True
        seed = (params.seed * 1_000_003 + attempt) % (MAX_SEED + 1)
        again = prior_sample(prior, batch=len(silent), steps=steps,
                             params=dataclasses.replace(params, seed=seed), on_steps=on_steps)  # fmt: skip
        codes[silent] = again.cpu().numpy()

        def redrawn_grids(rows: slice, again: torch.Tensor = again) -> torch.Tensor:
            return _all_levels(again[rows], q)

        def take(rows: slice, audio: np.ndarray, silent: np.ndarray = silent) -> None:
            hand_out(silent[rows], audio)

        _render_each(model, redrawn_grids, len(silent), steps, quality, render_frames, take)
    return Drawn(codes, None if prefix is None else prefix[0].cpu().numpy(), q,
                 model.mel_config.sample_rate, int(redrawn.sum()), render_frames)  # fmt: skip


def _to_draw(model: DistillModel, seconds: float, prime: object, exact_length: bool
             ) -> tuple[torch.Tensor | None, int, int | None]:  # fmt: skip
    """A generate call's (prime checked (1, Q, T0) or None, code steps to draw, samples to
    keep: None, what the steps render to, as sounds were made before exact lengths)."""
    p = _prior(model).config.levels
    steps = steps_for(model, seconds)
    if float(seconds) <= 0.0:  # steps_for would give one step: a 21-ms click, not a sound
        raise BadInput(f"seconds must be more than 0, got {seconds!r}")
    prefix = None if prime is None else check_grid(model, prime, "prime")
    if prefix is not None and bool((prefix[:, :p] < 0).any()):
        raise BadInput(f"prime must hold a code at every step of the first {p} levels (no -1)")
    if prefix is not None and prefix.shape[2] + steps > steps_for(model, MAX_SECONDS):
        raise BadInput(f"prime plus seconds exceeds {MAX_SECONDS:g} s")
    keep = None
    if exact_length:
        steps, keep = exact_steps(model, seconds, 0 if prefix is None else prefix.shape[2])
    return prefix, steps, keep


def quiet_draws(peaks: Sequence[float], loudest: float, under_db: float | None) -> list[bool]:
    """Which draws, by their peaks (dBFS), are not sounds: a peak under SILENT_PEAK_DB, or
    ``under_db`` under ``loudest`` (dBFS, the loudest first draw of the request; None: no
    relative rule)."""
    floor = SILENT_PEAK_DB if under_db is None else max(SILENT_PEAK_DB, loudest - under_db)
    return [peak < floor for peak in peaks]


def _all_levels(drawn: torch.Tensor, levels: int) -> torch.Tensor:
    """Codes the prior drew (B, P, T) as a grid of the RVQ-VAE's ``levels`` (B, Q, T): the
    levels past the prior's hold no code (-1)."""
    if drawn.shape[1] == levels:
        return drawn
    empty = drawn.new_full((drawn.shape[0], levels - drawn.shape[1], drawn.shape[2]), -1)
    return torch.cat([drawn, empty], 1)


def _with_prefix(prefix: torch.Tensor | None, new: torch.Tensor) -> torch.Tensor:
    """Grids (B, Q, T) after the prime's steps (1, Q, T0), if any: (B, Q, T0 + T)."""
    return new if prefix is None else torch.cat([prefix.expand(len(new), -1, -1), new], 2)


def render_batch(model: DistillModel, steps: int, render_frames: int | None) -> int:
    """Sounds of ``steps`` code steps decoded together: RENDER_BATCH, fewer where their frames
    pass ``render_frames`` (None: RENDER_BATCH whatever their length, as before the budget)."""
    if render_frames is None:
        return RENDER_BATCH
    frames = max(1, steps * model.vqvae.config.downsample)
    return max(1, min(RENDER_BATCH, render_frames // frames))


def _render_each(model: DistillModel, grids: Callable[[slice], torch.Tensor], count: int,
                 steps: int, quality: Quality, render_frames: int | None,
                 take: Callable[[slice, np.ndarray], None]) -> None:  # fmt: skip
    """``render`` of ``count`` sounds of ``steps`` code steps, in batches of
    :func:`render_batch`: ``grids(rows)`` gives a batch's codes (b, Q, steps), ``take(rows,
    audio)`` its audio (b, samples) as it is made. The batches depend on the count, the steps
    and the budget alone (a batch's shape changes the phase reconstruction's last bits), so
    sounds kept, stored as they come or replayed are the same samples."""
    size = render_batch(model, steps, render_frames)
    for start in range(0, count, size):
        rows = slice(start, min(start + size, count))
        take(rows, render(model, grids(rows), quality)[0])  # (b, samples)


def _render_batches(model: DistillModel, codes: torch.Tensor, quality: Quality,
                    on_batch: Callable[[int, int], None] | None,
                    render_frames: int | None) -> np.ndarray:  # fmt: skip
    """``render`` in batches of :func:`render_batch`: audio (B, samples); progress after each.
    Each batch is written into one array (a list of batches joined at the end held the audio
    twice: 2.9 GB more at the peak of a job of 256 sounds of 60 s)."""
    out: list[np.ndarray] = []  # the one array, made with the first batch

    def take(rows: slice, audio: np.ndarray) -> None:
        if not out:
            out.append(np.empty((len(codes), *audio.shape[1:]), dtype=audio.dtype))
        out[0][rows] = audio
        if on_batch is not None:
            on_batch(rows.stop, len(codes))

    _render_each(model, lambda rows: codes[rows], len(codes), codes.shape[2], quality,
                 render_frames, take)  # fmt: skip
    return out[0]


def progressive(model: DistillModel, audio: torch.Tensor, quality: str,
                search: int = SEARCH_CANDIDATES) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Codes (Q, T) of ``audio`` and its reconstructions (Q, samples) from k = 1..Q levels."""
    codes = encode(model, audio, search)
    grid = torch.from_numpy(codes)[None].to(_device(model))  # (1, Q, T)
    q = codes.shape[0]
    outs = [render(model, grid, quality, k)[0][0] for k in range(1, q + 1)]
    return codes, np.stack(outs)


def blend(model: DistillModel, a: torch.Tensor, b: torch.Tensor, amount: float, quality: str
          ) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Encoder outputs of a and b interpolated by ``amount`` (0: a, 1: b), quantised again.

    The shorter sound is padded with silence to the longer one's length. Returns codes (Q, T)
    and audio (samples,); at amount 0 and 1 they equal ``decode(encode(a or b, search=0))``:
    a mix has no sound to search codes against, so it keeps the quantizer's nearest.
    """
    amount = check_number(amount, "amount", 0.0, 1.0)
    n = max(a.shape[-1], b.shape[-1])
    pair = torch.stack([torch.nn.functional.pad(x, (0, n - x.shape[-1])) for x in (a, b)])
    with torch.inference_mode():
        mels = log_mel(pair.to(_device(model)), model.mel_config)  # (2, M, frames)
        z = model.vqvae.encode_latents(mels)  # (2, T, D)
        mixed = torch.lerp(z[0:1], z[1:2], amount)  # (1, T, D); exact at 0 and 1
        _, codes, _ = model.vqvae.quantize(mixed)  # (1, Q, T)
    audio, _ = render(model, codes, quality)
    return codes[0].cpu().numpy(), audio[0]


def resample_region(model: DistillModel, codes: object, t0: int, t1: int,
                    params: SamplingParams, quality: str) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Steps [t0, t1) of a full grid drawn again by the prior; codes (Q, T) and audio."""
    made = resample_variants(model, codes, t0, t1, params, quality, count=1)
    return made.codes[0], made.audio[0]


def resample_variants(model: DistillModel, codes: object, t0: int, t1: int,
                      params: SamplingParams, quality: Quality, *, count: int,
                      on_batch: Callable[[int, int], None] | None = None,
                      render_frames: int | None = BY_DEVICE) -> Generated:  # fmt: skip
    """``count`` versions of a full grid, each with steps [t0, t1) drawn again by the prior
    (one batch, one seed: version i depends on (model, codes, t0, t1, params, count, quality),
    as a generated sound does). Audio (count, samples) and codes (count, Q, T).
    ``render_frames``: as for :func:`generate`."""
    prior = _prior(model)
    grid = check_grid(model, codes)
    if render_frames == BY_DEVICE:
        render_frames = render_frames_for(model)
    p = prior.config.levels  # the prior draws the first p levels; finer ones are left empty
    if bool((grid[:, :p] < 0).any()):
        raise BadInput(f"resample_region needs a code at every step of the first {p} levels "
                       "(no -1)")  # fmt: skip
    count = check_int(count, "count", 1, MAX_COUNT)
    t0 = check_int(t0, "t0", 0, grid.shape[2] - 1)
    t1 = check_int(t1, "t1", t0 + 1, grid.shape[2])
    new = grid.expand(count, -1, -1).clone()  # (B, Q, T)
    new[:, :p] = prior_resample_region(prior, grid[:, :p].expand(count, -1, -1), t0, t1, params)
    new[:, p:, t0:t1] = -1  # the sound's finer codes there belonged to the steps drawn over
    audio = _render_batches(model, new, quality, on_batch, render_frames)
    return Generated(audio, new.cpu().numpy(), model.mel_config.sample_rate,
                     render_frames=render_frames)  # fmt: skip


def codebook_usage(model: DistillModel, mels: np.ndarray, batch: int = 64) -> dict[str, Any]:
    """Per-level code counts over log-mel chunks (N, M, T): usage, entropy, dead codes."""
    q, k = model.vqvae.config.levels, model.vqvae.config.codebook_size
    assert q is not None and k is not None
    counts = np.zeros((q, k), dtype=np.int64)
    with torch.inference_mode():
        for start in range(0, len(mels), batch):
            chunk = torch.from_numpy(mels[start : start + batch]).to(_device(model))
            codes = model.vqvae.encode(chunk).cpu().numpy()  # (B, Q, T)
            for level in range(q):
                counts[level] += np.bincount(codes[:, level].ravel(), minlength=k)
    levels = []
    for row in counts:
        p = row / max(1, int(row.sum()))
        entropy = float(-(p[p > 0] * np.log2(p[p > 0])).sum())
        levels.append({"usage": row, "entropy_bits": entropy, "perplexity": 2.0**entropy,
                       "dead": np.flatnonzero(row == 0).astype(np.int64),
                       "used": int((row > 0).sum())})  # fmt: skip
    return {"levels": levels, "codes_counted": int(counts[0].sum()), "codebook_size": k}


def edit_session(model: DistillModel, session: object, action: object, edit: object
                 ) -> EditSession:  # fmt: skip
    """The session after ``action`` ("apply" with ``edit``, "undo", "redo" or "none")."""
    try:
        # the base grid against the model before its edits are replayed: a 3-hour grid was
        # refused only after replaying them all
        if isinstance(session, Mapping) and isinstance(session.get("base"), Mapping):
            check_grid(model, CodeGrid.from_dict(session["base"]).codes, "the session's grid")
        current = EditSession.from_dict(session)
        if current.base.codebook_size != model.vqvae.config.codebook_size:
            raise BadInput(f"the session's grid has {current.base.codebook_size} codes per "
                           f"level; this model has {model.vqvae.config.codebook_size}")  # fmt: skip
        if action == "apply":
            current.apply(edit_from_dict(edit))
        elif action == "undo":
            current.undo()
        elif action == "redo":
            current.redo()
        elif action != "none":
            raise BadInput(f"action must be apply, undo, redo or none, got {action!r}")
    except CodeGridError as e:
        raise BadInput(str(e)) from e
    check_grid(model, current.grid.codes, "the edited grid")
    return current


# --- recipes: what an exported file records, and replaying it ------------------------------------

RECIPE_KINDS = ("generate", "decode", "edit", "resample")
# The keys each kind of recipe is written with, by this Distill and the earlier ones (the CLI,
# the infer worker's generate job, the UI's exports). A recipe holding another was written
# by a newer Distill, whose rule this one would replay without: regenerate says so (and
# replays it still, as a newer file's extra note or label changes nothing).
_DRAWN_KEYS = frozenset(SamplingParams.__dataclass_fields__) | {
    "count", "quality", "phase", "index", "threads", "render_frames", "trim"}  # fmt: skip
RECIPE_KEYS = {
    "generate": _DRAWN_KEYS | {"seconds", "quiet_under_loudest_db", "exact_length", "prime",
                               "prime_steps"},
    "resample": _DRAWN_KEYS | {"codes", "t0", "t1"},
    "decode": frozenset({"codes", "levels", "quality", "phase", "threads"}),
    "edit": frozenset({"session", "levels", "quality", "phase", "threads"}),
}  # fmt: skip


def unknown_recipe_keys(kind: str, data: Mapping[str, Any]) -> list[str]:
    """The keys of a ``kind`` recipe this Distill does not know (see RECIPE_KEYS), sorted."""
    known = RECIPE_KEYS.get(kind)
    return [] if known is None else sorted(str(k) for k in data if k not in known)


def generate_recipe(params: SamplingParams, *, count: int, seconds: float, quality: str,
                    index: int, render_frames: int | None, prime: np.ndarray | None = None,
                    trim: float | None = None) -> dict[str, Any]:  # fmt: skip
    """What regenerates sound ``index`` of a generate call (an export's metadata ``data``);
    ``prime``, the (Q, T0) codes it continued, if any; ``trim``, where the sound was ended
    (see :func:`finish`), recorded only when set.

    ``threads`` is recorded because CPU kernels split their sums by thread: measured, the same
    sound made with 1 and 2 torch threads differs in its last bits, so a replay uses the count
    the sound was made with.
    """
    recipe = {**params.to_dict(), "count": count, "seconds": seconds, "quality": quality,
              "phase": phase_record(quality), "index": index, "threads": torch.get_num_threads(),
              "quiet_under_loudest_db": QUIET_UNDER_LOUDEST_DB, "exact_length": True,
              "render_frames": render_frames}  # fmt: skip
    if prime is not None:
        recipe["prime"] = np.asarray(prime).tolist()
    if trim is not None:
        recipe["trim"] = trim
    return recipe


def resample_recipe(params: SamplingParams, codes: np.ndarray, *, t0: int, t1: int,
                    count: int, quality: str, index: int, render_frames: int | None,
                    trim: float | None = None) -> dict[str, Any]:  # fmt: skip
    """What makes version ``index`` of a ``resample_variants`` call again: the grid before,
    the region, the sampling parameters (and the thread count, as for a generated sound), and
    ``trim`` when set (see :func:`finish`)."""
    recipe = {**params.to_dict(), "codes": np.asarray(codes).tolist(), "t0": t0, "t1": t1,
              "count": count, "quality": quality, "phase": phase_record(quality),
              "index": index, "threads": torch.get_num_threads(),
              "render_frames": render_frames}  # fmt: skip
    if trim is not None:
        recipe["trim"] = trim
    return recipe


def decode_recipe(codes: np.ndarray, levels: int | None, quality: str,
                  threads: int | None = None) -> dict[str, Any]:  # fmt: skip
    """What decodes ``codes`` again; ``threads``: the count it was decoded with (default: now)."""
    return {"codes": np.asarray(codes).tolist(), "levels": levels, "quality": quality,
            "phase": phase_record(quality), "threads": threads or torch.get_num_threads()}  # fmt: skip


def replay(model: DistillModel, kind: str, data: Mapping[str, Any],
           on_batch: Callable[[int, int], None] | None = None) -> np.ndarray:  # fmt: skip
    """The audio (samples,) a recipe of ``kind`` describes, made again on ``model`` with the
    torch thread count it records (the process's count is restored after). ``on_batch(done,
    count)``: as for :func:`generate`, while a generate or resample recipe's batch is decoded."""
    if kind not in RECIPE_KINDS:
        raise BadInput(f"cannot regenerate a '{kind}' export (known: {', '.join(RECIPE_KINDS)})")
    check_trim(data.get("trim"))  # before the work: a bad value would only fail after it
    before = torch.get_num_threads()
    threads = data.get("threads")
    if threads is not None:
        torch.set_num_threads(check_int(threads, "threads", 1, 1024))
    try:
        return finish(model, data, _replay(model, kind, data, on_batch))
    finally:
        torch.set_num_threads(before)


def _replay(model: DistillModel, kind: str, data: Mapping[str, Any],
            on_batch: Callable[[int, int], None] | None = None) -> np.ndarray:  # fmt: skip
    try:
        quality = recorded_phase(data)
        if kind in ("generate", "resample"):
            # min_p and the change temperature came later: a recipe without one was drawn
            # without it (0 and 1)
            params = sampling_params({**{k: data[k] for k in ("temperature", "top_k", "top_p",
                                                              "seed")},
                                      "min_p": data.get("min_p", 0.0),
                                      "change_temperature": data.get("change_temperature",
                                                                     1.0)})  # fmt: skip
            count = check_int(data["count"], "count", 1, MAX_COUNT)
            index = check_int(data["index"], "index", 0, count - 1)
            # so did the frames budget of a decoding batch: without it, 16 sounds at a time
            frames = data.get("render_frames")
            if frames is not None:
                frames = check_int(frames, "render_frames", 1, 2**31)
            if kind == "resample":
                return resample_variants(model, _grid(data["codes"]), data["t0"], data["t1"],
                                         params, quality, count=count, on_batch=on_batch,
                                         render_frames=frames).audio[index]  # fmt: skip
            prime = data.get("prime")
            # the relative redraw rule came later: a recipe without it was drawn without it
            under = data.get("quiet_under_loudest_db")
            if under is not None:
                under = check_number(under, "quiet_under_loudest_db", 0.0, 200.0)
            # so did exact lengths: a recipe without them was drawn a hop short at most
            exact = data.get("exact_length", False)
            if not isinstance(exact, bool):  # "yes" was read as false: a hop short, silently
                raise BadInput(f"exact_length must be true or false, got {exact!r}")
            kept: list[np.ndarray] = []  # sound ``index`` alone: the others only for their peaks

            def keep(indices: np.ndarray, audio: np.ndarray) -> None:
                kept.extend(one.copy() for i, one in zip(indices.tolist(), audio, strict=True)
                            if i == index)  # fmt: skip

            generate_each(model, keep, count=count, seconds=data["seconds"], params=params,
                          quality=quality, prime=None if prime is None else _grid(prime, "prime"),
                          quiet_under_loudest_db=under, exact_length=exact,
                          render_frames=frames, on_batch=on_batch)  # fmt: skip
            return kept[-1]  # a sound drawn again: its last draw
        if kind == "decode":
            return decode(model, _grid(data["codes"]), data["levels"], quality)[0]
        session = edit_session(model, data["session"], "none", None)
        return decode(model, session.grid.codes, data["levels"], quality)[0]
    except KeyError as e:
        raise BadInput(f"the '{kind}' recipe lacks {e}") from e


def readings(kind: str, data: Mapping[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """The ways to read a recipe, as (how, recipe): as written first; then, for a recipe written
    before Distill recorded a rule it depends on, as the Distill of its time may have made it.
    ``distill regenerate`` tries them in turn until one makes the file's samples.

    What older recipes may lack: ``threads`` (recorded since thread counts were found to change
    the last bits: the sound may have been made with any count), ``phase`` (the ``fast`` preset
    was 8 iterations until about when thread counts came in, 4 since), and, in a sound the
    terminal UI exported from an infer worker whose reply did not name the quiet-draw rule it
    applied (``change_temperature`` recorded, ``quiet_under_loudest_db`` not), that rule."""
    changes: list[list[tuple[str, dict[str, Any]]]] = []
    if "phase" not in data and "threads" not in data and data.get("quality") == "fast":
        changes.append([("", {}), ("with 'fast' as 8 phase iterations (its meaning then)",
                                   {"phase": [8, "vocoder"]})])  # fmt: skip
    if (kind == "generate" and "change_temperature" in data
            and "quiet_under_loudest_db" not in data):  # fmt: skip
        changes.append([("", {}), (f"with the quiet-draw rule ({QUIET_UNDER_LOUDEST_DB:g} dB) its "
                                   "worker applied but did not name",
                                   {"quiet_under_loudest_db": QUIET_UNDER_LOUDEST_DB})])  # fmt: skip
    if "threads" not in data:
        now = torch.get_num_threads()
        counts = [now] + [n for n in (1, 2, 4, 8, 16, 32, 64) if n != now and n <= max(now, _cores())]
        changes.append([("" if n == now else f"with {n} thread{'s' * (n > 1)}", {"threads": n})
                        for n in counts])
    out: list[tuple[str, dict[str, Any]]] = [("as written", dict(data))]
    for combo in itertools.product(*changes):
        hows = [how for how, _ in combo if how]
        if hows:
            recipe = dict(data)
            for _, change in combo:
                recipe.update(change)
            out.append((", ".join(hows), recipe))
    return out


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _grid(codes: object, name: str = "codes") -> np.ndarray:
    """A recipe's code grid (nested lists from JSON) as int64, checked against the model later;
    ``name``: its key, for errors (a bad ``prime`` was called "the recipe's codes")."""
    what = "codes are" if name == "codes" else f"{name} is"
    try:
        grid = np.array(codes)
    except (TypeError, ValueError, OverflowError) as e:
        raise BadInput(f"the recipe's {what} not an integer grid ({e})") from e
    # whole numbers only: int64 of 1.5 would be 1, a code the file never held (an empty grid
    # is float to numpy: its shape is refused later)
    if grid.dtype.kind not in "iu" and grid.size:
        holds = "they hold" if name == "codes" else "it holds"
        raise BadInput(f"the recipe's {what} not an integer grid ({holds} {grid.dtype} "
                       "values)")  # fmt: skip
    try:
        return grid.astype(np.int64, casting="safe" if grid.size else "unsafe")
    except TypeError as e:  # uint64 past int64
        raise BadInput(f"the recipe's {what} not an integer grid ({e})") from e
