"""The shared training loop (distill.shared.train.loop) on a toy regression: the time budget's
fit, checkpoint pacing, resume of a budgeted run, and a checkpoint from another trainer. A fake
clock that advances one second per step makes the timing deterministic."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from distill.shared.errors import ConfigError, JobCancelled, ModelFormatError
from distill.shared.model.formats import read_checkpoint
from distill.shared.train.loop import (
    LoopConfig,
    PreviewLabel,
    Trainer,
    fit_epochs,
    lr_at,
    measured_epoch_s,
    with_default_budget,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

STEPS = 5  # steps per epoch: with one second per step, an epoch takes five seconds


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Hooks:
    """Advances the clock by a second per step; keeps metrics and checkpoints; can cancel."""

    def __init__(self, clock: FakeClock, start_from: bytes | None = None,
                 cancel_at_step: int | None = None, slow_steps: int = 0) -> None:  # fmt: skip
        self.clock, self.start_from, self.cancel_at_step = clock, start_from, cancel_at_step
        self.slow_steps = slow_steps  # the first steps take two seconds, as a cold start does
        self.metrics: list[dict[str, Any]] = []
        self.checkpoints: list[bytes] = []
        self.steps = 0

    def check_cancel(self) -> None:
        self.steps += 1
        if self.cancel_at_step is not None and self.steps >= self.cancel_at_step:
            raise JobCancelled("cancelled by the test")
        self.clock.now += 2.0 if self.steps <= self.slow_steps else 1.0

    def on_epoch(self, metrics: dict[str, Any]) -> None:
        self.metrics.append(metrics)

    def save_checkpoint(self, data: bytes) -> None:
        self.checkpoints.append(data)

    def load_checkpoint(self) -> bytes | None:
        return self.start_from

    def on_preview(
        self, epoch: int, mels: Tensor, recon: Tensor, labels: list[PreviewLabel]
    ) -> None:
        return None


class ToyTrainer(Trainer[nn.Linear]):
    """Linear regression y = x . w on fixed data: the loop with nothing else around it."""

    kind = "toy"

    def __init__(self, config: LoopConfig, hooks: Hooks) -> None:
        super().__init__(config, hooks, clock=hooks.clock)
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(40, 4, generator=g)  # (N, 4)
        self.y = self.x @ torch.tensor([1.0, -2.0, 0.5, 3.0])  # (N,)

    def build_model(self) -> nn.Linear:
        return nn.Linear(4, 1)

    @property
    def steps_per_epoch(self) -> int:
        return STEPS

    def batches(self, epoch: int) -> Iterator[tuple[Tensor, Tensor]]:
        g = torch.Generator().manual_seed(epoch)
        for _ in range(STEPS):
            idx = torch.randint(0, 32, (8,), generator=g)
            yield self.x[idx], self.y[idx]

    def new_totals(self) -> dict[str, Any]:
        return {"loss": 0.0}

    def step_loss(self, batch: tuple[Tensor, Tensor], totals: dict[str, Any]) -> Tensor:
        x, y = batch
        loss = ((self._model()(x).squeeze(1) - y) ** 2).mean()
        totals["loss"] += loss.item() / STEPS
        return loss

    @torch.no_grad()
    def validate(self) -> tuple[float, dict[str, Any]]:
        loss = float(((self._model()(self.x[32:]).squeeze(1) - self.y[32:]) ** 2).mean())
        return loss, {}

    def epoch_metrics(self, totals: dict[str, Any], validation: dict[str, Any]) -> dict[str, Any]:
        return {"train_loss": totals["loss"], "val_loss": validation["val_loss"]}

    def checkpoint_state(self) -> dict[str, Any]:
        return {"model_config": {}, "train_config": self.train_config.to_dict()}

    def restore_model(self, ckpt: dict[str, Any]) -> nn.Linear:
        self.train_config = LoopConfig(**ckpt["train_config"])
        model = nn.Linear(4, 1)
        model.load_state_dict(ckpt["state_dict"])
        return model


BASE = LoopConfig(epochs=100, lr=0.05, warmup_steps=3, patience=0, checkpoint_every_s=0)


def test_fit_epochs_plans_whole_epochs_within_the_budget_and_the_bound() -> None:
    assert fit_epochs(done=1, epoch_s=5.0, remaining_s=55.0, max_epochs=100) == 12
    assert fit_epochs(done=1, epoch_s=5.0, remaining_s=54.9, max_epochs=100) == 11
    assert fit_epochs(done=1, epoch_s=5.0, remaining_s=1e6, max_epochs=100) == 100
    assert fit_epochs(done=3, epoch_s=5.0, remaining_s=-10.0, max_epochs=100) == 4  # one more
    assert measured_epoch_s([9.0]) == 9.0
    assert measured_epoch_s([9.0, 4.0, 6.0]) == 5.0  # the first (warming up) is left out


def test_a_budget_fits_the_cosine_to_the_epochs_that_fit() -> None:
    clock = FakeClock()
    hooks = Hooks(clock)
    result = ToyTrainer(dataclasses.replace(BASE, minutes=1.0), hooks).run_loop()
    # warmup (3 steps) ends in epoch 1; epoch 1 took 5 s, so 55 s left hold 11 more epochs
    assert result.epochs == 12 and result.stopped == "budget"
    assert result.budget["planned_epochs"] == 12 and result.budget["steps"] == 12 * STEPS
    assert result.budget["spent_s"] == pytest.approx(60.0)
    assert "5.00 s per epoch" in result.budget["why"]
    # planned once, at epoch 2; epoch 1's line shows the plan its own time gives (not the bound)
    assert [m["epochs"] for m in hooks.metrics] == [12] * 12
    assert hooks.metrics[0]["eta_s"] == pytest.approx(55.0)
    last_lr = lr_at(BASE, 12 * STEPS - 1, 12 * STEPS)
    assert hooks.metrics[-1]["lr"] == pytest.approx(last_lr)
    assert last_lr == pytest.approx(BASE.lr * BASE.lr_min_ratio, rel=0.05)  # the cosine ended
    assert hooks.metrics[-1]["eta_s"] == 0


def test_a_long_warmup_is_planned_after_one_epoch_and_replanned_once_after_it() -> None:
    hooks = Hooks(FakeClock(), slow_steps=STEPS)  # epoch 1 takes 10 s, the others 5 s
    config = dataclasses.replace(BASE, minutes=1.0, warmup_steps=12)
    result = ToyTrainer(config, hooks).run_loop()
    # epoch 2: 10 s per epoch, 50 s left -> ends at 6; epoch 4 (warmup over): 5 s per epoch
    # (the first epoch left out), 40 s left -> ends at 3 + 8 = 11
    assert [m["epochs"] for m in hooks.metrics] == [6, 6, 6] + [11] * 8
    assert result.epochs == 11 and result.budget["spent_s"] == pytest.approx(60.0)
    assert "measured after the warmup (at epoch 3)" in result.budget["why"]


def test_a_slow_first_epoch_does_not_fix_the_plan_when_the_warmup_ends_inside_it() -> None:
    """Before: with the warmup over inside epoch 1, the plan after it was the last one, made
    from that epoch alone: a cold start's 10 s gave 6 epochs and the run ended at 35 s of 60."""
    hooks = Hooks(FakeClock(), slow_steps=STEPS)  # epoch 1 takes 10 s, the others 5 s
    result = ToyTrainer(dataclasses.replace(BASE, minutes=1.0), hooks).run_loop()
    # epoch 2: 10 s per epoch, 50 s left -> ends at 6; epoch 3: 5 s per epoch (the first left
    # out), 45 s left -> ends at 2 + 9 = 11
    assert [m["epochs"] for m in hooks.metrics] == [6, 6] + [11] * 9
    assert result.epochs == 11 and result.budget["spent_s"] == pytest.approx(60.0)
    assert "5.00 s per epoch measured after the warmup (at epoch 2)" in result.budget["why"]


