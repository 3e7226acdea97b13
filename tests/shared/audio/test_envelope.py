"""The envelope metric: how a sound's loudness runs over time, from its log-mel."""

from __future__ import annotations

import math

import pytest
import torch

from distill.shared.audio.io import load_audio
from distill.shared.audio.mel import MelConfig, log_mel
from distill.shared.audio.metrics import Envelope, envelope, envelope_distance, frame_levels_db
from tests.conftest import percussion_dir

FPS = 100.0  # frames a second of the synthetic log-mels


def _mel(levels_db: list[float], bands: int = 8) -> torch.Tensor:
    """A log-mel (bands, T) whose frames have these energies (dB) spread evenly over bands."""
    db = torch.tensor(levels_db, dtype=torch.float64)
    magnitude = (10 ** (db / 20) / math.sqrt(bands))[None].expand(bands, -1)
    return magnitude.log().float()


def _decay(peak_at: int, db_per_s: float, frames: int) -> list[float]:
    """Silence (-100 dB), then a hit at frame ``peak_at`` falling ``db_per_s``, floored at -100."""
    return [-100.0 if i < peak_at else max(-100.0, -(i - peak_at) * db_per_s / FPS)
            for i in range(frames)]  # fmt: skip


def test_frame_levels_are_relative_to_the_loudest_frame() -> None:
    db = frame_levels_db(_mel([-30.0, -10.0, -50.0]))
    assert db.tolist() == pytest.approx([-20.0, 0.0, -40.0], abs=1e-3)
    with pytest.raises(ValueError, match=r"\(M, T\)"):
        frame_levels_db(torch.zeros(8))


def test_a_decaying_hit_decays_in_the_time_its_slope_gives() -> None:
    env = envelope(_mel(_decay(peak_at=5, db_per_s=40.0, frames=200)), FPS)
    assert env.decay_s == pytest.approx(0.5, abs=1.5 / FPS)  # 20 dB at 40 dB/s
    assert not env.late and not env.retrigger
    slow = envelope(_mel(_decay(peak_at=5, db_per_s=10.0, frames=200)), FPS)
    assert slow.decay_s == pytest.approx(1.95, abs=1.5 / FPS)  # rings to the end
    assert slow.late and not slow.retrigger


def test_a_second_hit_after_a_silence_is_a_retrigger_but_not_a_rise_within_one() -> None:
    first = _decay(peak_at=0, db_per_s=200.0, frames=60)  # quiet from frame 20
    second = _decay(peak_at=0, db_per_s=200.0, frames=60)
    env = envelope(_mel(first + second), FPS)
    assert env.retrigger and not env.late
    # from the (first) peak to the end of the second hit: loud over 0.69 s in all
    assert env.decay_s == pytest.approx(0.69, abs=1.5 / FPS)
    # A dip to -30 dB (not quiet) and back, or a short gap of quiet (< 0.1 s), is one sound.
    dip = [0.0] * 10 + [-30.0] * 30 + [0.0] * 10 + [-100.0] * 20
    gap = [0.0] * 10 + [-60.0] * 5 + [0.0] * 10 + [-100.0] * 20
    assert not envelope(_mel(dip), FPS).retrigger
    assert not envelope(_mel(gap), FPS).retrigger
    # Silence before the first onset is not a retrigger either.
    assert not envelope(_mel([-100.0] * 50 + first), FPS).retrigger


def test_a_real_one_shot_decays_fast_and_once() -> None:
    cfg = MelConfig()
    for name in ("bd_808.flac", "elec_lo_snare.flac", "drum_tom_lo_soft.flac"):
        audio = load_audio(percussion_dir() / name, cfg.sample_rate)
        env = envelope(log_mel(audio, cfg), cfg.frames_per_second)
        assert 0.02 < env.decay_s < 1.0, name
        assert not env.retrigger, name
    # Two hits a second apart are two.
    audio = load_audio(percussion_dir() / "elec_lo_snare.flac", cfg.sample_rate)
    twice = torch.cat([audio, torch.zeros(cfg.sample_rate), audio])
    assert envelope(log_mel(twice, cfg), cfg.frames_per_second).retrigger


def test_envelope_distance_is_zero_for_sets_alike_and_grows_with_the_mismatch() -> None:
    short = [Envelope(decay_s=0.1 + 0.01 * i, late=False, retrigger=False) for i in range(20)]
    longer = [Envelope(decay_s=2 * (0.1 + 0.01 * i) + 0.02, late=False, retrigger=False)
              for i in range(20)]  # fmt: skip
    assert envelope_distance(short, short) == 0.0
    assert envelope_distance(longer, short) == pytest.approx(math.log(2.0), abs=1e-6)
    ringing = [Envelope(e.decay_s, late=i < 5, retrigger=i < 2) for i, e in enumerate(short)]
    assert envelope_distance(ringing, short) == pytest.approx(5 / 20 + 2 / 20)
    assert envelope_distance(short, ringing) == envelope_distance(ringing, short)
    with pytest.raises(ValueError, match="at least one"):
        envelope_distance([], short)
