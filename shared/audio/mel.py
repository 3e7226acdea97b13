"""Log-mel features and the inverse mel filterbank (log-mel back to a linear magnitude).

One frozen :class:`MelConfig` travels with every dataset and model, and the same
:func:`log_mel` runs in preprocessing, training and inference, so features never drift apart. Phase reconstruction (Griffin-Lim) is in
:mod:`distill.shared.audio.phase`, the metrics that compare two sounds in
:mod:`distill.shared.audio.metrics`.

Fixed choices that are not in the config (changing one would change every feature):

- magnitude mel (``power=1``) and natural log with a floor, as HiFi-GAN and most neural
  vocoders expect, so a learned vocoder can later replace Griffin-Lim on the same features;
- Slaney mel scale and Slaney area normalisation (librosa's defaults), so features match
  librosa-based tools;
- centred frames with *zero* padding at the edges rather than torchaudio's reflect padding:
  reflecting a trimmed drum hit mirrors its attack into a ghost pre-onset frame, and zero
  padding also removes torchaudio's failure on inputs shorter than ``n_fft / 2``.

Shapes: audio is ``(..., samples)``; a log-mel is ``(..., n_mels, frames)`` with
``frames = samples // hop_length + 1``.
"""

from __future__ import annotations

import math
import warnings
from functools import lru_cache

import torch
import torchaudio

# MelConfig and its bounds live in settings (no torch there); imported from here as before
from distill.shared.audio.settings import MAX_CHUNK_FRAMES as MAX_CHUNK_FRAMES
from distill.shared.audio.settings import MAX_N_FFT as MAX_N_FFT
from distill.shared.audio.settings import MAX_N_MELS as MAX_N_MELS
from distill.shared.audio.settings import MAX_SAMPLE_RATE as MAX_SAMPLE_RATE
from distill.shared.audio.settings import MIN_SAMPLE_RATE as MIN_SAMPLE_RATE
from distill.shared.audio.settings import MelConfig as MelConfig

MEL_SCALE = "slaney"
MEL_NORM = "slaney"


# --- cached transforms ---------------------------------------------------------------------------
# Building a mel filterbank and window costs milliseconds per call; keyed per (config, device) so
# training and inference on many short chunks pay it once. The cached modules hold only constant
# buffers, so sharing them across threads is safe.


@lru_cache(maxsize=32)
def _spectrogram(cfg: MelConfig, device: str) -> torchaudio.transforms.Spectrogram:
    return torchaudio.transforms.Spectrogram(
        n_fft=cfg.n_fft, hop_length=cfg.hop_length, power=1.0, center=True, pad_mode="constant"
    ).to(device)


@lru_cache(maxsize=32)
def _mel_scale(cfg: MelConfig, device: str) -> torchaudio.transforms.MelScale:
    return torchaudio.transforms.MelScale(
        n_mels=cfg.n_mels,
        sample_rate=cfg.sample_rate,
        f_min=cfg.f_min,
        f_max=cfg.f_max,
        n_stft=cfg.n_freqs,
        norm=MEL_NORM,
        mel_scale=MEL_SCALE,
    ).to(device)


@lru_cache(maxsize=32)
def _inverse_mel_scale(cfg: MelConfig, device: str) -> torchaudio.transforms.InverseMelScale:
    return torchaudio.transforms.InverseMelScale(
        n_stft=cfg.n_freqs,
        n_mels=cfg.n_mels,
        sample_rate=cfg.sample_rate,
        f_min=cfg.f_min,
        f_max=cfg.f_max,
        norm=MEL_NORM,
        mel_scale=MEL_SCALE,
    ).to(device)


def _hz_to_mel_slaney(hz: torch.Tensor) -> torch.Tensor:
    """Slaney's mel scale: linear below 1 kHz (3 mels per 200 Hz), logarithmic above."""
    log_step = math.log(6.4) / 27.0
    linear = hz * 3.0 / 200.0
    return torch.where(
        hz < 1000.0, linear, 15.0 + torch.log(hz.clamp_min(1e-9) / 1000.0) / log_step
    )


def _mel_to_hz_slaney(mel: torch.Tensor) -> torch.Tensor:
    log_step = math.log(6.4) / 27.0
    return torch.where(mel < 15.0, mel * 200.0 / 3.0, 1000.0 * torch.exp(log_step * (mel - 15.0)))


def mel_center_frequencies(cfg: MelConfig) -> torch.Tensor:
    """Centre frequency in Hz of each mel band, ``(n_mels,)``, strictly increasing."""
    f_max = cfg.f_max if cfg.f_max is not None else cfg.sample_rate / 2
    lo, hi = _hz_to_mel_slaney(torch.tensor([cfg.f_min, f_max], dtype=torch.float64))
    points = torch.linspace(float(lo), float(hi), cfg.n_mels + 2, dtype=torch.float64)
    return _mel_to_hz_slaney(points[1:-1]).float()  # band k peaks at point k + 1


