"""The broker's durable job table, in SQLite: policy and persistence, no sockets.

Every method that changes a job commits before it returns (outside :meth:`JobStore.batch`), so
the broker can acknowledge a submit, a cancel or a result knowing that a restart loses none of
it. Dependencies, attempts, cancels (with their cascade to dependents) and retries are policy
kept here, where they are tested without a socket.

Durability. The database runs in WAL mode. Job state changes (submit, dispatch, results,
failures, cancels, retries) commit with ``synchronous=FULL``: the WAL is fsynced at each
commit, so an acknowledged change survives a power cut, not only a broker crash. Progress and
metric rows commit with ``synchronous=NORMAL``: they are written to the WAL but not fsynced,
which keeps a training run's stream of events cheap; they survive a broker crash, a power cut
may lose the last few, and the next FULL commit (the WAL is append-only) makes them durable
too. Removals of finished jobs commit with NORMAL as well (a prune is thousands of them): a
power cut may bring the last ones back, to be removed again. The setting is per connection
and switches between transactions at no I/O cost.

Threading. One connection, opened with ``check_same_thread=False`` and guarded by a lock, so
the store may be created on one thread and used from another (tests run the broker loop in a
thread); the broker is expected to call it from one thread, and calls never overlap.

Storage. Params, results, progress and metric rows are msgpack (``distill.shared.bus.codec``:
the wire's own format and array allow-list, never pickle). Dependencies and metric rows have
their own tables, so appending a metric is one INSERT and progress is one UPDATE; wrapping a
drained burst of events in :meth:`JobStore.batch` makes it one commit for all of them.

Metric history is loaded only where asked for: :meth:`JobStore.get` loads it by default,
:meth:`JobStore.list` and :meth:`JobStore.dispatchable` only with ``with_metrics=True``, and the
records that state-changing methods return never carry it (``metrics_loaded`` says which).

Removal. A finished job may be removed (:meth:`JobStore.remove`), with its rows in every
table; one that a queued or running job depends on may not (that job reads its result when it
starts). A finished job that depended on a removed one keeps the id in ``depends_on`` and
lists it in ``removed_deps``; it cannot be retried. The artifacts every job names (in its
params and its result) are indexed in ``job_artifacts``, so that what removed jobs made can
be checked against every job that stays without decoding the whole journal.
"""

from __future__ import annotations

import builtins
import math
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from distill.shared.bus import codec
from distill.shared.bus.protocol import MAX_JOB_PARAMS_BYTES
from distill.shared.configs import nested
from distill.shared.errors import DecodeError, JobError
from distill.shared.ids import is_sha256, unprintable

