"""Training the RVQ-VAE: a plain PyTorch loop with named phases and a hooks object
(:mod:`distill.shared.train.loop`); the checkpoint and weights formats are in
:mod:`distill.shared.model.formats`.

One epoch is: batch (shuffle, augment) -> step (forward, loss, NaN check, backward, clip, Adam)
-> cancel check (every step) -> metrics (validation, codebook health) -> checkpoint -> preview.
Everything the worker does with the results (publish metrics, store checkpoints and previews)
goes through :class:`TrainHooks`, so the loop runs the same in a job, a test and a benchmark.

Determinism: the data order and augmentation draw from generators seeded by (seed, epoch); the
quantizer dropout and dead-code replacement draw from torch's global RNG, whose state (with
numpy's and Python's) is in every checkpoint. So on the CPU a run resumed from a checkpoint
ends with the same weights as one that never stopped. Threads are the caller's business
(``torch.set_num_threads``), never set here.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from distill.shared.audio.augment import AugmentConfig, augment_mel
from distill.shared.audio.dataset import Dataset
from distill.shared.configs import config_from_dict, require
from distill.shared.errors import ConfigError, DatasetError, JobError
from distill.shared.model.formats import checkpoint_to_bytes, read_checkpoint
from distill.shared.model.vqvae import VQVAE, VQVAEConfig, resolve_config
from distill.shared.train.loop import (
    TrainHooks,
    code_counts,
    lr_at,
    perplexity,
    rng_state,
    set_rng_state,
)

MIN_STEPS_PER_EPOCH = 8  # a 5-file collection still gets a few optimiser steps per epoch
KMEANS_MAX_VECTORS = 65536  # latents pooled for codebook init; more only slows k-means

# --------------------------------------------------------------------------------------------
# Config


@dataclass(frozen=True)
class TrainConfig:
    """How to train; travels in checkpoints. Reasons beside the defaults."""

    epochs: int = 300  # upper bound; early stopping usually ends small collections sooner
    batch_size: int = 16  # small batches: more updates per second on CPU for 1-s chunks
    lr: float = 2e-3  # Adam; the warmup makes this safe for the residual stacks
    lr_min_ratio: float = 0.05  # cosine decays to lr x this at the last epoch
    warmup_steps: int = 100  # linear warmup: the first steps see k-means-initialised codes
    schedule: str = "cosine"  # "cosine" or "constant" (after warmup)
    grad_clip: float = 1.0  # global norm; guards the first steps after dead-code swaps
    patience: int = 40  # epochs without a better validation loss before stopping; 0 = never
    seed: int = 0  # everything random in the run derives from it
    preview_every: int = 25  # epochs between audio previews; 0 = none
    preview_chunks: int = 2  # validation chunks per preview
    max_rollbacks: int = 2  # NaN/inf rollbacks allowed; the next one fails the job
    augment: bool = False  # mel augmentation (distill.shared.audio.augment) of training batches
    augment_gain: bool = True  # the AugmentConfig switches used when augment is on
    augment_time_shift: bool = True
    augment_noise: bool = False  # noise adds texture the reconstruction then has to invent
    augment_pitch_shift: bool = False

    def __post_init__(self) -> None:
        checks = [
            (self.epochs >= 1, "epochs must be >= 1"),
            (self.batch_size >= 1, "batch_size must be >= 1"),
            (self.lr > 0 and math.isfinite(self.lr), "lr must be a positive number"),
            (0 <= self.lr_min_ratio <= 1, "lr_min_ratio must be in [0, 1]"),
            (self.warmup_steps >= 0, "warmup_steps must be >= 0"),
            (self.schedule in ("cosine", "constant"), "schedule must be cosine or constant"),
            (self.grad_clip > 0, "grad_clip must be > 0"),
            (self.patience >= 0 and self.seed >= 0, "patience and seed must be >= 0"),
            (self.preview_every >= 0 and self.preview_chunks >= 1, "bad preview settings"),
            (self.max_rollbacks >= 0, "max_rollbacks must be >= 0"),
        ]
        require(checks, "TrainConfig")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """From a plain dict; unknown keys or wrong types raise ConfigError."""
        return config_from_dict(cls, d, "TrainConfig")


# --------------------------------------------------------------------------------------------
# Hooks and result


@dataclass
class TrainResult:
    model: VQVAE  # with the weights of the best validation epoch, in eval mode
    model_config: VQVAEConfig
    train_config: TrainConfig
    chosen: dict[str, Any]  # {"codebook_size", "levels", "why"}
    epochs: int  # epochs run
    best_val_loss: float
    best_epoch: int
    stopped: str  # "epochs" or "early_stopping"
    metrics: dict[str, Any]  # the last epoch's row


class _Diverged(Exception):
    """A non-finite loss: roll back to the last checkpoint."""


@dataclass
class _State:
    """What changes as training runs (the model and optimiser aside)."""

    epoch: int = 0  # epochs completed
    step: int = 0  # optimiser steps taken
    best_val: float = math.inf
    best_epoch: int = 0
    best_state: dict[str, Tensor] | None = None
    lr_scale: float = 1.0  # halved by every NaN rollback
    rollbacks: int = 0
    last_metrics: dict[str, Any] = field(default_factory=dict)  # the last epoch's row


# --------------------------------------------------------------------------------------------
# The loop


class VQVAETrainer:
    """Trains one VQVAE on one dataset; ``run()`` once. Resumes from ``hooks.load_checkpoint``."""

    def __init__(
        self,
        dataset: Dataset,
        model_config: VQVAEConfig,
        train_config: TrainConfig,
        hooks: TrainHooks,
        *,
        device: str = "cpu",
    ) -> None:
        train_idx, val_idx = dataset.train_indices(), dataset.val_indices()
        if len(train_idx) == 0:
            raise DatasetError("the dataset has no training chunks")
        if model_config.n_mels != dataset.mel_config.n_mels:
            raise ConfigError(
                f"model n_mels {model_config.n_mels} != dataset n_mels {dataset.mel_config.n_mels}"
            )
        self.dataset, self.hooks, self.device = dataset, hooks, torch.device(device)
        mels = torch.from_numpy(dataset.mels)  # (N, M, T)
        self.train_mels = mels[torch.from_numpy(train_idx)].to(self.device)  # (N_train, M, T)
        self.val_mels = mels[torch.from_numpy(val_idx)].to(self.device)  # (N_val, M, T)
        self.val_names = [dataset.manifest[int(dataset.chunk_file[i])].name for i in val_idx]
        n_files = len(dataset.files_in_split("train"))
        self.model_config, why = resolve_config(model_config, n_files)
        self.chosen = {"codebook_size": self.model_config.codebook_size,
                       "levels": self.model_config.levels, "why": why}  # fmt: skip
        self.train_config = train_config
        self.state = _State()
        self.model: VQVAE | None = None
        self.optimizer: torch.optim.Adam | None = None
        self.last_checkpoint: bytes | None = None

    # -- run ------------------------------------------------------------------------------------

    def run(self) -> TrainResult:
        """Train to the last epoch or early stop; raises JobError after too many NaN rollbacks."""
        with torch.random.fork_rng(devices=self._cuda_devices()):  # leave the caller's RNG be
            self._start()
            stopped = "epochs"
            while self.state.epoch < self.train_config.epochs:
                try:
                    self._epoch()
                except _Diverged as e:
                    self._rollback(str(e))
                    continue
                if self._should_stop():
                    stopped = "early_stopping"
                    break
            return self._result(self.state.last_metrics, stopped)

    def _start(self) -> None:
        data = self.hooks.load_checkpoint()
        if data is not None:
            self._restore(data)
            self.last_checkpoint = data
            return
        torch.manual_seed(self.train_config.seed)
        np.random.seed(self.train_config.seed)
        random.seed(self.train_config.seed)
        self.model = VQVAE(self.model_config).to(self.device)
        self._init_model_(self.model)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=self.train_config.lr)
        self._checkpoint()  # epoch 0: the point a NaN in the first epoch rolls back to

    @torch.no_grad()
    def _init_model_(self, model: VQVAE) -> None:
        """Normalisation from the training chunks, then codebooks by k-means over their latents."""
        x = self.train_mels  # (N, M, T)
        model.set_normalisation_(x.mean(dim=(0, 2)), x.std(dim=(0, 2)))
        latents = torch.cat([model.encode_latents(b) for b in x.split(64)])  # (N, T', D)
        pooled = latents.reshape(-1, latents.shape[-1])  # (N * T', D)
        if len(pooled) > KMEANS_MAX_VECTORS:
            g = torch.Generator().manual_seed(self.train_config.seed)
            pooled = pooled[torch.randperm(len(pooled), generator=g)[:KMEANS_MAX_VECTORS]]
        per_batch = min(self.train_config.batch_size, len(x)) * latents.shape[1]
        model.kmeans_init_(pooled, per_batch, seed=self.train_config.seed)

    def _should_stop(self) -> bool:
        patience = self.train_config.patience
        return patience > 0 and self.state.epoch - self.state.best_epoch >= patience

    # -- batch ----------------------------------------------------------------------------------

    @property
    def steps_per_epoch(self) -> int:
        n, bs = len(self.train_mels), min(self.train_config.batch_size, len(self.train_mels))
        return max(math.ceil(n / bs), MIN_STEPS_PER_EPOCH)

    def _batches(self, epoch: int) -> Iterator[Tensor]:
        """Full batches (B, M, T) for ``epoch``, shuffled by a generator seeded by the epoch."""
        cfg, n = self.train_config, len(self.train_mels)
        bs = min(cfg.batch_size, n)
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)
        need = self.steps_per_epoch * bs
        order = torch.cat([torch.randperm(n, generator=g) for _ in range(math.ceil(need / n))])
        for i in range(self.steps_per_epoch):
            x = self.train_mels[order[i * bs : (i + 1) * bs].to(self.device)]  # (B, M, T)
            yield self._augment(x, g)

    def _augment(self, x: Tensor, g: torch.Generator) -> Tensor:
        cfg = self.train_config
        if not cfg.augment:
            return x
        aug = AugmentConfig(gain=cfg.augment_gain, time_shift=cfg.augment_time_shift,
                            noise=cfg.augment_noise, pitch_shift=cfg.augment_pitch_shift)  # fmt: skip
        return augment_mel(x, self.dataset.mel_config, aug, g)

    # -- step -----------------------------------------------------------------------------------

    def _step(self, x: Tensor, totals: dict[str, Any]) -> None:
        """One optimiser step on batch x (B, M, T); accumulates loss sums and code counts."""
        model, opt = self._model(), self._optimizer()
        lr = lr_at(self.train_config, self.state.step, self._total_steps()) * self.state.lr_scale
        for group in opt.param_groups:
            group["lr"] = lr
        out = model(x)
        recon = model.reconstruction_loss(x, out.recon)
        loss = recon + out.commit_loss
        if not torch.isfinite(loss):
            raise _Diverged(f"loss was {loss.item()} at step {self.state.step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), self.train_config.grad_clip)
        opt.step()
        self.state.step += 1
        totals["loss"] += loss.item() * len(x)
        totals["recon"] += recon.item() * len(x)
        totals["commit"] += out.commit_loss.item() * len(x)
        totals["items"] += len(x)
        totals["usage"] += code_counts(out.codes, model.rvq.codebook_size)
        totals["lr"] = lr

    def _total_steps(self) -> int:
        return self.train_config.epochs * self.steps_per_epoch

    # -- epoch ----------------------------------------------------------------------------------

    def _epoch(self) -> dict[str, Any]:
        model = self._model()
        model.train()
        epoch = self.state.epoch + 1
        totals: dict[str, Any] = {"loss": 0.0, "recon": 0.0, "commit": 0.0, "items": 0, "lr": 0.0,
                                  "usage": torch.zeros(model.rvq.num_quantizers,
                                                       model.rvq.codebook_size, dtype=torch.long)}  # fmt: skip
        started = time.perf_counter()
        for x in self._batches(epoch):
            self.hooks.check_cancel()
            self._step(x, totals)
        seconds = time.perf_counter() - started
        val_loss, val_l1 = self._validate()
        if not math.isfinite(val_loss):
            raise _Diverged(f"validation loss was {val_loss} after epoch {epoch}")
        self.state.epoch = epoch
        self._track_best(val_loss)
        metrics = self._metrics(totals, val_loss, val_l1, seconds)
        self.state.last_metrics = metrics
        self._checkpoint()
        self.hooks.on_epoch(metrics)
        self._preview(epoch)
        return metrics

    @torch.no_grad()
    def _validate(self) -> tuple[float, float]:
        """Validation loss and log-mel L1 (training chunks when there is no validation split)."""
        model = self._model()
        model.eval()
        mels = self.val_mels if len(self.val_mels) else self.train_mels
        loss = l1 = 0.0
        for x in mels.split(64):
            recon = model(x).recon  # (b, M, T)
            loss += float(model.reconstruction_loss(x, recon)) * len(x)
            l1 += float((recon - x).abs().mean()) * len(x)
        model.train()
        return loss / len(mels), l1 / len(mels)

    def _track_best(self, val_loss: float) -> None:
        if val_loss < self.state.best_val:
            self.state.best_val, self.state.best_epoch = val_loss, self.state.epoch
            self.state.best_state = {k: v.detach().cpu().clone()
                                     for k, v in self._model().state_dict().items()}  # fmt: skip

    def _metrics(
        self, totals: dict[str, Any], val_loss: float, val_l1: float, seconds: float
    ) -> dict[str, Any]:
        usage: Tensor = totals["usage"]  # (Q, K)
        n, steps = max(totals["items"], 1), self.steps_per_epoch
        remaining = self.train_config.epochs - self.state.epoch
        return {
            "epoch": self.state.epoch,
            "epochs": self.train_config.epochs,
            "step": self.state.step,
            "train_loss": totals["loss"] / n,
            "train_recon": totals["recon"] / n,
            "commit_loss": totals["commit"] / n,
            "val_recon": val_loss,
            "val_l1": val_l1,
            "validated_on": "val" if len(self.val_mels) else "train",
            "best_val": self.state.best_val,
            "best_epoch": self.state.best_epoch,
            "utilisation": ((usage > 0).sum(dim=1).float() / usage.shape[1]).tolist(),
            "perplexity": perplexity(usage),
            "dead_codes": self._model().dead_codes(),
            "usage": usage.tolist(),  # (Q, K) code counts this epoch, for a heatmap
            "lr": totals["lr"],
            "epoch_s": seconds,
            "steps_per_s": steps / max(seconds, 1e-9),
            "eta_s": seconds * remaining,
            "rollbacks": self.state.rollbacks,
        }

    def _preview(self, epoch: int) -> None:
        every = self.train_config.preview_every
        if every == 0 or epoch % every != 0:
            return
        pool, names = (self.val_mels, self.val_names) if len(self.val_mels) else (
            self.train_mels, ["train"] * len(self.train_mels))  # fmt: skip
        n = min(self.train_config.preview_chunks, len(pool))
        model = self._model()
        model.eval()
        with torch.no_grad():
            recon = model(pool[:n]).recon  # (n, M, T)
        model.train()
        self.hooks.on_preview(epoch, pool[:n].cpu(), recon.cpu(), names[:n])

    def _result(self, metrics: dict[str, Any], stopped: str) -> TrainResult:
        model = self._model()
        if self.state.best_state is not None:
            model.load_state_dict(self.state.best_state)
        model.eval()
        return TrainResult(model=model, model_config=self.model_config,
                           train_config=self.train_config, chosen=self.chosen,
                           epochs=self.state.epoch, best_val_loss=self.state.best_val,
                           best_epoch=self.state.best_epoch, stopped=stopped,
                           metrics=metrics)  # fmt: skip

    def _model(self) -> VQVAE:
        assert self.model is not None, "run() builds the model"
        return self.model

    def _optimizer(self) -> torch.optim.Adam:
        assert self.optimizer is not None, "run() builds the optimiser"
        return self.optimizer

    def _cuda_devices(self) -> list[torch.device]:
        return [self.device] if self.device.type == "cuda" else []

    # -- checkpoint / rollback ------------------------------------------------------------------

    def _checkpoint(self) -> None:
        s, model = self.state, self._model()
        payload = {
            "model_config": self.model_config.to_dict(),
            "train_config": self.train_config.to_dict(),
            "mel_config": self.dataset.mel_config.to_dict(),
            "chosen": self.chosen,
            "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "optimizer": self._optimizer().state_dict(),
            "scheduler": {"kind": self.train_config.schedule, "lr_scale": s.lr_scale},
            "step": s.step,
            "epoch": s.epoch,
            "rng": rng_state(self._cuda_devices()),
            "best_val": s.best_val,
            "best_epoch": s.best_epoch,
            # the best weights, unless they are this epoch's (then state_dict holds them)
            "best_state_dict": None if s.best_epoch == s.epoch else s.best_state,
            "rollbacks": s.rollbacks,
            "last_metrics": s.last_metrics,
        }
        self.last_checkpoint = checkpoint_to_bytes(payload)
        self.hooks.save_checkpoint(self.last_checkpoint)

    def _restore(self, data: bytes) -> None:
        """Model, optimiser, counters and RNG from a checkpoint; its configs win over ours."""
        ckpt = read_checkpoint(data)
        self.model_config = VQVAEConfig.from_dict(ckpt["model_config"])
        self.train_config = TrainConfig.from_dict(ckpt["train_config"])
        self.chosen = dict(ckpt["chosen"])
        self.model = VQVAE(self.model_config).to(self.device)
        self.model.load_state_dict(ckpt["state_dict"])
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=self.train_config.lr)
        self.optimizer.load_state_dict(ckpt["optimizer"])
        best_state = ckpt["best_state_dict"]
        if best_state is None and int(ckpt["best_epoch"]) == int(ckpt["epoch"]) > 0:
            best_state = {k: v.clone() for k, v in ckpt["state_dict"].items()}
        self.state = _State(
            epoch=int(ckpt["epoch"]), step=int(ckpt["step"]), best_val=float(ckpt["best_val"]),
            best_epoch=int(ckpt["best_epoch"]), best_state=best_state,
            lr_scale=float(ckpt["scheduler"]["lr_scale"]), rollbacks=int(ckpt["rollbacks"]),
            last_metrics=dict(ckpt.get("last_metrics", {})),
        )  # fmt: skip
        set_rng_state(ckpt["rng"], self._cuda_devices())

    def _rollback(self, reason: str) -> None:
        """Back to the last checkpoint with half the learning rate; fail after max_rollbacks."""
        rollbacks = self.state.rollbacks + 1
        if rollbacks > self.train_config.max_rollbacks or self.last_checkpoint is None:
            raise JobError(
                f"training diverged {rollbacks} times ({reason}), even after halving the "
                f"learning rate {rollbacks - 1} time(s); try a lower lr or check the dataset"
            )
        lr_scale = self.state.lr_scale * 0.5
        self._restore(self.last_checkpoint)
        self.state.rollbacks, self.state.lr_scale = rollbacks, lr_scale
        self._checkpoint()  # the halved rate survives a crash


def train_vqvae(
    dataset: Dataset,
    model_config: VQVAEConfig,
    train_config: TrainConfig,
    hooks: TrainHooks,
    *,
    device: str = "cpu",
) -> TrainResult:
    """Train (or resume, when ``hooks.load_checkpoint()`` returns one) and return the result."""
    return VQVAETrainer(dataset, model_config, train_config, hooks, device=device).run()


