"""What every Distill trainer shares: the hooks it reports through, the learning-rate schedule,
RNG state for checkpoints, and codebook statistics.

A trainer is a plain PyTorch loop with named phases (batch, step, metrics, checkpoint, preview,
cancel check). Everything it does with its results (publish metrics, store checkpoints and
previews) goes through :class:`TrainHooks`, so it runs the same in a job, a test and a benchmark.
"""

from __future__ import annotations

import math
import random
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor


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


def lr_at(config: LRSchedule, step: int, total_steps: int) -> float:
    """Learning rate at optimiser step ``step`` (0-based): linear warmup then cosine/constant."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    if config.schedule == "constant":
        return config.lr
    span = max(1, total_steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / span)
    floor = config.lr * config.lr_min_ratio
    return floor + (config.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


class TrainHooks(Protocol):
    """What the loop reports to (a job context, a test, a benchmark)."""

    def check_cancel(self) -> None:
        """Raise (e.g. JobCancelled) to stop; called before every step."""
        ...

    def on_epoch(self, metrics: dict[str, Any]) -> None:
        """One row of metrics (plain msgpack-able values) after each epoch."""
        ...

    def save_checkpoint(self, data: bytes) -> None:
        """Store a checkpoint (bytes from torch.save); called after every epoch."""
        ...

    def load_checkpoint(self) -> bytes | None:
        """The last stored checkpoint of this run, or None for a fresh start."""
        ...

    def on_preview(self, epoch: int, mels: Tensor, recon: Tensor, names: list[str]) -> None:
        """True and reconstructed log-mel chunks (n, M, T) on the CPU, with their file names."""
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

    def on_preview(self, epoch: int, mels: Tensor, recon: Tensor, names: list[str]) -> None:
        return None


def code_counts(codes: Tensor, codebook_size: int) -> Tensor:
    """Counts (Q, K) of each code per level in codes (B, Q, T'); -1 (dropped) not counted."""
    per_level = codes.transpose(0, 1).reshape(codes.shape[1], -1).cpu()  # (Q, B * T')
    return torch.stack([torch.bincount(row[row >= 0], minlength=codebook_size)
                        for row in per_level])  # fmt: skip


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
