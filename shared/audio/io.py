"""Audio in and out: decode anything soundfile reads, make it model-ready, write WAV/FLAC.

Reading goes through soundfile (libsndfile: WAV, FLAC, OGG, MP3, AIFF and more), never through
``torchaudio.load``, which routes through torchcodec in torchaudio >= 2.9. Every way a file can
be unusable raises :class:`AudioError` with the file's name and the reason in words.

The path from file to model input, in :func:`prepare_audio`:

1. decode to float32 ``(channels, frames)`` and reject non-finite samples, absurd rates and
   files too short to hold a sound;
2. downmix to mono (mean of channels, so a stereo file keeps its level);
3. reject files whose peak is below the silence threshold (dBFS);
4. trim leading and trailing silence: samples more than ``threshold`` dB below the file's own
   peak, keeping a few milliseconds before the onset so attacks stay whole; silence that sits
   at a constant offset (DC) is judged as it stands from the offset, which is then removed
   (:func:`trim_to_sound`);
5. resample to the model rate with ``torchaudio.functional.resample``;
6. normalise the peak to -1 dBFS (see :func:`normalise` for why peak and not RMS).

Chunking (:func:`cut_chunks`) works on the last axis of any tensor, audio or log-mel frames.
"""

from __future__ import annotations

import io
import math
import os
import re
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, BinaryIO, Literal

import numpy as np
import soundfile as sf
import torch
import torchaudio

from distill.shared.errors import AudioError

MIN_SAMPLE_RATE = 1000  # below this nothing audible survives; it is a broken header
MAX_SAMPLE_RATE = 768_000  # the highest rate real converters run at
MIN_DURATION_S = 0.001  # under 1 ms holds no pitch or timbre at any FFT size we use
# Decoding allocates what the header promises, every channel: refuse more than 1 GiB of float32
# (10 minutes of 7.1 at 48 kHz fit; a 1-MB FLAC of 8 channels at 192 kHz for 5 minutes, mostly
# silence, does not: it took a worker to 4.2 GB), or what the length limit allows of stereo at
# 96 kHz if that is more, rather than let a file exhaust the worker's memory.
MAX_DECODED_SAMPLES = 2**28
# Ten minutes per file by default: a sound collection holds hits, loops and recordings of
# seconds to minutes; an hour-long file is almost always a mistake (a whole session), and
# decoding it would hold ~1.4 GB of float32 stereo. Files past it are skipped with this reason.
ENV_MAX_AUDIO_S = "DISTILL_MAX_AUDIO_S"
DEFAULT_MAX_AUDIO_S = 600.0
DECODE_BLOCK_S = 10.0  # decoded per read: the limit is checked between blocks
DEFAULT_SILENCE_THRESHOLD_DB = -60.0
DEFAULT_PEAK_DB = -1.0  # 1 dB of headroom keeps resampled or augmented audio off full scale
ONSET_MARGIN_S = 0.005  # kept before the first loud sample: the very start of an attack
TAIL_MARGIN_S = 0.010  # kept after the last loud sample: the end of a decay
# The stretch at each end of a file that says whether its silence sits at an offset (DC: a bad
# converter, a synth's bias). A hit's 2 s of silence at +0.05 counted as sound (0.2 s of hit
# encoded to 207 code steps, not 20), and a file of a constant 0.5 was trained on.
EDGE_S = 0.010
AUDIO_EXTENSIONS = frozenset(
    {".wav", ".wave", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aif", ".aiff", ".aifc",
     ".caf", ".w64", ".rf64", ".au", ".snd"}
)  # fmt: skip

Normalisation = Literal["peak", "rms", "none"]
AudioSource = bytes | bytearray | memoryview | str | Path


@dataclass(frozen=True)
class DecodedAudio:
    """A file as read: ``samples`` is float32 ``(channels, frames)`` at ``sample_rate``."""

    name: str
    samples: np.ndarray  # (channels, frames) float32
    sample_rate: int
    format: str  # soundfile's format name, e.g. "FLAC"
    subtype: str  # e.g. "PCM_24"

    @property
    def channels(self) -> int:
        return int(self.samples.shape[0])

    @property
    def frames(self) -> int:
        return int(self.samples.shape[1])

    @property
    def duration_s(self) -> float:
        return self.frames / self.sample_rate


# --- reading -------------------------------------------------------------------------------------


