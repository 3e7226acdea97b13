"""``distill.jobs``: durable jobs, dispatched to worker services as MDP requests.

Policy over the job journal (:mod:`distill.broker.store.journal`). The socket loop calls it
through its internal-service table (requests) and its job hooks (worker replies, lost workers,
timers); it reaches the loop only through :class:`JobHost`, never by importing it.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import sqlite3
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Protocol

from distill.broker.registry import JobOrigin, Registry, Request, WorkerEntry
from distill.broker.services.common import field, ok_body, page
from distill.broker.services.periodic import Periodic
from distill.broker.services.removal import JobRemoval, PruneRule, Tally
from distill.broker.services.retention import Retention
from distill.broker.store.journal import (
    MAX_METRICS_PAGE,
    JobRecord,
    JobStore,
    StaleAttempt,
    artifact_refs,
    check_params,
    refusal_message,
)
from distill.shared import errors as E
from distill.shared.bus import protocol as P
from distill.shared.bus.codec import pack, unpack_map
from distill.shared.bus.messages import JobDispatch, JobSubmit
from distill.shared.errors import DecodeError, JobError
from distill.shared.ids import is_sha256
from distill.shared.logs import get_logger
from distill.shared.services import WORKER_SERVICES
from distill.shared.train.jobparams import check_job_params

log = get_logger("broker.jobs")
DISTILL_SERVICES = frozenset(s.service for s in WORKER_SERVICES.values())
# Failures that would repeat on every attempt (the job's own settings or input are wrong): the
# job fails at once instead of running max_attempts times into the same error.
# no other attempt can do better: the input is wrong, or (damaged) the broker has removed it,
# or (store_full) the store has no room, which the next attempt a second later meets again
# (three attempts went in ~12 s).
FINAL_ERROR_CODES = frozenset({E.CONFIG, E.BAD_REQUEST, E.AUDIO, E.DATASET, E.MODEL_FORMAT,
                               E.DAMAGED, E.STORE_FULL})

CANCEL_REPEAT_S = 1.0  # a running job's cancel is re-announced until the worker stops
RESCAN_S = 1.0  # look for newly dispatchable jobs at least this often
RETENTION_SWEEP_S = 60.0  # make up deletions a crash missed; the usual ones happen at once
PREVIEW_TRIM_S = 5.0  # how soon old previews go once a job published a new one
MAX_WAIT_S = 300.0
# `wait`s parked at once: per job, and in all (each is a client's long poll; past these a wait
# is refused at once rather than held)
MAX_WAITERS_PER_JOB = 256
MAX_WAITERS = 10_000
MAX_LIST_JOBS = 500  # jobs per list reply
MAX_ANNOUNCED_KEPT = 10_000  # finished jobs remembered as announced (see _announced_final)
# A list reply stops adding jobs past this many packed bytes (params may be large), well below
# the clients' message limit; the reply then says ``truncated``.
MAX_LIST_REPLY_BYTES = P.MAX_MESSAGE_BYTES // 4
# Jobs one `remove` names: all of them go in one transaction, on the loop (more: `prune`,
# which goes in bounded steps, or several requests).
MAX_REMOVE_IDS = 100
PRUNE_EVERY_S = 60.0  # how often automatic pruning looks for jobs past their time


def _remember(ids: OrderedDict[str, None], job_id: str) -> None:
    """Add ``job_id`` to a bounded memory of finished jobs (the newest MAX_ANNOUNCED_KEPT)."""
    ids[job_id] = None
    while len(ids) > MAX_ANNOUNCED_KEPT:
        ids.popitem(last=False)


def _progress_fields(event: dict[str, Any]) -> dict[str, Any]:
    """What a job record keeps of a progress event (without its routing fields)."""
    return {k: v for k, v in event.items() if k not in ("topic", "seq", "broker_ts", "job")}


class JobHost(Protocol):
    """What the job service needs from the broker loop."""

    registry: Registry

    def publish(self, topic: str, event: dict[str, Any]) -> dict[str, Any]: ...
    def caller_is_worker(self) -> bool: ...
    def caller_is_client(self) -> bool: ...
    def caller_key(self) -> str | None: ...
    def caller_is_admin(self) -> bool: ...
    def key_is_client(self, key: str) -> bool: ...
    def describe_key(self, key: str) -> str: ...
    def key_file(self, key: str) -> str | None: ...
    def forget_events(self, topic: str) -> None: ...
    def submit_internal(self, service: bytes, body: list[bytes], job_id: str) -> Request: ...
    def reply_later(self, identity: bytes, service: bytes, body: list[bytes]) -> bool: ...


class JobService:
    def __init__(self, broker: JobHost, store: JobStore, *,
                 retention: Retention | None = None, keep_finished_s: float = 0.0) -> None:
        self.broker = broker
        self.store = store
        self.retention = retention
        self.removal = JobRemoval(store, retention)
        self.periodic = Periodic()  # each task guarded: one failing never stops the others
        self.periodic.add("flush_events", 0.0, lambda now: self._flush_events())
        self.periodic.add("dispatch_scan", 0.0, self._scan)
        self.periodic.add("cancel_and_timeouts", CANCEL_REPEAT_S, lambda now: self._cancels())
        self.periodic.add("expire_waiters", 0.0, self._expire_waiters)
        if retention is not None:
            self.periodic.add("retention_sweep", RETENTION_SWEEP_S, retention.sweep)
            self.periodic.add("trim_previews", PREVIEW_TRIM_S, lambda now: self._trim_previews())
        # automatic pruning (0: jobs are kept for ever): one bounded step a loop turn while a
        # pass lasts, a pass every PRUNE_EVERY_S (sooner for a short keep, as in tests)
        self._keep_finished_s = keep_finished_s
        self._prune_every_s = min(PRUNE_EVERY_S, keep_finished_s / 2)
        self._prune_at = 0.0
        self._prune_cursor: tuple[float, int] | None = None
        self._pruned = {"jobs": 0, "artifacts": 0, "bytes": 0, "kept": 0}  # this pass's, so far
        if keep_finished_s > 0:
            self.periodic.add("prune_finished_jobs", 0.0, self._auto_prune)
        self.in_registry: set[str] = set()  # job ids with a request queued or held by a worker
        self.waiters: dict[str, list[tuple[bytes, float]]] = {}
        self.pending_progress: dict[str, dict[str, Any]] = {}
        self._dirty = True
        self._next_scan = 0.0
        self._previewed: set[str] = set()  # jobs that published previews since the last trim
        # finished jobs already announced, the newest MAX_ANNOUNCED_KEPT (a set of every job
        # ever finished grew with the broker's history; one forgotten is at most announced twice)
        self._announced_final: OrderedDict[str, None] = OrderedDict()
        # succeeded jobs whose reply carried their last progress (Reply.progress): a progress
        # event of theirs that comes later is older news, dropped; as many as _announced_final
        self._progress_final: OrderedDict[str, None] = OrderedDict()
        self._attempt_of: dict[tuple[str, str], int] = {}  # (job, worker id) -> attempt it holds
        for record in store.requeue_running("the broker restarted while the job was running"):
            log.info("job_requeued_after_restart", job=record.id, status=record.status)

    # --- requests ----------------------------------------------------------------------------
    def serve(self, identity: bytes, body: list[bytes]) -> list[bytes] | None:
        msg = unpack_map(body[0])
        op = msg.get("op")
        handler = {
            "submit": self._submit, "get": self._get, "list": self._list, "cancel": self._cancel,
            "retry": self._retry, "checkpoint": self._checkpoint, "counts": self._counts,
            "metrics": self._metrics, "metrics_page": self._metrics_page,
            "remove": self._remove, "prune": self._prune,
        }.get(op) if isinstance(op, str) else None
        if op == "wait":
            return self._wait(identity, msg)
        if handler is None:
            raise DecodeError(f"distill.jobs has no op {op!r} (ops: submit, get, list, cancel, "
                              "retry, wait, checkpoint, metrics, metrics_page, counts, remove, "
                              "prune)")
        return ok_body(handler(msg))

    def _submit(self, msg: dict[str, Any]) -> dict[str, Any]:
        req = JobSubmit.from_map({k: v for k, v in msg.items() if k != "op" and v is not None})
        if req.service.startswith("mmi.") or req.service.encode() in P.BROKER_SERVICES:
            # the broker answers these itself: no worker may register them, so such a job
            # would wait in the queue for ever
            raise JobError(f"{req.service} is the broker's own service: no worker runs jobs "
                           "for it")  # fmt: skip
        if req.service.startswith("distill.") and req.service not in DISTILL_SERVICES:
            # a typo in Distill's own names would wait in the queue for ever without a word
            near = difflib.get_close_matches(req.service, sorted(DISTILL_SERVICES), n=1)
            raise JobError(f"no Distill service is called {req.service!r}"
                           + (f": did you mean {near[0]!r}?" if near else
                              f" (they are {', '.join(sorted(DISTILL_SERVICES))})"))
        check_params(req.params)  # its size and shape first: the artifact walk below reads it all
        # a Distill job service's params as its worker will read them (torch-free): a bad
        # setting of a pipeline's last stage is refused now, not after its first stages ran
        check_job_params(req.service, req.params)
        self._check_artifacts(req.params)
        record = self.store.submit(req.service, req.params, depends_on=req.depends_on,
                                   max_attempts=req.max_attempts, timeout_s=req.timeout_s,
                                   owner=self.broker.caller_key())  # fmt: skip
        self._announce(record)
        self._dirty = True
        out = record.to_dict()
        if record.status == "queued" and not self.broker.registry.has_workers(req.service.encode()):
            out["note"] = (f"no worker serves {req.service} now: the job waits until one "
                           "registers (`distill workers` lists them)")
        return out

    def _check_artifacts(self, params: Any) -> None:
        """JobError unless the store holds every artifact ``params`` names: a job without
        its input would fail every attempt."""
        if self.retention is None:
            return
        for where, sha in artifact_refs(params):
            if not self.retention.artifacts.has(sha):
                raise JobError(
                    f"{where} names artifact {sha[:16]}, which the broker's store does not "
                    "hold (deleted, or never uploaded): upload it again")  # fmt: skip

    def _get(self, msg: dict[str, Any]) -> dict[str, Any]:
        """The record with ``metric_count``; with ``metrics`` (the default) also the latest
        rows, at most one page of them from ``metrics_start`` on (the rest: ``metrics_page``)."""
        job_id = field(msg, "id", str)
        self._flush_events()  # the latest progress and rows, not the last tick's
        out = self.store.get(job_id, with_metrics=False).to_dict(with_metrics=False)
        count = self.store.metric_count(job_id)
        out["metric_count"] = count
        if out.get("owner"):  # as the allowed folder names it ('clients/laptop.key' (z85))
            out.update(self._owner_fields(out["owner"]))
        if out.get("checkpoint") and self.retention is not None:  # a finished job's goes
            out["checkpoint_stored"] = self.retention.artifacts.has(out["checkpoint"])
        if msg.get("metrics", True):
            start = max(0, count - MAX_METRICS_PAGE)
            out["metrics"] = self.store.metrics_page(job_id, start=start)
            out["metrics_start"] = start
        return out

    def _metrics_page(self, msg: dict[str, Any]) -> dict[str, Any]:
        """``metrics_page {id, start, limit}`` -> ``{start, rows, count}``; ``rows`` holds at
        most ``limit`` (capped at MAX_METRICS_PAGE) rows from index ``start``."""
        job_id = field(msg, "id", str)
        start, limit = page(msg, MAX_METRICS_PAGE, MAX_METRICS_PAGE)
        rows = self.store.metrics_page(job_id, start=start, limit=limit)
        return {"id": job_id, "start": start, "rows": rows, "count": self.store.metric_count(job_id)}

    def _list(self, msg: dict[str, Any]) -> dict[str, Any]:
        """``list {status?, service?, mine?, start?, limit?}`` -> ``{jobs, start, more,
        truncated}``: newest first, at most ``limit`` (capped at MAX_LIST_JOBS) from position
        ``start``; ``more`` says another page follows (``truncated``: this one was cut by its
        size). ``mine``: only the caller's key's jobs (without CURVE every job, as nobody owns
        one). Each owned job carries ``owner_file`` and ``owner_name`` (:meth:`_owner_fields`)."""
        start, limit = page(msg, 200, MAX_LIST_JOBS)
        mine = bool(field(msg, "mine", bool, False))
        records = self.store.list(status=field(msg, "status", str, None),
                                  service=field(msg, "service", str, None), limit=limit + 1,
                                  start=start, owner=self.broker.caller_key() if mine else None)
        jobs: list[dict[str, Any]] = []
        size = 0
        for record in records[:limit]:
            item = record.to_dict(with_metrics=False)
            if record.owner is not None:
                item.update(self._owner_fields(record.owner))
            size += len(pack(item))
            if size > MAX_LIST_REPLY_BYTES:
                return {"jobs": jobs, "start": start, "more": True, "truncated": True}
            jobs.append(item)
        return {"jobs": jobs, "start": start, "more": len(records) > limit, "truncated": False}

    def _counts(self, msg: dict[str, Any]) -> dict[str, Any]:
        return self.store.counts()

    def _cancel(self, msg: dict[str, Any]) -> dict[str, Any]:
        job_id = field(msg, "id", str)
        before = self.store.get(job_id, with_metrics=False)
        self._require_owner(before, "cancel")
        caller = self.broker.caller_key()
        default = ("cancelled by user" if caller is None or caller == before.owner
                   else f"cancelled by the key {self._key_label(caller)}")  # fmt: skip
        record = self.store.request_cancel(job_id, field(msg, "reason", str, None) or default)
        cascaded: list[str] = []
        if record.status == "cancelled":
            self._drop_queued(job_id)
            self._finished(record)
            for dep in self._cascaded(record):
                self._drop_queued(dep.id)
                self._finished(dep)
                cascaded.append(dep.id)
        elif record.status == "running":
            self._announce_cancel(job_id)
        return {**record.to_dict(with_metrics=False), "cascaded": cascaded}

    def _retry(self, msg: dict[str, Any]) -> dict[str, Any]:
        job_id = field(msg, "id", str)
        record = self.store.get(job_id, with_metrics=False)
        self._require_owner(record, "retry")
        # its inputs are still there, as a submit's must be (else every attempt would fail on
        # the missing one)
        self._check_artifacts(record.params)
        note = self._forget_lost_checkpoint(record)
        taken_down = [r.id for r in self.store.cancelled_because_of(job_id)]
        try:
            record = self.store.retry(job_id)
        except JobError as e:  # a dependency failed or was cancelled: is it the caller's to retry?
            raise JobError(str(e) + self._blocker_owner(record)) from None
        self._announce(record)
        self._dirty = True
        out = record.to_dict(with_metrics=False)
        # the dependents its end took down, queued again with it (other keys' too)
        out["requeued"] = [r.id for r in self.store.get_many(taken_down) if r.status == "queued"]
        if note:
            out["note"] = note
        return out

    def _remove(self, msg: dict[str, Any]) -> dict[str, Any]:
        """``remove {ids, artifacts?, dry_run?}``: finished jobs out of the journal, all or
        none, with their checkpoints and previews (``artifacts``: and their results)."""
        self._require_client("remove jobs")
        ids = field(msg, "ids", list)
        if not ids or len(ids) > MAX_REMOVE_IDS or not all(isinstance(i, str) for i in ids):
            raise DecodeError(f"field 'ids' must list 1 to {MAX_REMOVE_IDS} job ids (more: "
                              "`prune`, or several requests)")  # fmt: skip
        dry_run = bool(field(msg, "dry_run", bool, False))
        if refusals := self._removal_refusals(ids):
            owned = any(why.startswith("it belongs to the key") for _, why in refusals)
            raise JobError(refusal_message(refusals, len(set(ids))) + (
                " (another key's job: only that key or an admin key, in the allowed folder's "
                "admins/, may remove it)" if owned else ""))
        tally = self.removal.remove(ids, results=bool(field(msg, "artifacts", bool, False)),
                                    dry_run=dry_run)  # fmt: skip
        if not dry_run:
            self._forget(tally)
            log.info("jobs_removed", jobs=len(tally.jobs), artifacts=len(tally.released),
                     bytes=sum(a.size for a in tally.released))  # fmt: skip
        return {**tally.to_dict(), "dry_run": dry_run}

    def _prune(self, msg: dict[str, Any]) -> dict[str, Any]:
        """``prune {older_than_s, status?, artifacts?, dry_run?, cursor?}``: one bounded step
        of removing the finished jobs the rule names, oldest first. ``more``: ask again with
        the reply's ``cursor`` (the clients walk every step)."""
        self._require_client("remove jobs")
        rule = PruneRule(older_than_s=field(msg, "older_than_s", (int, float)),
                         status=field(msg, "status", str, None),
                         results=bool(field(msg, "artifacts", bool, False)),
                         dry_run=bool(field(msg, "dry_run", bool, False)))  # fmt: skip
        cursor = field(msg, "cursor", list, None)
        if cursor is not None and (len(cursor) != 2 or not isinstance(cursor[0], (int, float))
                                   or not isinstance(cursor[1], int)):  # fmt: skip
            raise DecodeError("field 'cursor' must be what the previous prune reply gave")
        after = None if cursor is None else (cursor[0], cursor[1])
        tally, after = self.removal.prune_step(rule, after, may_remove=self._may_manage,
                                               owner_of=self.store.owner_of)  # fmt: skip
        if not rule.dry_run and tally.jobs:
            self._forget(tally)
            log.info("jobs_removed", jobs=len(tally.jobs), artifacts=len(tally.released),
                     bytes=sum(a.size for a in tally.released), rule="prune")  # fmt: skip
        cursor = None if after is None else list(after)
        return {**tally.to_dict(), "dry_run": rule.dry_run, "cursor": cursor, "more": bool(cursor)}

    def _require_client(self, action: str) -> None:
        """Under CURVE, a request that changes what the user keeps comes from a client key: a
        worker key (a machine that runs jobs) has no business there."""
        if not self.broker.caller_is_client():
            raise JobError(f"cannot {action}: only a client key may (this is a worker key)")

    def _may_manage(self, owner: str | None) -> bool:
        """Whether the caller may cancel, retry or remove a job of ``owner``: a job without
        one (submitted without CURVE, or before jobs had owners) is anyone's, as is one whose
        key has left the allowed folder's clients (else nobody could end it); any other only
        its owner's or an admin key's."""
        caller = self.broker.caller_key()
        return (owner is None or caller is None or caller == owner
                or self.broker.caller_is_admin() or not self.broker.key_is_client(owner))

    def _owner_refusal(self, owner: str) -> str:
        return (f"it belongs to the key {self.broker.describe_key(owner)}, which submitted it; "
                "only that key or an admin key (in the allowed folder's admins/) may")

    def _key_label(self, key: str) -> str:
        """A key in a short line: its allowed file ('admins/boss.key'), else its first
        characters."""
        return self.broker.key_file(key) or key[:8] + "…"

    def _owner_fields(self, owner: str) -> dict[str, Any]:
        """What a reply says of a job's or a file's owner beside its key: ``owner_file``, its
        allowed file while it is a client key (None once it is not: its jobs are anyone's),
        and ``owner_name``, the owner in words; ``owner_role: "worker"`` for a key allowed as a
        worker only (a job a worker submitted is anyone's too, but its key is not revoked)."""
        named = self.broker.describe_key(owner)
        if not self.broker.key_is_client(owner):
            if self.broker.key_file(owner) is not None:  # allowed, but not as a client: a worker
                return {"owner_file": None, "owner_role": "worker",
                        "owner_name": f"{named} (a worker's key: anyone may manage its jobs)"}
            return {"owner_file": None,
                    "owner_name": f"{named} (no longer a client key: anyone may manage its jobs)"}
        return {"owner_file": self.broker.key_file(owner), "owner_name": named}

    def _require_owner(self, record: JobRecord, action: str) -> None:
        """JobError unless the caller may ``action`` the job (see :meth:`_may_manage`)."""
        if not self._may_manage(record.owner):
            assert record.owner is not None
            raise JobError(f"cannot {action} job {record.id}: {self._owner_refusal(record.owner)}")

    def _blocker_owner(self, record: JobRecord) -> str:
        """Said after a retry refused for a dependency that is not the caller's to retry."""
        for dep in record.depends_on:
            owner = self.store.owner_of(dep)
            if owner is not None and not self._may_manage(owner):
                status = self.store.get(dep, with_metrics=False).status
                if status in ("failed", "cancelled"):
                    return (f" (job {dep} belongs to the key "
                            f"{self.broker.describe_key(owner)}: only that key or an admin key "
                            "may retry it)")
        return ""

    def _removal_refusals(self, ids: list[str]) -> list[tuple[str, str]]:
        """(job id, why) for each of ``ids`` that cannot be removed: another key's, or what
        the journal refuses (unknown, not finished, needed by a queued or running job), all at
        once so that one answer names every problem."""
        ids = list(dict.fromkeys(ids))
        found = dict(self.store.removal_refusals(ids))
        # another key's job: what else stands in its way is not the caller's business
        for job_id, owner in self.store.owners(ids).items():
            if not self._may_manage(owner):
                found[job_id] = f"it belongs to the key {self.broker.describe_key(owner)}"
        refusals = [(job_id, found[job_id]) for job_id in ids if job_id in found]
        refusals += [(job_id, why) for job_id, why in found.items() if job_id not in ids]
        return refusals

    def name_artifact_owners(self, items: list[dict[str, Any]],
                             uploaders: Callable[[str], set[str]]) -> None:
        """``owner`` and its fields (:meth:`_owner_fields`) on each listed artifact that has
        an owner (see :meth:`deletion_refusal`: the owner of the job it was stored for, else
        its uploader; the first of two that began the same upload at once), in place."""
        if self.broker.caller_key() is None:
            return  # no keys, no owners (uploads without CURVE are everyone's)
        of_jobs = self.store.owners(item["job"] for item in items if item.get("job"))
        for item in items:
            if item.get("job"):
                owner = of_jobs.get(item["job"])
            else:
                owner = min(uploaders(item["sha256"]), default=None)
            if owner is not None:
                item.update(owner=owner, **self._owner_fields(owner))

    def storing_refusal(self, job: str | None) -> str | None:
        """Why the caller may not store an artifact under job ``job`` (None: it may): what is
        stored for a job is its owner's (:meth:`deletion_refusal`), so under CURVE only the
        job's owner, an admin or a worker key (which stores checkpoints, previews and results
        for the jobs it runs) may; else a key could plant a file among another key's."""
        if job is None or self.broker.caller_key() is None or self.broker.caller_is_worker():
            return None
        owner = self.store.owner_of(job)
        if owner is None or self._may_manage(owner):
            return None
        return (f"cannot store an artifact for job {job}: {self._owner_refusal(owner)}")

    def deletion_refusal(self, sha: str, job: str | None, uploaders: set[str]) -> str | None:
        """Why the caller may not delete artifact ``sha`` (None: it may): under CURVE an
        artifact stored for a job (a worker's checkpoint, preview or result: whatever key the
        worker uploads with) is that job's owner's, as the job is (see :meth:`_may_manage`), and
        one uploaded on its own its uploader's. Another key's job that names it does not hold
        it (else any key could keep anyone's file for ever by naming it); a queued or running
        job that needs it does, whoever's it is (the store's own rule)."""
        holders: list[tuple[str, str, str]] = []  # (owner, what is said before and after it)
        if job is not None:
            if (job_owner := self.store.owner_of(job)) is not None:
                holders.append((job_owner, f"it was stored for job {job} of the key ", ""))
        else:
            holders += [(key, "the key ", " uploaded it") for key in sorted(uploaders)]
        for owner, before, after in holders:
            if not self._may_manage(owner):
                return (f"cannot delete artifact {sha[:16]}: {before}"
                        f"{self.broker.describe_key(owner)}{after}; only that key or an admin "
                        "key (in the allowed folder's admins/) may")
        return None

    def _forget(self, tally: Tally) -> None:
        """What the service and the event hub remember of removed jobs."""
        for job in tally.jobs:
            self._announced_final.pop(job.id, None)
            self._progress_final.pop(job.id, None)
            self._previewed.discard(job.id)
            self.pending_progress.pop(job.id, None)
            self.broker.forget_events(f"job.{job.id}")

    def _auto_prune(self, now: float) -> None:
        """One step of automatic pruning (``DISTILL_STORE_KEEP_FINISHED_JOBS_DAYS``): the
        jobs' checkpoints and previews go, their results stay."""
        if now < self._prune_at:
            return
        rule = PruneRule(older_than_s=self._keep_finished_s)
        tally, self._prune_cursor = self.removal.prune_step(rule, self._prune_cursor)
        self._forget(tally)
        for key, n in (("jobs", len(tally.jobs)), ("artifacts", len(tally.released)),
                       ("bytes", sum(a.size for a in tally.released)), ("kept", len(tally.pinned))):
            self._pruned[key] += n
        if self._prune_cursor is not None:
            return  # more next turn: the loop serves its sockets in between
        self._prune_at = now + self._prune_every_s
        if self._pruned["jobs"]:  # kept: old jobs a queued or running job still depends on
            log.info("jobs_pruned", **self._pruned, keep_days=self._keep_finished_s / 86_400)
        self._pruned = dict.fromkeys(self._pruned, 0)

    def _forget_lost_checkpoint(self, record: JobRecord) -> str | None:
        """A retry resumes from the job's checkpoint; if that artifact is gone (released, or
        deleted by hand), the job starts from scratch, and the reply says so."""
        if record.finished is False or not self._checkpoint_gone(record):
            return None
        self.store.clear_checkpoint(record.id)
        return f"checkpoint {record.checkpoint} is no longer stored: the job starts from scratch"

    def _checkpoint_gone(self, record: JobRecord) -> bool:
        """Whether the job has a checkpoint the store no longer holds (released, deleted by
        hand, or set aside as damaged)."""
        return (record.checkpoint is not None and self.retention is not None
                and not self.retention.artifacts.has(record.checkpoint))  # fmt: skip

    def _worker_write(self, msg: dict[str, Any], action: str) -> tuple[str, int | None]:
        """The job id and attempt of a worker's ``checkpoint`` or ``metrics`` request. Under
        CURVE only a worker key may send one; and the job must be running (with ``attempt``,
        that attempt: a worker abandoned by the broker cannot write beside its successor;
        without it, as workers before the attempt was sent do, any running attempt)."""
        job_id = field(msg, "id", str)
        attempt = field(msg, "attempt", int, None)
        if not self.broker.caller_is_worker():
            raise JobError(f"cannot {action} job {job_id}: only a worker key may (this is a "
                           "client key)")  # fmt: skip
        if attempt is None:
            status = self.store.get(job_id, with_metrics=False).status
            if status != "running":
                raise StaleAttempt(f"cannot {action} job {job_id}: it is {status}, not running")
        return job_id, attempt

    def _checkpoint(self, msg: dict[str, Any]) -> dict[str, Any]:
        """``checkpoint {id, sha256, attempt}``: the job's latest checkpoint, from the worker
        running it (see :meth:`_worker_write`); the artifact must be stored."""
        job_id, attempt = self._worker_write(msg, "set the checkpoint of")
        sha = field(msg, "sha256", str)
        if self.retention is not None and is_sha256(sha) and not self.retention.artifacts.has(sha):
            raise JobError(f"checkpoint {sha[:16]} of job {job_id} is not in the broker's store: "
                           "upload it first")  # fmt: skip
        previous = self.store.set_checkpoint(job_id, sha, attempt=attempt)
        if previous is not None and self.retention is not None:
            try:
                self.retention.superseded(job_id, previous)
            except Exception:  # the checkpoint is registered; freeing space is the sweep's job now
                log.exception("retention_failed", job=job_id, artifact=previous)
        return {"id": job_id, "checkpoint": sha}

    def _metrics(self, msg: dict[str, Any]) -> dict[str, Any]:
        """A metric row sent as a request: stored before the reply, so no row is ever lost to
        the event stream's best-effort delivery; then published for live viewers. From the
        worker running the job only (see :meth:`_worker_write`): no duplicate rows from a
        stale attempt, none on a job that is not running."""
        job_id, attempt = self._worker_write(msg, "record metrics of")
        row = field(msg, "row", dict)
        self.store.append_metrics(job_id, row, attempt=attempt)
        self.broker.publish(f"job.{job_id}", {"type": "metrics", "job": job_id, "row": row, "recorded": True})
        return {"id": job_id}

    @property
    def _waiting(self) -> int:
        return sum(len(parked) for parked in self.waiters.values())

    def _wait(self, identity: bytes, msg: dict[str, Any]) -> list[bytes] | None:
        """``wait {id, timeout_s}``: the record once the job has finished, or after
        ``timeout_s`` (default 30, at most MAX_WAIT_S; 0: at once) with ``wait_timed_out``."""
        job_id = field(msg, "id", str)
        timeout_s = field(msg, "timeout_s", (int, float), None)
        if timeout_s is None:
            timeout_s = 30.0
        if not math.isfinite(timeout_s) or timeout_s < 0:
            raise DecodeError(f"field 'timeout_s' must be a finite number of seconds >= 0, "
                              f"got {timeout_s}")  # fmt: skip
        record = self.store.get(job_id, with_metrics=False)
        if record.finished:
            return ok_body(record.to_dict(with_metrics=False))
        if timeout_s == 0:
            return ok_body({**record.to_dict(with_metrics=False), "wait_timed_out": True})
        parked = self.waiters.get(job_id, [])
        if len(parked) >= MAX_WAITERS_PER_JOB or self._waiting >= MAX_WAITERS:
            raise JobError(f"too many clients wait on {'job ' + job_id if parked else 'jobs'} "
                           "already: poll with `get` instead")  # fmt: skip
        self.waiters.setdefault(job_id, parked).append(
            (identity, time.monotonic() + min(float(timeout_s), MAX_WAIT_S)))
        return None

    # --- events ------------------------------------------------------------------------------
    def on_event(self, topic: str, event: dict[str, Any]) -> None:
        if not topic.startswith("job."):
            return
        job_id = topic[4:]
        if event.get("type") == "progress":
            if job_id not in self._progress_final:
                self.pending_progress[job_id] = _progress_fields(event)
        elif event.get("type") == "preview":
            self._previewed.add(job_id)
        # A metrics row is stored only when its worker sends it as a request (`metrics`, with
        # its attempt: every Distill worker does); one published as an event is shown live,
        # never kept: anyone who may publish could add rows to a running job that way.

    def _flush_events(self) -> None:
        if not self.pending_progress:
            return
        with self.store.batch():
            for job_id, fields in self.pending_progress.items():
                try:
                    self.store.record_progress(job_id, fields)
                except JobError:
                    pass  # an event for a job this broker does not know
        self.pending_progress.clear()

    # --- dispatch and results (JobHooks) -----------------------------------------------------
    def tick(self, now: float) -> None:
        """The loop's timer: every periodic task, each guarded (see :mod:`.periodic`)."""
        self.periodic.tick(now)

    def _scan(self, now: float) -> None:
        if self._dirty or now >= self._next_scan:
            self._dirty = False
            self._next_scan = now + RESCAN_S
            self._dispatch_ready()

    def _cancels(self) -> None:
        for job_id in self.store.cancel_pending_ids():
            self._announce_cancel(job_id)
        for record in self.store.overdue(time.time()):
            self._announce_cancel(record.id)
            self._after_failure(self.store.fail_attempt(record.id, f"timed out after {record.timeout_s:g} s"))

    def _trim_previews(self) -> None:
        jobs, self._previewed = self._previewed, set()
        assert self.retention is not None
        for job_id in sorted(jobs):
            self.retention.trim_previews(job_id)

    def _dispatch_ready(self) -> None:
        # Ids first: only jobs not yet handed to the registry have their params decoded.
        for job_id in self.store.dispatchable_ids():
            if job_id in self.in_registry:
                continue
            record = self.store.get(job_id, with_metrics=False)
            if self._checkpoint_gone(record):
                # the attempt starts from scratch, not from an error fetching it
                log.warning("checkpoint_gone", job=record.id, artifact=record.checkpoint)
                self.store.clear_checkpoint(record.id)
                record = dataclasses.replace(record, checkpoint=None)
            dispatch = JobDispatch(id=record.id, service=record.service, params=record.params,
                                   attempt=record.attempts + 1, previous_errors=record.attempt_errors,
                                   deps=self.store.deps_results(record.id), checkpoint=record.checkpoint)
            self.in_registry.add(record.id)
            self.broker.submit_internal(record.service.encode(), [pack({"job": dispatch.to_map()})], record.id)

    def on_dispatched(self, job_id: str, worker: WorkerEntry) -> None:
        try:
            record = self.store.mark_running(job_id, worker.worker_id)
        except JobError as e:  # cancelled between queueing and dispatch: stop it at once
            log.info("job_dispatch_stale", job=job_id, reason=str(e))
            self._announce_cancel(job_id)
            return
        self._attempt_of[(job_id, worker.worker_id)] = record.attempts
        self._announce(record)

    def on_reply(self, job_id: str, frames: list[bytes], worker: WorkerEntry) -> None:
        """A worker's reply to a job. A reply from an attempt that is over (the job timed out,
        was cancelled or requeued) is ignored; a result the journal cannot store fails the
        attempt with that reason, so the job never stays running with no worker."""
        self.in_registry.discard(job_id)
        attempt = self._attempt_of.pop((job_id, worker.worker_id), None)
        try:
            reply = unpack_map(frames[0], "job reply")
        except DecodeError as e:
            reply = {"ok": False, "error": {"message": f"worker sent a malformed reply: {e}"}}
        try:
            record = self._record_reply(job_id, reply, worker, attempt)
        except StaleAttempt as e:
            log.info("job_reply_ignored", job=job_id, attempt=attempt, reason=str(e))
            return
        except (JobError, sqlite3.Error) as e:  # refused or not committed: this attempt failed
            log.warning("job_result_refused", job=job_id, reason=str(e))
            try:
                record = self.store.fail_attempt(job_id, f"the broker could not store the result: {e}",
                                                 worker=worker.worker_id, attempt=attempt)
            except StaleAttempt:
                return
        if record.status == "succeeded":
            self._finished(record)
        else:
            self._after_failure(record)
        self._dirty = True

    def _record_reply(self, job_id: str, reply: dict[str, Any], worker: WorkerEntry,
                      attempt: int | None) -> JobRecord:
        if reply.get("ok") is True:
            result = reply.get("result")
            progress = reply.get("progress")
            with self.store.batch():  # the last progress and the result together, or neither
                if isinstance(progress, dict):
                    try:
                        self.store.record_progress(job_id, _progress_fields(progress))
                    except JobError:  # too large to keep, as its event would be: the result
                        progress = None  # still counts
                record = self.store.mark_succeeded(
                    job_id, result if isinstance(result, dict) else {"value": result},
                    worker=worker.worker_id, attempt=attempt)  # fmt: skip
            if isinstance(progress, dict):
                self.pending_progress.pop(job_id, None)  # older than the one recorded
                _remember(self._progress_final, job_id)
            return record
        if reply.get("cancelled"):
            current = self.store.get(job_id, with_metrics=False)
            if current.status != "running" or current.worker != worker.worker_id:
                raise StaleAttempt(f"job {job_id} is {current.status} on {current.worker}")
            return self.store.mark_cancelled(job_id, current.cancel_reason or "cancelled")
        error = reply["error"] if isinstance(reply.get("error"), dict) else {}
        message = str(error.get("message", "unknown error"))
        return self.store.fail_attempt(job_id, f"attempt on {worker.meta.get('host', '?')}: {message}",
                                       worker=worker.worker_id, attempt=attempt,
                                       final=error.get("code") in FINAL_ERROR_CODES)

    def on_lost(self, job_id: str, reason: str) -> None:
        """The worker holding the job is gone. With a checkpoint the job resumes where it was,
        so the loss is not its fault (``lost``, its own larger bound); without one, a worker
        that dies on the job may be killed by it, so the attempt counts."""
        self.in_registry.discard(job_id)
        self._dirty = True
        try:
            record = self.store.get(job_id, with_metrics=False)
            if record.status != "running":
                return
            self._attempt_of.pop((job_id, record.worker or ""), None)
            record = self.store.fail_attempt(job_id, f"worker lost: {reason}",
                                             lost=record.checkpoint is not None)
        except JobError:
            return
        self._after_failure(record)
        self._dirty = True

    def _after_failure(self, record: JobRecord) -> None:
        if record.status == "queued":
            self._announce(record)  # back in the queue for another attempt
            # said where the user watches (distill train, jobs watch, the UI): without it a
            # lost worker showed as "queued", then epoch 1 again, with no reason
            reason = record.attempt_errors[-1] if record.attempt_errors else "it ended"
            then = ("it resumes from its last checkpoint" if record.checkpoint
                    else "it starts again (no checkpoint yet)")  # fmt: skip
            self.broker.publish(f"job.{record.id}", {
                "type": "note", "job": record.id,
                "message": f"attempt {record.attempts} ended ({reason}): queued again; {then}"})
        else:
            self._finished(record)
            for dep in self._cascaded(record):
                self._drop_queued(dep.id)
                self._finished(dep)

    def _cascaded(self, record: JobRecord) -> list[JobRecord]:
        """The jobs ``record``'s end cancelled, at any depth, not yet announced."""
        return [r for r in self.store.cancelled_because_of(record.id)
                if r.id not in self._announced_final]

    # --- announcements -----------------------------------------------------------------------
    def _finished(self, record: JobRecord) -> None:
        _remember(self._announced_final, record.id)
        self._announce(record)
        if self.retention is not None:
            try:
                self.retention.job_finished(record)
            except Exception:  # freeing space must never stop the announcement; the sweep retries
                log.exception("retention_failed", job=record.id)
        for identity, _ in self.waiters.pop(record.id, []):
            self.broker.reply_later(identity, P.SERVICE_JOBS, ok_body(record.to_dict(with_metrics=False)))

    def _announce(self, record: JobRecord) -> None:
        if not record.finished:
            self._announced_final.pop(record.id, None)
            self._progress_final.pop(record.id, None)
        self.broker.publish(f"job.{record.id}", {
            "type": "status", "job": record.id, "service": record.service, "status": record.status,
            "attempts": record.attempts, "worker": record.worker, "error": record.error,
            "result": record.result})

    def _announce_cancel(self, job_id: str) -> None:
        self.broker.publish("control.cancel", {"type": "cancel", "job": job_id})

    def _drop_queued(self, job_id: str) -> None:
        removed = self.broker.registry.cancel_queued(
            lambda r: isinstance(r.origin, JobOrigin) and r.origin.job_id == job_id)
        if removed:
            self.in_registry.discard(job_id)

    def _expire_waiters(self, now: float) -> None:
        for job_id in list(self.waiters):
            keep = []
            for identity, deadline in self.waiters[job_id]:
                if deadline <= now:
                    record = self.store.get(job_id, with_metrics=False)
                    self.broker.reply_later(identity, P.SERVICE_JOBS,
                                            ok_body({**record.to_dict(with_metrics=False), "wait_timed_out": True}))
                else:
                    keep.append((identity, deadline))
            if keep:
                self.waiters[job_id] = keep
            else:
                del self.waiters[job_id]
