"""Periodic broker tasks, each guarded: one that raises is logged and runs again next time.

The broker's own upkeep (journal flushes, the dispatch scan, upload expiry, retention sweeps)
runs from the socket loop's timer. A bug or a full disk in one of them must not stop the loop,
and must not stop the others: :class:`Periodic` runs each task in its own ``try``, logs the
exception with its traceback under the task's name, counts it, and goes on.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from distill.shared.logs import get_logger

log = get_logger("broker.periodic")


@dataclass
class _Task:
    name: str
    interval_s: float  # 0: every tick
    run: Callable[[float], object]  # called with the loop's monotonic clock (what it returns is not used)
    next_at: float = 0.0
    failures: int = field(default=0)


class Periodic:
    """Named tasks run from :meth:`tick`, each at most once per its interval."""

    def __init__(self) -> None:
        self._tasks: list[_Task] = []

    def add(self, name: str, interval_s: float, run: Callable[[float], object]) -> None:
        if any(t.name == name for t in self._tasks):
            raise ValueError(f"periodic task {name!r} is already registered")
        self._tasks.append(_Task(name, interval_s, run))

    def failures(self, name: str) -> int:
        """How many times task ``name`` raised (for tests and stats)."""
        return next(t.failures for t in self._tasks if t.name == name)

    def tick(self, now: float) -> None:
        for task in self._tasks:
            if now < task.next_at:
                continue
            task.next_at = now + task.interval_s
            try:
                task.run(now)
            except Exception:  # the loop outlives any one task; the traceback goes to the log
                task.failures += 1
                log.exception("periodic_task_failed", task=task.name, failures=task.failures)
