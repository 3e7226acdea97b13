"""The RVQ-VAE worker's preview WAVs: a reconstruction over full scale is scaled down, not
clipped (what you compare by ear is the sound's shape, as export would write it)."""

from __future__ import annotations

import io

import numpy as np
import soundfile as sf
import torch

from distill.workers.train_vqvae import _wav_bytes


def test_a_loud_preview_is_scaled_down_not_clipped() -> None:
    t = torch.linspace(0, 1, 4800)
    loud = 3.0 * torch.sin(2 * torch.pi * 330 * t) * torch.exp(-4 * t)  # ~ +9.5 dBFS
    back, rate = sf.read(io.BytesIO(_wav_bytes(loud, 48000)), dtype="float64")
    assert rate == 48000 and back.shape == (4800,)
    assert 0.95 < float(np.abs(back).max()) <= 1.0
    # one gain for the whole preview: the samples are the input's times a constant
    gain = float(np.abs(back).max()) / float(loud.abs().max())
    assert np.allclose(back, loud.numpy() * gain, atol=2e-6)


def test_a_preview_under_full_scale_is_written_as_it_is() -> None:
    quiet = 0.5 * torch.sin(torch.linspace(0, 60, 4800))
    back, _ = sf.read(io.BytesIO(_wav_bytes(quiet, 48000)), dtype="float64")
    assert np.allclose(back, quiet.numpy(), atol=2e-6)


def test_the_same_preview_of_two_jobs_is_two_artifacts() -> None:
    """The store keeps identical bytes once, tagged with the first job: a second run's
    "original" previews (the same training audio) were missing from its own list. The tags
    (job, epoch, file) make each job's bytes its own."""
    from distill.shared.audio.io import read_metadata

    audio = torch.sin(torch.arange(4800) / 10.0) * 0.5
    first = _wav_bytes(audio, 48000, {"comment": "distill preview of job j-1, epoch 5, a.wav"})
    second = _wav_bytes(audio, 48000, {"comment": "distill preview of job j-2, epoch 5, a.wav"})
    assert first != second
    assert "job j-2" in read_metadata(second)["comment"]
    a, _ = sf.read(io.BytesIO(first), dtype="float64")
    b, _ = sf.read(io.BytesIO(second), dtype="float64")
    assert np.array_equal(a, b)  # the same sound
