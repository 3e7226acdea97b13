"""Mel config, log-mel features, Griffin-Lim inversion and metrics (distill.shared.audio.mel)."""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from distill.shared.audio.io import load_audio
from distill.shared.audio.mel import MelConfig, log_mel, mel_center_frequencies
from distill.shared.audio.metrics import log_mel_l1, spectral_convergence
from distill.shared.audio.phase import mel_to_audio
from distill.shared.errors import ConfigError
from tests.conftest import percussion_dir

CFG = MelConfig()




def tone(freq: float, seconds: float = 0.5, amp: float = 0.5) -> torch.Tensor:
    t = torch.arange(round(seconds * CFG.sample_rate), dtype=torch.float64) / CFG.sample_rate
    return (amp * torch.sin(2 * torch.pi * freq * t)).float()


# --- config ----------------------------------------------------------------------------------


def test_defaults_match_the_design() -> None:
    assert CFG.to_dict() == {
        "sample_rate": 48000, "n_fft": 2048, "hop_length": 512, "n_mels": 128, "f_min": 0.0,
        "f_max": None, "log_floor": 1e-5, "chunk_frames": 94, "chunk_overlap": 0.5,
    }  # fmt: skip
    assert CFG.chunk_samples == 93 * 512
    assert CFG.chunk_hop_frames == 47


def test_config_round_trips_and_is_frozen() -> None:
    cfg = MelConfig(sample_rate=44100, n_mels=80, f_max=16000.0)
    assert MelConfig.from_dict(cfg.to_dict()) == cfg
    assert MelConfig.from_dict({}) == MelConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.n_mels = 64  # type: ignore[misc,unused-ignore]


