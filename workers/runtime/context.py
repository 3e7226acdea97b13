"""What a job handler sees: its parameters, its dependencies' results, and ways to report.

A handler is ``def run_job(ctx: JobContext) -> dict``. It runs in a thread of the worker
process while the worker's socket loop keeps heartbeating, so it may take hours. It returns a
msgpack-able map (the job's result: a summary plus artifact references, i.e. sha256 hex ids).
Raising any exception fails this attempt with the exception's message; raising
:class:`~distill.shared.errors.JobCancelled` (what ``check_cancel`` does) ends it cancelled.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol


class ArtifactAccess(Protocol):
    """The broker's artifact store as a handler sees it (content-addressed by sha256 hex)."""

    def put_bytes(self, data: bytes, *, kind: str, name: str, job: str | None = None) -> str:
        """Store bytes; returns the sha256 hex id."""
        ...

    def put_file(self, path: Path, *, kind: str, name: str, job: str | None = None) -> str:
        """Store a file (streamed in chunks); returns the sha256 hex id."""
        ...

    def get_bytes(self, sha256: str) -> bytes:
        """Fetch an artifact's bytes (through the worker's local cache)."""
        ...

    def get_file(self, sha256: str) -> Path:
        """Fetch an artifact into the worker's local cache; returns its read-only path."""
        ...

    def stat(self, sha256: str) -> dict[str, Any]:
        """Size, kind, name, job and creation time of an artifact."""
        ...

    def list(self, *, kind: str | None = None, job: str | None = None) -> list[dict[str, Any]]:
        """Every stored artifact of a kind and/or job (all pages), newest first."""
        ...


@dataclass
class JobInfo:
    """The job as dispatched to this worker."""

    job_id: str
    service: str
    params: dict[str, Any]
    attempt: int = 1  # 1 for the first attempt; >1 means a retry: resume from checkpoint
    previous_errors: list[str] = field(default_factory=list)
    deps: dict[str, dict[str, Any]] = field(default_factory=dict)  # dependency id -> its result
    checkpoint: str | None = None  # sha256 of the last checkpoint registered by any attempt


class JobContext(Protocol):
    info: JobInfo
    device: str  # resolved device string: "cpu", "cuda:0", "mps"
    artifacts: ArtifactAccess

    @property
    def cancelled(self) -> bool: ...

    def check_cancel(self) -> None:
        """Raise JobCancelled if the job was cancelled. Call it every step."""
        ...

    def progress(self, fraction: float | None = None, **fields: Any) -> None:
        """Publish the job's current progress (kept as the job's latest state by the broker)."""
        ...

    def metrics(self, **values: Any) -> None:
        """Publish one row of metrics (e.g. per epoch); the broker appends it to the job's history."""
        ...

    def event(self, type: str, **fields: Any) -> None:
        """Publish any other event on ``job.<id>`` (e.g. ``preview`` with an artifact id)."""
        ...

    def save_checkpoint(self, data: bytes, *, name: str) -> str:
        """Store a checkpoint artifact and register it on the job record; returns its sha256."""
        ...

    def load_checkpoint(self) -> bytes | None:
        """The last registered checkpoint of this job (from any attempt), or None."""
        ...
