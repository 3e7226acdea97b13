"""The broker's storage settings: the store's limits, and what the store and the job journal keep.

Read once at start from the environment (``DISTILL_STORE_*``; the README's reliability section
lists them); every value is checked, and a bad one names its variable.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields

from distill.shared.errors import ConfigError

GIB = 1024**3


@dataclass(frozen=True)
class StorageSettings:
    # Room for a few dozen trained models, their datasets and the running jobs' checkpoints,
    # yet well inside a laptop's disk.
    max_bytes: int = 64 * GIB
    # sqlite, logs and the OS need room to write; a full disk fails commits, not just uploads.
    min_free_bytes: int = 2 * GIB
    # An hour: an upload over a slow link advances every few seconds; one silent for an hour
    # was abandoned (a closed laptop), and holds its declared size until it goes.
    upload_idle_s: float = 3600.0
    # Previews of the last 3 preview epochs: enough to hear the trend, ~1 MB each.
    keep_preview_epochs: int = 3
    # Finished jobs are kept for ever (0) unless asked: a job's record is the only place that
    # says how its model or sounds were made, and removing it is for the user to choose.
    # Fractions of a day are allowed.
    keep_finished_jobs_days: float = 0.0

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"storage setting {f.name} must be a number >= 0, got {value!r}")
        if self.upload_idle_s <= 0:
            raise ConfigError("storage setting upload_idle_s must be > 0")
        if not math.isfinite(self.keep_finished_jobs_days):  # nan passes ">= 0" above
            raise ConfigError(
                "storage setting keep_finished_jobs_days must be a number of days (0: for ever), "
                f"got {self.keep_finished_jobs_days!r}"
            )

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> StorageSettings:
        """``DISTILL_STORE_MAX_BYTES``, ``DISTILL_STORE_MIN_FREE_BYTES``,
        ``DISTILL_STORE_UPLOAD_IDLE_S``, ``DISTILL_STORE_KEEP_PREVIEW_EPOCHS``,
        ``DISTILL_STORE_KEEP_FINISHED_JOBS_DAYS``; unset: default."""
        env = os.environ if env is None else env
        values: dict[str, int | float] = {}
        for f in fields(cls):
            name = f"DISTILL_STORE_{f.name.upper()}"
            if (raw := env.get(name)) is None or not raw.strip():
                continue
            try:
                values[f.name] = float(raw) if f.type in ("float", float) else int(raw)
            except ValueError:
                raise ConfigError(f"{name}={raw!r} is not a number") from None
        return cls(**values)  # type: ignore[arg-type]