def test_a_budget_shorter_than_the_warmup_shortens_the_warmup() -> None:
    hooks = Hooks(FakeClock())
    config = dataclasses.replace(BASE, minutes=0.25, warmup_steps=100)  # 15 s: three epochs
    result = ToyTrainer(config, hooks).run_loop()
    assert (result.epochs, result.stopped) == (3, "budget")
    assert hooks.metrics[0]["lr"] == pytest.approx(config.lr * STEPS / 100)  # still warming up
    assert hooks.metrics[-1]["lr"] < 0.1 * config.lr  # the cosine decayed within the budget


def test_the_epochs_bound_wins_over_a_long_budget() -> None:
    result = ToyTrainer(dataclasses.replace(BASE, epochs=4, minutes=60.0),
                        Hooks(FakeClock())).run_loop()  # fmt: skip
    assert (result.epochs, result.stopped, result.budget["planned_epochs"]) == (4, "epochs", 4)


def test_without_a_budget_the_run_is_its_epochs() -> None:
    result = ToyTrainer(dataclasses.replace(BASE, epochs=3), Hooks(FakeClock())).run_loop()
    assert (result.epochs, result.stopped) == (3, "epochs")
    assert result.budget["minutes"] == 0 and "no time budget" in result.budget["why"]


def test_checkpoints_are_paced_by_time_and_always_written_at_the_end() -> None:
    hooks = Hooks(FakeClock())
    ToyTrainer(dataclasses.replace(BASE, epochs=7, checkpoint_every_s=12), hooks).run_loop()
    epochs = [read_checkpoint(c)["epoch"] for c in hooks.checkpoints]
    assert epochs == [0, 3, 6, 7]  # the start, then >= 12 s apart (5 s epochs), then the end
    every = Hooks(FakeClock())
    ToyTrainer(dataclasses.replace(BASE, epochs=3), every).run_loop()
    assert [read_checkpoint(c)["epoch"] for c in every.checkpoints] == [0, 1, 2, 3]


