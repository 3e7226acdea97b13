"""Training-time augmentation, on log-mel chunks or on audio. Pure torch, seeded by the caller.

Small collections (5-500 files) overfit fast; mild, label-free changes that a person would call
"the same sound" stretch them. Each change is switched on its own in :class:`AugmentConfig`, and
draws its random numbers from a ``torch.Generator`` the caller passes, so a training run with a
seed is repeatable. Every item of a batch gets its own random draw.

On log-mels (``augment_mel``) the changes respect the log floor: nothing ever goes below
``log(cfg.log_floor)``, the value silence has, so augmented chunks look like real features.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from distill.shared.audio.mel import MelConfig, mel_center_frequencies
from distill.shared.errors import ConfigError


@dataclass(frozen=True)
class AugmentConfig:
    # Gain: the same sound played louder or softer. +-6 dB covers how differently people
    # record and export without changing the timbre.
    gain: bool = True
    gain_db: float = 6.0
    # Time shift: a hit starting a little earlier or later in its chunk, so the model does not
    # learn that every onset sits at frame 0 (trimmed one-shots all start there). 8 frames
    # = 85 ms at the default hop; vacated frames become silence.
    time_shift: bool = True
    max_shift_frames: int = 8
    # Noise: a quiet background, as in any real room. Its level is drawn between these two
    # values (dB below the chunk's peak), far enough down that the sound stays the same.
    noise: bool = True
    noise_db_min: float = -70.0
    noise_db_max: float = -45.0
    # Pitch shift: off by default because it changes what a drum *is* (a tuned tom, a tabla
    # stroke); +-1 semitone when a person wants more variety from very few files.
    pitch_shift: bool = False
    max_semitones: float = 1.0

    def __post_init__(self) -> None:
        checks = {
            "gain_db": 0.0 <= self.gain_db <= 24.0,
            "max_shift_frames": self.max_shift_frames >= 0,
            "noise_db_min/max": -120.0 <= self.noise_db_min <= self.noise_db_max <= 0.0,
            "max_semitones": 0.0 <= self.max_semitones <= 12.0,
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ConfigError(f"augment config out of range: {', '.join(bad)} ({self})")


def _uniform(n: int, low: float, high: float, gen: torch.Generator) -> torch.Tensor:
    """``(n,)`` uniform draws on the generator's device (CPU generators feed any device)."""
    return low + (high - low) * torch.rand(n, generator=gen, device=gen.device)


def _shift_last_axis(x: torch.Tensor, shifts: torch.Tensor, fill: float) -> torch.Tensor:
    """Shift each item of ``(B, ..., T)`` along T by ``shifts[b]`` (positive = later), filling
    the vacated positions with ``fill``."""
    t = x.shape[-1]
    idx = torch.arange(t, device=x.device)
    src = idx[None, :] - shifts.to(x.device)[:, None]  # (B, T) source position of each output
    valid = (src >= 0) & (src < t)
    src = src.clamp(0, t - 1)
    view = (x.shape[0],) + (1,) * (x.ndim - 2) + (t,)  # broadcast over middle axes
    gathered = torch.gather(x, -1, src.view(view).expand_as(x))
    return torch.where(valid.view(view), gathered, torch.full_like(x, fill))


def _as_batch(x: torch.Tensor, item_ndim: int) -> tuple[torch.Tensor, bool]:
    if x.ndim == item_ndim:
        return x.unsqueeze(0), True
    if x.ndim != item_ndim + 1:
        raise ValueError(f"expected {item_ndim}-d item or batch of them, got {tuple(x.shape)}")
    return x, False


# --- log-mel -------------------------------------------------------------------------------------


def _pitch_shift_mel(x: torch.Tensor, semitones: torch.Tensor, mel_cfg: MelConfig) -> torch.Tensor:
    """Move each item's spectrum by ``semitones[b]``: band k takes the energy found at
    ``f_k / ratio``, interpolated between neighbouring bands. ``(B, n_mels, T)`` in and out."""
    centres = mel_center_frequencies(mel_cfg).to(x.device)  # (n_mels,) Hz, increasing
    ratio = torch.pow(2.0, semitones.to(x.device) / 12.0)  # (B,)
    source_hz = centres[None, :] / ratio[:, None]  # (B, n_mels)
    pos = torch.searchsorted(centres, source_hz.contiguous()).clamp(1, len(centres) - 1)
    lo_hz, hi_hz = centres[pos - 1], centres[pos]
    w = ((source_hz - lo_hz) / (hi_hz - lo_hz).clamp_min(1e-6)).clamp(0.0, 1.0)  # (B, n_mels)
    lin = torch.exp(x)  # interpolate magnitudes, not logs
    lo = torch.gather(lin, 1, (pos - 1)[:, :, None].expand_as(lin))
    hi = torch.gather(lin, 1, pos[:, :, None].expand_as(lin))
    out = lo * (1 - w[:, :, None]) + hi * w[:, :, None]  # (B, n_mels, T)
    below = source_hz < centres[0]  # energy from below the lowest band: none
    out = torch.where(below[:, :, None], torch.zeros_like(out), out)
    return torch.log(out.clamp_min(mel_cfg.log_floor))