def _looks_like_text(data: bytes) -> bool:
    head = data[:4096]
    if not head or b"\x00" in head:
        return False
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return False
    printable = sum(ch.isprintable() or ch in "\r\n\t" for ch in text)
    return printable >= 0.95 * len(text)


def _undecodable_reason(data: bytes, err: Exception) -> str:
    if _looks_like_text(data):
        return "not audio: it is a text file"
    detail = _lib_reason(err)
    if "malformed" in detail:
        return f"corrupt or truncated ({detail})"
    return f"not an audio format soundfile can read ({detail})"


_SHORT_CHUNK = re.compile(r"(?:data|SSND) : (\d+) \(should be (\d+)\)")
# Streaming writers leave these in the size field and never come back to fix it; the data that
# follows is whole, and libsndfile reads all of it.
_PLACEHOLDER_SIZES = frozenset({0xFFFFFFFF, 0x7FFFFFFF})


def _truncation(f: sf.SoundFile, frames_read: int) -> str | None:
    """Why a decoded file looks truncated, or None. libsndfile clips a short data chunk silently
    and only says so in its log; compressed formats decode fewer frames than their header says."""
    m = _SHORT_CHUNK.search(f.extra_info)
    if m:
        promised, held = int(m.group(1)), int(m.group(2))
        if held < promised and promised not in _PLACEHOLDER_SIZES:
            return f"truncated: header promises {promised} data bytes, file holds {held}"
    declared = f.frames
    # MP3 frame counts are estimates from the bitrate; allow them 10%.
    slack = 0.1 * declared if f.format == "MP3" else 0
    if declared > 0 and frames_read < declared - slack:
        return f"truncated: header promises {declared} frames, only {frames_read} decode"
    return None


def max_audio_s() -> float:
    """The longest file decoded, in seconds: ``$DISTILL_MAX_AUDIO_S``, else 600."""
    raw = os.environ.get(ENV_MAX_AUDIO_S, "").strip()
    if not raw:
        return DEFAULT_MAX_AUDIO_S
    try:
        value = float(raw)
    except ValueError:
        raise AudioError(f"{ENV_MAX_AUDIO_S}={raw!r} is not a number of seconds") from None
    if not math.isfinite(value) or value <= 0:
        raise AudioError(f"{ENV_MAX_AUDIO_S} must be a positive number of seconds, got {raw!r}")
    return value


def _too_long(name: str, limit_s: float, f: sf.SoundFile, seconds: float) -> AudioError:
    """A file refused for its length; ``seconds`` (what its header states, or what was read
    before the limit stopped it), its rate and channels go with it for the manifest."""
    return AudioError(
        f"{name}: longer than {limit_s:g} s, the longest file decoded (setting {ENV_MAX_AUDIO_S}); "
        "skipped",
        stated=(float(seconds), int(f.samplerate), int(f.channels)),
    )


def stated_duration_s(path: str | Path) -> float | None:
    """The length ``path``'s header states, in seconds, read without decoding any sample; None
    when it states none (a stream's placeholder size) or soundfile cannot read it (then
    :func:`read_audio` says why)."""
    try:
        info = sf.info(str(path))
    except (RuntimeError, OSError, ValueError, TypeError):
        return None
    if info.samplerate <= 0 or info.frames <= 0 or info.frames in _PLACEHOLDER_SIZES:
        return None
    return float(info.frames / info.samplerate)


def _max_samples(limit_s: float) -> int:
    """Samples (frames x channels) one file may decode to (see MAX_DECODED_SAMPLES)."""
    return max(MAX_DECODED_SAMPLES, int(limit_s * 96_000 * 2))