@pytest.mark.parametrize(
    "bad",
    [
        {"bogus": 1},
        {"sample_rate": 500},
        {"sample_rate": 48000.0},
        {"n_fft": 0},
        {"n_fft": True},
        {"hop_length": 4096},
        {"hop_length": 1},  # 48 000 frames a second: a model file of it took 54 s per 0.5 s
        {"hop_length": 47},
        {"n_mels": 2000},
        {"f_min": -1.0},
        {"f_max": 30000.0},
        {"f_min": 500.0, "f_max": 400.0},
        {"log_floor": 0.0},
        {"log_floor": float("nan")},
        {"chunk_frames": 1},
        {"chunk_overlap": 1.0},
        {"chunk_overlap": "half"},
    ],
)
def test_bad_config_raises_config_error(bad: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        MelConfig.from_dict(bad)


# --- features --------------------------------------------------------------------------------


def test_log_mel_shapes_batches_and_floor() -> None:
    x = torch.randn(2, 3, 10_000) * 0.1
    m = log_mel(x, CFG)
    assert m.shape == (2, 3, 128, 10_000 // 512 + 1)
    assert torch.allclose(m[1, 2], log_mel(x[1, 2], CFG), atol=1e-5)  # batching changes nothing
    silent = log_mel(torch.zeros(4800), CFG)
    assert torch.allclose(silent, torch.full_like(silent, math.log(1e-5)))


@pytest.mark.parametrize("n", [1, 2, 100, 1023, 1024, 1025])
def test_log_mel_takes_input_shorter_than_the_fft(n: int) -> None:
    m = log_mel(torch.ones(n) * 0.5, CFG)
    assert m.shape == (128, n // 512 + 1) and torch.isfinite(m).all()


def test_a_chunk_of_audio_gives_a_chunk_of_frames() -> None:
    assert log_mel(torch.zeros(CFG.chunk_samples), CFG).shape[-1] == CFG.chunk_frames


@pytest.mark.parametrize("band", [3, 20, 50, 90, 120])
def test_a_sine_lands_in_its_mel_band(band: int) -> None:
    freq = float(mel_center_frequencies(CFG)[band])
    m = log_mel(tone(freq), CFG)  # (n_mels, frames)
    assert int(m[:, 5:-5].mean(dim=1).argmax()) == band


def test_a_sine_between_bands_lands_next_to_its_frequency() -> None:
    centres = mel_center_frequencies(CFG)
    for freq in [100.0, 440.0, 1000.0, 3000.0, 10_000.0]:
        nearest = int((centres - freq).abs().argmin())
        got = int(log_mel(tone(freq), CFG)[:, 5:-5].mean(dim=1).argmax())
        assert abs(got - nearest) <= 1, freq


def test_centre_frequencies_are_increasing_and_within_range() -> None:
    c = mel_center_frequencies(CFG)
    assert c.shape == (128,) and bool((c.diff() > 0).all())
    assert 0 < float(c[0]) < 100 and float(c[-1]) < 24000


# --- inversion and metrics -------------------------------------------------------------------


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Griffin-Lim is ~200 small FFT calls; on a shared 2-core box, two OpenMP threads fighting
    other processes made it 13x slower than one (6.4 s vs 0.48 s per second of audio)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.usefixtures("one_thread")
def test_griffin_lim_is_seeded_and_leaves_global_rng_alone() -> None:
    m = log_mel(tone(700, 0.3), CFG)
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = mel_to_audio(m, CFG, n_iter=4, seed=1)
    after = torch.rand(1)
    assert torch.equal(before, after)
    assert torch.equal(a, mel_to_audio(m, CFG, n_iter=4, seed=1))
    assert not torch.equal(a, mel_to_audio(m, CFG, n_iter=4, seed=2))
    assert a.shape == ((m.shape[-1] - 1) * 512,)
    assert mel_to_audio(m, CFG, n_iter=2, length=1000).shape == (1000,)
    assert mel_to_audio(m[:, :1], CFG, n_iter=2).shape == (1,)  # one frame still inverts


def test_metrics_are_zero_for_identity_and_align_lengths() -> None:
    x = tone(440, 0.4)
    assert float(spectral_convergence(x, x, CFG)) == 0.0
    assert float(log_mel_l1(x, x, CFG)) == 0.0
    assert float(spectral_convergence(x, torch.zeros_like(x), CFG)) == pytest.approx(1.0)
    assert float(spectral_convergence(x, torch.cat([x, x]), CFG)) == 0.0  # cut to the shorter
    batch = torch.stack([x, tone(880, 0.4)])
    assert spectral_convergence(batch, batch.flip(0), CFG).shape == (2,)
    assert log_mel_l1(batch, batch.flip(0), CFG).shape == (2,)


# Measured on these files (48 kHz, defaults, 32 iterations, seed 0): SC 0.119, 0.207, 0.258,
# log-mel L1 0.080, 0.085, 0.105. Over all 128 percussion files the median floor is 0.30 (at 24 kHz).
GL_FILES = ["drum_tom_lo_soft.flac", "elec_lo_snare.flac", "tabla_tas3.flac"]


@pytest.mark.usefixtures("one_thread")
def test_griffin_lim_on_real_files_reaches_the_known_floor() -> None:
    scs, l1s = [], []
    for name in GL_FILES:
        audio = load_audio(percussion_dir() / name, CFG.sample_rate)
        est = mel_to_audio(log_mel(audio, CFG), CFG, length=len(audio))
        scs.append(float(spectral_convergence(audio, est, CFG)))
        l1s.append(float(log_mel_l1(audio, est, CFG)))
    assert max(scs) < 0.35 and statistics.median(scs) < 0.30
    assert max(l1s) < 0.20
    # and the metric tells a wrong answer apart: another file's audio scores far worse
    other = load_audio(percussion_dir() / "hat_star.flac", CFG.sample_rate)
    assert float(spectral_convergence(audio, other, CFG)) > 0.8


@pytest.mark.parametrize(
    ("field", "value", "bound"),
    [("n_fft", 65536, "16384"), ("n_mels", 1000, "512"), ("chunk_frames", 100_000, "2048")],
)
def test_mel_settings_past_the_bounds_are_refused_naming_the_bound(
    field: str, value: int, bound: str
) -> None:
    """Before: n_fft=65536 or chunk_frames=100000 were accepted and allocated on first use."""
    with pytest.raises(ConfigError, match=f"{field} {value} is over the limit of {bound}"):
        MelConfig.from_dict({field: value})


def test_a_long_sounds_log_mel_in_blocks_is_the_same() -> None:
    """Preprocessing computes a long file's log-mel a block of frames at a time (a 10-minute
    file's whole spectrogram held 0.7 GB more): the same frames, the centred STFT's zero
    padding at either end included."""
    from distill.shared.audio.mel import log_mel_blocked

    g = torch.Generator().manual_seed(0)
    for samples in (48000 * 3 + 123, 512 * 100, 700):
        audio = torch.randn(samples, generator=g) * 0.1
        whole = log_mel(audio, CFG)
        for block in (7, 64, 1000):
            blocked = log_mel_blocked(audio, CFG, block)
            assert blocked.shape == whole.shape
            assert torch.allclose(blocked, whole, atol=1e-5, rtol=0)
    short = torch.randn(2000, generator=g)
    assert torch.equal(log_mel_blocked(short, CFG), log_mel(short, CFG))  # one block: log_mel