def gain_mel(mels: torch.Tensor, db: float | torch.Tensor, log_floor: float) -> torch.Tensor:
    """Log-mel (natural log of magnitude, any shape) of the same sound played ``db`` louder
    (softer when negative): ``db / 20 * ln 10`` added to every value, never below the floor
    (silence stays silence). ``db`` broadcasts against ``mels``."""
    return (mels + db * (math.log(10) / 20)).clamp_min(math.log(log_floor))


def move_bands(mel: torch.Tensor, bands: int) -> torch.Tensor:
    """Log-mel ``(..., n_mels, T)`` moved ``bands`` mel bands up (down when negative), the edge
    band repeated into the gap: above ~1 kHz, where mel bands are log-spaced, a move of two
    bands is a pitch shift of a few percent."""
    if bands == 0:
        return mel
    if bands > 0:
        low = mel[..., :1, :].expand(*mel.shape[:-2], bands, mel.shape[-1])
        return torch.cat([low, mel[..., :-bands, :]], dim=-2)
    high = mel[..., -1:, :].expand(*mel.shape[:-2], -bands, mel.shape[-1])
    return torch.cat([mel[..., -bands:, :], high], dim=-2)


def augment_mel(
    mels: torch.Tensor, mel_cfg: MelConfig, cfg: AugmentConfig, gen: torch.Generator
) -> torch.Tensor:
    """Augment log-mel chunks ``(B, n_mels, T)`` (or one ``(n_mels, T)``); same shape out."""
    x, single = _as_batch(mels, 2)
    b = x.shape[0]
    floor = math.log(mel_cfg.log_floor)
    if cfg.pitch_shift and cfg.max_semitones > 0:
        semis = _uniform(b, -cfg.max_semitones, cfg.max_semitones, gen)
        x = _pitch_shift_mel(x, semis, mel_cfg)
    if cfg.gain and cfg.gain_db > 0:
        g_db = _uniform(b, -cfg.gain_db, cfg.gain_db, gen).to(x.device)
        x = gain_mel(x, g_db[:, None, None], mel_cfg.log_floor)
    if cfg.time_shift and cfg.max_shift_frames > 0:
        m = cfg.max_shift_frames
        shifts = torch.randint(-m, m + 1, (b,), generator=gen, device=gen.device)
        x = _shift_last_axis(x, shifts, floor)
    if cfg.noise:
        level_db = _uniform(b, cfg.noise_db_min, cfg.noise_db_max, gen).to(x.device)
        peak = x.amax(dim=(1, 2)).exp()  # (B,)
        scale = peak * torch.pow(10.0, level_db / 20)  # (B,)
        noise = torch.rand(x.shape, generator=gen, device=gen.device).to(x.device)
        x = torch.log(x.exp() + scale[:, None, None] * noise).clamp_min(floor)
    return x[0] if single else x


# --- audio ---------------------------------------------------------------------------------------


def _pitch_shift_audio(x: torch.Tensor, semitones: torch.Tensor) -> torch.Tensor:
    """Varispeed: read each item ``ratio`` times faster (pitch and speed move together, as on
    tape); keeps the length, padding the end with silence when slowed down. ``(B, S)``."""
    b, s = x.shape
    ratio = torch.pow(2.0, semitones.to(x.device) / 12.0)  # (B,)
    pos = torch.arange(s, device=x.device, dtype=x.dtype)[None, :] * ratio[:, None]  # (B, S)
    i0 = pos.floor().long()
    frac = pos - i0
    valid = i0 + 1 < s
    i0c, i1c = i0.clamp(0, s - 1), (i0 + 1).clamp(0, s - 1)
    out = x.gather(1, i0c) * (1 - frac) + x.gather(1, i1c) * frac
    return torch.where(valid, out, torch.zeros_like(out))


def augment_audio(
    audio: torch.Tensor, mel_cfg: MelConfig, cfg: AugmentConfig, gen: torch.Generator
) -> torch.Tensor:
    """Augment audio ``(B, samples)`` (or one ``(samples,)``) at ``mel_cfg.sample_rate``.

    Same shape out. The time shift is up to ``max_shift_frames * hop_length`` samples, so both
    paths shift by the same time.
    """
    x, single = _as_batch(audio, 1)
    b = x.shape[0]
    if cfg.pitch_shift and cfg.max_semitones > 0:
        x = _pitch_shift_audio(x, _uniform(b, -cfg.max_semitones, cfg.max_semitones, gen))
    if cfg.gain and cfg.gain_db > 0:
        g_db = _uniform(b, -cfg.gain_db, cfg.gain_db, gen).to(x.device)
        x = x * torch.pow(10.0, g_db / 20)[:, None]
    if cfg.time_shift and cfg.max_shift_frames > 0:
        m = cfg.max_shift_frames * mel_cfg.hop_length
        shifts = torch.randint(-m, m + 1, (b,), generator=gen, device=gen.device)
        x = _shift_last_axis(x, shifts, 0.0)
    if cfg.noise:
        level_db = _uniform(b, cfg.noise_db_min, cfg.noise_db_max, gen).to(x.device)
        scale = x.abs().amax(dim=1) * torch.pow(10.0, level_db / 20)  # (B,)
        noise = torch.randn(x.shape, generator=gen, device=gen.device).to(x.device)
        x = x + scale[:, None] * noise
    return x[0] if single else x
