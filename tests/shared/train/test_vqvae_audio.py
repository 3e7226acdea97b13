"""The RVQ-VAE trainer judges its model by the audio: a few validation chunks decoded with
Griffin-Lim, scored beside the floor (Griffin-Lim of the true mel), on the metric rows every
``audio_every`` epochs, at the planned last one and in the result."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import Tensor, nn

from distill.shared.audio.dataset import Dataset
from distill.shared.audio.mel import MelConfig
from distill.shared.model.vqvae import VQVAE, VQVAEOutput
from distill.shared.train.vqvae import AudioCheck, VQVAETrainer, decoded_sc
from tests.shared.train.test_vqvae import FAST, TINY, RecordingHooks, dataset, run

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

__all__ = ["dataset"]  # the module-scoped fixture, shared with test_vqvae.py


class Noisy(nn.Module):
    """Stands in for a model: returns its input plus fixed noise of mean |noise| nats."""

    def __init__(self, noise: float) -> None:
        super().__init__()
        self.noise = noise

    def forward(self, mel: Tensor) -> VQVAEOutput:
        g = torch.Generator().manual_seed(0)
        recon = mel + self.noise * torch.randn(mel.shape, generator=g).abs()  # (n, M, T)
        return VQVAEOutput(recon, torch.zeros(0), torch.zeros(()))


def test_a_perfect_model_sits_on_the_floor_and_errors_raise_the_ratio(dataset: Dataset) -> None:
    mels = torch.from_numpy(dataset.mels[:3])  # (3, M, T)
    check = AudioCheck(mels, ["a", "b", "c"], dataset.mel_config, n_iter=8)
    perfect = check.measure(Noisy(0.0))
    assert perfect["ratio"] == pytest.approx(1.0) and 0 < perfect["floor"] < 1
    small, large = (check.measure(Noisy(n))["ratio"] for n in (0.1, 0.5))
    assert 1.0 < small < large
    assert perfect["files"] == ["a", "b", "c"] and perfect["chunks"] == 3


def test_decoded_sc_is_seeded_and_per_chunk() -> None:
    cfg = MelConfig()
    g = torch.Generator().manual_seed(1)
    mel = torch.randn(2, cfg.n_mels, 20, generator=g) - 4  # (2, M, T)
    first, second = decoded_sc(mel, mel, cfg, 4), decoded_sc(mel, mel, cfg, 4)
    assert first.shape == (2,) and torch.equal(first, second)


def test_the_check_takes_one_chunk_per_validation_file(dataset: Dataset) -> None:
    trainer = VQVAETrainer(dataset, TINY, FAST, RecordingHooks())
    val_files = {int(dataset.chunk_file[i]) for i in dataset.val_indices()}
    names = trainer.audio_check.names
    assert len(names) == min(FAST.audio_chunks, len(dataset.val_indices()))
    assert len(set(names)) == min(len(names), len(val_files))


@pytest.mark.slow  # trains a model
def test_audio_figures_are_on_the_rows_and_in_the_result(dataset: Dataset) -> None:
    hooks = RecordingHooks()
    result = run(dataset, hooks, dataclasses.replace(FAST, epochs=5, audio_every=2))
    measured = [m["epoch"] for m in hooks.metrics if "audio_sc" in m]
    assert measured == [2, 4, 5]  # every 2 epochs and the planned last
    row = hooks.metrics[1]
    assert row["audio_sc_ratio"] == pytest.approx(row["audio_sc"] / row["audio_sc_floor"])
    assert result.audio["epoch"] == result.best_epoch
    assert result.audio["floor"] == pytest.approx(row["audio_sc_floor"])  # computed once
    assert isinstance(result.model, VQVAE) and result.audio["ratio"] > 1.0
