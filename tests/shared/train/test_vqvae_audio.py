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


def test_the_check_scores_the_chunks_against_their_sound(dataset: Dataset) -> None:
    # Built from files, the dataset keeps the check chunks' audio: the figure is the bar's,
    # spectral convergence on STFT bins against the sound, whose floor (Griffin-Lim's phase
    # error) is far above the one on mel bins.
    chosen = dataset.check_order()[:3]
    mels = torch.from_numpy(dataset.mels[chosen])
    audio = dataset.chunk_audio(chosen)
    assert audio is not None
    on_audio = AudioCheck(mels, ["a", "b", "c"], dataset.mel_config, 8, torch.from_numpy(audio))
    on_mels = AudioCheck(mels, ["a", "b", "c"], dataset.mel_config, 8)
    a, m = on_audio.measure(Noisy(0.3)), on_mels.measure(Noisy(0.3))
    assert (a["on"], m["on"]) == ("audio", "mel bins")
    assert a["floor"] > 2 * m["floor"] and 1.0 < a["ratio"] < m["ratio"]
    assert on_audio.measure(Noisy(0.0))["ratio"] == pytest.approx(1.0)
    trainer = VQVAETrainer(dataset, TINY, FAST, RecordingHooks())
    assert trainer.audio_check.audio is not None  # the trainer uses the sound where it is kept
    older = dataclasses.replace(dataset, check_chunks=dataset.check_chunks[:0],
                                check_audio=dataset.check_audio[:0])  # fmt: skip
    assert VQVAETrainer(older, TINY, FAST, RecordingHooks()).audio_check.audio is None


@pytest.mark.slow  # trains a model
def test_audio_figures_are_on_the_rows_and_in_the_result(dataset: Dataset) -> None:
    hooks = RecordingHooks()
    result = run(dataset, hooks, dataclasses.replace(FAST, epochs=5, audio_every=2))
    measured = [m["epoch"] for m in hooks.metrics if "audio_sc" in m]
    assert measured == [2, 4, 5]  # every 2 epochs and the planned last
    row = hooks.metrics[1]
    assert row["audio_sc_ratio"] == pytest.approx(row["audio_sc"] / row["audio_sc_floor"])
    assert result.audio["epoch"] == result.best_epoch
    # the figure of record: against the sound, a chunk of every validation file at least
    val_files = {int(dataset.chunk_file[i]) for i in dataset.val_indices()}
    assert result.audio["on"] == "audio" and len(set(result.audio["files"])) == len(val_files)
    assert isinstance(result.model, VQVAE) and result.audio["ratio"] > 1.0
