"""Phase reconstruction: log-mel back to a waveform with Griffin-Lim.

The magnitude comes from :func:`distill.shared.audio.mel.mel_to_linear`; the phase is estimated
by fast Griffin-Lim (with momentum). Two starting points:

- ``"random"``: uniform random phase from a seed (torchaudio's Griffin-Lim, the old default);
- ``"vocoder"``: a phase-vocoder estimate built from the magnitude alone, before any iteration.
  Each frame's spectral peaks get their true frequency by quadratic interpolation of the log
  magnitude; every bin takes the frequency of the peak whose region it lies in; phase is that
  frequency integrated over the frames (trapezoid rule), and the bins around a peak are locked
  to it (Hann frames alternate by pi from bin to bin). Fully vectorised: one cumulative sum over
  frames, no heap (phase-gradient heap integration was the other candidate: its per-bin heap
  walk is a Python loop over ~10^5 bins per second of audio, slower than the iterations it saves).

Measured by ``bench/infer.py --only phase`` on real percussion (see :data:`QUALITY_PRESETS`):
spectral convergence against Griffin-Lim-32 from a random start, and speed.

A learned vocoder would replace this module and keep :func:`mel_to_audio`'s signature.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

import torch
import torchaudio

from distill.shared.audio.mel import MelConfig, mel_to_linear

PhaseInit = Literal["random", "vocoder"]
Quality = Literal["preview", "fast", "best"]


@dataclass(frozen=True)
class PhasePreset:
    n_iter: int
    init: PhaseInit


# What each quality setting runs. Spectral convergence against the original audio, as a ratio to
# Griffin-Lim 32 from a random start, on 24 percussion files (bench/infer.py --only phase):
# vocoder start + 0 iterations 1.40, + 2 1.08, + 4 0.99, + 8 0.93, + 32 0.85; random start + 8
# 1.11. One core, CPU time: Griffin-Lim 32 random 10.9x real time, vocoder + 4 53.5x.
QUALITY_PRESETS: dict[str, PhasePreset] = {
    # the code editor's coarse preview: answers within a UI frame budget, near GL-32's quality
    "preview": PhasePreset(n_iter=2, init="vocoder"),
    # generation and requests: as good as GL-32 from a random start at a fifth of the cost, so
    # generation (prior + decode + phase) passes 25x real time on one core
    "fast": PhasePreset(n_iter=4, init="vocoder"),
    # exports and the demo: better than GL-32 from a random start, at about its cost
    "best": PhasePreset(n_iter=32, init="vocoder"),
}


def preset(quality: str | PhasePreset) -> PhasePreset:
    """The preset a quality names (a preset itself passes: a recipe's recorded one)."""
    if isinstance(quality, PhasePreset):
        return quality
    found = QUALITY_PRESETS.get(quality)
    if found is None:
        raise ValueError(f"phase quality must be one of {sorted(QUALITY_PRESETS)}, got {quality!r}")
    return found


@lru_cache(maxsize=32)
def _window(n_fft: int, device: str) -> torch.Tensor:
    return torch.hann_window(n_fft, device=device)


def vocoder_phase(spec: torch.Tensor, cfg: MelConfig) -> torch.Tensor:
    """An initial phase (radians) for a magnitude ``(..., n_freqs, frames)``, same shape.

    One sound at a time: the maths never mixes sounds, so the phase is the same bit for bit,
    and its dozen full-size temporaries are one sound's, not the batch's (16 sounds of 60 s
    peaked at 8.5 GB with them all at once)."""
    shape = spec.shape
    flat = spec.reshape(-1, shape[-2], shape[-1])
    out = torch.empty_like(flat)
    for i in range(flat.shape[0]):
        out[i] = _vocoder_phase_one(flat[i], cfg)
    return out.reshape(shape)


def _vocoder_phase_one(spec: torch.Tensor, cfg: MelConfig) -> torch.Tensor:
    """:func:`vocoder_phase` of one magnitude ``(n_freqs, frames)``."""
    # Work frame by frame with frequency last (contiguous for cummax) and int32 indices:
    # measured 3x faster than over (F, N) with int64 on one core.
    log_mag = torch.log(spec.transpose(-1, -2).clamp_min(1e-7)).contiguous()  # (..., N, F)
    n_freqs = log_mag.shape[-1]
    below = torch.nn.functional.pad(log_mag[..., :-1], (1, 0), value=-30.0)  # (..., N, F)
    above = torch.nn.functional.pad(log_mag[..., 1:], (0, 1), value=-30.0)
    peak = (log_mag >= below) & (log_mag > above)  # local maxima over frequency
    # Quadratic interpolation of the peak's log magnitude: its offset from the bin, in bins.
    denom = below - 2 * log_mag + above
    offset = (0.5 * (below - above) / denom.clamp_max(-1e-6)).clamp_(-0.5, 0.5)
    # Each bin's region: the nearest peak, i.e. the last peak at or below it or the first at
    # or above it (a running max over indices from each side); ties go to the lower peak.
    bins = torch.arange(n_freqs, device=spec.device, dtype=torch.int32).expand_as(peak)
    none = torch.full_like(bins, -n_freqs)
    last_below = torch.where(peak, bins, none).cummax(-1).values
    mirrored = torch.where(peak, n_freqs - 1 - bins, none).flip(-1).cummax(-1).values.flip(-1)
    first_above = n_freqs - 1 - mirrored
    owner = torch.where(first_above - bins < bins - last_below, first_above, last_below)
    owner = owner.clamp_(0, n_freqs - 1).long()  # a frame without peaks: all bins own bin 0
    true_bin = owner + torch.gather(offset, -1, owner)  # (..., N, F) fractional bins
    advance = true_bin * (2 * math.pi * cfg.hop_length / cfg.n_fft)  # radians per frame
    # Trapezoid rule over frames: the phase at frame n is the integral of the frequency so far.
    steps = 0.5 * (advance[..., 1:, :] + advance[..., :-1, :])  # (..., N-1, F)
    phase = torch.cat([torch.zeros_like(advance[..., :1, :]), steps.cumsum(-2)], -2)
    phase = torch.gather(phase, -1, owner) + math.pi * (bins - owner)  # locked to the peak
    return phase.transpose(-1, -2)  # (..., F, N)


def griffin_lim(
    spec: torch.Tensor,
    cfg: MelConfig,
    *,
    init_phase: torch.Tensor,
    n_iter: int,
    momentum: float = 0.99,
    length: int,
) -> torch.Tensor:
    """Fast Griffin-Lim from a given phase: ``(..., n_freqs, frames) -> (..., length)``.

    Frames are centred with zero padding, as in the features, so no length is too short.
    """
    shape = spec.shape
    spec = spec.reshape(-1, shape[-2], shape[-1])  # (B, F, N)
    window = _window(cfg.n_fft, str(spec.device))
    n_fft, hop = cfg.n_fft, cfg.hop_length
    angles = torch.polar(torch.ones_like(spec), init_phase.reshape(spec.shape))  # (B, F, N)
    previous = torch.zeros_like(angles)
    alpha = momentum / (1 + momentum)
    for _ in range(n_iter):
        audio = torch.istft(spec * angles, n_fft, hop, window=window, length=length)  # (B, L)
        rebuilt = torch.stft(audio, n_fft, hop, window=window, return_complex=True,
                             pad_mode="constant")  # fmt: skip
        angles = torch.sgn(rebuilt - alpha * previous)  # z / |z| in one kernel (0 stays 0)
        previous = rebuilt
    audio = torch.istft(spec * angles, n_fft, hop, window=window, length=length)  # (B, L)
    return audio.reshape(*shape[:-2], length)


def mel_to_audio(
    logmel: torch.Tensor,
    cfg: MelConfig,
    *,
    n_iter: int = 32,
    momentum: float = 0.99,
    seed: int = 0,
    length: int | None = None,
    init: PhaseInit = "random",
) -> torch.Tensor:
    """Invert a log-mel to audio: ``(..., n_mels, frames) -> (..., samples)``.

    Least-squares inverse mel filterbank, then Griffin-Lim with momentum (fast Griffin-Lim)
    from ``init``: ``"random"`` (from ``seed``, inside a forked RNG, so the same input and seed
    give the same audio and the caller's global RNG is left untouched) or ``"vocoder"`` (a
    deterministic phase-vocoder start; ``seed`` is unused). ``length`` defaults to
    ``(frames - 1) * hop_length``, the length whose log-mel has ``frames`` frames; a longer
    ``length`` is padded with silence, a shorter one cut.
    """
    frames = logmel.shape[-1]
    out_len = length if length is not None else max(1, (frames - 1) * cfg.hop_length)
    spec = mel_to_linear(logmel, cfg)  # (..., n_freqs, frames); checks the shape
    if init == "vocoder":
        gl_len = (frames - 1) * cfg.hop_length if frames > 1 else cfg.hop_length
        spec = spec if frames > 1 else torch.nn.functional.pad(spec, (0, 1))  # (..., F, >= 2)
        audio = griffin_lim(spec, cfg, init_phase=vocoder_phase(spec, cfg), n_iter=n_iter,
                            momentum=momentum, length=gl_len)  # fmt: skip
    elif init == "random":
        audio, gl_len = _torchaudio_griffin_lim(spec, cfg, n_iter, momentum, seed)
    else:
        raise ValueError(f"phase init must be 'random' or 'vocoder', got {init!r}")
    if out_len > gl_len:
        audio = torch.nn.functional.pad(audio, (0, out_len - gl_len))
    return audio[..., :out_len]


def mel_to_audio_quality(
    logmel: torch.Tensor, cfg: MelConfig, quality: str | PhasePreset, *, length: int | None = None
) -> torch.Tensor:
    """:func:`mel_to_audio` with a named preset (``preview``, ``fast`` or ``best``), or a
    recipe's recorded one."""
    p = preset(quality)
    return mel_to_audio(logmel, cfg, n_iter=p.n_iter, init=p.init, length=length)


def _torchaudio_griffin_lim(
    spec: torch.Tensor, cfg: MelConfig, n_iter: int, momentum: float, seed: int
) -> tuple[torch.Tensor, int]:
    frames = spec.shape[-1]
    # torchaudio re-runs a reflect-padded STFT on its own output, which needs more than
    # n_fft / 2 samples: give very short inputs silent frames to reach that, cut them after.
    min_frames = cfg.n_fft // cfg.hop_length + 1
    if frames < min_frames:
        spec = torch.nn.functional.pad(spec, (0, min_frames - frames))  # (..., n_freqs, F)
    gl_len = (spec.shape[-1] - 1) * cfg.hop_length  # the length whose STFT has F frames
    devices = [spec.device] if spec.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        audio = torchaudio.functional.griffinlim(
            spec,
            window=_window(cfg.n_fft, str(spec.device)),
            n_fft=cfg.n_fft,
            hop_length=cfg.hop_length,
            win_length=cfg.n_fft,
            power=1.0,
            n_iter=n_iter,
            momentum=momentum,
            length=gl_len,
            rand_init=True,
        )  # (..., gl_len)
    return audio, gl_len
