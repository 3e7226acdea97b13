"""Training the RVQ-VAE (distill.shared.train.vqvae): loss, codebook health, checkpoints,
resume, NaN rollback. A tiny model on six percussion files trains in about a second."""

from __future__ import annotations

import dataclasses
import io
import math
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor

from distill.shared.audio.dataset import Dataset, ManifestRow, build_dataset
from distill.shared.audio.io import scan_folder
from distill.shared.audio.mel import MelConfig
from distill.shared.errors import ConfigError, JobCancelled, JobError, ModelFormatError
from distill.shared.model.formats import read_checkpoint, weights_from_bytes, weights_to_bytes
from distill.shared.model.vqvae import VQVAE, VQVAEConfig, dead_code_threshold_for
from distill.shared.train import vqvae as vqvae_training
from distill.shared.train.loop import PreviewLabel, lr_at
from distill.shared.train.vqvae import (
    TrainConfig,
    VQVAETrainer,
    _mean_losses,
    preview_pool,
    train_vqvae,
)
from tests.conftest import held_out, percussion_dir

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

FILES = ["bd_808.flac", "bd_haus.flac", "sn_dub.flac", "hat_bdu.flac", "tabla_na.flac",
         "elec_blip.flac", "drum_tom_lo_hard.flac"]  # fmt: skip
TINY = VQVAEConfig(channels=32, latent_dim=16, blocks=2, codebook_size=16, levels=2)
FAST = TrainConfig(epochs=6, batch_size=4, lr=3e-3, warmup_steps=4, preview_every=2, patience=0,
                   checkpoint_every_s=0)  # fmt: skip


@pytest.fixture(scope="module")
def dataset() -> Dataset:
    folder = percussion_dir()
    paths = [p for p in scan_folder(folder) if p.name in FILES]
    ds = build_dataset([(p.name, p.read_bytes()) for p in paths], MelConfig(), seed=0)
    ds = held_out(ds, "elec_blip.flac")  # one one-shot is too little to validate on by itself
    assert len(ds.val_indices()) > 0 and len(ds.train_indices()) > 0
    return ds


class RecordingHooks:
    """Keeps everything the loop reports; can cancel before a given step or poison weights."""

    def __init__(self, start_from: bytes | None = None, cancel_at_step: int | None = None,
                 poison_at_steps: tuple[int, ...] = ()) -> None:  # fmt: skip
        self.metrics: list[dict[str, Any]] = []
        self.checkpoints: list[bytes] = []
        self.previews: list[tuple[int, Tensor, Tensor, list[PreviewLabel]]] = []
        self.start_from, self.cancel_at_step = start_from, cancel_at_step
        self.poison_at_steps = set(poison_at_steps)
        self.steps = 0
        self.trainer: VQVAETrainer | None = None

    def check_cancel(self) -> None:
        self.steps += 1
        if self.cancel_at_step is not None and self.steps >= self.cancel_at_step:
            raise JobCancelled("cancelled by the test")
        if self.steps in self.poison_at_steps and self.trainer is not None:
            assert self.trainer.model is not None
            with torch.no_grad():  # a corrupted weight, as from a bad update
                next(self.trainer.model.parameters()).fill_(math.nan)

    def on_epoch(self, metrics: dict[str, Any]) -> None:
        self.metrics.append(metrics)

    def save_checkpoint(self, data: bytes) -> None:
        self.checkpoints.append(data)

    def load_checkpoint(self) -> bytes | None:
        return self.start_from

    def on_preview(
        self, epoch: int, mels: Tensor, recon: Tensor, labels: list[PreviewLabel]
    ) -> None:
        self.previews.append((epoch, mels, recon, labels))


def run(dataset: Dataset, hooks: RecordingHooks, train: TrainConfig = FAST,
        model: VQVAEConfig = TINY) -> Any:  # fmt: skip
    trainer = VQVAETrainer(dataset, model, train, hooks)
    hooks.trainer = trainer
    return trainer.run()


# -- training ---------------------------------------------------------------------------------


