"""The prior on a handful of sounds, at the size ``distill demo`` runs in CI: the demo's 10
bundled one-shots, a tiny RVQ-VAE, a tiny prior, then 8 draws with the demo's settings.

Before the prior's small-data changes (epochs of 4 steps, the best epoch picked on one
validation file), the same run drew 8 near-silent sounds: the prior stopped before it had
learnt how a sound starts (figures in test_the_demo_draws_are_audible_and_distinct).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import pytest
import torch

from distill.shared.audio.dataset import build_dataset
from distill.shared.audio.mel import MelConfig
from distill.shared.cli import demo
from distill.shared.model.inference import render
from distill.shared.model.modelfile import DistillModel
from distill.shared.model.sampling import SamplingParams, sample
from distill.shared.model.vqvae import VQVAEConfig
from distill.shared.train.loop import NullHooks
from distill.shared.train.prior import PriorTrainConfig, PriorTrainer, encode_dataset
from distill.shared.train.vqvae import TrainConfig, VQVAETrainer

pytestmark = pytest.mark.slow  # trains two models (about a minute on one core)

# tests/shared/cli/test_demo.py's short configuration, epochs only (no time budget: the same
# weights on every run)
CI_VQVAE = VQVAEConfig(channels=32, latent_dim=16, blocks=1)
CI_VQVAE_TRAIN = TrainConfig(epochs=15, preview_every=0, checkpoint_every_s=0)
CI_PRIOR = {"hidden": 32, "embed_dim": 16}
CI_PRIOR_TRAIN = PriorTrainConfig(epochs=15, checkpoint_every_s=0)
PEAK_FLOOR_DBFS = -30.0  # every draw clearly audible


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def dbfs(x: np.ndarray) -> float:
    return 20 * math.log10(float(np.abs(x).max()) + 1e-12)


def test_the_demo_draws_are_audible_and_distinct() -> None:
    files = [(p.name, p.read_bytes()) for p in demo.bundled_sounds()]
    ds = build_dataset(files, MelConfig())
    vqvae = VQVAETrainer(ds, CI_VQVAE, CI_VQVAE_TRAIN, NullHooks()).run().model
    codes = encode_dataset(vqvae, ds)
    trained = PriorTrainer(codes, CI_PRIOR, CI_PRIOR_TRAIN, NullHooks()).run()
    model = DistillModel(mel_config=ds.mel_config, vqvae=vqvae, prior=trained.model, summary={})
    steps = round(demo.DEMO_SECONDS * ds.mel_config.sample_rate / ds.mel_config.hop_length)
    params = SamplingParams(temperature=demo.DEMO_TEMPERATURE, seed=demo.DEMO_SEED)
    drawn = sample(trained.model, batch=demo.DEMO_COUNT, steps=steps, params=params)
    audio, _ = render(model, drawn, "best")  # (8, samples)
    peaks = [dbfs(a) for a in audio]
    # measured: peaks -21.9 to -11.4 dBFS; with the prior's training before its small-data
    # changes, this same run gave -67.1 to -48.6 (all 8 below the floor)
    assert min(peaks) > PEAK_FLOOR_DBFS, [round(p, 1) for p in peaks]
    agreement = max(float((drawn[i] == drawn[j]).float().mean())
                    for i in range(len(drawn)) for j in range(i + 1, len(drawn)))  # fmt: skip
    assert agreement < 0.95  # distinct draws, not copies of one another
