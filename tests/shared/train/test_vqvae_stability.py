"""Issue 10's stability check: a fixed-seed, fixed-step run of the default RVQ-VAE on a small
percussion subset, on the CPU, never lets validation log-mel L1 climb past 1.5x its best so far,
and the model it returns is the best by validation (no worse than the model after its first
epoch).

The model is what a CPU job trains (choose_size: 256 channels, 3 blocks, downsample 1, the
PCA-initialised linear path; the figures below were measured at downsample 2, the default then).
Without the linear path it fails on the previous default rate, lr 2e-3: validation L1 per
epoch 1.37 0.94 0.60 0.76 1.00 0.61 ..., 1.67x its best, as the warmup reaches the peak
(``STABILITY_MODEL='{"linear_path": false}' STABILITY_TRAIN='{"lr": 2e-3}'``); with it, 2e-3
and 4e-3 pass too. Run it against other settings with
``STABILITY_MODEL='{"channels": 384, "blocks": 6}'``. Known gap: the issue-time size (384 x 6,
downsample 1) at 2e-3 passes it here (1.15x; also 20 epochs at the constant peak rate); its
tenfold climb was measured on the full 115-file set with 512 x 6 codebooks, far longer than a
test may run.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from distill.shared.audio.dataset import Dataset, build_dataset
from distill.shared.audio.io import scan_folder
from distill.shared.audio.mel import MelConfig
from distill.shared.model.vqvae import VQVAEConfig, choose_size
from distill.shared.train.vqvae import TrainConfig, VQVAETrainer, _mean_losses
from tests.conftest import held_out, percussion_dir
from tests.shared.train.test_vqvae import RecordingHooks

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

FILES = 12  # the first files of the set, by name: 11 train / 1 validation
# The default model and optimiser; a small codebook and a short schedule keep it to about a
# minute on one core. 10 epochs of MIN_STEPS_PER_EPOCH: 30 warmup steps, then 50 at the peak
# rate before the cosine has decayed much -- where the old defaults climbed.
EPOCHS, WARMUP = 10, 30


@pytest.fixture(scope="module")
def subset() -> Dataset:
    audio = [p for p in scan_folder(percussion_dir()) if p.suffix == ".flac"][:FILES]
    ds = build_dataset([(p.name, p.read_bytes()) for p in audio], MelConfig(), seed=0)
    return held_out(ds, "bd_pure.flac")  # a one-shot alone is too little to validate on


def _model_config() -> VQVAEConfig:
    overrides = json.loads(os.environ.get("STABILITY_MODEL", "{}"))
    sized, _ = choose_size("cpu", overrides)  # what a CPU job trains
    return VQVAEConfig.from_dict({"codebook_size": 64, "levels": 3, **sized})


@pytest.mark.slow  # trains the default-sized model for a minute
def test_default_training_is_stable(subset: Dataset) -> None:
    overrides = json.loads(os.environ.get("STABILITY_TRAIN", "{}"))
    train = TrainConfig.from_dict({"epochs": EPOCHS, "warmup_steps": WARMUP, "patience": 0,
                                   "checkpoint_every_s": 0, "preview_every": 0,
                                   "audio_every": 0, "seed": 0, **overrides})  # fmt: skip
    hooks = RecordingHooks()
    result = VQVAETrainer(subset, _model_config(), train, hooks).run()
    val_l1 = [m["val_l1"] for m in hooks.metrics]
    assert len(val_l1) == EPOCHS
    best_so_far = [min(val_l1[: i + 1]) for i in range(len(val_l1))]
    ratios = [v / b for v, b in zip(val_l1, best_so_far, strict=True)]
    assert max(ratios) <= 1.5, f"validation L1 per epoch {val_l1}"
    # The model returned is the best by validation (its codebooks refined only where that
    # hurts neither loss), no worse than after the first epoch. Which epoch is best depends on
    # the CPU's arithmetic (the same seed and steps: the last on one machine, 0.5% worse than
    # the best on another); test_early_stopping_returns_the_best_epoch_not_the_last shows the
    # best returned where the last is worse, whatever the machine.
    val_loss = [m["val_recon"] for m in hooks.metrics]
    x = torch.from_numpy(subset.mels[subset.val_indices()])  # (N_val, M, T)
    with torch.no_grad():  # measured as the trainer measured each epoch's val_recon
        returned = _mean_losses(result.model.eval(), x)[0]
    best = min(val_loss)
    assert val_loss.index(best) + 1 == result.best_epoch
    assert returned <= best * (1 + 1e-5) and returned <= val_loss[0] * (1 + 1e-5)
