"""Phase reconstruction: log-mel back to a waveform with Griffin-Lim.

The magnitude comes from :func:`distill.shared.audio.mel.mel_to_linear`; the phase is
estimated by fast Griffin-Lim (with momentum), seeded so that the same input gives the same
audio. A learned vocoder would replace this module and keep the same signature.
"""

from __future__ import annotations

from functools import lru_cache

import torch
import torchaudio

from distill.shared.audio.mel import MelConfig, mel_to_linear


@lru_cache(maxsize=32)
def _window(n_fft: int, device: str) -> torch.Tensor:
    return torch.hann_window(n_fft, device=device)


def mel_to_audio(
    logmel: torch.Tensor,
    cfg: MelConfig,
    *,
    n_iter: int = 32,
    momentum: float = 0.99,
    seed: int = 0,
    length: int | None = None,
) -> torch.Tensor:
    """Invert a log-mel to audio: ``(..., n_mels, frames) -> (..., samples)``.

    Least-squares inverse mel filterbank, then Griffin-Lim with momentum (fast Griffin-Lim).
    The random initial phase comes from ``seed`` inside a forked RNG, so the same input and seed
    give the same audio and the caller's global RNG is left untouched. ``length`` defaults to
    ``(frames - 1) * hop_length``, the length whose log-mel has ``frames`` frames; a longer
    ``length`` is padded with silence, a shorter one cut.
    """
    frames = logmel.shape[-1]
    out_len = length if length is not None else max(1, (frames - 1) * cfg.hop_length)
    device = str(logmel.device)
    spec = mel_to_linear(logmel, cfg)  # (..., n_freqs, frames); checks the shape
    # Griffin-Lim re-runs a reflect-padded STFT on its own output, which needs more than
    # n_fft / 2 samples: give very short inputs silent frames to reach that, cut them after.
    min_frames = cfg.n_fft // cfg.hop_length + 1
    if frames < min_frames:
        spec = torch.nn.functional.pad(spec, (0, min_frames - frames))  # (..., n_freqs, F)
    gl_len = (spec.shape[-1] - 1) * cfg.hop_length  # the length whose STFT has F frames
    devices = [logmel.device] if logmel.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        audio = torchaudio.functional.griffinlim(
            spec,
            window=_window(cfg.n_fft, device),
            n_fft=cfg.n_fft,
            hop_length=cfg.hop_length,
            win_length=cfg.n_fft,
            power=1.0,
            n_iter=n_iter,
            momentum=momentum,
            length=gl_len,
            rand_init=True,
        )  # (..., gl_len)
    if out_len > gl_len:
        audio = torch.nn.functional.pad(audio, (0, out_len - gl_len))
    return audio[..., :out_len]
