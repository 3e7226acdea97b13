"""Training-time augmentation (distill.shared.audio.augment)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from distill.shared.audio.augment import (
    AugmentConfig,
    _pitch_shift_audio,
    _pitch_shift_mel,
    augment_audio,
    augment_mel,
)
from distill.shared.audio.mel import MelConfig, log_mel, mel_center_frequencies
from distill.shared.errors import ConfigError

MEL = MelConfig()
FLOOR = math.log(MEL.log_floor)
NOTHING = AugmentConfig(gain=False, time_shift=False, noise=False, pitch_shift=False)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def tones(*freqs: float, seconds: float = 0.5) -> torch.Tensor:
    t = torch.arange(round(seconds * MEL.sample_rate)) / MEL.sample_rate
    return torch.stack([0.5 * torch.sin(2 * torch.pi * f * t) for f in freqs])  # (B, samples)


def dominant_hz(audio: torch.Tensor) -> float:
    spectrum = torch.fft.rfft(audio * torch.hann_window(len(audio))).abs()
    return float(spectrum.argmax()) * MEL.sample_rate / len(audio)


@pytest.fixture(scope="module")
def mels() -> torch.Tensor:
    return log_mel(tones(220.0, 880.0, 3000.0), MEL)  # (3, n_mels, frames)


def test_everything_off_is_identity(mels: torch.Tensor) -> None:
    assert torch.equal(augment_mel(mels, MEL, NOTHING, gen()), mels)
    audio = tones(440.0)
    assert torch.equal(augment_audio(audio, MEL, NOTHING, gen()), audio)


def test_defaults_leave_pitch_alone() -> None:
    cfg = AugmentConfig()
    assert cfg.gain and cfg.time_shift and cfg.noise and not cfg.pitch_shift


def test_same_seed_same_result_other_seed_other_result(mels: torch.Tensor) -> None:
    cfg = dataclasses.replace(AugmentConfig(), pitch_shift=True)
    a = augment_mel(mels, MEL, cfg, gen(1))
    assert torch.equal(a, augment_mel(mels, MEL, cfg, gen(1)))
    assert not torch.equal(a, augment_mel(mels, MEL, cfg, gen(2)))
    audio = tones(440.0, 660.0)
    b = augment_audio(audio, MEL, cfg, gen(1))
    assert torch.equal(b, augment_audio(audio, MEL, cfg, gen(1)))
    assert not torch.equal(b, augment_audio(audio, MEL, cfg, gen(2)))


def test_shapes_are_kept_and_the_floor_holds(mels: torch.Tensor) -> None:
    cfg = AugmentConfig(pitch_shift=True, gain_db=24.0)
    for seed in range(5):
        out = augment_mel(mels, MEL, cfg, gen(seed))
        assert out.shape == mels.shape and out.min() >= FLOOR - 1e-5
        assert torch.isfinite(out).all()
    one = augment_mel(mels[0], MEL, cfg, gen())  # a single (n_mels, T) chunk
    assert one.shape == mels[0].shape
    assert augment_audio(tones(440.0)[0], MEL, cfg, gen()).shape == tones(440.0)[0].shape


def test_each_item_draws_its_own_gain(mels: torch.Tensor) -> None:
    cfg = dataclasses.replace(NOTHING, gain=True, gain_db=6.0)
    out = augment_mel(mels, MEL, cfg, gen(5))
    loud = mels > FLOOR + 8  # well above the floor, where the clamp cannot touch
    deltas = [float((out[b] - mels[b])[loud[b]].mean()) for b in range(3)]
    for b, d in enumerate(deltas):
        assert torch.allclose((out[b] - mels[b])[loud[b]], torch.tensor(d), atol=1e-4)
        assert abs(d) <= 6.0 * math.log(10) / 20 + 1e-6  # within +-6 dB
    assert len({round(d, 6) for d in deltas}) == 3


def test_gain_on_audio_matches_gain_on_mel() -> None:
    cfg = dataclasses.replace(NOTHING, gain=True)
    audio = tones(500.0)
    louder = augment_audio(audio, MEL, cfg, gen(3))
    ratio = float(louder.abs().max() / audio.abs().max())
    mel = log_mel(audio, MEL)
    mel_delta = augment_mel(mel, MEL, cfg, gen(3)) - mel
    loudest = mel == mel.max()
    assert float(mel_delta[loudest].mean()) == pytest.approx(math.log(ratio), abs=1e-4)


def test_time_shift_moves_content_within_the_limit() -> None:
    x = torch.full((4, 128, 94), FLOOR)
    x[:, :, 40] = 0.0  # one loud frame
    cfg = dataclasses.replace(NOTHING, time_shift=True, max_shift_frames=8)
    out = augment_mel(x, MEL, cfg, gen(0))
    where = out[:, 0, :].argmax(dim=1) - 40
    assert bool((where.abs() <= 8).all()) and len(set(where.tolist())) > 1
    assert torch.isclose(out, torch.tensor(FLOOR)).sum() == x.numel() - 4 * 128  # fill = floor


def test_noise_stays_far_below_the_sound(mels: torch.Tensor) -> None:
    cfg = dataclasses.replace(NOTHING, noise=True)
    out = augment_mel(mels, MEL, cfg, gen(0))
    peak = mels.amax(dim=(1, 2), keepdim=True)
    loud = mels > peak - 1.0
    assert (out[loud] - mels[loud]).abs().max() < 0.03  # the sound itself barely changes
    quiet = mels <= FLOOR + 1e-6
    assert (out[quiet] > FLOOR).float().mean() > 0.9  # silence gets a noise floor
    audio = tones(440.0)
    noisy = augment_audio(audio, MEL, cfg, gen(0))
    noise_db = 20 * math.log10(float((noisy - audio).pow(2).mean().sqrt() / audio.abs().max()))
    assert cfg.noise_db_min - 1 <= noise_db <= cfg.noise_db_max + 1


def test_pitch_shift_by_an_octave_doubles_the_frequency() -> None:
    centres = mel_center_frequencies(MEL)
    band = 60
    mel = log_mel(tones(float(centres[band])), MEL)  # (1, n_mels, frames)
    up = _pitch_shift_mel(mel, torch.tensor([12.0]), MEL)
    got = float(centres[int(up[0, :, 10:-10].mean(dim=1).argmax())])
    assert got == pytest.approx(2 * float(centres[band]), rel=0.06)
    octave_up = _pitch_shift_audio(tones(1000.0), torch.tensor([12.0]))
    assert dominant_hz(octave_up[0, : MEL.sample_rate // 4]) == pytest.approx(2000, abs=4)


def test_pitch_shift_on_audio_stays_within_its_range() -> None:
    cfg = dataclasses.replace(NOTHING, pitch_shift=True, max_semitones=2.0)
    audio = augment_audio(tones(*[1000.0] * 8), MEL, cfg, gen(0))  # (8, samples)
    found = [dominant_hz(item[: MEL.sample_rate // 4]) for item in audio]
    assert all(1000 * 2 ** (-2 / 12) - 8 <= hz <= 1000 * 2 ** (2 / 12) + 8 for hz in found)
    assert max(abs(hz - 1000) for hz in found) > 20  # some items really moved


@pytest.mark.parametrize(
    "bad",
    [{"gain_db": -1.0}, {"max_shift_frames": -1}, {"noise_db_min": -10.0, "noise_db_max": -20.0},
     {"max_semitones": 13.0}],
)  # fmt: skip
def test_bad_config_is_refused(bad: dict[str, float]) -> None:
    with pytest.raises(ConfigError):
        AugmentConfig(**bad)  # type: ignore[arg-type,unused-ignore]