@pytest.mark.slow  # trains a model
def test_training_lowers_the_loss_and_uses_every_level(dataset: Dataset) -> None:
    hooks = RecordingHooks()
    result = run(dataset, hooks)
    first, last = hooks.metrics[0], hooks.metrics[-1]
    assert [m["epoch"] for m in hooks.metrics] == list(range(1, 7))
    assert last["train_recon"] < first["train_recon"]
    assert last["val_recon"] < first["val_recon"]
    for used, ppl in zip(last["utilisation"], last["perplexity"], strict=True):
        assert used * 16 > 1 and ppl > 1.0  # every level uses more than one code
    assert len(last["usage"]) == 2 and len(last["usage"][0]) == 16  # (Q, K) for a heatmap
    assert last["usage_group"] == 1

    assert len(last["dead_codes"]) == 2 and last["lr"] > 0 and last["eta_s"] == 0
    assert result.epochs == 6 and result.stopped == "epochs" and not result.model.training
    best = min(m["val_recon"] for m in hooks.metrics)
    refine = result.refine  # the codebooks refined after training, kept if no worse
    assert refine["iters"] == FAST.refine_iters and refine["val_loss_before"] == pytest.approx(best)
    assert result.best_val_loss == (refine["val_loss_after"] if refine["kept"] else best)
    assert result.best_val_loss <= best
    train = torch.from_numpy(dataset.mels[dataset.train_indices()])  # (N, M, T)
    with torch.no_grad():
        codes = result.model.encode(train)  # (N, Q, T')
    assert result.codes_in_use == [torch.unique(codes[:, q]).numel() / 16 for q in range(2)]
    assert len(hooks.checkpoints) == 7  # the initial state, then one per epoch
    # at each decoded-audio check (epoch 5, and the planned last), the codes the model of that
    # epoch uses over the training chunks: its checkpoint encodes them to the same share
    checked = [m["epoch"] for m in hooks.metrics if "codes_in_use" in m]
    assert checked == [5, 6] and all("audio_sc_ratio" in hooks.metrics[e - 1] for e in checked)
    for epoch in checked:
        ckpt = read_checkpoint(hooks.checkpoints[epoch])
        at_epoch = VQVAE(VQVAEConfig.from_dict(ckpt["model_config"]))
        at_epoch.load_state_dict(ckpt["state_dict"])
        at_epoch.eval()
        with torch.no_grad():
            codes = at_epoch.encode(train)
        used = [torch.unique(codes[:, q]).numel() / 16 for q in range(2)]
        assert hooks.metrics[epoch - 1]["codes_in_use"] == used
    # the check moves no codebook (quantizing in training mode would update the EMA ones)
    model = result.model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert hooks.trainer is not None
    hooks.trainer.codes_in_use(model)
    assert model.training and all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert [p[0] for p in hooks.previews] == [2, 4, 6]
    epoch, mels, recon, labels = hooks.previews[0]
    assert mels.shape == recon.shape and mels.shape[1:] == (128, 94) and len(labels) == len(mels)
    val_files = {dataset.manifest[int(dataset.chunk_file[i])].name for i in dataset.val_indices()}
    assert {label.file for label in labels} <= val_files


def test_previews_take_one_chunk_of_each_sound_before_a_second_of_any() -> None:
    # a 3-chunk validation loop, a one-shot that trains, a 2-chunk validation sound
    files = [("loop.flac", 3, "val"), ("hit.flac", 1, "train"), ("pad.flac", 2, "val")]
    manifest = [ManifestRow(name, f"{i:064x}", "ok", None, float(n), 48000, 1, n, split)
                for i, (name, n, split) in enumerate(files)]  # fmt: skip
    chunk_file = np.array([i for i, (_, n, _) in enumerate(files) for _ in range(n)], np.int32)
    mels = np.zeros((len(chunk_file), 128, 94), np.float32)
    dataset = Dataset(MelConfig(), mels, chunk_file, manifest, seed=0)
    pool = preview_pool(dataset, dataset.val_indices())  # rows: loop 0, 1, 2; pad 3, 4
    assert [(p.row, tuple(p.label)) for p in pool] == [
        (0, ("loop.flac", 1, 3)), (3, ("pad.flac", 1, 2)), (1, ("loop.flac", 2, 3)),
        (4, ("pad.flac", 2, 2)), (2, ("loop.flac", 3, 3))]  # fmt: skip


