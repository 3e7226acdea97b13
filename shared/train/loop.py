"""What every Distill trainer shares: the loop itself (epochs, steps, validation, metrics,
checkpoints, NaN rollback, cancel, early stopping, best-by-validation, RNG state, resume, the
time budget), the learning-rate schedule, and codebook statistics.

A trainer subclasses :class:`Trainer` and supplies what differs: how to build and initialise
its model, its batches, the loss of one step, its validation, its part of each metrics row and
what its checkpoint holds beside the loop's state. One epoch is: batch -> cancel check -> step
(lr, forward, loss, NaN check, backward, clip, Adam) for every batch -> validate -> metrics ->
hooks.on_epoch -> checkpoint (paced) -> after_epoch (previews): a stored checkpoint's epoch
always has its row, whenever a worker is killed. Everything the loop does with
its results goes through :class:`TrainHooks`, so it runs the same in a job, a test and a bench.

Time budget. With ``minutes > 0`` the loop plans the last epoch as the one that fits in what is
left of the budget (at least one more, at most ``epochs``), from the wall seconds per epoch it
measured (steps, validation, checkpoints and hooks together; the attempt's first epoch is left
out once a later one exists, as it pays one-off allocation costs). It plans twice: once after
the first epoch, so that progress and the schedule are known early, and once more, from epochs
run after the warmup and after the attempt's first, at the start of the first epoch where both
have ended (never again, so a run's schedule is one curve, not one that shifts every step).
Planned for good from the first epoch alone, a prior whose first epoch ran at 10 steps/s (the
rest at 14-17) kept 671 steps of the ~1100 its budget held, and the run ended 40 s early.
The cosine spans exactly the planned steps, so the run stops when the budget is spent and the
learning rate has reached its floor together; a budget too short for the warmup gets a warmup
of a quarter of the planned steps. Before the first plan the cosine spans the ``epochs`` upper
bound (one epoch, mostly warmup). The plan is in the checkpoint; a resumed run keeps it and the
seconds spent (those after the last checkpoint of a killed attempt are not counted).

Checkpoints are paced by time: at most one per ``checkpoint_every_s`` (0: after every epoch),
and always at the start (the point a NaN in the first epoch rolls back to), after a rollback,
and at the end of the run.

Determinism: a trainer's data order draws from generators seeded by (seed, epoch); what draws
from torch's global RNG is restored with it from every checkpoint, so on the CPU a run resumed
from a checkpoint ends with the same weights as one that never stopped. Threads are the
caller's business (``torch.set_num_threads``), never set here.
"""

from __future__ import annotations

import math
import random
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, NamedTuple, Protocol, TypeVar

import numpy as np
import torch
from torch import Tensor, nn

from distill.shared.errors import JobError, ModelFormatError, UnknownSettings
from distill.shared.model.formats import checkpoint_to_bytes, read_checkpoint

# LoopConfig and its bounds live in settings (no torch there); imported from here as before
from distill.shared.train.settings import MAX_BATCH_SIZE as MAX_BATCH_SIZE
from distill.shared.train.settings import MAX_BUDGET_MINUTES as MAX_BUDGET_MINUTES
from distill.shared.train.settings import MAX_EPOCHS as MAX_EPOCHS
from distill.shared.train.settings import MAX_WARMUP_STEPS as MAX_WARMUP_STEPS
from distill.shared.train.settings import LoopConfig as LoopConfig

MIN_CHECKPOINT_EVERY_S = 10.0  # the pacing a short budget may bring checkpoints down to

M = TypeVar("M", bound=nn.Module)


# --------------------------------------------------------------------------------------------
# Config


# --------------------------------------------------------------------------------------------
# Schedule and budget


class LRSchedule(Protocol):
    """The schedule fields of a (frozen) training config."""

    @property
    def lr(self) -> float: ...  # peak learning rate
    @property
    def lr_min_ratio(self) -> float: ...  # cosine decays to lr x this at the last step
    @property
    def warmup_steps(self) -> int: ...  # linear warmup steps
    @property
    def schedule(self) -> str: ...  # "cosine" or "constant" (after warmup)