def _read_blocks(f: sf.SoundFile, name: str, limit_s: float) -> np.ndarray:
    """All frames as ``(channels, frames)``, read block by block, stopping past ``limit_s``.

    Written into one array the header's length sizes (blocks were kept, joined and transposed:
    three copies of the file at once); a header that under-states the length (or has none)
    grows it."""
    limit_frames = int(limit_s * f.samplerate)
    if 0 < limit_frames < f.frames and f.frames not in _PLACEHOLDER_SIZES:
        raise _too_long(name, limit_s, f, f.frames / f.samplerate)  # the header says so: nothing is decoded
    block_frames = max(1, int(DECODE_BLOCK_S * f.samplerate))
    stated = f.frames if f.frames > 0 and f.frames not in _PLACEHOLDER_SIZES else block_frames
    out = np.empty((f.channels, stated), dtype=np.float32)
    total = 0
    while True:
        try:
            block = f.read(block_frames, dtype="float32", always_2d=True)  # (frames, channels)
        except (sf.LibsndfileError, RuntimeError) as e:
            raise AudioError(f"{name}: truncated or corrupt: {_lib_reason(e)}") from e
        if not len(block):
            break
        end = total + len(block)
        if end > limit_frames:  # a header that under-states the length (or none)
            raise _too_long(name, limit_s, f, end / f.samplerate)  # at least that long
        if end * f.channels > _max_samples(limit_s):
            raise _too_many_samples(name, f, end)
        if end > out.shape[1]:
            grown = np.empty((f.channels, max(end, 2 * out.shape[1])), dtype=np.float32)
            grown[:, :total] = out[:, :total]
            out = grown
        out[:, total:end] = block.T
        total = end
    return np.ascontiguousarray(out[:, :total]) if total < out.shape[1] else out


def _too_many_samples(name: str, f: sf.SoundFile, frames: int) -> AudioError:
    return AudioError(
        f"{name}: too much to decode at once ({frames} frames x {f.channels} channels at "
        f"{f.samplerate} Hz; at most {MAX_DECODED_SAMPLES} samples): mix it down to stereo "
        "or a lower rate first",
        stated=(frames / f.samplerate, int(f.samplerate), int(f.channels)))  # fmt: skip


def _decode(src: BinaryIO | str, name: str, data: bytes | None, limit_s: float) -> DecodedAudio:
    try:
        with sf.SoundFile(src) as f:
            if (f.frames * f.channels > _max_samples(limit_s)
                    and f.frames not in _PLACEHOLDER_SIZES):
                raise _too_many_samples(name, f, f.frames)
            samples = _read_blocks(f, name, limit_s)  # (channels, frames)
            problem = _truncation(f, samples.shape[1])
            rate, fmt, subtype = int(f.samplerate), str(f.format), str(f.subtype)
    except sf.LibsndfileError as e:
        raw = data if data is not None else _head_of(src)
        raise AudioError(f"{name}: {_undecodable_reason(raw, e)}") from e
    if problem:
        raise AudioError(f"{name}: {problem}")
    return DecodedAudio(name=name, samples=samples, sample_rate=rate, format=fmt, subtype=subtype)


def _lib_reason(e: Exception) -> str:
    """libsndfile's own words, without the "Error opening <object at 0x...>:" preamble."""
    text = str(e)
    if text.startswith("Error opening") and ": " in text:
        text = text.rsplit(": ", 1)[-1]
    return text.replace("Error : ", "").strip().rstrip(".") or type(e).__name__


def _head_of(src: BinaryIO | str) -> bytes:
    try:
        with open(src, "rb") as fh:  # type: ignore[arg-type]
            return fh.read(4096)
    except (OSError, TypeError):
        return b""


def read_audio(
    source: AudioSource, *, name: str | None = None, max_s: float | None = None
) -> DecodedAudio:
    """Decode a file from bytes or a path, at its own rate and channel count.

    Raises AudioError for: an empty file, a file soundfile cannot read (e.g. text named .wav),
    a truncated file, no samples, NaN/inf samples, a rate outside 1 kHz..768 kHz, a file
    shorter than 1 ms or 2 samples, and one longer than ``max_s`` seconds (None:
    :func:`max_audio_s`), found from its header or while reading it block by block.
    """
    limit_s = max_audio_s() if max_s is None else max_s
    if isinstance(source, (str, Path)):
        path = Path(source)
        name = name or path.name
        try:
            size = path.stat().st_size
        except OSError as e:
            raise AudioError(f"{name}: cannot open: {e.strerror or e}") from e
        if size == 0:
            raise AudioError(f"{name}: empty file (0 bytes)")
        decoded = _decode(str(path), name, None, limit_s)
    else:
        data = bytes(source)
        name = name or "<bytes>"
        if not data:
            raise AudioError(f"{name}: empty file (0 bytes)")
        decoded = _decode(io.BytesIO(data), name, data, limit_s)
    _validate_decoded(decoded)
    return decoded


