"""Client side of ``distill.jobs``: submit work, follow it, cancel or retry it."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from distill.shared.bus import protocol as P
from distill.shared.bus.client import Client, Subscription
from distill.shared.errors import BAD_REQUEST, JOB, JobError, RequestError

SERVICE = P.SERVICE_JOBS.decode()
FINISHED = ("succeeded", "failed", "cancelled")


class JobsClient:
    def __init__(self, client: Client) -> None:
        self.client = client

    def _call(self, op: str, **fields: Any) -> Any:
        try:
            return self.client.request(SERVICE, {"op": op, **fields})
        except RequestError as e:
            if e.code in (JOB, BAD_REQUEST):
                raise JobError(str(e)) from None
            raise

    def submit(self, service: str, params: dict[str, Any] | None = None, *, depends_on: Sequence[str] = (),
               max_attempts: int = 3, timeout_s: float | None = None) -> dict[str, Any]:
        result: dict[str, Any] = self._call("submit", service=service, params=params or {},
                                            depends_on=list(depends_on), max_attempts=max_attempts,
                                            timeout_s=timeout_s)
        return result

    def get(self, job_id: str, *, metrics: bool = True) -> dict[str, Any]:
        result: dict[str, Any] = self._call("get", id=job_id, metrics=metrics)
        return result

    def list(self, *, status: str | None = None, service: str | None = None, limit: int = 200) -> list[dict[str, Any]]:
        return list(self._call("list", status=status, service=service, limit=limit)["jobs"])

    def cancel(self, job_id: str, reason: str = "cancelled by user") -> dict[str, Any]:
        result: dict[str, Any] = self._call("cancel", id=job_id, reason=reason)
        return result

    def retry(self, job_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self._call("retry", id=job_id)
        return result

    def wait(self, job_id: str, timeout_s: float = 3600.0) -> dict[str, Any]:
        """Long-poll until the job ends (or ``timeout_s``); returns its record."""
        deadline = time.monotonic() + timeout_s
        while True:
            chunk = max(0.1, min(30.0, deadline - time.monotonic()))
            record: dict[str, Any] = self.client.request(
                SERVICE, {"op": "wait", "id": job_id, "timeout_s": chunk}, timeout_s=chunk + 10)
            if record["status"] in FINISHED or time.monotonic() >= deadline:
                return record

    def follow(self, job_id: str, on_event: Callable[[dict[str, Any]], None],
               timeout_s: float | None = None) -> dict[str, Any]:
        """Call ``on_event`` for each event of the job (snapshot first) until it ends."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        with Subscription(self.client.endpoint, [f"job.{job_id}"]) as sub:
            while (event := sub.next(timeout_s=0)) is not None:  # the snapshot: latest state
                on_event(event)
            record = self.get(job_id, metrics=False)
            while record["status"] not in FINISHED:
                if deadline is not None and time.monotonic() > deadline:
                    break
                event = sub.next(timeout_s=1.0)
                if event is None:
                    record = self.get(job_id, metrics=False)  # events are best effort; poll too
                    continue
                on_event(event)
                if event.get("type") == "status" and event.get("status") in FINISHED:
                    record = self.get(job_id, metrics=False)
        return record
