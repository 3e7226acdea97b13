"""Metrics that compare two sounds: spectral convergence and log-mel L1.

Both take audio (not features), so they judge what a listener would hear after the whole
chain, Griffin-Lim included.
"""

from __future__ import annotations

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