def test_a_short_budget_checkpoints_at_least_six_times() -> None:
    """Before: one checkpoint a minute whatever the budget, so a worker lost in a 1-minute
    run repeated all of it. Now at most a sixth of the budget apart (10 s at the least)."""
    hooks = Hooks(FakeClock())  # 5-s epochs
    ToyTrainer(dataclasses.replace(BASE, epochs=100, minutes=1.0, checkpoint_every_s=60), hooks).run_loop()
    epochs = [read_checkpoint(c)["epoch"] for c in hooks.checkpoints]
    assert epochs[:4] == [0, 2, 4, 6] and len(epochs) >= 6  # 10 s apart, not 60
    long = Hooks(FakeClock())
    ToyTrainer(dataclasses.replace(BASE, epochs=30, minutes=60.0, checkpoint_every_s=60), long).run_loop()
    assert [read_checkpoint(c)["epoch"] for c in long.checkpoints][:3] == [0, 12, 24]  # as set


def test_a_resumed_budgeted_run_keeps_its_plan_and_the_time_spent() -> None:
    config = dataclasses.replace(BASE, minutes=1.0)
    whole = ToyTrainer(config, Hooks(FakeClock())).run_loop()
    cut = Hooks(FakeClock(), cancel_at_step=4 * STEPS + 2)  # inside epoch 5, after the fit
    with pytest.raises(JobCancelled):
        ToyTrainer(config, cut).run_loop()
    resumed = ToyTrainer(config, Hooks(FakeClock(), start_from=cut.checkpoints[-1])).run_loop()
    assert resumed.epochs == whole.epochs == 12 and resumed.stopped == "budget"
    assert resumed.budget["spent_s"] == pytest.approx(60.0)
    for key, value in whole.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[key]), key


class KilledAfterCheckpoint(Exception):
    """What kill -9 does to a worker right after it stored a checkpoint."""


def test_a_run_killed_right_after_a_checkpoint_resumes_with_every_epochs_row() -> None:
    """The metrics row of an epoch goes out before its checkpoint is stored, so a worker killed
    as soon as a checkpoint is stored leaves no epoch without a row once it resumes (the
    prior's kill -9 job test lost epoch 4's row under load when the checkpoint came first)."""

    class Killed(Hooks):
        def save_checkpoint(self, data: bytes) -> None:
            super().save_checkpoint(data)
            if read_checkpoint(data)["epoch"] == 3:
                raise KilledAfterCheckpoint

    first = Killed(FakeClock())
    with pytest.raises(KilledAfterCheckpoint):
        ToyTrainer(dataclasses.replace(BASE, epochs=6), first).run_loop()
    resumed = Hooks(FakeClock(), start_from=first.checkpoints[-1])
    ToyTrainer(dataclasses.replace(BASE, epochs=6), resumed).run_loop()
    rows = [m["epoch"] for m in first.metrics + resumed.metrics]
    assert sorted(set(rows)) == [1, 2, 3, 4, 5, 6] and len(rows) == 6, rows


def test_a_checkpoint_of_another_trainer_is_refused() -> None:
    hooks = Hooks(FakeClock())
    ToyTrainer(dataclasses.replace(BASE, epochs=1), hooks).run_loop()

    class OtherTrainer(ToyTrainer):
        kind = "other"

    with pytest.raises(ModelFormatError, match="toy trainer's, not the other"):
        OtherTrainer(BASE, Hooks(FakeClock(), start_from=hooks.checkpoints[-1])).run_loop()


def test_the_default_budget_comes_from_the_device_unless_the_params_say() -> None:
    defaults = {"cpu": 8.0, "cuda": 3.0}
    params, note = with_default_budget({"lr": 1e-3}, "cuda:1", defaults, "RVQ-VAE")
    assert params == {"lr": 1e-3, "minutes": 3.0} and note["source"] == "default"
    assert "cuda" in note["why_minutes"]
    assert with_default_budget({}, "mps", defaults, "prior")[0]["minutes"] == 8.0
    params, note = with_default_budget({"minutes": 0}, "cpu", defaults, "prior")
    assert params == {"minutes": 0} and note["source"] == "params"


@pytest.mark.parametrize("bad", [{"minutes": -1.0}, {"minutes": 1e9}, {"checkpoint_every_s": -1.0}])
def test_loop_config_refuses_bad_budgets(bad: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        LoopConfig(**bad)


@pytest.mark.parametrize(
    ("field", "value"),
    [("epochs", 10**9), ("batch_size", 1_000_000), ("warmup_steps", 10**8), ("lr", 5.0)],
)
def test_training_settings_past_their_bounds_are_refused_with_the_bound(
    field: str, value: object
) -> None:
    """Before: epochs=10**9 or batch_size=10**6 were accepted and failed (or ran for ever) only
    once the trainer allocated or looped."""
    from distill.shared.errors import ConfigError
    from distill.shared.train.loop import LoopConfig

    with pytest.raises(ConfigError, match=f"{field} .* over the limit"):
        LoopConfig(**{field: value})  # type: ignore[arg-type]