@pytest.mark.slow  # trains a model
def test_a_codebook_refinement_that_makes_validation_worse_is_undone(
    dataset: Dataset, monkeypatch: pytest.MonkeyPatch
) -> None:
    short = dataclasses.replace(FAST, epochs=2, preview_every=0)
    plain = run(dataset, RecordingHooks(), dataclasses.replace(short, refine_iters=0))
    assert plain.refine == {"iters": 0, "kept": False}

    def scramble(self: Any, latents: Tensor, batch_vectors: int, iters: int) -> None:
        for vq in self.rvq.layers:  # codes nowhere near the latents
            vq._codebook.embed.data.add_(100.0)

    monkeypatch.setattr(VQVAE, "refine_codebooks_", scramble)
    result = run(dataset, RecordingHooks(), dataclasses.replace(short, refine_decoder_steps=0))
    refine = result.refine
    assert not refine["kept"] and refine["decoder_steps"] == 0
    assert (refine["train_loss_after"], refine["val_loss_after"]) == (
        refine["train_loss_before"], refine["val_loss_before"])  # the model as trained
    assert torch.equal(result.model.codebooks(), plain.model.codebooks())
    for a, b in zip(result.model.state_dict().values(), plain.model.state_dict().values(),
                    strict=True):  # fmt: skip
        assert torch.equal(a, b)
    assert result.best_val_loss == plain.best_val_loss and not result.model.training


@pytest.mark.slow  # trains a model
def test_the_decoder_tuned_after_refinement_is_kept_only_where_both_losses_hold(
    dataset: Dataset,
) -> None:
    config = dataclasses.replace(FAST, epochs=2, preview_every=0, refine_decoder_steps=60)
    seen: list[tuple[int, tuple[float, float]]] = []
    trainer = VQVAETrainer(dataset, TINY, config, RecordingHooks())
    losses = trainer._losses
    trainer._losses = lambda model: seen.append((0, losses(model))) or seen[-1][1]  # type: ignore[method-assign]
    result = trainer.run()
    refine = result.refine
    checks = [loss for _, loss in seen[1:]]  # as trained, then refined + 0, 25, 50, 60 steps
    assert len(checks) == 4
    before = seen[0][1]
    ok = [c for c in checks if c[0] <= before[0] and c[1] <= before[1]]
    assert refine["kept"] == bool(ok)
    if ok:  # the lowest validation loss among the states that hold both
        best = min(ok, key=lambda c: c[1])
        assert (refine["train_loss_after"], refine["val_loss_after"]) == best
        assert refine["decoder_steps"] == [0, 25, 50, 60][checks.index(best)]
        assert result.best_val_loss == best[1]