def _validate_decoded(d: DecodedAudio) -> None:
    """AudioError for decoded audio Distill cannot use; past the header checks it says what
    the file is (``stated``), so a manifest's skipped row shows its length, rate and channels."""
    what = (d.duration_s, d.sample_rate, d.channels)
    if not MIN_SAMPLE_RATE <= d.sample_rate <= MAX_SAMPLE_RATE:
        raise AudioError(
            f"{d.name}: sample rate {d.sample_rate} Hz is outside "
            f"{MIN_SAMPLE_RATE}..{MAX_SAMPLE_RATE} Hz (a broken header?)"
        )
    if d.frames == 0 or d.channels == 0:
        raise AudioError(f"{d.name}: no audio samples in the file")
    if d.frames < 2 or d.duration_s < MIN_DURATION_S:
        raise AudioError(
            f"{d.name}: too short to be a sound ({d.frames} sample(s), "
            f"{d.duration_s * 1000:.3f} ms; the minimum is 2 samples and {MIN_DURATION_S * 1000:g} ms)",
            stated=what,
        )
    finite = np.isfinite(d.samples)
    if not finite.all():
        bad = int(d.samples.size - finite.sum())
        raise AudioError(f"{d.name}: {bad} sample(s) are NaN or infinite", stated=what)


# --- making it model-ready ------------------------------------------------------------------------


def to_mono(samples: np.ndarray | torch.Tensor) -> torch.Tensor:
    """``(channels, frames) -> (frames,)`` by averaging, which keeps a stereo file's level."""
    x = torch.as_tensor(samples, dtype=torch.float32)
    return x.mean(dim=0) if x.ndim == 2 else x


def db_to_amplitude(db: float) -> float:
    return float(10.0 ** (db / 20.0))


def peak_db(audio: torch.Tensor) -> float:
    peak = float(audio.abs().max()) if audio.numel() else 0.0
    return 20.0 * math.log10(peak) if peak > 0 else -math.inf


def _edge_levels(audio: torch.Tensor, sample_rate: int, floor: float) -> list[float | None]:
    """Per end of ``audio`` (start, end): the level it sits still at over EDGE_S (its median,
    its samples within half of it of each other), 0.0 where that is under ``floor`` (silent as
    it is), None where it moves (sound)."""
    k = max(1, min(int(audio.shape[-1]), round(EDGE_S * sample_rate)))
    levels: list[float | None] = []
    for edge in (audio[:k], audio[-k:]):
        level = float(edge.median()) if edge.numel() else 0.0
        if abs(level) < floor:
            levels.append(0.0)
        else:
            still = float(edge.max() - edge.min()) < abs(level) / 2
            levels.append(level if still else None)
    return levels


def silence_offset(audio: torch.Tensor, sample_rate: int, floor: float) -> float:
    """The constant offset (DC) the silence of ``audio`` ``(samples,)`` sits at: the mean of
    the levels its still ends sit at ``floor`` or more from zero, or 0.0. Sound at an end
    swings through far more than half its level (of the 148 percussion and texture files, no
    end passes for an offset), and an end within ``floor`` of zero is silent as it is: a file
    without an offset gets 0.0 and is judged exactly as before offsets were looked for."""
    return _offset(_edge_levels(audio, sample_rate, floor))


def _offset(levels: list[float | None]) -> float:
    found = [v for v in levels if v]
    return sum(found) / len(found) if found else 0.0


def edge_offsets(audio: torch.Tensor, sample_rate: int, floor: float) -> tuple[float, float]:
    """What the start and the end of ``audio`` are judged silent against (:func:`trim_silence`):
    (0.0, 0.0) unless one sits at an offset (:func:`silence_offset`); then each end's own
    level, an end with sound in it (the DC under it) the offset."""
    levels = _edge_levels(audio, sample_rate, floor)  # (looked at once)
    offset = _offset(levels)
    if not offset:
        return 0.0, 0.0
    head, tail = (offset if v is None else v for v in levels)
    return head, tail


def trim_silence(
    audio: torch.Tensor,
    sample_rate: int,
    threshold_db: float = DEFAULT_SILENCE_THRESHOLD_DB,
) -> torch.Tensor:
    """Cut leading and trailing samples quieter than ``threshold_db`` below the peak.

    ``(samples,) -> (samples',)``. Relative to the file's own peak, so a quiet recording loses
    as much of its tail as a loud one. Keeps ``ONSET_MARGIN_S`` before the first loud sample
    and ``TAIL_MARGIN_S`` after the last. An end whose silence sits at an offset (DC, see
    :func:`edge_offsets`) is judged by how far each sample stands from that offset; the offset
    itself stays (:func:`trim_to_sound` removes it). An all-zero input, or one of nothing but
    an offset, is returned unchanged.
    """
    return _trim(audio, sample_rate, threshold_db)[0]


