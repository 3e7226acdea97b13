"""Metrics that compare two sounds: spectral convergence and log-mel L1; and a sound's
envelope (how its loudness runs over time), to compare sets of sounds by their shape.

The first two take audio (not features), so they judge what a listener would hear after the
whole chain, Griffin-Lim included. The envelope reads a log-mel: decoded codes and a training
file's own frames are measured alike, before phase reconstruction.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from distill.shared.audio.mel import MelConfig, as_float_audio, log_mel, magnitude_spectrogram


def _align(ref: torch.Tensor, est: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut both to the shorter length (both are taken to start at the same instant)."""
    n = min(ref.shape[-1], est.shape[-1])
    return ref[..., :n], est[..., :n]


def spectral_convergence(ref: torch.Tensor, est: torch.Tensor, cfg: MelConfig) -> torch.Tensor:
    """``||S_ref - S_est||_F / ||S_ref||_F`` on linear STFT magnitudes of two audio signals.

    ``(..., samples), (..., samples) -> (...)``; lengths are aligned by cutting to the shorter.
    0 is identical; 1 is no match (Griffin-Lim from true mels does not reach 0: its phase
    estimate leaves a floor that depends on the sound).
    """
    ref, est = _align(as_float_audio(ref), as_float_audio(est))
    s_ref = magnitude_spectrogram(ref, cfg)  # (..., n_freqs, frames)
    s_est = magnitude_spectrogram(est, cfg)
    num = torch.linalg.vector_norm(s_ref - s_est, dim=(-2, -1))
    den = torch.linalg.vector_norm(s_ref, dim=(-2, -1)).clamp_min(1e-12)
    return num / den


def log_mel_l1(ref: torch.Tensor, est: torch.Tensor, cfg: MelConfig) -> torch.Tensor:
    """Mean absolute log-mel difference of two audio signals: ``(..., samples) x2 -> (...)``.

    Lengths are aligned by cutting to the shorter. To compare log-mels directly, take
    ``(a - b).abs().mean(dim=(-2, -1))``; this is that on :func:`log_mel` of each signal.
    """
    ref, est = _align(as_float_audio(ref), as_float_audio(est))
    return (log_mel(ref, cfg) - log_mel(est, cfg)).abs().mean(dim=(-2, -1))


# The envelope's thresholds, in dB below the sound's loudest frame: a sound has "decayed" once
# it stays DECAY_DB down; it is "quiet" below QUIET_DB; a second onset is a return above
# DECAY_DB after at least RETRIGGER_QUIET_S seconds quiet; a sound is "late" when it is still
# within DECAY_DB of its peak after LATE_S seconds.
DECAY_DB = -20.0
QUIET_DB = -40.0
RETRIGGER_QUIET_S = 0.1
LATE_S = 1.0


@dataclass(frozen=True)
class Envelope:
    """How a sound's loudness runs over time (see :func:`envelope`)."""

    decay_s: float  # seconds from the loudest frame to the last frame within DECAY_DB of it
    late: bool  # a frame within DECAY_DB of the peak LATE_S seconds or more after the start
    retrigger: bool  # a second onset: back above DECAY_DB after RETRIGGER_QUIET_S quiet


def frame_levels_db(log_mel_: torch.Tensor) -> torch.Tensor:
    """A magnitude log-mel (M, T) (:func:`log_mel`) -> each frame's energy in dB relative to
    the loudest frame (T,): 0 at the peak, negative elsewhere."""
    if log_mel_.ndim != 2 or log_mel_.shape[1] == 0:
        raise ValueError(f"frame_levels_db: log-mel must be (M, T) with T >= 1, got "
                         f"{tuple(log_mel_.shape)}")  # fmt: skip
    energy = (2 * log_mel_.double()).exp().sum(0)  # (T,) sum over bands of magnitude squared
    return (10 * torch.log10(energy / energy.max())).float()


def envelope(log_mel_: torch.Tensor, frames_per_second: float) -> Envelope:
    """The envelope of one sound from its magnitude log-mel (M, T)."""
    db = frame_levels_db(log_mel_).tolist()
    peak = max(range(len(db)), key=db.__getitem__)
    last = max(i for i, v in enumerate(db) if v > DECAY_DB) if max(db) > DECAY_DB else peak
    late_from = round(LATE_S * frames_per_second)
    need = max(1, round(RETRIGGER_QUIET_S * frames_per_second))
    heard, quiet, armed, retrigger = False, 0, False, False
    for v in db:
        if heard and armed and v > DECAY_DB:
            retrigger = True
            break
        heard = heard or v > DECAY_DB
        quiet = quiet + 1 if v < QUIET_DB else 0
        armed = armed or (heard and quiet >= need)
    return Envelope(decay_s=(last - peak) / frames_per_second,
                    late=any(v > DECAY_DB for v in db[late_from:]), retrigger=retrigger)  # fmt: skip


# Where two sets' decay times are compared (quantiles), and the time added to each before their
# ratio is taken (a decay of 0 s, a sound that drops 20 dB in its first frame, is common).
DISTANCE_QUANTILES = (0.25, 0.5, 0.75, 0.9)
DISTANCE_FLOOR_S = 0.02


def envelope_distance(drawn: list[Envelope], reference: list[Envelope]) -> float:
    """How far apart two sets of sounds are in shape: the mean over DISTANCE_QUANTILES of
    |log| of the ratio of their decay times, plus the difference of their shares still loud
    after LATE_S and of their shares with a second onset. 0 for sets alike."""
    if not drawn or not reference:
        raise ValueError("envelope_distance: both sets need at least one envelope")
    levels = torch.tensor(DISTANCE_QUANTILES)

    def decays(envs: list[Envelope]) -> torch.Tensor:
        times = torch.tensor([e.decay_s for e in envs], dtype=torch.float64)
        return torch.quantile(times, levels.double()) + DISTANCE_FLOOR_S

    def share(envs: list[Envelope], what: str) -> float:
        return sum(bool(getattr(e, what)) for e in envs) / len(envs)

    shape = float((decays(drawn) / decays(reference)).log().abs().mean())
    return (shape + abs(share(drawn, "late") - share(reference, "late"))
            + abs(share(drawn, "retrigger") - share(reference, "retrigger")))  # fmt: skip
