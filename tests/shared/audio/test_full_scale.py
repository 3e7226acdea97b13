"""Sounds over full scale (distill.shared.audio.export.within_full_scale, what the UI plays and
the training previews hold): scaled down, never clipped, as export is."""

from __future__ import annotations

import numpy as np

from distill.shared.audio.export import HEADROOM_DB, within_full_scale


def test_a_sound_over_full_scale_is_scaled_down_not_clipped() -> None:
    t = np.linspace(0, 1, 4800, dtype=np.float32)
    loud = (5.0 * np.sin(2 * np.pi * 220 * t) * np.exp(-3 * t)).astype(np.float32)  # +14 dBFS
    played = within_full_scale(loud)
    ceiling = 10 ** (-HEADROOM_DB / 20)
    assert np.isclose(float(np.abs(played).max()), ceiling, rtol=1e-6)
    ratio = played[loud != 0] / loud[loud != 0]
    assert np.allclose(ratio, ratio[0], rtol=1e-5)  # one gain for every sample: the shape kept


def test_a_sound_under_full_scale_plays_as_it_is() -> None:
    quiet = np.array([0.0, 0.5, -0.9, 0.2], dtype=np.float32)
    assert np.array_equal(within_full_scale(quiet), quiet)
    assert within_full_scale(np.zeros(0, dtype=np.float32)).shape == (0,)