def trim_to_sound(
    audio: torch.Tensor,
    sample_rate: int,
    threshold_db: float = DEFAULT_SILENCE_THRESHOLD_DB,
) -> torch.Tensor:
    """:func:`trim_silence`, then the levels its ends' silence sat at taken off, along the line
    from the start's to the end's, so that the sound starts and ends at zero.

    The offset is inaudible and the mel features cannot carry it; kept, the sound would start
    and end with a step to it (a click, at every chunk's padding). Taken off whole where only one
    end sat at it, it would make that step at the other end (a clean start then began at -0.05);
    along the line, an end that was clean stays as it was. A file whose ends are both clean (all
    148 percussion and texture files) is returned as :func:`trim_silence` returns it, bit for bit.
    """
    trimmed, head, tail = _trim(audio, sample_rate, threshold_db)
    if not (head or tail):
        return trimmed
    return trimmed - torch.linspace(head, tail, trimmed.shape[-1], dtype=trimmed.dtype)


def _trim(audio: torch.Tensor, sample_rate: int, threshold_db: float) -> tuple[torch.Tensor, float, float]:
    """:func:`trim_silence`'s cut, and the levels (:func:`edge_offsets`) it judged the start
    and the end against."""
    if threshold_db >= 0:
        raise ValueError(f"threshold_db must be negative, got {threshold_db}")
    level = audio.abs()
    peak = float(level.max()) if audio.numel() else 0.0
    if peak == 0.0:
        return audio, 0.0, 0.0
    head, tail = edge_offsets(audio, sample_rate, peak * db_to_amplitude(threshold_db))
    lead = (audio - head).abs() if head else level
    trail = (audio - tail).abs() if tail else level
    if head or tail:  # the peak as the sound stands from its offset
        peak = max(float(lead.max()), float(trail.max()))
    floor = peak * db_to_amplitude(threshold_db)
    loud_lead, loud_trail = torch.nonzero(lead >= floor), torch.nonzero(trail >= floor)
    if peak == 0.0 or not len(loud_lead) or not len(loud_trail):  # nothing but the offset
        return audio, 0.0, 0.0
    first, last = int(loud_lead[0, 0]), int(loud_trail[-1, 0])
    start = max(0, first - round(ONSET_MARGIN_S * sample_rate))
    stop = min(audio.shape[-1], last + 1 + round(TAIL_MARGIN_S * sample_rate))
    return audio[start:stop], head, tail


def trim_tail(audio: np.ndarray, sample_rate: int, under_peak_db: float, keep: int = 0
              ) -> np.ndarray:  # fmt: skip
    """End a sound where it has fallen ``under_peak_db`` dB under its peak for good.

    ``(samples,) -> (samples',)``, a new float32 array. What follows the last sample within
    ``under_peak_db`` of the peak is cut, but for ``TAIL_MARGIN_S``, which fades out along a
    half cosine so that the cut never clicks (it is already that far down). The start is kept:
    a drawn sound begins where the model began it; nor is anything before sample ``keep`` cut
    (what must stay whole: a continuation's prime, a resampled region), the fade starting there
    at the earliest. A silent sound, or one that rings to its end, keeps its length (the fade
    then touches nothing).
    """
    if not under_peak_db > 0:
        raise ValueError(f"under_peak_db must be positive, got {under_peak_db}")
    x = np.asarray(audio, dtype=np.float32)
    level = np.abs(x)
    peak = float(level.max()) if x.size else 0.0
    if peak == 0.0:
        return x.copy()
    last = int(np.flatnonzero(level >= peak * db_to_amplitude(-under_peak_db))[-1])
    last = max(last, keep - 1)
    margin = round(TAIL_MARGIN_S * sample_rate)
    if last + 1 + margin >= x.shape[-1]:
        return x.copy()
    out = x[: last + 1 + margin].copy()
    if margin:
        # 1 at the last loud sample's neighbour, 0 at the very last sample
        fade = 0.5 + 0.5 * np.cos(np.pi * np.arange(1, margin + 1) / margin)
        out[last + 1 :] *= fade.astype(np.float32)
    return out