def lr_at(
    config: LRSchedule, step: int, total_steps: int, *, warmup_steps: int | None = None
) -> float:
    """Learning rate at optimiser step ``step`` (0-based): linear warmup then cosine/constant.

    ``warmup_steps`` replaces the config's (a budget shorter than the warmup shortens it)."""
    warmup = config.warmup_steps if warmup_steps is None else warmup_steps
    if step < warmup:
        return config.lr * (step + 1) / warmup
    if config.schedule == "constant":
        return config.lr
    span = max(1, total_steps - warmup)
    progress = min(1.0, (step - warmup) / span)
    floor = config.lr * config.lr_min_ratio
    return floor + (config.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def fit_epochs(done: int, epoch_s: float, remaining_s: float, max_epochs: int) -> int:
    """The planned last epoch of a budgeted run: ``done`` plus the whole epochs of ``epoch_s``
    seconds that fit in ``remaining_s`` (at least one, so the cosine gets to decay), capped at
    ``max_epochs``."""
    fitting = math.floor(max(remaining_s, 0.0) / max(epoch_s, 1e-9))
    return min(max_epochs, done + max(1, fitting))


def measured_epoch_s(walls: list[float]) -> float:
    """Seconds per epoch from this attempt's whole-epoch wall times; the first is left out
    when a later one exists (it pays one-off allocation and cache costs)."""
    assert walls, "measure at least one epoch"
    kept = walls[1:] if len(walls) > 1 else walls
    return sum(kept) / len(kept)


# --------------------------------------------------------------------------------------------
# Hooks


class PreviewLabel(NamedTuple):
    """Where a preview chunk comes from."""

    file: str  # the sound's file name
    chunk: int  # which of the file's chunks, from 1
    chunks: int  # how many chunks the file has


class TrainHooks(Protocol):
    """What the loop reports to (a job context, a test, a benchmark)."""

    def check_cancel(self) -> None:
        """Raise (e.g. JobCancelled) to stop; called before every step."""
        ...

    def on_epoch(self, metrics: dict[str, Any]) -> None:
        """One row of metrics (plain msgpack-able values) after each epoch."""
        ...

    def save_checkpoint(self, data: bytes) -> None:
        """Store a checkpoint (bytes from torch.save); paced by ``checkpoint_every_s``."""
        ...

    def load_checkpoint(self) -> bytes | None:
        """The last stored checkpoint of this run, or None for a fresh start."""
        ...

    def on_preview(
        self, epoch: int, mels: Tensor, recon: Tensor, labels: list[PreviewLabel]
    ) -> None:
        """True and reconstructed log-mel chunks (n, M, T) on the CPU, with where each is from."""
        ...


class NullHooks:
    """Hooks that keep nothing: for benchmarks and quick experiments."""

    def check_cancel(self) -> None:
        return None

    def on_epoch(self, metrics: dict[str, Any]) -> None:
        return None

    def save_checkpoint(self, data: bytes) -> None:
        return None

    def load_checkpoint(self) -> bytes | None:
        return None

    def on_preview(
        self, epoch: int, mels: Tensor, recon: Tensor, labels: list[PreviewLabel]
    ) -> None:
        return None


# --------------------------------------------------------------------------------------------
# The loop


class Diverged(Exception):
    """A non-finite loss: roll back to the last checkpoint."""


@dataclass
class LoopState:
    """What changes as training runs (the model and optimiser aside); all of it checkpointed."""

    epoch: int = 0  # epochs completed
    step: int = 0  # optimiser steps taken
    best_val: float = math.inf
    best_epoch: int = 0
    best_state: dict[str, Tensor] | None = None
    lr_scale: float = 1.0  # halved by every NaN rollback
    rollbacks: int = 0
    last_metrics: dict[str, Any] = field(default_factory=dict)  # the last epoch's row
    planned_epochs: int = 0  # the budget's planned last epoch; 0 until planned (or no budget)
    fits: int = 0  # plans made: 1 after the first epoch, 2 after the warmup and a second
    # epoch (the last)
    fit_epoch_s: float = 0.0  # the seconds per epoch the last plan used
    fit_at_epoch: int = 0  # epochs completed when it was made


@dataclass
class LoopResult(Generic[M]):
    model: M  # with the weights of the best validation epoch, in eval mode
    epochs: int  # epochs run
    best_val: float
    best_epoch: int
    stopped: str  # "epochs", "budget" or "early_stopping"
    metrics: dict[str, Any]  # the last epoch's row
    budget: dict[str, Any]  # minutes, planned_epochs, steps, spent_s, stopped, why


class Trainer(ABC, Generic[M]):
    """The loop; a subclass supplies the model, batches, loss, validation and its metrics.

    ``run_loop()`` once; it resumes from ``hooks.load_checkpoint()`` when that returns bytes.
    ``clock`` (seconds, monotonic) times epochs, the budget and checkpoint pacing; tests pass a
    fake one.
    """

    kind: ClassVar[str]  # which trainer wrote a checkpoint: "vqvae", "prior"

    def __init__(self, train_config: LoopConfig, hooks: TrainHooks, *, device: str = "cpu",
                 clock: Callable[[], float] = time.monotonic) -> None:  # fmt: skip
        self.train_config = train_config
        self.hooks, self.device, self.clock = hooks, torch.device(device), clock
        self.state = LoopState()
        self.model: M | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.last_checkpoint: bytes | None = None
        self._checkpointed_epoch = -1  # the epoch of last_checkpoint
        self._last_checkpoint_at = -math.inf  # clock() when it was written
        self._spent_before = 0.0  # budget seconds spent by earlier attempts (from the checkpoint)
        self._started_at = 0.0  # clock() when this attempt (or the last rollback) started
        self._epoch_walls: list[float] = []  # this attempt's whole-epoch wall seconds
        self._epoch_mark: float | None = None  # clock() at the start of the running epoch
        self._lr = 0.0

    # -- what a trainer supplies ----------------------------------------------------------------

    @abstractmethod
    def build_model(self) -> M:
        """A fresh model on ``self.device``, initialised (from data if need be)."""

    @property
    @abstractmethod
    def steps_per_epoch(self) -> int: ...

    @abstractmethod
    def batches(self, epoch: int) -> Iterator[Any]:
        """The batches of ``epoch`` (1-based), ``steps_per_epoch`` of them, seeded by it."""

    @abstractmethod
    def new_totals(self) -> dict[str, Any]:
        """Empty per-epoch accumulators for ``step_loss``."""

    @abstractmethod
    def step_loss(self, batch: Any, totals: dict[str, Any]) -> Tensor:
        """Forward ``batch``, return the loss to minimise; add what the metrics need to totals."""

    @abstractmethod
    def validate(self) -> tuple[float, dict[str, Any]]:
        """The validation loss (lower is better; picks the best epoch) and more values."""

    @abstractmethod
    def epoch_metrics(self, totals: dict[str, Any], validation: dict[str, Any]) -> dict[str, Any]:
        """The trainer's part of an epoch's metrics row; ``validation`` is what ``validate``
        returned, with the loss under "val_loss"."""

    @abstractmethod
    def checkpoint_state(self) -> dict[str, Any]:
        """What a checkpoint holds beside the loop's state: at least "model_config" and
        "train_config" (plain dicts)."""

    @abstractmethod
    def restore_model(self, ckpt: dict[str, Any]) -> M:
        """Configs from a checkpoint (they win over the constructor's; set ``train_config``),
        and the model with the checkpoint's weights, on ``self.device``."""

    def build_optimizer(self, model: M) -> torch.optim.Optimizer:
        return torch.optim.Adam(model.parameters(), lr=self.train_config.lr)

    def after_epoch(self, epoch: int) -> None:
        """After the metrics and checkpoint of ``epoch`` (audio previews, say)."""
        return None

    # -- run ------------------------------------------------------------------------------------

    def run_loop(self) -> LoopResult[M]:
        """Train to the planned last epoch or early stop; JobError after too many NaN rollbacks."""
        with torch.random.fork_rng(devices=self._cuda_devices()):  # leave the caller's RNG be
            self._start()
            stopped = self._stop_reason()
            while stopped is None:
                try:
                    self._epoch()
                except Diverged as e:
                    self._rollback(str(e))
                    continue
                stopped = self._stop_reason()
            if self._checkpointed_epoch != self.state.epoch:
                self._checkpoint()  # always at the end, whatever the pacing
            return self._result(stopped)

    def _start(self) -> None:
        self._started_at = self.clock()
        data = self.hooks.load_checkpoint()
        if data is not None:
            self._restore(data)
            self.last_checkpoint, self._checkpointed_epoch = data, self.state.epoch
            self._last_checkpoint_at = self.clock()
            return
        cfg = self.train_config
        torch.manual_seed(cfg.seed)
        np.random.seed(cfg.seed)
        random.seed(cfg.seed)
        self.model = self.build_model()
        self.optimizer = self.build_optimizer(self.model)
        self._checkpoint()  # epoch 0: the point a NaN in the first epoch rolls back to

    def _stop_reason(self) -> str | None:
        s, cfg = self.state, self.train_config
        if cfg.patience > 0 and s.epoch - s.best_epoch >= cfg.patience:
            return "early_stopping"
        if s.epoch >= self.planned_epochs:
            return "budget" if self.planned_epochs < cfg.epochs else "epochs"
        return None

    @property
    def planned_epochs(self) -> int:
        """The last epoch: fitted to the budget, else the ``epochs`` upper bound."""
        return self.state.planned_epochs or self.train_config.epochs

    def spent_s(self) -> float:
        """Seconds of the budget spent, over every attempt of this run."""
        return self._spent_before + self.clock() - self._started_at

    # -- budget ---------------------------------------------------------------------------------

    def _mark_epoch_start(self) -> None:
        now = self.clock()
        if self._epoch_mark is not None:
            self._epoch_walls.append(now - self._epoch_mark)
        self._epoch_mark = now

    def _fit_budget(self) -> None:
        """Plan the last epoch after the first measured epoch, and once more after the warmup
        and the attempt's first epoch."""
        s, cfg = self.state, self.train_config
        if cfg.minutes <= 0 or s.fits >= 2 or not self._epoch_walls:
            return
        after_warmup = (s.step >= cfg.warmup_steps and s.epoch > s.fit_at_epoch
                        and len(self._epoch_walls) > 1)  # an epoch not the attempt's first  # fmt: skip
        if s.fits == 1 and not after_warmup:
            return
        epoch_s = measured_epoch_s(self._epoch_walls)
        remaining = cfg.minutes * 60 - self.spent_s()
        s.planned_epochs = fit_epochs(s.epoch, epoch_s, remaining, cfg.epochs)
        s.fits = 2 if after_warmup else 1
        s.fit_epoch_s, s.fit_at_epoch = epoch_s, s.epoch

    def _warmup_steps(self) -> int:
        """The configured warmup, or a quarter of the planned steps when the budget is shorter."""
        cfg = self.train_config
        if not self.state.planned_epochs:
            return cfg.warmup_steps
        return min(cfg.warmup_steps, self.planned_epochs * self.steps_per_epoch // 4)

    def budget_summary(self, stopped: str) -> dict[str, Any]:
        s, cfg = self.state, self.train_config
        if cfg.minutes <= 0:
            why = f"no time budget: up to {cfg.epochs} epochs"
        elif s.planned_epochs:
            when = "after the warmup" if s.fits == 2 else "over the first epoch"
            why = (f"{cfg.minutes:g} min budget: {s.fit_epoch_s:.2f} s per epoch measured {when} "
                   f"(at epoch {s.fit_at_epoch}) -> the schedule ends at epoch "
                   f"{s.planned_epochs} (upper bound {cfg.epochs})")  # fmt: skip
        else:
            why = f"{cfg.minutes:g} min budget; the run ended before its first epoch was measured"
        return {"minutes": cfg.minutes, "planned_epochs": self.planned_epochs, "steps": s.step,
                "spent_s": round(self.spent_s(), 3), "stopped": stopped, "why": why}  # fmt: skip

    # -- step -----------------------------------------------------------------------------------

    def _step(self, batch: Any, totals: dict[str, Any]) -> None:
        """One optimiser step: lr, loss, NaN check, backward, clip, Adam."""
        model, opt, s = self._model(), self._optimizer(), self.state
        total = self.planned_epochs * self.steps_per_epoch
        lr = lr_at(self.train_config, s.step, total, warmup_steps=self._warmup_steps())
        lr *= s.lr_scale
        for group in opt.param_groups:  # a group may run at a share of the rate ("lr_share")
            group["lr"] = lr * group.get("lr_share", 1.0)
        loss = self.step_loss(batch, totals)
        if not torch.isfinite(loss):
            raise Diverged(f"loss was {loss.item()} at step {s.step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), self.train_config.grad_clip)
        opt.step()
        s.step += 1
        self._lr = lr

    # -- epoch ----------------------------------------------------------------------------------

    def _epoch(self) -> None:
        self._mark_epoch_start()
        self._fit_budget()
        self._model().train()
        epoch = self.state.epoch + 1
        totals = self.new_totals()
        started = self.clock()
        for batch in self.batches(epoch):
            self.hooks.check_cancel()
            self._step(batch, totals)
        seconds = self.clock() - started
        val_loss, validation = self.validate()
        if not math.isfinite(val_loss):
            raise Diverged(f"validation loss was {val_loss} after epoch {epoch}")
        self.state.epoch = epoch
        self._track_best(val_loss)
        validation = {**validation, "val_loss": val_loss}
        metrics = {**self._loop_metrics(seconds), **self.epoch_metrics(totals, validation)}
        self.state.last_metrics = metrics
        # the row before the checkpoint: a worker killed between the two resumes from the one
        # before and sends this epoch's row again, where the other way round (the checkpoint
        # stored, then the kill) the resumed run starts past an epoch whose row never came
        self.hooks.on_epoch(metrics)
        if self._checkpoint_due():
            self._checkpoint()
        self.after_epoch(epoch)

    def _track_best(self, val_loss: float) -> None:
        s = self.state
        if val_loss < s.best_val:
            s.best_val, s.best_epoch = val_loss, s.epoch
            s.best_state = {k: v.detach().cpu().clone()
                            for k, v in self._model().state_dict().items()}  # fmt: skip

    def _loop_metrics(self, seconds: float) -> dict[str, Any]:
        s, cfg = self.state, self.train_config
        per_epoch = self._epoch_walls[-1] if self._epoch_walls else seconds
        planned = self.planned_epochs
        if cfg.minutes > 0 and not s.planned_epochs and self._epoch_mark is not None:
            # Not fitted yet (the plan is made as the next epoch starts): show the plan this
            # epoch's wall time gives, not the epochs upper bound and its hours-long eta.
            per_epoch = self.clock() - self._epoch_mark
            planned = fit_epochs(s.epoch, per_epoch, cfg.minutes * 60 - self.spent_s(), cfg.epochs)
        return {
            "epoch": s.epoch,
            "epochs": planned,
            "step": s.step,
            "best_val": s.best_val,
            "best_epoch": s.best_epoch,
            "lr": self._lr,
            "epoch_s": seconds,  # the steps alone
            "steps_per_s": self.steps_per_epoch / max(seconds, 1e-9),
            "eta_s": per_epoch * (planned - s.epoch),
            "spent_s": self.spent_s(),
            "rollbacks": s.rollbacks,
        }

    def _result(self, stopped: str) -> LoopResult[M]:
        model, s = self._model(), self.state
        if s.best_state is not None:
            model.load_state_dict(s.best_state)
        model.eval()
        return LoopResult(model=model, epochs=s.epoch, best_val=s.best_val,
                          best_epoch=s.best_epoch, stopped=stopped, metrics=s.last_metrics,
                          budget=self.budget_summary(stopped))  # fmt: skip

    def _model(self) -> M:
        assert self.model is not None, "run_loop() builds the model"
        return self.model

    def _optimizer(self) -> torch.optim.Optimizer:
        assert self.optimizer is not None, "run_loop() builds the optimiser"
        return self.optimizer

    def _cuda_devices(self) -> list[torch.device]:
        return [self.device] if self.device.type == "cuda" else []

    # -- checkpoint / rollback ------------------------------------------------------------------

    def _checkpoint_due(self) -> bool:
        every = self.train_config.checkpoint_every_s
        minutes = self.train_config.minutes
        if every > 0 and minutes > 0:
            # a short budget checkpoints more often: a worker lost in a 1-minute run repeated
            # the whole run (one checkpoint a minute); now at most a sixth of it
            every = min(every, max(MIN_CHECKPOINT_EVERY_S, minutes * 60 / 6))
        return every == 0 or self.clock() - self._last_checkpoint_at >= every

    def _checkpoint(self) -> None:
        s, model = self.state, self._model()
        payload = {
            **self.checkpoint_state(),
            "trainer": self.kind,
            "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "optimizer": self._optimizer().state_dict(),
            "scheduler": {
                "kind": self.train_config.schedule,
                "lr_scale": s.lr_scale,
                "planned_epochs": s.planned_epochs,
                "fits": s.fits,
                "fit_epoch_s": s.fit_epoch_s,
                "fit_at_epoch": s.fit_at_epoch,
            },
            "step": s.step,
            "epoch": s.epoch,
            "rng": rng_state(self._cuda_devices()),
            "best_val": s.best_val,
            "best_epoch": s.best_epoch,
            # the best weights, unless they are this epoch's (then state_dict holds them)
            "best_state_dict": None if s.best_epoch == s.epoch else s.best_state,
            "rollbacks": s.rollbacks,
            "last_metrics": s.last_metrics,
            "spent_s": self.spent_s(),
        }
        self.last_checkpoint = checkpoint_to_bytes(payload)
        self._checkpointed_epoch, self._last_checkpoint_at = s.epoch, self.clock()
        self.hooks.save_checkpoint(self.last_checkpoint)

    def _restore(self, data: bytes) -> None:
        """Model, optimiser, counters and RNG from a checkpoint; its configs win over ours."""
        ckpt = read_checkpoint(data)
        trainer = ckpt.get("trainer", "vqvae")  # the RVQ-VAE's checkpoints predate the field
        if trainer != self.kind:
            raise ModelFormatError(f"the checkpoint is the {trainer} trainer's, not the "
                                   f"{self.kind} trainer's")  # fmt: skip
        try:
            self.model = self.restore_model(ckpt)
        except UnknownSettings as e:  # a newer worker's checkpoint, resumed by an older one
            raise ModelFormatError(e.newer("the checkpoint")) from e
        self.optimizer = self.build_optimizer(self.model)
        self.optimizer.load_state_dict(ckpt["optimizer"])
        best_state = ckpt["best_state_dict"]
        if best_state is None and int(ckpt["best_epoch"]) == int(ckpt["epoch"]) > 0:
            best_state = {k: v.clone() for k, v in ckpt["state_dict"].items()}
        sched = ckpt["scheduler"]
        self.state = LoopState(
            epoch=int(ckpt["epoch"]), step=int(ckpt["step"]), best_val=float(ckpt["best_val"]),
            best_epoch=int(ckpt["best_epoch"]), best_state=best_state,
            lr_scale=float(sched["lr_scale"]), rollbacks=int(ckpt["rollbacks"]),
            last_metrics=dict(ckpt.get("last_metrics", {})),
            planned_epochs=int(sched.get("planned_epochs", 0)),
            fits=int(sched.get("fits", 0)),
            fit_epoch_s=float(sched.get("fit_epoch_s", 0.0)),
            fit_at_epoch=int(sched.get("fit_at_epoch", 0)),
        )  # fmt: skip
        self._spent_before, self._started_at = float(ckpt.get("spent_s", 0.0)), self.clock()
        self._epoch_mark = None  # a partial epoch is no measure of one
        set_rng_state(ckpt["rng"], self._cuda_devices())

    def _rollback(self, reason: str) -> None:
        """Back to the last checkpoint with half the learning rate; fail after max_rollbacks."""
        rollbacks = self.state.rollbacks + 1
        if rollbacks > self.train_config.max_rollbacks or self.last_checkpoint is None:
            raise JobError(
                f"training diverged {rollbacks} times ({reason}), even after halving the "
                f"learning rate {rollbacks - 1} time(s); try a lower lr or check the dataset"
            )
        lr_scale, spent = self.state.lr_scale * 0.5, self.spent_s()
        self._restore(self.last_checkpoint)
        self.state.rollbacks, self.state.lr_scale = rollbacks, lr_scale
        self._spent_before, self._started_at = spent, self.clock()  # time lost still counts
        self._checkpoint()  # the halved rate survives a crash


# --------------------------------------------------------------------------------------------
# Statistics and RNG state


def code_counts(codes: Tensor, codebook_size: int) -> Tensor:
    """Counts (Q, K) of each code per level in codes (B, Q, T'); -1 (dropped) not counted."""
    per_level = codes.transpose(0, 1).reshape(codes.shape[1], -1).cpu()  # (Q, B * T')
    return torch.stack([torch.bincount(row[row >= 0], minlength=codebook_size)
                        for row in per_level])  # fmt: skip


def in_use(usage: Tensor) -> list[float]:
    """Share of each level's codes used at least once in counts (Q, K)."""
    return ((usage > 0).sum(dim=1).float() / usage.shape[1]).tolist()


def perplexity(usage: Tensor) -> list[float]:
    """exp(entropy) of each level's code distribution (Q, K): K when uniform, 1 when collapsed."""
    p = usage.double() / usage.sum(dim=1, keepdim=True).clamp_min(1)
    entropy = -(p * p.clamp_min(1e-12).log()).sum(dim=1)
    return entropy.exp().tolist()


def rng_state(cuda_devices: list[torch.device]) -> dict[str, Any]:
    """torch, CUDA, numpy and Python RNG states as tensors and plain values (weights_only)."""
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    version, py_state, gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": [torch.cuda.get_rng_state(d) for d in cuda_devices],
        "numpy": {"name": str(name), "keys": torch.from_numpy(np.asarray(keys, np.int64)),
                  "pos": int(pos), "has_gauss": int(has_gauss), "cached": float(cached)},
        "python": {"version": int(version), "state": [int(v) for v in py_state],
                   "gauss": None if gauss is None else float(gauss)},
    }  # fmt: skip


def set_rng_state(rng: dict[str, Any], cuda_devices: list[torch.device]) -> None:
    torch.set_rng_state(rng["torch"])
    for device, state in zip(cuda_devices, rng.get("cuda", []), strict=False):
        torch.cuda.set_rng_state(state, device)
    n = rng["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state((n["name"], keys, n["pos"], n["has_gauss"], n["cached"]))
    p = rng["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))


def with_default_budget(
    train_params: dict[str, Any], device: str, defaults: dict[str, float], stage: str
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Training params with "minutes" set to the device's default budget when absent, and a
    note of where the budget came from ({"source": "params" | "default", "why_minutes"}).

    ``defaults`` maps a device kind ("cpu", "cuda", "mps") to minutes; unknown kinds take the
    CPU's. An explicit "minutes" (0 included: epochs only) is the person's choice and is kept.
    """
    if "minutes" in train_params:
        return train_params, {"source": "params",
                              "why_minutes": f"{train_params['minutes']} min from the job's params"}  # fmt: skip
    kind = device.split(":")[0]
    minutes = defaults.get(kind, defaults["cpu"])
    why = f"the default {stage} budget on {kind}: {minutes:g} min (set train.minutes to change it)"
    return {**train_params, "minutes": minutes}, {"source": "default", "why_minutes": why}