JOB_STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")
FINISHED_STATUSES = frozenset({"succeeded", "failed", "cancelled"})
# 2: jobs.lost_attempts (losses that were not the job's fault); 3: jobs may be removed (a
# dependency need not be in the table), job_artifacts, jobs_by_finished; 4: jobs.owner (the
# client key that submitted the job, under CURVE)
SCHEMA_VERSION = 4
MAX_ATTEMPTS_LIMIT = 100  # a typo such as 1000 would keep a broken job cycling for days
# Attempts lost to the system (a broker restart, a worker lost while the job resumes from its
# checkpoint) are not the work's fault and do not use its attempts; they have their own bound,
# larger than any max_attempts a user sets, so a night with a few hiccups still finishes, yet a
# job that kills every worker it meets still ends.
MAX_LOST_ATTEMPTS = 20
FINAL_ERROR_ATTEMPTS = 4  # attempts a failed job's error lists in full
MAX_PARAMS_BYTES = MAX_JOB_PARAMS_BYTES  # params name artifacts and settings (shared/bus/protocol)
MAX_PARAMS_DEPTH = 32  # maps and lists within each other; Distill's own go 4 deep
MAX_RESULT_BYTES = 1024 * 1024  # a result is a summary (ids, metrics), far below a message
MAX_METRIC_ROW_BYTES = 16 * 1024  # one epoch's numbers; a loss curve is thousands of these
MAX_PROGRESS_BYTES = 64 * 1024  # the latest progress line, with per-level codebook use
# Queued jobs per service: a script stuck in a submit loop (or a service whose workers never
# come) is stopped with a clear error long before the journal or the dispatch scan suffer.
MAX_QUEUED_PER_SERVICE = 10_000
MAX_METRICS_PAGE = 1_000  # rows per metrics page: ~1 MiB at the row limit's typical ~1 KiB
MAX_SERVICE_NAME_CHARS = 255
MAX_REASON_CHARS = 2_000  # a reason is a message, not a log: a whole traceback is clipped
MAX_PRUNE_PAGE = 1_000  # finished jobs looked at per prunable() page
_IN_BATCH = 500  # ids per "IN (...)" query: well under SQLite's bound-parameter limit
_EMPTY_LIST = codec.pack([])  # attempt_errors of a new job

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,  -- submission order: "oldest first" without clock ties
    id TEXT NOT NULL UNIQUE,
    service TEXT NOT NULL,
    params BLOB NOT NULL,
    status TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    max_attempts INTEGER NOT NULL,
    attempt_budget INTEGER NOT NULL,        -- max_attempts as submitted; a retry grants it again
    worker TEXT,
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    result BLOB,
    error TEXT,
    attempt_errors BLOB NOT NULL,
    progress BLOB,
    checkpoint TEXT,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    cancel_reason TEXT,
    cancelled_by TEXT,                      -- the dependency whose failure cancelled this job
    timeout_s REAL,
    owner TEXT,                             -- the z85 key of the client that submitted it (CURVE)
    lost_attempts INTEGER NOT NULL DEFAULT 0  -- attempts lost to the system, not counted
);
CREATE INDEX IF NOT EXISTS jobs_by_status ON jobs (status, service, seq);
CREATE INDEX IF NOT EXISTS jobs_by_cancelled_by ON jobs (cancelled_by);
CREATE INDEX IF NOT EXISTS jobs_by_finished ON jobs (finished_at);
CREATE TABLE IF NOT EXISTS job_deps (
    job_id TEXT NOT NULL REFERENCES jobs (id),
    dep_id TEXT NOT NULL,                   -- no reference: a finished job's may be removed
    pos INTEGER NOT NULL,
    PRIMARY KEY (job_id, dep_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS job_deps_by_dep ON job_deps (dep_id);
CREATE TABLE IF NOT EXISTS job_metrics (
    n INTEGER PRIMARY KEY,
    job_id TEXT NOT NULL REFERENCES jobs (id),
    row BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS job_metrics_by_job ON job_metrics (job_id, n);
CREATE TABLE IF NOT EXISTS job_artifacts (  -- every artifact id a job's params or result names
    job_id TEXT NOT NULL REFERENCES jobs (id),
    source TEXT NOT NULL,                   -- 'params' or 'result'
    sha256 TEXT NOT NULL,
    PRIMARY KEY (job_id, source, sha256)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS job_artifacts_by_sha256 ON job_artifacts (sha256);
-- artifacts a removal was to take but kept because other jobs named them: they go with the
-- last of those jobs
CREATE TABLE IF NOT EXISTS release_later (sha256 TEXT PRIMARY KEY) WITHOUT ROWID;
"""
# Version 2 -> 3: job_deps without the reference on dep_id (SQLite alters no constraint: the
# table is made again), in the same transaction as the index of artifacts it adds.
_UPGRADE_DEPS = """
CREATE TABLE job_deps_v3 (
    job_id TEXT NOT NULL REFERENCES jobs (id),
    dep_id TEXT NOT NULL,
    pos INTEGER NOT NULL,
    PRIMARY KEY (job_id, dep_id)
) WITHOUT ROWID;
INSERT INTO job_deps_v3 (job_id, dep_id, pos) SELECT job_id, dep_id, pos FROM job_deps;
DROP TABLE job_deps;
ALTER TABLE job_deps_v3 RENAME TO job_deps;
CREATE INDEX job_deps_by_dep ON job_deps (dep_id);
"""


@dataclass(frozen=True)
class JobRecord:
    """One job as stored. ``attempts`` counts dispatches: while running it is the attempt number."""

    id: str
    service: str
    params: dict[str, Any]
    status: str
    attempts: int
    max_attempts: int
    worker: str | None
    created_at: float
    started_at: float | None
    finished_at: float | None
    depends_on: list[str]
    result: dict[str, Any] | None
    error: str | None
    attempt_errors: list[str]  # one reason per failed attempt, in order
    progress: dict[str, Any] | None  # latest progress event fields
    metrics: list[dict[str, Any]]  # metric history rows, in order (see metrics_loaded)
    checkpoint: str | None  # sha256 of the last registered checkpoint
    cancel_requested: bool
    timeout_s: float | None
    cancel_reason: str | None = None  # why a cancel was requested (running jobs)
    cancelled_by: str | None = None  # the dependency that caused this job's cancellation
    metrics_loaded: bool = True  # False: ``metrics`` was not read (it is [] here)
    lost_attempts: int = 0  # attempts lost to a broker restart or a resumable worker loss
    # the dependencies (in depends_on) removed from the journal since this job finished
    removed_deps: list[str] = field(default_factory=list)
    # the z85 public key of the client that submitted the job under CURVE (None: submitted
    # without CURVE, or before jobs had owners): who may cancel, retry or remove it
    owner: str | None = None

    @property
    def counted_attempts(self) -> int:
        """Attempts that count against ``max_attempts`` (lost ones excluded)."""
        return self.attempts - self.lost_attempts

    @property
    def finished(self) -> bool:
        return self.status in FINISHED_STATUSES

    def to_dict(self, *, with_metrics: bool = True) -> dict[str, Any]:
        """A msgpack-able map; ``metrics`` is included only if asked for and loaded."""
        out: dict[str, Any] = {
            "id": self.id,
            "service": self.service,
            "params": self.params,
            "status": self.status,
            "attempts": self.attempts,
            "max_attempts": self.max_attempts,
            "worker": self.worker,
            "created_at": self.created_at,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "depends_on": list(self.depends_on),
            "result": self.result,
            "error": self.error,
            "attempt_errors": list(self.attempt_errors),
            "progress": self.progress,
            "checkpoint": self.checkpoint,
            "cancel_requested": self.cancel_requested,
            "timeout_s": self.timeout_s,
            "cancel_reason": self.cancel_reason,
            "cancelled_by": self.cancelled_by,
            "lost_attempts": self.lost_attempts,
            "removed_deps": list(self.removed_deps),
            "owner": self.owner,
        }
        if with_metrics and self.metrics_loaded:
            out["metrics"] = list(self.metrics)
        return out


@dataclass(frozen=True)
class FinishedJob:
    """A finished job as a removal lists it."""

    id: str
    service: str
    status: str
    finished_at: float
    owner: str | None = None  # see JobRecord.owner

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "service": self.service, "status": self.status,
                "finished_at": self.finished_at}  # fmt: skip


@dataclass(frozen=True)
class PrunePage:
    """One page of :meth:`JobStore.prunable`: old finished jobs, oldest first."""

    jobs: list[FinishedJob]  # removable now
    pinned: list[tuple[str, str]]  # (job id, why it stays): a queued or running job needs it
    cursor: tuple[float, int] | None  # where the next page starts; None: this page was the last


# --- small helpers ------------------------------------------------------------------------------


def _new_job_id() -> str:
    return "j-" + secrets.token_hex(5)


class StaleAttempt(JobError):
    """A write from an attempt that is no longer the job's current one (fenced off)."""


def _pack_map(value: Any, what: str, max_bytes: int | None = None) -> bytes:
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise JobError(f"{what} must be a map with string keys, got {type(value).__name__}")
    try:
        packed = codec.pack(value)
    except (TypeError, ValueError, OverflowError) as e:
        raise JobError(f"{what} cannot be stored: {e}") from e
    if max_bytes is not None and len(packed) > max_bytes:
        raise JobError(f"{what} is {len(packed)} bytes packed, over the limit of {max_bytes}")
    return packed


def check_params(params: Any) -> bytes:
    """A job's params packed, or JobError: a map with string keys, at most MAX_PARAMS_BYTES
    packed, nested at most MAX_PARAMS_DEPTH deep, holding only msgpack's plain values (and
    arrays). Checked before anything walks them (the artifact check, ``jobs show``): a
    thousand-deep nest hit Python's recursion limit there."""
    packed = _pack_map(params, "params", MAX_PARAMS_BYTES)
    for value, depth in nested(params):
        if isinstance(value, (dict, list)):
            if depth > MAX_PARAMS_DEPTH:
                raise JobError(f"params nest deeper than {MAX_PARAMS_DEPTH} levels")
        elif value is not None and not isinstance(value, (str, bytes, int, float, np.ndarray)):
            raise JobError(f"params hold a {type(value).__name__}, which a job's params may not")
    return packed


# What queued or running jobs need (JobStore.referenced_artifacts); each {} narrows its part to
# one artifact (JobStore.is_referenced). UNION ALL: a set is made of the rows, and UNION's
# sort to drop duplicates took longer than decoding every job's params.
_REFERENCED = (
    "SELECT a.sha256 FROM jobs j JOIN job_artifacts a ON a.job_id = j.id AND a.source = 'params'"
    " WHERE j.status IN ('queued', 'running'){params}"
    " UNION ALL SELECT checkpoint FROM jobs"
    " WHERE status IN ('queued', 'running') AND checkpoint IS NOT NULL{checkpoint}"
    " UNION ALL SELECT a.sha256 FROM jobs j JOIN job_deps d ON d.job_id = j.id"
    " JOIN job_artifacts a ON a.job_id = d.dep_id AND a.source = 'result'"
    " WHERE j.status IN ('queued', 'running'){result}"
)
_REFERENCED_ALL = _REFERENCED.format(params="", checkpoint="", result="")
_IS_REFERENCED = _REFERENCED.format(params=" AND a.sha256 = :sha",
                                    checkpoint=" AND checkpoint = :sha",
                                    result=" AND a.sha256 = :sha") + " LIMIT 1"  # fmt: skip


class InUse:
    """``sha256 in in_use``: whether a queued or running job needs it, asked of the journal
    (:meth:`JobStore.is_referenced`) each time: what deletions check, one artifact at a time."""

    def __init__(self, jobs: JobStore) -> None:
        self._jobs = jobs

    def __contains__(self, sha256: object) -> bool:
        return isinstance(sha256, str) and self._jobs.is_referenced(sha256)


def _statements(script: str) -> Iterator[str]:
    """The statements of an SQL script, one at a time (``executescript`` would commit the
    transaction they are meant to run in)."""
    pending = ""
    for line in script.splitlines(keepends=True):
        pending += line
        if sqlite3.complete_statement(pending):
            yield pending.strip()
            pending = ""
    if pending.strip():
        raise AssertionError(f"an SQL statement without its end: {pending.strip()[:80]}")


def _chunks(items: Sequence[str]) -> Iterator[tuple[Sequence[str], str]]:
    """``items`` in slices of at most _IN_BATCH, each with its ``?,?,...`` marks."""
    for start in range(0, len(items), _IN_BATCH):
        batch = items[start : start + _IN_BATCH]
        yield batch, ",".join("?" * len(batch))


def _unpack(blob: bytes | None) -> Any:
    if blob is None:
        return None
    try:
        return codec.unpack(blob, max_bytes=max(len(blob), 1))
    except DecodeError as e:  # only a corrupted database gets here
        raise JobError(f"job table holds an undecodable value: {e}") from e


def _clip(reason: object) -> str:
    text = str(reason)
    return text if len(text) <= MAX_REASON_CHARS else text[: MAX_REASON_CHARS - 1] + "…"


def _dependency_reason(dep_id: str, status: str, error: str | None) -> str:
    return f"dependency {dep_id} {status}: {error}" if error else f"dependency {dep_id} {status}"


def _shown_id(job_id: object) -> str:
    """A job id for a message: a job id is ~12 characters, a longer one is not echoed whole."""
    text = str(job_id)
    return text if len(text) <= 80 else f"{text[:40]}… ({len(text)} characters)"


def refusal_message(refusals: Sequence[tuple[str, str]], asked: int) -> str:
    """One line naming every job that cannot be removed, and why."""
    reasons = "; ".join(f"job {job_id}: {why}" for job_id, why in refusals)
    if asked == 1:
        return f"cannot remove {reasons}"
    return f"cannot remove {len(refusals)} of the {asked} jobs, so none was removed: {reasons}"


def _final_error(errors: Sequence[str]) -> str:
    """Every attempt's reason; past FINAL_ERROR_ATTEMPTS the first and the last ones, with how
    many lie between (a job that lost twenty attempts to restarts got a line of 2.5 kB)."""
    numbered = [f"attempt {i}: {reason}" for i, reason in enumerate(errors, 1)]
    if len(numbered) > FINAL_ERROR_ATTEMPTS:
        numbered = [numbered[0], f"({len(numbered) - 3} more)", *numbered[-2:]]
    listed = "; ".join(numbered)
    return f"failed after {len(errors)} attempt{'s' if len(errors) != 1 else ''}: {listed}"


def artifact_refs(value: Any, where: str = "params") -> Iterator[tuple[str, str]]:
    """(where, sha256) for every sha256 hex string anywhere inside ``value`` (maps: keys and
    values, lists): the broker's one rule for the artifacts a job needs (kept from deletion
    while it is queued or running; refused at submit when the store lacks one). ``where``
    says it as a person would find it: ``params.files[3].sha256 (hat_yosh.wav)``."""
    if isinstance(value, str):
        if is_sha256(value):
            yield where, value
    elif isinstance(value, dict):
        name = value.get("name")
        label = f" ({name})" if isinstance(name, str) else ""
        for k, v in value.items():
            if isinstance(k, str) and is_sha256(k):
                yield where + label, k
            for found, sha in artifact_refs(v, f"{where}.{k}"):
                yield (found + label if isinstance(v, str) else found), sha
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            yield from artifact_refs(item, f"{where}[{i}]")


def _collect_sha256(value: Any, into: set[str]) -> None:
    """Every sha256 hex string anywhere inside ``value`` (see :func:`artifact_refs`)."""
    into.update(sha for _, sha in artifact_refs(value))


def _check_submit_args(
    service: str, depends_on: Sequence[str], max_attempts: int, timeout_s: float | None
) -> list[str]:
    if not isinstance(service, str) or not 0 < len(service) <= MAX_SERVICE_NAME_CHARS:
        raise JobError(f"service must be a name of 1..{MAX_SERVICE_NAME_CHARS} characters")
    if (bad := unprintable(service)) is not None:
        raise JobError(f"service {service!r} contains a control or format character ({bad})")
    if isinstance(depends_on, str) or not all(isinstance(d, str) for d in depends_on):
        raise JobError("depends_on must be a list of job ids")
    if (
        isinstance(max_attempts, bool)
        or not isinstance(max_attempts, int)
        or not 1 <= max_attempts <= MAX_ATTEMPTS_LIMIT
    ):
        raise JobError(f"max_attempts must be an integer in 1..{MAX_ATTEMPTS_LIMIT}")
    if timeout_s is not None and (
        isinstance(timeout_s, bool)
        or not isinstance(timeout_s, (int, float))
        or not math.isfinite(timeout_s)
        or timeout_s <= 0
    ):
        raise JobError(f"timeout_s must be a positive number of seconds, got {timeout_s!r}")
    return list(dict.fromkeys(depends_on))  # drop repeats, keep order


# --- the store ----------------------------------------------------------------------------------


class JobStore:
    """The durable job table. See the module docstring for durability and threading."""

    def __init__(self, path: Path | str, *, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._lock = threading.RLock()
        self._path = path
        self._db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        self._db.row_factory = sqlite3.Row
        self._synchronous: str | None = None
        self._batch_depth = 0  # > 0 inside batch(): calls become savepoints of one transaction
        self._batch_durable = False
        try:
            self._open_schema()
        except BaseException:
            self._db.close()
            raise

    def _open_schema(self) -> None:
        self._db.execute("PRAGMA journal_mode=WAL")  # ":memory:" stays in "memory" mode
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.execute("PRAGMA busy_timeout=5000")
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise JobError(
                f"the job table {self._path} has schema version {version}; this Distill reads "
                f"up to {SCHEMA_VERSION}: it was written by a newer Distill. Upgrade Distill to "
                "open it, or start this one with another --data-dir (nothing was changed)"
            )
        self._db.execute("PRAGMA synchronous=FULL")
        self._synchronous = "FULL"
        # An older table gains what it lacks in the same transaction as the version bump.
        upgrade = (
            "ALTER TABLE jobs ADD COLUMN lost_attempts INTEGER NOT NULL DEFAULT 0;"
            if version == 1
            else ""
        )
        if 0 < version < 3:
            upgrade += _UPGRADE_DEPS
        if 0 < version < 4 and "owner" not in self._columns("jobs"):
            upgrade += "ALTER TABLE jobs ADD COLUMN owner TEXT;"
        # One transaction: a half-created or half-upgraded schema is never left behind.
        self._db.execute("BEGIN IMMEDIATE")
        try:
            for statement in _statements(_SCHEMA + upgrade):
                self._db.execute(statement)
            if 0 < version < 3:
                self._index_every_job(self._db)
            self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        except BaseException:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def _columns(self, table: str) -> set[str]:
        return {row[1] for row in self._db.execute(f"PRAGMA table_info({table})")}

    def _index_every_job(self, db: sqlite3.Connection) -> None:
        """Fill ``job_artifacts`` from every job's params and result (the upgrade to 3)."""
        rows = db.execute("SELECT id, params, result FROM jobs")
        for job_id, params, result in rows:
            self._index_artifacts(db, job_id, "params", _unpack(params))
            self._index_artifacts(db, job_id, "result", _unpack(result))

    @staticmethod
    def _index_artifacts(db: sqlite3.Connection, job_id: str, source: str, value: Any) -> None:
        found: set[str] = set()
        _collect_sha256(value, found)
        db.executemany(
            "INSERT OR IGNORE INTO job_artifacts (job_id, source, sha256) VALUES (?, ?, ?)",
            [(job_id, source, sha) for sha in sorted(found)],
        )

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> JobStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- transactions ---

    @contextmanager
    def _write(
        self, *, durable: bool = True, one_statement: bool = False
    ) -> Iterator[sqlite3.Connection]:
        """One write transaction, committed (FULL or NORMAL, see module doc) when the block ends.

        Inside :meth:`batch` it is a savepoint of the batch's transaction instead, so that a
        failing call is undone on its own; a block of ``one_statement`` needs none (a statement
        is atomic) and skips its cost, which matters for the frequent events.
        """
        with self._lock:
            if self._batch_depth and one_statement and not durable:
                yield self._db
                return
            if self._batch_depth:
                yield from self._savepoint(durable)
                return
            self._set_synchronous(durable)
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._commit()

    def _savepoint(self, durable: bool) -> Iterator[sqlite3.Connection]:
        self._db.execute("SAVEPOINT call")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK TO call")
            self._db.execute("RELEASE call")
            raise
        self._db.execute("RELEASE call")
        self._batch_durable |= durable

    def _set_synchronous(self, durable: bool) -> None:
        synchronous = "FULL" if durable else "NORMAL"
        if synchronous != self._synchronous:
            self._db.execute(f"PRAGMA synchronous={synchronous}")
            self._synchronous = synchronous

    @contextmanager
    def batch(self) -> Iterator[None]:
        """Group many calls into one transaction, committed when the block ends.

        For draining a burst of progress and metric events: one commit instead of one each.
        Calls inside are not committed when they return, so acknowledge nothing from inside a
        batch; if any call inside changed a job's state, the WAL is fsynced after the commit
        (as a FULL commit would). A call that raises is undone alone: catch it and go on. An
        exception that leaves the block rolls the whole batch back.
        """
        with self._lock:
            if self._batch_depth:  # nested: part of the outer batch
                self._batch_depth += 1
                try:
                    yield
                finally:
                    self._batch_depth -= 1
                return
            self._set_synchronous(False)
            self._db.execute("BEGIN IMMEDIATE")
            self._batch_depth, self._batch_durable = 1, False
            try:
                yield
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            finally:
                self._batch_depth = 0
            self._commit()
            if self._batch_durable:
                self._sync_barrier()

    def _sync_barrier(self) -> None:
        """fsync the WAL now, making every earlier commit durable.

        SQLite refuses to change ``synchronous`` inside a transaction, so a batch commits with
        NORMAL; this rewrites one header field (a one-page write) under FULL, and the fsync of
        the append-only WAL covers the batch's frames before it.
        """
        self._set_synchronous(True)
        self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    def _commit(self) -> None:
        try:
            self._db.execute("COMMIT")
        except sqlite3.Error as e:  # disk full, I/O error: never leave a transaction open
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise JobError(f"job table write failed: {e}") from e

    # --- reading ---

    def _row(self, job_id: str) -> sqlite3.Row:
        row = None
        if isinstance(job_id, str):
            row = self._db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise JobError(f"no job {_shown_id(job_id)}")
        return row

    def _deps_of(self, ids: Sequence[str]) -> dict[str, builtins.list[str]]:
        return self._dependencies(ids)[0]

    def _dependencies(
        self, ids: Sequence[str]
    ) -> tuple[dict[str, builtins.list[str]], dict[str, builtins.list[str]]]:
        """Each job's dependencies, in order, and those of them no longer in the journal."""
        deps: dict[str, builtins.list[str]] = {i: [] for i in ids}
        removed: dict[str, builtins.list[str]] = {i: [] for i in ids}
        for batch, marks in _chunks(ids):
            rows = self._db.execute(
                "SELECT d.job_id, d.dep_id, p.id IS NULL FROM job_deps d "
                f"LEFT JOIN jobs p ON p.id = d.dep_id WHERE d.job_id IN ({marks}) "
                "ORDER BY d.job_id, d.pos",
                batch,
            )
            for job_id, dep_id, gone in rows:
                deps[job_id].append(dep_id)
                if gone:
                    removed[job_id].append(dep_id)
        return deps, removed

    def _metrics_of(self, job_id: str) -> builtins.list[dict[str, Any]]:
        rows = self._db.execute(
            "SELECT row FROM job_metrics WHERE job_id = ? ORDER BY n", (job_id,)
        )
        return [_unpack(blob) for (blob,) in rows]

    def _records(self, rows: Sequence[sqlite3.Row], with_metrics: bool) -> builtins.list[JobRecord]:
        deps, removed = self._dependencies([r["id"] for r in rows])
        return [self._record(r, deps[r["id"]], removed[r["id"]], with_metrics) for r in rows]

    def _record(
        self,
        row: sqlite3.Row,
        deps: builtins.list[str],
        removed_deps: builtins.list[str],
        with_metrics: bool,
    ) -> JobRecord:
        return JobRecord(
            id=row["id"],
            service=row["service"],
            params=_unpack(row["params"]),
            status=row["status"],
            attempts=row["attempts"],
            max_attempts=row["max_attempts"],
            worker=row["worker"],
            created_at=row["created_at"],
            started_at=row["started_at"],
            finished_at=row["finished_at"],
            depends_on=deps,
            result=_unpack(row["result"]),
            error=row["error"],
            attempt_errors=list(_unpack(row["attempt_errors"])),
            progress=_unpack(row["progress"]),
            metrics=self._metrics_of(row["id"]) if with_metrics else [],
            checkpoint=row["checkpoint"],
            cancel_requested=bool(row["cancel_requested"]),
            timeout_s=row["timeout_s"],
            cancel_reason=row["cancel_reason"],
            cancelled_by=row["cancelled_by"],
            metrics_loaded=with_metrics,
            lost_attempts=row["lost_attempts"],
            removed_deps=removed_deps,
            owner=row["owner"],
        )

    def _load(self, job_id: str, with_metrics: bool = False) -> JobRecord:
        with self._lock:
            return self._records([self._row(job_id)], with_metrics)[0]

    def get(self, job_id: str, *, with_metrics: bool = True) -> JobRecord:
        """The job ``job_id``; unknown -> :class:`JobError` ``"no job <id>"``."""
        return self._load(job_id, with_metrics)

    def owners(self, ids: Iterable[str]) -> dict[str, str]:
        """The owner of each owned job of ``ids`` (unowned and unknown ones are left out)."""
        wanted = sorted({i for i in ids if isinstance(i, str)})
        found: dict[str, str] = {}
        with self._lock:
            for part, marks in _chunks(wanted):
                rows = self._db.execute(
                    f"SELECT id, owner FROM jobs WHERE owner IS NOT NULL AND id IN ({marks})", part)
                found.update((job_id, owner) for job_id, owner in rows)
        return found

    def owner_of(self, job_id: str) -> str | None:
        """The job's owner (see JobRecord.owner); None for an unowned or unknown job."""
        return self.owners([job_id]).get(job_id)

    def get_many(self, ids: Sequence[str]) -> builtins.list[JobRecord]:
        """The jobs of ``ids`` the journal holds (without metrics), in submission order."""
        wanted = [i for i in dict.fromkeys(ids) if isinstance(i, str)]
        rows: builtins.list[sqlite3.Row] = []
        with self._lock:
            for part, marks in _chunks(wanted):
                rows += self._db.execute(f"SELECT * FROM jobs WHERE id IN ({marks})", part).fetchall()
            rows.sort(key=lambda row: row["seq"])
            return self._records(rows, False)

    def known(self, ids: Iterable[str]) -> set[str]:
        """Which of ``ids`` are jobs the journal holds (the others were removed, or never were)."""
        wanted = sorted({i for i in ids if isinstance(i, str)})
        found: set[str] = set()
        with self._lock:
            for part, marks in _chunks(wanted):
                rows = self._db.execute(f"SELECT id FROM jobs WHERE id IN ({marks})", part)
                found.update(row[0] for row in rows)
        return found

    def list(
        self,
        *,
        status: str | None = None,
        service: str | None = None,
        limit: int = 200,
        start: int = 0,
        with_metrics: bool = False,
        owner: str | None = None,
    ) -> builtins.list[JobRecord]:
        """Jobs, newest first, optionally of one status and/or service and/or owner; ``start``
        skips that many of them (paging)."""
        if status is not None and status not in JOB_STATUSES:
            raise JobError(f"unknown job status {status!r}; one of {', '.join(JOB_STATUSES)}")
        where, args = [], []
        if status is not None:
            where.append("status = ?")
            args.append(status)
        if service is not None:
            where.append("service = ?")
            args.append(service)
        if owner is not None:
            where.append("owner = ?")
            args.append(owner)
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        with self._lock:
            rows = self._db.execute(
                f"SELECT * FROM jobs {clause} ORDER BY seq DESC LIMIT ? OFFSET ?",
                (*args, max(0, limit), max(0, start)),
            ).fetchall()
            return self._records(rows, with_metrics)

    def cancelled_because_of(self, job_id: str) -> builtins.list[JobRecord]:
        """The jobs cancelled because ``job_id`` failed or was cancelled: its dependents, and
        theirs (each names its direct dependency in ``cancelled_by``), in submit order. Found by
        the index on ``cancelled_by``: it was a scan of every cancelled job, whose cost grew
        with the journal's history (335 ms at 10 000), and found the direct dependents only."""
        with self._lock:
            found: builtins.list[sqlite3.Row] = []
            frontier = [job_id]
            while frontier:
                rows = self._db.execute(
                    "SELECT * FROM jobs WHERE cancelled_by = ? AND status = 'cancelled'",
                    (frontier.pop(),),
                ).fetchall()
                found.extend(rows)
                frontier.extend(row["id"] for row in rows)
            found.sort(key=lambda row: row["seq"])
            return self._records(found, False)

    def dispatchable(
        self, service: str | None = None, *, with_metrics: bool = False
    ) -> builtins.list[JobRecord]:
        """Queued jobs whose dependencies have all succeeded, oldest first."""
        clause, args = ("AND j.service = ?", (service,)) if service is not None else ("", ())
        with self._lock:
            rows = self._db.execute(
                "SELECT j.* FROM jobs j WHERE j.status = 'queued' "
                f"{clause} AND NOT EXISTS ("
                "  SELECT 1 FROM job_deps d JOIN jobs p ON p.id = d.dep_id"
                "  WHERE d.job_id = j.id AND p.status != 'succeeded'"
                ") ORDER BY j.seq",
                args,
            ).fetchall()
            return self._records(rows, with_metrics)

    def counts(self) -> dict[str, int]:
        """Number of jobs in each status (every status present, zero included)."""
        with self._lock:
            rows = self._db.execute("SELECT status, COUNT(*) FROM jobs GROUP BY status")
            found = dict(rows.fetchall())
        return {s: found.get(s, 0) for s in JOB_STATUSES}

    def deps_results(self, job_id: str) -> dict[str, dict[str, Any]]:
        """Each dependency's result, by dependency id. All of them must have succeeded."""
        with self._lock:
            self._row(job_id)
            rows = self._db.execute(
                "SELECT p.id, p.status, p.result FROM job_deps d JOIN jobs p ON p.id = d.dep_id "
                "WHERE d.job_id = ? ORDER BY d.pos",
                (job_id,),
            ).fetchall()
        out: dict[str, dict[str, Any]] = {}
        for dep_id, status, result in rows:
            if status != "succeeded":
                raise JobError(f"job {job_id}: dependency {dep_id} is {status}, not succeeded")
            out[dep_id] = _unpack(result) or {}
        return out

    def overdue(self, now: float) -> builtins.list[JobRecord]:
        """Running jobs whose ``timeout_s`` has passed at time ``now`` (the broker's clock)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM jobs WHERE status = 'running' AND timeout_s IS NOT NULL "
                "AND started_at + timeout_s <= ? ORDER BY seq",
                (now,),
            ).fetchall()
            return self._records(rows, False)

    def referenced_artifacts(self) -> set[str]:
        """Artifacts that queued or running jobs still need, so must not be deleted.

        That is every sha256 string anywhere in their params, their last checkpoint (a retry
        resumes from it), and the results of their dependencies (which they will consume).
        Read from the ``job_artifacts`` index (5 000 queued jobs naming 20 files each:
        0.46-0.48x the time of decoding their params). The broker's deletions ask
        :meth:`in_use`, one artifact at a time; the whole set is for tests and benchmarks.
        """
        with self._lock:
            rows = self._db.execute(_REFERENCED_ALL).fetchall()
        return {sha for (sha,) in rows}

    def is_referenced(self, sha256: str) -> bool:
        """Whether a queued or running job needs ``sha256`` (as :meth:`referenced_artifacts`),
        through the index by artifact: what the store asks before each deletion, without a set
        of every artifact every queued job names."""
        with self._lock:
            return self._db.execute(_IS_REFERENCED, {"sha": sha256}).fetchone() is not None

    def in_use(self) -> InUse:
        """What queued or running jobs need, as a container asked one artifact at a time."""
        return InUse(self)

    # --- removing ---

    def removal_refusals(self, ids: Sequence[str]) -> builtins.list[tuple[str, str]]:
        """(job id, why it cannot be removed) for each of ``ids`` that cannot: unknown, not
        finished, or a dependency of a queued or running job (which reads its result when it
        starts). Empty: all of them can go."""
        with self._lock:
            return self._refusals(self._db, ids)

    def _refusals(
        self, db: sqlite3.Connection, ids: Sequence[str]
    ) -> builtins.list[tuple[str, str]]:
        status: dict[str, str] = {}
        for batch, marks in _chunks(ids):
            rows = db.execute(f"SELECT id, status FROM jobs WHERE id IN ({marks})", batch)
            status.update((job_id, job_status) for job_id, job_status in rows)
        finished = [i for i in ids if status.get(i) in FINISHED_STATUSES]
        needed_by = self._active_dependents(db, finished)
        refusals: builtins.list[tuple[str, str]] = []
        for job_id in ids:
            if job_id not in status:
                refusals.append((_shown_id(job_id), "no such job"))
            elif status[job_id] not in FINISHED_STATUSES:
                refusals.append((job_id, f"it is {status[job_id]} (only a finished job can be "
                                         "removed: cancel it first)"))  # fmt: skip
            elif job_id in needed_by:
                child, child_status = needed_by[job_id]
                refusals.append((job_id, f"{child_status} job {child} depends on it (it reads "
                                         "this job's result when an attempt starts)"))  # fmt: skip
        return refusals

    @staticmethod
    def _active_dependents(
        db: sqlite3.Connection, ids: Sequence[str]
    ) -> dict[str, tuple[str, str]]:
        """For each of ``ids`` that a queued or running job depends on: (that job, its status)."""
        found: dict[str, tuple[str, str]] = {}
        for batch, marks in _chunks(ids):
            rows = db.execute(
                "SELECT d.dep_id, c.id, c.status FROM job_deps d JOIN jobs c ON c.id = d.job_id "
                f"WHERE d.dep_id IN ({marks}) AND c.status IN ('queued', 'running') ORDER BY c.seq",
                batch,
            )
            for dep_id, child, status in rows:
                found.setdefault(dep_id, (child, status))
        return found

    def remove(
        self, ids: Sequence[str], *, release_later: Sequence[str] = (), settled: Sequence[str] = ()
    ) -> int:
        """Remove finished jobs with their rows in every table (metrics, dependencies, the
        artifacts they name), in one transaction; all or none: any job that cannot go
        (:meth:`removal_refusals`) raises :class:`JobError` naming each, and nothing is
        removed. Returns the metric rows removed with them. A dependent that stays keeps
        their ids in ``depends_on`` (see ``removed_deps``).

        ``release_later``: artifacts that were to go with them but that other jobs still name,
        to go with the last of those (:meth:`to_release_with`); ``settled``: such artifacts
        gone now."""
        ids = list(dict.fromkeys(ids))
        with self._write(durable=False) as db:  # see Durability: a prune is thousands of these
            if refusals := self._refusals(db, ids):
                raise JobError(refusal_message(refusals, len(ids)))
            db.executemany("INSERT OR IGNORE INTO release_later (sha256) VALUES (?)",
                           [(sha,) for sha in release_later])  # fmt: skip
            db.executemany("DELETE FROM release_later WHERE sha256 = ?", [(sha,) for sha in settled])
            metric_rows = 0
            for batch, marks in _chunks(ids):
                metric_rows += db.execute(
                    f"DELETE FROM job_metrics WHERE job_id IN ({marks})", batch
                ).rowcount
                for table in ("job_deps", "job_artifacts"):
                    db.execute(f"DELETE FROM {table} WHERE job_id IN ({marks})", batch)
                db.execute(f"DELETE FROM jobs WHERE id IN ({marks})", batch)
        return metric_rows

    def prunable(
        self,
        *,
        older_than_s: float,
        status: str | None = None,
        after: tuple[float, int] | None = None,
        limit: int = 100,
    ) -> PrunePage:
        """Jobs that finished ``older_than_s`` seconds ago or more (by this store's clock),
        of ``status`` if given, oldest first, from the cursor ``after`` (a page's
        ``cursor``) on: at most ``limit`` (capped at MAX_PRUNE_PAGE) looked at. Those a
        queued or running job depends on are listed as ``pinned``."""
        if status is not None and status not in FINISHED_STATUSES:
            raise JobError(f"only finished jobs are removed: status must be one of "
                           f"{', '.join(sorted(FINISHED_STATUSES))}, got {status!r}")  # fmt: skip
        if (isinstance(older_than_s, bool) or not isinstance(older_than_s, (int, float))
                or not math.isfinite(older_than_s) or older_than_s < 0):  # fmt: skip
            raise JobError(f"the age of jobs to remove must be seconds >= 0, got {older_than_s!r}")
        # "+status": walk the index by finished_at (the order asked for), not the one by status
        where = ["finished_at <= ?", "+status IN ('succeeded', 'failed', 'cancelled')"]
        args: builtins.list[Any] = [self._clock() - older_than_s]
        if status is not None:
            where.append("+status = ?")
            args.append(status)
        if after is not None:
            where.append("(finished_at, seq) > (?, ?)")
            args.extend(after)
        limit = max(1, min(limit, MAX_PRUNE_PAGE))
        with self._lock:
            rows = self._db.execute(
                f"SELECT id, service, status, finished_at, seq, owner FROM jobs "
                f"WHERE {' AND '.join(where)}"
                " ORDER BY finished_at, seq LIMIT ?",
                (*args, limit),
            ).fetchall()
            needed_by = self._active_dependents(self._db, [r["id"] for r in rows])
        jobs, pinned = [], []
        for r in rows:
            if r["id"] in needed_by:
                child, child_status = needed_by[r["id"]]
                pinned.append((r["id"], f"{child_status} job {child} depends on it"))
            else:
                jobs.append(FinishedJob(r["id"], r["service"], r["status"], r["finished_at"],
                                        r["owner"]))
        cursor = (rows[-1]["finished_at"], rows[-1]["seq"]) if len(rows) == limit else None
        return PrunePage(jobs, pinned, cursor)

    def to_release_with(self, ids: Sequence[str]) -> set[str]:
        """The artifacts left to go with the last job that names them (``release_later`` of an
        earlier :meth:`remove`) that any of ``ids`` names."""
        found: set[str] = set()
        with self._lock:
            for batch, marks in _chunks(list(ids)):
                rows = self._db.execute(
                    "SELECT DISTINCT a.sha256 FROM job_artifacts a JOIN release_later r"
                    f" ON r.sha256 = a.sha256 WHERE a.job_id IN ({marks})",
                    batch,
                )
                found.update(sha for (sha,) in rows)
        return found

    def needed_artifacts(self, shas: Sequence[str], *, besides: Sequence[str] = ()) -> set[str]:
        """Those of ``shas`` that a job other than ``besides`` names in its params or result,
        or that a queued or running job resumes from (its checkpoint): what removing the jobs
        ``besides`` must not take from the store. Indexed: no job is decoded."""
        leaving = set(besides)
        found: set[str] = set()
        with self._lock:
            for batch, marks in _chunks(list(dict.fromkeys(shas))):
                rows = self._db.execute(
                    f"SELECT sha256, job_id FROM job_artifacts WHERE sha256 IN ({marks})", batch
                )
                found.update(sha for sha, job_id in rows if job_id not in leaving)
                rows = self._db.execute(
                    f"SELECT checkpoint FROM jobs WHERE status IN ('queued', 'running') "
                    f"AND checkpoint IN ({marks})",
                    batch,
                )
                found.update(sha for (sha,) in rows)
        return found

    # --- submitting ---

    def submit(
        self,
        service: str,
        params: dict[str, Any],
        *,
        depends_on: Sequence[str] = (),
        max_attempts: int = 3,
        timeout_s: float | None = None,
        owner: str | None = None,
    ) -> JobRecord:
        """Store a new job. It is queued, or cancelled at once if a dependency already failed.
        ``owner``: the z85 key of the client submitting it (under CURVE)."""
        deps = _check_submit_args(service, depends_on, max_attempts, timeout_s)
        packed = check_params(params)
        with self._write() as db:
            (queued,) = db.execute(
                "SELECT COUNT(*) FROM jobs WHERE status = 'queued' AND service = ?", (service,)
            ).fetchone()
            if queued >= MAX_QUEUED_PER_SERVICE:
                raise JobError(
                    f"service {service!r} already has {queued} queued jobs, the most it may hold "
                    "(start a worker for it, or cancel some)"
                )
            blocker = self._first_blocker(db, deps)
            job_id = _new_job_id()
            while db.execute("SELECT 1 FROM jobs WHERE id = ?", (job_id,)).fetchone():
                job_id = _new_job_id()
            timeout = None if timeout_s is None else float(timeout_s)
            db.execute(
                "INSERT INTO jobs (id, service, params, status, max_attempts, attempt_budget,"
                " created_at, attempt_errors, timeout_s, owner)"
                " VALUES (?, ?, ?, 'queued', ?, ?, ?, ?, ?, ?)",
                (
                    job_id,
                    service,
                    packed,
                    max_attempts,
                    max_attempts,
                    self._clock(),
                    _EMPTY_LIST,
                    timeout,
                    owner,
                ),
            )
            db.executemany(
                "INSERT INTO job_deps (job_id, dep_id, pos) VALUES (?, ?, ?)",
                [(job_id, dep, pos) for pos, dep in enumerate(deps)],
            )
            self._index_artifacts(db, job_id, "params", params)
            if blocker is not None:
                self._cancel_row(db, job_id, blocker[1], cancelled_by=blocker[0])
        return self._load(job_id)

    def _first_blocker(
        self, db: sqlite3.Connection, deps: Sequence[str], *, submitting: bool = True
    ) -> tuple[str, str] | None:
        """(dep id, reason) for the first dependency already failed or cancelled, or (for a
        job already stored, not ``submitting``) removed; unknown ids of a new job raise."""
        blocker = None
        for dep in deps:
            row = db.execute("SELECT status, error FROM jobs WHERE id = ?", (dep,)).fetchone()
            if row is None and submitting:
                raise JobError(f"cannot depend on job {dep}: no such job")
            if row is None:
                blocker = blocker or (dep, f"dependency {dep} was removed from the journal")
            elif blocker is None and row["status"] in ("failed", "cancelled"):
                blocker = (dep, _dependency_reason(dep, row["status"], row["error"]))
        return blocker

    # --- state changes ---

    def _running_row(
        self, job_id: str, worker: str | None, action: str, attempt: int | None = None
    ) -> sqlite3.Row:
        """The row of a running job, fenced: a given ``worker`` or ``attempt`` must be current.

        Raises :class:`StaleAttempt` for a write from an attempt that is over (the job ended,
        was requeued, or runs elsewhere): the caller ignores it instead of failing anything.
        """
        row = self._row(job_id)
        if row["status"] != "running":
            raise StaleAttempt(f"cannot {action} job {job_id}: it is {row['status']}, not running")
        if worker is not None and row["worker"] != worker:
            raise StaleAttempt(
                f"cannot {action} job {job_id}: it runs on {row['worker']}, not on {worker}"
            )
        if attempt is not None and row["attempts"] != attempt:
            raise StaleAttempt(
                f"cannot {action} job {job_id} for attempt {attempt}: "
                f"attempt {row['attempts']} is the current one"
            )
        return row

    def mark_running(self, job_id: str, worker: str) -> JobRecord:
        """Dispatch a queued job to ``worker``: one more attempt starts now."""
        with self._write() as db:
            row = self._row(job_id)
            if row["status"] != "queued":
                raise JobError(f"cannot start job {job_id}: it is {row['status']}, not queued")
            db.execute(
                "UPDATE jobs SET status = 'running', attempts = attempts + 1, worker = ?,"
                " started_at = ? WHERE id = ?",
                (worker, self._clock(), job_id),
            )
        return self._load(job_id)

    def mark_succeeded(
        self,
        job_id: str,
        result: dict[str, Any],
        *,
        worker: str | None = None,
        attempt: int | None = None,
    ) -> JobRecord:
        """A running job finished; ``worker`` and ``attempt``, if given, must be current.

        A result that cannot be stored raises :class:`JobError` (not :class:`StaleAttempt`):
        the caller fails the attempt with that reason.
        """
        packed = _pack_map(result, "result", MAX_RESULT_BYTES)
        with self._write() as db:
            self._running_row(job_id, worker, "complete", attempt)
            db.execute(
                "UPDATE jobs SET status = 'succeeded', result = ?, error = NULL,"
                " finished_at = ? WHERE id = ?",
                (packed, self._clock(), job_id),
            )
            self._index_artifacts(db, job_id, "result", result)
        return self._load(job_id)

    def fail_attempt(
        self,
        job_id: str,
        reason: str,
        *,
        worker: str | None = None,
        attempt: int | None = None,
        lost: bool = False,
        final: bool = False,
    ) -> JobRecord:
        """This attempt failed: queue again while attempts remain, else fail the job for good.

        ``lost``: the attempt was lost to the system (see :data:`MAX_LOST_ATTEMPTS`), not the
        work's fault; it is recorded but does not use one of ``max_attempts``. ``final``: the
        failure would repeat on every attempt (bad settings, unusable input), so the job fails
        now. A job whose cancel was requested ends cancelled instead of running again.
        """
        with self._write() as db:
            row = self._running_row(job_id, worker, "fail", attempt)
            self._fail_row(db, row, reason, lost=lost, final=final)
        return self._load(job_id)

    def _fail_row(
        self, db: sqlite3.Connection, row: sqlite3.Row, reason: str, *, lost: bool = False,
        final: bool = False,
    ) -> None:
        job_id = row["id"]
        lost_attempts = row["lost_attempts"] + (1 if lost else 0)
        label = (f"{reason} (not counted: lost {lost_attempts} of {MAX_LOST_ATTEMPTS})"
                 if lost_attempts <= MAX_LOST_ATTEMPTS else
                 f"{reason} (lost {lost_attempts}: more than the {MAX_LOST_ATTEMPTS} not counted)")
        errors = [*_unpack(row["attempt_errors"]), _clip(label if lost else reason)]
        # A lost attempt gives its attempt back: max_attempts counts dispatches (a retry sets
        # it to attempts + the submitted budget), so it grows by the one that did not count.
        max_attempts = row["max_attempts"] + (1 if lost else 0)
        db.execute(
            "UPDATE jobs SET attempt_errors = ?, cancel_requested = 0, lost_attempts = ?,"
            " max_attempts = ? WHERE id = ?",
            (codec.pack(errors), lost_attempts, max_attempts, job_id),
        )
        if row["cancel_requested"]:
            self._cancel_row(db, job_id, row["cancel_reason"] or "cancelled")
        elif not final and row["attempts"] < max_attempts and lost_attempts <= MAX_LOST_ATTEMPTS:
            db.execute("UPDATE jobs SET status = 'queued', worker = NULL WHERE id = ?", (job_id,))
        else:
            error = _final_error(errors)
            db.execute(
                "UPDATE jobs SET status = 'failed', error = ?, finished_at = ? WHERE id = ?",
                (error, self._clock(), job_id),
            )
            self._cascade_cancel(db, job_id, _dependency_reason(job_id, "failed", error))

    def request_cancel(self, job_id: str, reason: str = "cancelled by user") -> JobRecord:
        """Queued: cancelled now (with its dependents). Running: flagged, the worker stops it.

        A finished job is left as it is.
        """
        with self._write() as db:
            row = self._row(job_id)
            if row["status"] == "queued":
                self._cancel_row(db, job_id, reason)
            elif row["status"] == "running":
                db.execute(
                    "UPDATE jobs SET cancel_requested = 1, cancel_reason = ? WHERE id = ?",
                    (_clip(reason), job_id),
                )
        return self._load(job_id)

    def mark_cancelled(self, job_id: str, reason: str) -> JobRecord:
        """End a queued or running job as cancelled (with its dependents); finished: unchanged."""
        with self._write() as db:
            row = self._row(job_id)
            if row["status"] not in FINISHED_STATUSES:
                self._cancel_row(db, job_id, reason)
        return self._load(job_id)

    def _cancel_row(
        self, db: sqlite3.Connection, job_id: str, reason: str, *, cancelled_by: str | None = None
    ) -> None:
        reason = _clip(reason)
        db.execute(
            "UPDATE jobs SET status = 'cancelled', error = ?, finished_at = ?, cancel_requested = 0,"
            " cancelled_by = ? WHERE id = ?",
            (reason, self._clock(), cancelled_by, job_id),
        )
        self._cascade_cancel(db, job_id, _dependency_reason(job_id, "cancelled", reason))

    def _cascade_cancel(self, db: sqlite3.Connection, root_id: str, reason: str) -> None:
        """Cancel every queued job that depends, directly or not, on ``root_id``.

        Each gets ``reason`` (which names ``root_id``, the cause) and ``cancelled_by`` = its
        direct dependency, so that retrying the cause re-queues the same tree. Dependents are
        never running: a job is dispatched only after its dependencies succeeded, for good.
        """
        frontier = [root_id]
        now = self._clock()
        while frontier:
            parent = frontier.pop()
            children = db.execute(
                "SELECT j.id FROM job_deps d JOIN jobs j ON j.id = d.job_id "
                "WHERE d.dep_id = ? AND j.status = 'queued'",
                (parent,),
            ).fetchall()
            for (child,) in children:
                db.execute(
                    "UPDATE jobs SET status = 'cancelled', error = ?, finished_at = ?,"
                    " cancelled_by = ? WHERE id = ?",
                    (reason, now, parent, child),
                )
                frontier.append(child)

    def retry(self, job_id: str) -> JobRecord:
        """Queue a failed or cancelled job again with a fresh attempt budget (history kept).

        Dependents cancelled because of it are queued again too. A job cancelled because of a
        dependency that is still failed or cancelled cannot be retried: retry that one.
        """
        with self._write() as db:
            row = self._row(job_id)
            if row["status"] not in ("failed", "cancelled"):
                raise JobError(f"cannot retry job {job_id}: it is {row['status']}")
            blocker = self._first_blocker(db, self._deps_of([job_id])[job_id], submitting=False)
            if blocker is not None:
                gone = not db.execute("SELECT 1 FROM jobs WHERE id = ?", (blocker[0],)).fetchone()
                then = "submit the work again" if gone else f"retry {blocker[0]}"
                raise JobError(f"cannot retry job {job_id}: {blocker[1]}; {then}")
            self._requeue_row(db, row)
            self._requeue_dependents(db, job_id)
        return self._load(job_id)

    def _requeue_row(self, db: sqlite3.Connection, row: sqlite3.Row) -> None:
        db.execute(
            "UPDATE jobs SET status = 'queued', max_attempts = ?, error = NULL, result = NULL,"
            " finished_at = NULL, worker = NULL, cancel_requested = 0, cancel_reason = NULL,"
            " cancelled_by = NULL WHERE id = ?",
            (row["attempts"] + row["attempt_budget"], row["id"]),
        )
        db.execute("DELETE FROM job_artifacts WHERE job_id = ? AND source = 'result'", (row["id"],))

    def _requeue_dependents(self, db: sqlite3.Connection, root_id: str) -> None:
        frontier = [root_id]
        while frontier:
            parent = frontier.pop()
            children = db.execute(
                "SELECT * FROM jobs WHERE status = 'cancelled' AND cancelled_by = ? ORDER BY seq",
                (parent,),
            ).fetchall()
            for child in children:
                deps = self._deps_of([child["id"]])[child["id"]]
                blocker = self._first_blocker(db, deps, submitting=False)
                if blocker is None:
                    self._requeue_row(db, child)
                    frontier.append(child["id"])
                else:  # still blocked by another dependency: make *that* one its cause
                    db.execute(
                        "UPDATE jobs SET error = ?, cancelled_by = ? WHERE id = ?",
                        (blocker[1], blocker[0], child["id"]),
                    )

    def requeue_running(self, reason: str) -> builtins.list[JobRecord]:
        """On broker start: every job left running lost its attempt (``fail_attempt(lost=True)``):
        a broker restart is never the job's fault."""
        with self._write() as db:
            rows = db.execute("SELECT * FROM jobs WHERE status = 'running' ORDER BY seq").fetchall()
            for row in rows:
                self._fail_row(db, row, reason, lost=True)
        return [self._load(row["id"]) for row in rows]

    # --- frequent, cheap updates ---

    def record_progress(self, job_id: str, progress: dict[str, Any]) -> None:
        """Replace the job's latest progress (one UPDATE, not fsynced: see module doc)."""
        packed = _pack_map(progress, "progress", MAX_PROGRESS_BYTES)
        with self._write(durable=False, one_statement=True) as db:
            if db.execute("UPDATE jobs SET progress = ? WHERE id = ?", (packed, job_id)).rowcount:
                return
        raise JobError(f"no job {job_id}")

    def append_metrics(
        self, job_id: str, row: dict[str, Any], *, attempt: int | None = None
    ) -> None:
        """Append one metric row to the job's history (one INSERT, not fsynced).

        With ``attempt``, the row is refused (:class:`StaleAttempt`) unless that attempt is the
        running one: an abandoned worker cannot add rows beside its successor's.
        """
        packed = _pack_map(row, "metrics row", MAX_METRIC_ROW_BYTES)
        if attempt is not None:
            with self._lock:
                self._running_row(job_id, None, "record metrics of", attempt)
        try:
            with self._write(durable=False, one_statement=True) as db:
                db.execute("INSERT INTO job_metrics (job_id, row) VALUES (?, ?)", (job_id, packed))
        except sqlite3.IntegrityError:  # the foreign key: no such job
            raise JobError(f"no job {job_id}") from None

    def set_checkpoint(self, job_id: str, sha256: str, *, attempt: int | None = None) -> str | None:
        """Register the job's latest checkpoint artifact (a retry resumes from it).

        Returns the checkpoint it supersedes (None if none, or the same one). With ``attempt``,
        refused (:class:`StaleAttempt`) unless that attempt is the running one.
        """
        if not is_sha256(sha256):
            raise JobError(f"checkpoint of job {job_id} must be a sha256 hex id, got {sha256!r}")
        with self._write() as db:
            row = (
                self._row(job_id)
                if attempt is None
                else self._running_row(job_id, None, "checkpoint", attempt)
            )
            db.execute("UPDATE jobs SET checkpoint = ? WHERE id = ?", (sha256, job_id))
        previous: str | None = row["checkpoint"]
        return previous if previous != sha256 else None

    def clear_checkpoint(self, job_id: str) -> None:
        """Forget the job's checkpoint (its artifact is gone): the next attempt starts afresh."""
        with self._write() as db:
            if not db.execute("UPDATE jobs SET checkpoint = NULL WHERE id = ?", (job_id,)).rowcount:
                raise JobError(f"no job {job_id}")

    def metric_count(self, job_id: str) -> int:
        """How many metric rows the job has (what ``jobs show`` prints, without the rows)."""
        with self._lock:
            self._row(job_id)
            (n,) = self._db.execute(
                "SELECT COUNT(*) FROM job_metrics WHERE job_id = ?", (job_id,)
            ).fetchone()
        return int(n)

    def metrics_page(
        self, job_id: str, *, start: int = 0, limit: int = MAX_METRICS_PAGE
    ) -> builtins.list[dict[str, Any]]:
        """Metric rows ``start``, ``start + 1``, ... of the job (at most ``limit``, capped at
        :data:`MAX_METRICS_PAGE`), in order; fewer than asked means the history ends there."""
        if start < 0 or limit < 1:
            raise JobError(f"metrics page needs start >= 0 and limit >= 1, got {start}, {limit}")
        with self._lock:
            self._row(job_id)
            rows = self._db.execute(
                "SELECT row FROM job_metrics WHERE job_id = ? ORDER BY n LIMIT ? OFFSET ?",
                (job_id, min(limit, MAX_METRICS_PAGE), start),
            ).fetchall()
        return [_unpack(blob) for (blob,) in rows]

    def dispatchable_ids(self) -> builtins.list[str]:
        """Ids of :meth:`dispatchable` jobs, oldest first: no params decoded (the periodic scan)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT j.id FROM jobs j WHERE j.status = 'queued' AND NOT EXISTS ("
                "  SELECT 1 FROM job_deps d JOIN jobs p ON p.id = d.dep_id"
                "  WHERE d.job_id = j.id AND p.status != 'succeeded'"
                ") ORDER BY j.seq"
            ).fetchall()
        return [r[0] for r in rows]

    def cancel_pending_ids(self) -> builtins.list[str]:
        """Running jobs whose cancel was requested (the worker has not stopped yet)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT id FROM jobs WHERE status = 'running' AND cancel_requested = 1 ORDER BY seq"
            ).fetchall()
        return [r[0] for r in rows]