# torchaudio's polyphase kernel holds ~(new/g) x (orig/g) taps (g their gcd): 23,520 for 44100 ->
# 48000, but 2.1e9 (17 GB in float64) for 44101 -> 48000, which took a worker down. Past
# RESAMPLE_MAX_TAPS (~130 MB of kernels at its edge) the ratio is approximated by the nearest
# fraction whose taps fit: off by at most 2.5e-4 of the rate (0.43 cents, far below what an ear
# tells apart; 1.5 ms in a 6-s sound), and nothing changes for the rates that fit.
RESAMPLE_MAX_TAPS = 4_000_000


def resample(audio: torch.Tensor, orig_rate: int, new_rate: int) -> torch.Tensor:
    """``(..., samples) -> (..., samples * new / orig)`` with a windowed-sinc filter; any pair
    of rates in bounded memory (see RESAMPLE_MAX_TAPS)."""
    if orig_rate == new_rate:
        return audio
    ratio = resample_ratio(orig_rate, new_rate)
    return torchaudio.functional.resample(audio, ratio.denominator, ratio.numerator)


def resample_ratio(orig_rate: int, new_rate: int) -> Fraction:
    """new / orig as :func:`resample` applies it: exact (reduced: smaller kernels for e.g.
    44100 -> 48000) where its kernel fits RESAMPLE_MAX_TAPS, else the nearest that does."""
    ratio = Fraction(new_rate, orig_rate)
    if ratio.numerator * ratio.denominator > RESAMPLE_MAX_TAPS:
        # a denominator q keeps the numerator near q * ratio: taps ~ q^2 * ratio
        ratio = ratio.limit_denominator(max(1, math.isqrt(int(RESAMPLE_MAX_TAPS / ratio))))
    return ratio


def normalise(
    audio: torch.Tensor, mode: Normalisation = "peak", target_db: float = DEFAULT_PEAK_DB
) -> torch.Tensor:
    """Scale a file to a standard level.

    ``"peak"`` (the default) sets the peak to ``target_db`` dBFS. Peak, not RMS, because these
    collections are mostly one-shots whose crest factors differ by 20 dB and more: RMS levelling
    would push a snare's transient far past full scale (clipping it, or needing a limiter that
    changes its sound), while peak levelling never clips and keeps each file's dynamics intact.
    ``"rms"`` sets the RMS to ``target_db`` dBFS but lowers the gain where the peak would pass
    0 dBFS. ``"none"`` leaves the level alone.
    """
    if mode == "none":
        return audio
    peak = float(audio.abs().max()) if audio.numel() else 0.0
    if peak == 0.0:
        return audio
    target = db_to_amplitude(target_db)
    if mode == "peak":
        gain = target / peak
    elif mode == "rms":
        rms = float(audio.pow(2).mean().sqrt())
        gain = min(target / rms, 1.0 / peak)
    else:
        raise ValueError(f"normalisation must be 'peak', 'rms' or 'none', got {mode!r}")
    return audio * gain


def prepare_audio(
    decoded: DecodedAudio,
    sample_rate: int,
    *,
    silence_threshold_db: float = DEFAULT_SILENCE_THRESHOLD_DB,
    normalisation: Normalisation = "peak",
) -> torch.Tensor:
    """A decoded file to model-ready mono float32 audio ``(samples,)`` at ``sample_rate``.

    Raises AudioError when the whole file is quieter than ``silence_threshold_db`` dBFS.
    """
    mono = to_mono(decoded.samples)  # (frames,)
    level = peak_db(mono)
    # silence at an offset is silence: a file of nothing but a constant 0.5 was trained on
    offsets = {v for v in edge_offsets(mono, decoded.sample_rate,
                                       db_to_amplitude(silence_threshold_db)) if v}  # fmt: skip
    # (each end's: an offset that drifts between them is no constant to stand out from)
    if offsets:
        level = max(peak_db(mono - v) for v in offsets)
    if level < silence_threshold_db:
        shown = "-inf" if level == -math.inf else f"{level:.1f}"
        loudest = peak_db(torch.as_tensor(decoded.samples, dtype=torch.float32))
        if offsets:
            dc = ", ".join(f"{v:+.3g}" for v in sorted(offsets))
            raise AudioError(
                f"{decoded.name}: all silent but for a constant offset (DC {dc}): around it, "
                f"its peak {shown} dBFS is below the {silence_threshold_db:g} dBFS silence "
                "threshold"
            )  # fmt: skip
        if loudest >= silence_threshold_db:  # loud channels that cancel in the mix
            raise AudioError(
                f"{decoded.name}: its channels cancel when mixed to mono (they peak at "
                f"{loudest:.1f} dBFS, the mix at {shown}): one channel is the other inverted; "
                "export one channel, or flip one"
            )  # fmt: skip
        raise AudioError(
            f"{decoded.name}: all silent (peak {shown} dBFS is below the "
            f"{silence_threshold_db:g} dBFS silence threshold)"
        )
    # (an offset its silence sat at is taken off: see trim_to_sound. Codes already made of an
    # offset file stay theirs: a continued sound's recipe holds the codes it kept.)
    trimmed = trim_to_sound(mono, decoded.sample_rate, silence_threshold_db)
    audio = resample(trimmed, decoded.sample_rate, sample_rate)
    return normalise(audio, normalisation).contiguous()