@pytest.mark.slow  # trains a model
def test_the_refinement_draws_chunks_up_to_the_cap_with_their_variants(
    dataset: Dataset, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(vqvae_training, "KMEANS_MAX_VECTORS", 1000)
    trainer = VQVAETrainer(dataset, TINY, dataclasses.replace(FAST, epochs=1), RecordingHooks())
    result = trainer.run()
    steps = 94  # frames per chunk at downsample 1
    assert result.refine["latents"] == (1000 // (5 * steps)) * 5 * steps  # 2 chunks x 5 views
    latents = trainer._refine_latents(result.model)
    assert latents.shape == (2 * 5 * steps, TINY.latent_dim) and trainer.batch_vectors == 4 * steps


def _magnitude_sc(model: VQVAE, mels: Tensor) -> float:
    """Median spectral convergence, on mel magnitudes, of the model's unquantized round trip."""
    with torch.no_grad():
        recon = model.decode_latents(model.encode_latents(mels), mels.shape[-1])
    err = (recon.exp() - mels.exp()).norm(dim=(1, 2)) / mels.exp().norm(dim=(1, 2))
    return float(err.median())


def test_the_starting_codec_scales_every_bin_alike_and_keeps_loud_bins_closer(
    dataset: Dataset,
) -> None:
    """The PCA codec the trainer starts from divides every bin by one scale; with each bin's own
    std instead, the quiet bins take components from the loud ones and the magnitudes that
    spectral convergence (and the ear) weighs come back worse, held-back and trained alike."""
    config = dataclasses.replace(TINY, latent_dim=32, linear_path=True)
    model = VQVAETrainer(dataset, config, FAST, RecordingHooks()).build_model().eval()
    assert torch.all(model.mel_std == model.mel_std[0])
    train = torch.from_numpy(dataset.mels[dataset.train_indices()])  # (N, M, T)
    held_back = torch.from_numpy(dataset.mels[dataset.val_indices()])
    per_bin = VQVAE(config).eval()
    per_bin.set_normalisation_(train.mean(dim=(0, 2)), train.std(dim=(0, 2)))
    per_bin.pca_init_(train)
    assert torch.equal(per_bin.mel_mean, model.mel_mean)
    for mels in (held_back, train):
        assert _magnitude_sc(model, mels) < 0.95 * _magnitude_sc(per_bin, mels)


def test_a_dead_code_threshold_at_an_average_codes_use_is_refused(dataset: Dataset) -> None:
    """Batches of 4 chunks of 94 latents over 16 codes: an average code is used 23.5 times a
    batch. A threshold at or above it would replace codes in use at every step: refused before
    training, naming the setting and the bound; just below it trains."""
    hooks = RecordingHooks()
    with pytest.raises(ConfigError, match=r"dead_code_threshold 23\.5 .*average code's use per batch \(23\.5"):
        VQVAETrainer(dataset, dataclasses.replace(TINY, dead_code_threshold=23.5), FAST, hooks)
    trainer = VQVAETrainer(dataset, dataclasses.replace(TINY, dead_code_threshold=23.4), FAST, hooks)
    assert trainer.batch_vectors / 16 == 23.5


@pytest.mark.slow  # trains a model
def test_codebook_sizes_are_chosen_from_the_dataset_when_unset(dataset: Dataset) -> None:
    model = dataclasses.replace(TINY, codebook_size=None, levels=None)
    result = run(dataset, RecordingHooks(), dataclasses.replace(FAST, epochs=1), model)
    n_train = len(dataset.train_indices())  # chunks: the material the codebooks fit
    assert (result.chosen["codebook_size"], result.chosen["levels"]) == (64, 6)
    assert f"{n_train} training chunks" in result.chosen["why"]
    assert result.model.rvq.codebook_size == 64
    # dead codes: below 2% of the uses an average code gets from one batch's latents
    per_batch = min(FAST.batch_size, len(dataset.train_indices())) * 94  # downsample 1
    threshold = result.chosen["dead_code_threshold"]
    assert threshold == pytest.approx(dead_code_threshold_for(per_batch, 64), rel=1e-5)
    assert result.model_config.dead_code_threshold == threshold and "replaced" in result.chosen["why"]
    assert result.model.dead_code_threshold == threshold  # the bound each codebook replaces by
    assert result.model.rvq.layers[0]._codebook.expire_codes_.keywords == {"threshold": threshold}


@pytest.mark.slow  # trains a model
def test_augmentation_runs_when_switched_on(dataset: Dataset) -> None:
    hooks = RecordingHooks()
    run(dataset, hooks, dataclasses.replace(FAST, epochs=1, augment=True))
    assert math.isfinite(hooks.metrics[0]["train_loss"])


@pytest.mark.slow  # trains a model
def test_weights_artifact_round_trips(dataset: Dataset) -> None:
    result = run(dataset, RecordingHooks(), dataclasses.replace(FAST, epochs=1))
    model, mel_config, summary = weights_from_bytes(
        weights_to_bytes(result.model, dataset.mel_config, {"epochs": 1})
    )
    x = torch.from_numpy(dataset.mels[:2])
    assert torch.equal(model.encode(x), result.model.encode(x))
    assert mel_config == dataset.mel_config and summary == {"epochs": 1}


@pytest.mark.slow  # trains a model
def test_early_stopping_returns_the_best_epoch_not_the_last(dataset: Dataset) -> None:
    """Patience 1 ends the run at the first epoch that does not improve on the best: the
    model returned is the best epoch's (its codebooks refined only where that hurts neither
    loss), measured as the trainer measured each epoch, not the worse last one's."""
    hooks = RecordingHooks()
    result = run(dataset, hooks, dataclasses.replace(FAST, epochs=30, patience=1))
    assert result.stopped == "early_stopping" and result.epochs < 30
    assert result.epochs == result.best_epoch + 1
    val_loss = [m["val_recon"] for m in hooks.metrics]
    best = val_loss[result.best_epoch - 1]
    assert best == min(val_loss) and val_loss[-1] > best * (1 + 1e-5)
    x = torch.from_numpy(dataset.mels[dataset.val_indices()])  # (N_val, M, T)
    with torch.no_grad():
        returned = _mean_losses(result.model.eval(), x)[0]
    assert returned <= best * (1 + 1e-5)


# -- resume and rollback ----------------------------------------------------------------------


@pytest.mark.slow  # trains a model
def test_resuming_from_a_checkpoint_equals_an_uninterrupted_run(dataset: Dataset) -> None:
    steps_per_epoch = VQVAETrainer(dataset, TINY, FAST, RecordingHooks()).steps_per_epoch
    whole = RecordingHooks()
    uninterrupted = run(dataset, whole, dataclasses.replace(FAST, epochs=4))
    cut = RecordingHooks(cancel_at_step=2 * steps_per_epoch + 3)  # cancelled inside epoch 3
    with pytest.raises(JobCancelled):
        run(dataset, cut, dataclasses.replace(FAST, epochs=4))
    assert len(cut.metrics) == 2
    resumed_hooks = RecordingHooks(start_from=cut.checkpoints[-1])
    resumed = run(dataset, resumed_hooks, dataclasses.replace(FAST, epochs=4))
    assert [m["epoch"] for m in resumed_hooks.metrics] == [3, 4]
    for key, value in uninterrupted.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[key]), key
    drop = ("epoch_s", "steps_per_s", "eta_s", "spent_s")
    same = [
        {k: v for k, v in m.items() if k not in drop}
        for m in (whole.metrics[-1], resumed_hooks.metrics[-1])
    ]
    assert same[0] == same[1]
    finished = run(
        dataset,
        RecordingHooks(start_from=resumed_hooks.checkpoints[-1]),
        dataclasses.replace(FAST, epochs=4),
    )  # a retry after the last epoch
    assert finished.epochs == 4 and finished.metrics["epoch"] == 4


@pytest.mark.slow  # trains a model
def test_a_nan_rolls_back_with_half_the_learning_rate(dataset: Dataset) -> None:
    constant = dataclasses.replace(FAST, epochs=3, schedule="constant", warmup_steps=0)
    steps_per_epoch = VQVAETrainer(dataset, TINY, FAST, RecordingHooks()).steps_per_epoch
    hooks = RecordingHooks(poison_at_steps=(steps_per_epoch + 4,))  # during epoch 2
    result = run(dataset, hooks, constant)
    assert [m["epoch"] for m in hooks.metrics] == [1, 2, 3]  # epoch 2 ran again
    assert hooks.metrics[0]["rollbacks"] == 0 and hooks.metrics[-1]["rollbacks"] == 1
    assert hooks.metrics[0]["lr"] == pytest.approx(3e-3)
    assert hooks.metrics[-1]["lr"] == pytest.approx(1.5e-3)
    assert all(torch.isfinite(p).all() for p in result.model.parameters())


@pytest.mark.slow  # trains a model
def test_the_third_nan_fails_the_job_with_a_reason(dataset: Dataset) -> None:
    hooks = RecordingHooks(poison_at_steps=(2, 4, 6))  # every attempt at epoch 1
    with pytest.raises(JobError, match="diverged 3 times"):
        run(dataset, hooks)


# -- checkpoints and configs ------------------------------------------------------------------


@pytest.mark.slow  # trains a model
def test_a_newer_checkpoint_format_is_refused(dataset: Dataset) -> None:
    hooks = RecordingHooks()
    result = run(dataset, hooks, dataclasses.replace(FAST, epochs=1))
    ckpt = torch.load(io.BytesIO(hooks.checkpoints[-1]), weights_only=True)
    ckpt["format_version"] = 99
    buf = io.BytesIO()
    torch.save(ckpt, buf)
    with pytest.raises(ModelFormatError, match="newer"):
        read_checkpoint(buf.getvalue())
    with pytest.raises(ModelFormatError, match="newer"):
        run(dataset, RecordingHooks(start_from=buf.getvalue()))
    with pytest.raises(ModelFormatError):
        read_checkpoint(hooks.checkpoints[-1][:1000])  # truncated
    with pytest.raises(ModelFormatError):
        weights_from_bytes(hooks.checkpoints[-1])  # a checkpoint is not a weights artifact
    # a newer Distill's setting, in a checkpoint a worker resumes and in weights it reads
    # (before: "VQVAEConfig: unknown keys ['warp']; known keys [...]")
    newer = "holds settings this Distill does not know \\(warp\\): it was written by a newer Distill"
    ckpt["format_version"] = 1
    ckpt["model_config"] = {**ckpt["model_config"], "warp": 2}
    buf = io.BytesIO()
    torch.save(ckpt, buf)
    with pytest.raises(ModelFormatError, match="the checkpoint " + newer):
        run(dataset, RecordingHooks(start_from=buf.getvalue()))
    raw = weights_to_bytes(result.model, dataset.mel_config)
    weights = torch.load(io.BytesIO(raw), weights_only=True)
    weights["model_config"] = {**weights["model_config"], "warp": 2}
    buf = io.BytesIO()
    torch.save(weights, buf)
    with pytest.raises(ModelFormatError, match="the VQ-VAE weights' config " + newer):
        weights_from_bytes(buf.getvalue())


@pytest.mark.parametrize(
    "bad",
    [
        {"epochs": 0},
        {"lr": "fast"},
        {"batch_size": 2.5},
        {"augment": "yes"},
        {"schedule": "step"},
        {"patience": -1},
        {"adam_beta2": 1.0},
        {"audio_chunks": 0},
        {"refine_iters": -1},
        {"refine_iters": 101},
        {"bogus": 1},
    ],  # fmt: skip
)
def test_train_config_from_dict_rejects_bad_input(bad: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        TrainConfig.from_dict(bad)


def test_train_config_round_trips_and_the_schedule_warms_up_then_decays() -> None:
    cfg = TrainConfig(lr=1e-3, warmup_steps=10, lr_min_ratio=0.1)
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    assert TrainConfig.from_dict({"lr": 1}).lr == 1.0
    assert lr_at(cfg, 0, 100) == pytest.approx(1e-4)
    assert lr_at(cfg, 9, 100) == pytest.approx(1e-3)
    assert lr_at(cfg, 100, 100) == pytest.approx(1e-4)


@pytest.mark.slow  # trains a model
def test_train_vqvae_is_the_trainer_in_one_call(dataset: Dataset) -> None:
    result = train_vqvae(dataset, TINY, dataclasses.replace(FAST, epochs=1), RecordingHooks())
    assert result.epochs == 1 and result.metrics["epoch"] == 1


def test_usage_counts_are_grouped_past_the_cells_a_row_holds() -> None:
    """2048 codes x 12 levels of counts overflowed a metric row's 16 KiB on every epoch (three
    attempts, each failing after its first epoch): past USAGE_CELLS a level they are summed."""
    from distill.shared.bus.codec import pack
    from distill.shared.train.vqvae import USAGE_CELLS, grouped_usage, usage_group

    usage = torch.randint(0, 200_000, (16, 8192))
    grouped = grouped_usage(usage)
    assert usage_group(8192) == 64 and grouped.shape == (16, USAGE_CELLS)
    assert torch.equal(grouped.sum(1), usage.sum(1)) and int(grouped[3, 1]) == int(usage[3, 64:128].sum())
    assert len(pack({"usage": grouped.tolist()})) < 12 * 1024
    odd = grouped_usage(torch.ones(2, 300, dtype=torch.long))  # groups of 3, the last short
    assert odd.shape == (2, 100) and int(odd.sum()) == 600
    small = torch.ones(2, 16, dtype=torch.long)
    assert grouped_usage(small) is small and usage_group(16) == 1


def test_the_refinement_after_training_keeps_within_the_budget(dataset: Dataset) -> None:
    """The codebooks' refinement ran whole after a spent budget (3.4 minutes after a 1.4-minute
    stage on 500 files): it now stops its decoder steps once the budget, or a tenth of it past
    a spent one, is over; without a budget it runs whole."""
    import dataclasses

    now = [0.0]

    def clock() -> float:  # every reading 10 s later: the budget is spent at once
        now[0] += 10.0
        return now[0]

    train = dataclasses.replace(FAST, epochs=1, minutes=0.5, refine_decoder_steps=100)
    trainer = VQVAETrainer(dataset, TINY, train, RecordingHooks(), clock=clock)
    refine = trainer.run().refine
    assert refine["cut_short"] and refine["decoder_steps"] < 100
    whole = VQVAETrainer(dataset, TINY, dataclasses.replace(train, minutes=0.0, epochs=1),
                         RecordingHooks(), clock=clock).run().refine  # fmt: skip
    assert not whole["cut_short"]