# --- features ------------------------------------------------------------------------------------


def as_float_audio(audio: torch.Tensor) -> torch.Tensor:
    if audio.ndim < 1 or audio.shape[-1] < 1:
        raise ValueError(
            f"audio must have at least one sample on its last axis, got {tuple(audio.shape)}"
        )
    return audio if audio.is_floating_point() else audio.float()


def magnitude_spectrogram(audio: torch.Tensor, cfg: MelConfig) -> torch.Tensor:
    """Linear STFT magnitude: ``(..., samples) -> (..., n_freqs, frames)``."""
    audio = as_float_audio(audio)
    return _spectrogram(cfg, str(audio.device))(audio)


def log_mel(audio: torch.Tensor, cfg: MelConfig) -> torch.Tensor:
    """Log-mel of audio at ``cfg.sample_rate``: ``(..., samples) -> (..., n_mels, frames)``.

    Any length of at least one sample works (short input is zero-padded by the centred STFT).
    """
    spec = magnitude_spectrogram(audio, cfg)  # (..., n_freqs, frames)
    mel = _mel_scale(cfg, str(spec.device))(spec)  # (..., n_mels, frames)
    return torch.log(torch.clamp(mel, min=cfg.log_floor))


# Frames a long sound's log-mel is computed in at a time (log_mel_blocked): ~90 s of sound at
# the default hop, a 0.7-GB spectrogram at once for a 10-minute file otherwise.
LOG_MEL_BLOCK_FRAMES = 8192


@lru_cache(maxsize=32)
def _frame_spectrogram(cfg: MelConfig, device: str) -> torchaudio.transforms.Spectrogram:
    """The centred spectrogram's frames of an already padded segment (no centring of its own)."""
    return torchaudio.transforms.Spectrogram(
        n_fft=cfg.n_fft, hop_length=cfg.hop_length, power=1.0, center=False
    ).to(device)


def log_mel_blocked(audio: torch.Tensor, cfg: MelConfig,
                    block_frames: int = LOG_MEL_BLOCK_FRAMES) -> torch.Tensor:  # fmt: skip
    """:func:`log_mel` of mono ``audio`` (samples,), ``block_frames`` frames at a time: the same
    frames (the centred STFT's zero padding where a block reaches past the sound), without
    holding a long sound's whole spectrogram. Up to ``block_frames`` frames it is log_mel."""
    audio = as_float_audio(audio)
    hop, half = cfg.hop_length, cfg.n_fft // 2
    frames = audio.shape[-1] // hop + 1  # the centred STFT's
    if audio.ndim != 1 or frames <= block_frames:
        return log_mel(audio, cfg)
    spec_of, mel_of = _frame_spectrogram(cfg, str(audio.device)), _mel_scale(cfg, str(audio.device))
    parts = []
    for f0 in range(0, frames, block_frames):
        f1 = min(frames, f0 + block_frames)
        lo, hi = f0 * hop - half, (f1 - 1) * hop + half + (cfg.n_fft % 2)  # samples [lo, hi)
        segment = audio[max(lo, 0) : min(hi, audio.shape[-1])]
        segment = torch.nn.functional.pad(segment, (max(0, -lo), max(0, hi - audio.shape[-1])))
        mel = mel_of(spec_of(segment))  # (n_mels, f1 - f0)
        parts.append(torch.log(torch.clamp(mel, min=cfg.log_floor)))
    return torch.cat(parts, dim=-1)


def mel_to_linear(logmel: torch.Tensor, cfg: MelConfig) -> torch.Tensor:
    """Least-squares inverse of the mel filterbank: ``(..., n_mels, frames) -> (..., n_freqs,
    frames)`` linear STFT magnitude (no phase)."""
    if logmel.ndim < 2 or logmel.shape[-2] != cfg.n_mels:
        raise ValueError(f"expected (..., {cfg.n_mels}, frames), got {tuple(logmel.shape)}")
    mel = torch.exp(logmel.float())  # (..., n_mels, frames)
    return _inverse_mel_scale(cfg, str(logmel.device))(mel)  # (..., n_freqs, frames)


@lru_cache(maxsize=32)
def mel_inverts(mel: MelConfig) -> bool:
    """Whether ``mel_to_linear``, which every sound a model makes goes through, works for
    ``mel``: a filterbank with empty or indistinguishable filters (too few frequency bins for
    its mel bands) has no least-squares inverse, and generating failed in torch's lstsq.
    (MelConfig itself is torch-free: this is checked where mel settings are used, by the
    preprocess job and by model files.)"""
    try:
        with warnings.catch_warnings():  # torchaudio warns of empty filters: said here instead
            warnings.simplefilter("ignore")
            linear = mel_to_linear(torch.zeros(1, mel.n_mels, 1), mel)  # (1, n_freqs, 1)
    except (RuntimeError, ValueError):  # torch.linalg.LinAlgError is a RuntimeError
        return False
    return bool(torch.isfinite(linear).all())