def load_audio(
    source: AudioSource,
    sample_rate: int,
    *,
    name: str | None = None,
    silence_threshold_db: float = DEFAULT_SILENCE_THRESHOLD_DB,
    normalisation: Normalisation = "peak",
    max_s: float | None = None,
) -> torch.Tensor:
    """:func:`read_audio` (``max_s``: its limit) then :func:`prepare_audio`: a file to mono
    ``(samples,)``."""
    decoded = read_audio(source, name=name, max_s=max_s)
    return prepare_audio(
        decoded, sample_rate, silence_threshold_db=silence_threshold_db, normalisation=normalisation
    )


# --- lengths and chunks ---------------------------------------------------------------------------


def pad_to_length(x: torch.Tensor, length: int) -> torch.Tensor:
    """Zero-pad the last axis at the end up to ``length``; longer input is returned as is."""
    short = length - x.shape[-1]
    return torch.nn.functional.pad(x, (0, short)) if short > 0 else x


def chunk_starts(total: int, chunk_len: int, hop: int) -> list[int]:
    """Start offsets of chunks that cover ``[0, total)``: every ``hop``, plus one aligned to
    the end when the regular grid would leave a tail uncovered. ``total < chunk_len`` gives
    ``[0]`` (that one chunk is padded)."""
    if chunk_len < 1 or hop < 1:
        raise ValueError(f"chunk_len and hop must be positive, got {chunk_len}, {hop}")
    if total <= chunk_len:
        return [0]
    starts = list(range(0, total - chunk_len + 1, hop))
    if starts[-1] + chunk_len < total:
        starts.append(total - chunk_len)
    return starts


def cut_chunks(x: torch.Tensor, chunk_len: int, hop: int) -> torch.Tensor:
    """Overlapping chunks along the last axis: ``(..., T) -> (n, ..., chunk_len)``.

    Input shorter than one chunk is zero-padded to one chunk (pad audio *before* a log-mel so
    padding is silence, not zeros in the log domain).
    """
    x = pad_to_length(x, chunk_len)
    starts = chunk_starts(x.shape[-1], chunk_len, hop)
    return torch.stack([x[..., s : s + chunk_len] for s in starts])  # (n, ..., chunk_len)


# --- folders and writing --------------------------------------------------------------------------


def scan_folder(folder: str | Path) -> list[Path]:
    """Every regular file under ``folder`` (recursively), sorted, except hidden ones.

    Non-audio files (a README, a licence) are *included*: the dataset decodes by content, not by
    name, and lists each one in its manifest as skipped with the reason ("not audio: it is a
    text file"), so the person sees every file of theirs accounted for. Hidden files and
    folders (``.DS_Store``, ``._x.wav`` AppleDouble forks, ``.git``) are OS or tool metadata,
    not the person's sounds, and are left out.
    """
    root = Path(folder)
    if not root.is_dir():
        raise AudioError(f"{folder}: not a folder")
    return [p for p in _visible(root) if _why_left_out(root, p) == ""]


def left_out(folder: str | Path) -> list[tuple[Path, str]]:
    """What :func:`scan_folder` leaves out under ``folder`` (hidden files aside), each with its
    reason, for the person to hear of: links that point at nothing (a moved sample library
    leaves a folder of them), links to folders (not followed), things that are not files (a
    FIFO, a device), and links out of the folder to a file soundfile cannot read. That last:
    a received "sound pack" holding ``kick.wav -> ~/.ssh/id_rsa`` sent the key to the broker's
    store; a link out of the folder to a sound (a folder of links into a library) is read."""
    root = Path(folder)
    found = [(p, _why_left_out(root, p)) for p in _visible(root)]
    return [(p, why) for p, why in found if why]


