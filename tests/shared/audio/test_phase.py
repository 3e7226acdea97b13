"""Phase reconstruction: the vocoder start, the presets, and the old random path."""

from __future__ import annotations

import math

import pytest
import torch

from distill.shared.audio.mel import MelConfig, log_mel
from distill.shared.audio.metrics import spectral_convergence
from distill.shared.audio.phase import QUALITY_PRESETS, mel_to_audio, mel_to_audio_quality

torch.set_num_threads(1)
CFG = MelConfig()


def _tone(seconds: float = 1.0, hz: float = 441.0) -> torch.Tensor:
    t = torch.arange(int(seconds * CFG.sample_rate)) / CFG.sample_rate
    return 0.5 * torch.sin(2 * math.pi * hz * t) * torch.exp(-2 * t)  # (samples,)


def test_vocoder_start_alone_rebuilds_a_tone_far_better_than_a_random_start() -> None:
    tone = _tone()
    mel = log_mel(tone, CFG)
    vocoder = mel_to_audio(mel, CFG, n_iter=0, init="vocoder", length=tone.shape[-1])
    random = mel_to_audio(mel, CFG, n_iter=0, init="random", length=tone.shape[-1])
    sc_vocoder = float(spectral_convergence(tone, vocoder, CFG))
    sc_random = float(spectral_convergence(tone, random, CFG))
    assert sc_vocoder < 0.5 * sc_random, (sc_vocoder, sc_random)


def test_iterations_from_the_vocoder_start_improve_convergence_on_a_hit() -> None:
    gen = torch.Generator().manual_seed(0)
    t = torch.arange(CFG.sample_rate // 2) / CFG.sample_rate
    tone = _tone(0.5, 120.0) + 0.3 * torch.randn(t.shape, generator=gen) * torch.exp(-30 * t)
    mel = log_mel(tone, CFG)
    scs = [float(spectral_convergence(tone, mel_to_audio(mel, CFG, n_iter=n, init="vocoder",
                                                         length=tone.shape[-1]), CFG))
           for n in (0, 8)]  # fmt: skip
    assert scs[1] < scs[0]


def test_vocoder_path_is_deterministic_batched_and_keeps_lengths() -> None:
    mels = log_mel(torch.stack([_tone(0.5), _tone(0.5, 1000.0)]), CFG)  # (2, M, N)
    a = mel_to_audio(mels, CFG, n_iter=3, init="vocoder")
    b = mel_to_audio(mels, CFG, n_iter=3, init="vocoder")
    assert torch.equal(a, b)
    assert a.shape == (2, (mels.shape[-1] - 1) * CFG.hop_length)
    one = mel_to_audio(mels[1], CFG, n_iter=3, init="vocoder")
    assert torch.allclose(one, a[1], atol=1e-5)
    assert torch.isfinite(a).all()


@pytest.mark.parametrize("frames", [1, 2, 3])
def test_very_short_inputs_work(frames: int) -> None:
    mel = torch.full((CFG.n_mels, frames), -5.0)
    out = mel_to_audio(mel, CFG, n_iter=2, init="vocoder", length=700)
    assert out.shape == (700,) and torch.isfinite(out).all()


def test_quality_presets_and_bad_names() -> None:
    mel = log_mel(_tone(0.3), CFG)
    for name in QUALITY_PRESETS:
        assert torch.isfinite(mel_to_audio_quality(mel, CFG, name)).all()
    with pytest.raises(ValueError, match="phase quality"):
        mel_to_audio_quality(mel, CFG, "ultra")
    with pytest.raises(ValueError, match="phase init"):
        mel_to_audio(mel, CFG, init="zero")  # type: ignore[arg-type]


def test_random_start_is_unchanged_and_seeded() -> None:
    mel = log_mel(_tone(0.3), CFG)
    state = torch.get_rng_state()
    a = mel_to_audio(mel, CFG, n_iter=4, seed=3)
    assert torch.equal(state, torch.get_rng_state())
    assert torch.equal(a, mel_to_audio(mel, CFG, n_iter=4, seed=3))
    assert not torch.equal(a, mel_to_audio(mel, CFG, n_iter=4, seed=4))


def test_vocoder_phase_one_sound_at_a_time_is_the_batched_maths_bit_for_bit() -> None:
    """The vocoder start runs sound by sound (its full-size temporaries are one sound's, not a
    batch's: 16 sounds of 60 s peaked at 8 GB in it); nothing in its maths mixes sounds, so
    exported files made before keep regenerating exactly."""
    from distill.shared.audio.phase import _vocoder_phase_one, vocoder_phase

    torch.manual_seed(0)
    spec = torch.rand(2, 3, CFG.n_fft // 2 + 1, 40) ** 4  # two leading dims: any batch shape
    assert torch.equal(vocoder_phase(spec, CFG), _vocoder_phase_one(spec, CFG))
