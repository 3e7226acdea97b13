"""Client side of ``distill.jobs``: submit work, follow it, cancel, retry or remove it.

Lists and metric histories come in pages (each reply stays below the clients' message
limit): :meth:`JobsClient.iter_jobs` and :meth:`JobsClient.iter_metrics` walk them all, and
:func:`metrics_pages` does the same for the asyncio client (the UI). A prune comes in steps
(the broker removes jobs a few at a time between its other work): :meth:`JobsClient.prune`
walks them all and adds them up.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from distill.shared.bus import protocol as P
from distill.shared.bus.client import Client, Subscription
from distill.shared.bus.security import AUTO
from distill.shared.errors import BAD_REPLY, BAD_REQUEST, JOB, JobError, RequestError

if TYPE_CHECKING:
    from distill.shared.bus.aclient import AsyncClient

SERVICE = P.SERVICE_JOBS.decode()
FINISHED = ("succeeded", "failed", "cancelled")
# Rows asked for per metrics page: the broker's own cap (it sends at most that many whatever
# is asked), ~1 MiB at the metric row limit's typical ~1 KiB.
METRICS_PAGE_ROWS = 1_000
JOBS_PAGE = 500  # jobs asked for per list page: the broker's cap per reply
REMOVE_IDS = 100  # job ids per remove request: the broker's cap per request


def add_removal(total: dict[str, Any], reply: dict[str, Any]) -> dict[str, Any]:
    """``total`` (a ``remove`` or ``prune`` reply) with ``reply``'s jobs and artifacts added."""
    out = {**total, "jobs": [*total["jobs"], *reply["jobs"]],
           "pinned": [*total.get("pinned", []), *reply.get("pinned", [])]}  # fmt: skip
    for key in ("released", "kept_in_use", "kept_results"):
        out[key] = {n: total[key][n] + reply[key][n] for n in ("count", "bytes")}
    out["others"] = total.get("others", 0) + reply.get("others", 0)
    return out


def owner_label(record: dict[str, Any]) -> str:
    """A job record's owner in a table cell (the CLI's and the UI's): its allowed file's name
    (``laptop`` for 'clients/laptop.key'), ``(worker)`` for a key allowed as a worker only,
    ``(revoked)`` once it is no longer allowed; ``-`` for none."""
    if not record.get("owner"):
        return "-"
    if file := record.get("owner_file"):
        return str(file).rsplit("/", 1)[-1].removesuffix(".key")
    if record.get("owner_role") == "worker":
        return "(worker)"  # anyone may manage its jobs, as for a revoked key
    return "(revoked)"  # no longer a client key: anyone may manage its jobs


def add_metric_row(rows: list[dict[str, Any]], row: dict[str, Any]) -> list[dict[str, Any]]:
    """A job's metric history (as curves draw it) with ``row`` added, in place (and returned).
    A resumed attempt repeats the epochs after its checkpoint: its rows replace the older ones
    from there on (the stored history keeps both, in the order they came). Amortised O(1): the
    replaced rows are the last ones."""
    epoch = row.get("epoch")
    if isinstance(epoch, int) and not isinstance(epoch, bool):
        while rows and isinstance(rows[-1].get("epoch"), int) and rows[-1]["epoch"] >= epoch:
            rows.pop()
    rows.append(row)
    return rows


def metric_history(rows: Sequence[Any]) -> list[dict[str, Any]]:
    """The stored rows of a job as curves draw them (see :func:`add_metric_row`)."""
    out: list[dict[str, Any]] = []
    for row in rows:
        if isinstance(row, dict):
            add_metric_row(out, row)
    return out


def next_metrics_start(page: dict[str, Any]) -> int | None:
    """Where the page after ``page`` (a ``metrics_page`` reply) starts; None at the end.

    The count comes with each page, so a history that grows while it is read (a running job)
    is followed to its end as of the last page."""
    rows, start, count = page.get("rows"), page.get("start"), page.get("count")
    if not isinstance(rows, list) or not isinstance(start, int) or not isinstance(count, int):
        raise RequestError(f"a metrics_page reply needs rows, start and count; got keys "
                           f"{sorted(page)}", code=BAD_REPLY)
    following = start + len(rows)
    return following if rows and following < count else None


async def metrics_pages(client: AsyncClient, job_id: str, start: int = 0,
                        page_rows: int = METRICS_PAGE_ROWS) -> AsyncIterator[list[dict[str, Any]]]:
    """The job's metric rows from ``start`` on, one page (a list of rows) at a time."""
    at: int | None = start
    while at is not None:
        page: dict[str, Any] = await client.request(
            SERVICE, {"op": "metrics_page", "id": job_id, "start": at, "limit": page_rows})
        at = next_metrics_start(page)
        yield list(page["rows"])