def broken_links(folder: str | Path) -> list[Path]:
    """The symbolic links under ``folder`` that point at nothing (see :func:`left_out`)."""
    return [p for p in _visible(Path(folder)) if p.is_symlink() and not p.exists()]


def _why_left_out(root: Path, path: Path) -> str | None:
    """Why ``path`` (under ``root``) is not one of the folder's files; "" if it is one, None
    for a folder (its files are listed on their own)."""
    if path.is_symlink():
        if not path.exists():
            return "a link that points at nothing"
        if path.is_dir():
            return "a link to a folder (not followed)"
    elif path.is_dir():
        return None
    if not path.is_file():
        return "not a file (a pipe, a device or a socket)"
    if path.is_symlink():
        target = path.resolve()
        if not target.is_relative_to(root.resolve()):
            try:
                sf.info(str(target))
            except Exception:  # anything soundfile cannot read: not sent anywhere
                return f"a link out of the folder to a file that is not audio ({target})"
    return ""


def _visible(root: Path) -> list[Path]:
    """Everything under ``root`` but hidden files and folders, sorted by relative path."""
    found = [p for p in root.rglob("*")
             if not any(part.startswith(".") for part in p.relative_to(root).parts)]
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def is_audio_name(name: str) -> bool:
    """Whether a file name has an audio extension (a hint for UIs; decoding decides)."""
    return Path(name).suffix.lower() in AUDIO_EXTENSIONS


_WRITE_SUBTYPES = {"WAV": "PCM_24", "FLAC": "PCM_24"}
_METADATA_KEYS = frozenset({"title", "copyright", "software", "artist", "comment", "date",
                            "album", "license", "tracknumber", "genre"})  # fmt: skip


def write_audio(
    target: str | Path | BinaryIO,
    audio: np.ndarray | torch.Tensor,
    sample_rate: int,
    format: Literal["WAV", "FLAC"] = "WAV",
    metadata: dict[str, str] | None = None,
) -> None:
    """Write ``(samples,)`` or ``(channels, samples)`` audio as 24-bit WAV or FLAC.

    ``metadata`` keys are soundfile's string fields (title, software, comment, artist, date,
    ...); Distill puts the model id, seed and sampling parameters there so that any generated
    file can be generated again. Samples outside [-1, 1] are clipped (PCM cannot hold them).
    """
    if format not in _WRITE_SUBTYPES:
        raise AudioError(f"cannot write format {format!r}; use 'WAV' or 'FLAC'")
    if not MIN_SAMPLE_RATE <= sample_rate <= MAX_SAMPLE_RATE:
        raise AudioError(f"cannot write at {sample_rate} Hz")
    x = audio.detach().cpu().numpy() if isinstance(audio, torch.Tensor) else np.asarray(audio)
    if x.ndim not in (1, 2) or x.shape[-1] == 0:
        raise AudioError(f"audio to write must be (samples,) or (channels, samples), got {x.shape}")
    if not np.isfinite(x).all():
        raise AudioError("audio to write holds NaN or infinite samples")
    frames = np.clip(x.T if x.ndim == 2 else x, -1.0, 1.0).astype(np.float32)  # (samples, ch)
    meta = dict(metadata or {})
    unknown = sorted(set(meta) - _METADATA_KEYS)
    if unknown:
        raise AudioError(f"unknown metadata keys {unknown}; known: {sorted(_METADATA_KEYS)}")
    kwargs: dict[str, Any] = {"format": format, "subtype": _WRITE_SUBTYPES[format]}
    with sf.SoundFile(target, "w", sample_rate, frames.shape[1] if frames.ndim == 2 else 1,
                      **kwargs) as f:  # fmt: skip
        for key, value in meta.items():
            setattr(f, key, str(value))
        f.write(frames)


def read_metadata(source: str | Path | bytes) -> dict[str, str]:
    """The string metadata soundfile reads from a file (title, software, comment, ...)."""
    src: Any = io.BytesIO(source) if isinstance(source, bytes) else str(source)
    with sf.SoundFile(src) as f:
        return {k: v for k, v in f.copy_metadata().items() if v}