class JobsClient:
    def __init__(self, client: Client) -> None:
        self.client = client

    def _call(self, op: str, request_timeout_s: float | None = None, **fields: Any) -> Any:
        """The op's result; a job error (an unknown id, a bad field) as JobError."""
        # no timeout_s unless given: the client's own (any object with request(service, body))
        timeout: dict[str, Any] = {} if request_timeout_s is None else {"timeout_s": request_timeout_s}
        try:
            return self.client.request(SERVICE, {"op": op, **fields}, **timeout)
        except RequestError as e:
            if e.code in (JOB, BAD_REQUEST):
                raise JobError(str(e)) from None
            raise

    def submit(self, service: str, params: dict[str, Any] | None = None, *, depends_on: Sequence[str] = (),
               max_attempts: int = 3, timeout_s: float | None = None) -> dict[str, Any]:
        if isinstance(depends_on, str):  # list("j-1") is ["j", "-", "1"]: "no such job j"
            raise RequestError(f"depends_on must be a list of job ids, got the string "
                               f"{depends_on!r} (write depends_on=[{depends_on!r}])",
                               code=BAD_REQUEST)  # fmt: skip
        result: dict[str, Any] = self._call("submit", service=service, params=params or {},
                                            depends_on=list(depends_on), max_attempts=max_attempts,
                                            timeout_s=timeout_s)
        return result

    def get(self, job_id: str, *, metrics: bool = True) -> dict[str, Any]:
        result: dict[str, Any] = self._call("get", id=job_id, metrics=metrics)
        return result

    def list(self, *, status: str | None = None, service: str | None = None, limit: int = 200,
             mine: bool = False) -> list[dict[str, Any]]:  # fmt: skip
        """The newest ``limit`` jobs (one page: the broker sends at most JOBS_PAGE; more with
        :meth:`iter_jobs`); ``mine``: only those this client's key submitted (under CURVE)."""
        return list(self._call("list", status=status, service=service, limit=limit,
                               mine=mine or None)["jobs"])  # fmt: skip

    def iter_jobs(self, *, status: str | None = None, service: str | None = None,
                  page: int = JOBS_PAGE) -> Iterator[dict[str, Any]]:
        """Every job (of a status, of a service), newest first, fetched page by page."""
        start, seen = 0, set()
        while True:
            reply = self._call("list", status=status, service=service, limit=page, start=start)
            jobs = reply["jobs"]
            for job in jobs:
                # Pages are by position, newest first: a job submitted meanwhile shifts the
                # rest by one, so a job may come twice (never not at all).
                if job["id"] not in seen:
                    seen.add(job["id"])
                    yield job
            if not jobs or not reply.get("more"):
                return
            start += len(jobs)

    def metric_count(self, job_id: str) -> int:
        """How many metric rows the job has (no rows fetched)."""
        return int(self.get(job_id, metrics=False)["metric_count"])

    def metrics_page(self, job_id: str, start: int = 0,
                     limit: int = METRICS_PAGE_ROWS) -> dict[str, Any]:
        """``{start, rows, count}``: at most ``limit`` rows from index ``start`` on."""
        page: dict[str, Any] = self._call("metrics_page", id=job_id, start=start, limit=limit)
        return page

    def iter_metrics(self, job_id: str, start: int = 0,
                     page_rows: int = METRICS_PAGE_ROWS) -> Iterator[dict[str, Any]]:
        """Every metric row of the job from ``start`` on, fetched page by page."""
        at: int | None = start
        while at is not None:
            page = self.metrics_page(job_id, at, page_rows)
            at = next_metrics_start(page)
            yield from page["rows"]

    def cancel(self, job_id: str, reason: str | None = None) -> dict[str, Any]:
        """Cancel the job (and the queued jobs that depend on it: ``cascaded``). ``reason``
        defaults to "cancelled by user", or under CURVE, when another key (an admin's) cancels
        it, "cancelled by the key FILE"."""
        result: dict[str, Any] = self._call("cancel", id=job_id, reason=reason)
        return result

    def retry(self, job_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self._call("retry", id=job_id)
        return result

    def remove(self, ids: Sequence[str], *, artifacts: bool = False,
               dry_run: bool = False) -> dict[str, Any]:  # fmt: skip
        """Remove finished jobs from the broker's journal, with their checkpoints and previews
        (``artifacts``: and the results they made, a model, sounds, a dataset, unless another
        job still names them). All or none: a job that is unknown, not finished, or that a
        queued or running job depends on refuses the call (JobError naming each, and why).
        Returns ``{jobs, released, kept_in_use, kept_results, dry_run}``: the jobs removed and
        the artifacts (``count``, ``bytes``) released, kept because a job needs them, and
        kept as results. ``dry_run``: what would go; nothing changes."""
        if isinstance(ids, str):
            raise RequestError(f"ids must be a list of job ids, got the string {ids!r} "
                               f"(write [{ids!r}])", code=BAD_REQUEST)  # fmt: skip
        ids = list(dict.fromkeys(ids))
        batches = [ids[i : i + REMOVE_IDS] for i in range(0, len(ids), REMOVE_IDS)]
        if len(batches) > 1 and not dry_run:  # all or none over every request: look first
            self.remove(ids, artifacts=artifacts, dry_run=True)
        total: dict[str, Any] | None = None
        for batch in batches:
            reply = self._call("remove", ids=batch, artifacts=artifacts, dry_run=dry_run)
            total = reply if total is None else add_removal(total, reply)
        if total is None:
            raise RequestError("remove needs at least one job id", code=BAD_REQUEST)
        return total

    def prune(self, older_than_s: float, *, status: str | None = None, artifacts: bool = False,
              dry_run: bool = False) -> dict[str, Any]:  # fmt: skip
        """Remove every job that finished ``older_than_s`` seconds ago or more (of ``status``
        only, if given), as :meth:`remove` does, step by step until none is left. Jobs a
        queued or running job depends on stay, listed in ``pinned`` with the reason; under CURVE
        other keys' jobs stay too (an admin key's prune takes them), counted in ``others``."""
        total: dict[str, Any] | None = None
        cursor = None
        while True:
            reply = self._call("prune", older_than_s=older_than_s, status=status,
                               artifacts=artifacts, dry_run=dry_run, cursor=cursor)  # fmt: skip
            total = reply if total is None else add_removal(total, reply)
            cursor = reply.get("cursor")
            if not reply.get("more") or cursor is None:
                total.update(cursor=None, more=False)
                return total

    def wait(self, job_id: str, timeout_s: float = 3600.0) -> dict[str, Any]:
        """Long-poll until the job ends (or ``timeout_s``); returns its record."""
        deadline = time.monotonic() + timeout_s
        while True:
            chunk = max(0.1, min(30.0, deadline - time.monotonic()))
            # through _call: an unknown id is a JobError, as from get and cancel
            record: dict[str, Any] = self._call("wait", request_timeout_s=chunk + 10, id=job_id,
                                                timeout_s=chunk)  # fmt: skip
            if record["status"] in FINISHED or time.monotonic() >= deadline:
                return record

    def follow(self, job_id: str, on_event: Callable[[dict[str, Any]], None],
               timeout_s: float | None = None) -> dict[str, Any]:
        """Call ``on_event`` for each event of the job (snapshot first) until it ends.

        Events are best effort, so the record is polled too. The job's end is handed out last,
        from the record once the job has ended: its last progress, unless that came as an
        event already (it can come after the broker's final status: the worker publishes it on
        another socket), then its status (the event's, or one of the same shape when a poll
        found the job ended before its events came)."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        final: dict[str, Any] | None = None  # the job's end as an event, held until the end
        fraction: Any = None  # the latest progress event's

        def seen(event: dict[str, Any]) -> None:
            nonlocal final, fraction
            if event.get("type") == "status" and event.get("status") in FINISHED:
                final = event
                return
            if event.get("type") == "progress":
                fraction = event.get("fraction")
            on_event(event)

        # the events with the keys of the client the requests go through (given ones too)
        security = getattr(self.client, "security", AUTO)
        with Subscription(self.client.endpoint, [f"job.{job_id}"], security=security) as sub:
            while (event := sub.next(timeout_s=0)) is not None:  # the snapshot: latest state
                seen(event)
            record = self.get(job_id, metrics=False)
            while record["status"] not in FINISHED:
                if deadline is not None and time.monotonic() > deadline:
                    break
                event = sub.next(timeout_s=1.0)
                if event is None:
                    record = self.get(job_id, metrics=False)  # events are best effort; poll too
                    continue
                seen(event)
                if final is not None:
                    record = self.get(job_id, metrics=False)
        if record["status"] in FINISHED:
            progress = record.get("progress")
            if isinstance(progress, dict) and progress.get("fraction") != fraction:
                on_event({**progress, "type": "progress", "job": job_id})
            on_event(final if final is not None and final.get("status") == record["status"] else
                     {"type": "status", "job": job_id, "service": record.get("service"),
                      "status": record["status"], "attempts": record.get("attempts"),
                      "worker": record.get("worker"), "error": record.get("error"),
                      "result": record.get("result")})  # fmt: skip
        return record
