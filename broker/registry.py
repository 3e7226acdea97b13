"""Worker and request bookkeeping for the broker: who serves what, who holds which request,
who is overdue. Pure policy: no sockets. The socket loop in ``broker.py`` calls these methods
and sends whatever frames they tell it to.
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field
from typing import Any

MAX_REDELIVERIES = 3  # a request whose worker dies this many times is failed, not retried again
# Client requests queued for a service that has no worker, at most: past it a request is refused
# at once. Such requests wait only for their deadline, but a client that keeps sending to a
# service nobody serves (a typo in a loop, or many identities without CURVE) would otherwise
# hold memory until each expires. 1000 is far above what Distill's own clients queue while a
# worker starts (a handful) and bounds the wait to ~1000 small bodies per service name.
MAX_QUEUED_WITHOUT_WORKER = 1000


@dataclass(frozen=True)
class ClientOrigin:
    identity: bytes  # the client's ROUTER identity


@dataclass(frozen=True)
class JobOrigin:
    job_id: str


Origin = ClientOrigin | JobOrigin


@dataclass
class Request:
    id: int
    service: bytes
    body: list[bytes]
    origin: Origin
    arrived: float
    deadline: float | None  # None: waits for a worker for as long as it takes (jobs)
    deliveries: int = 0

    @property
    def reply_address(self) -> bytes:
        """The client address frame sent to the worker (RFC 7 REQUEST frame 4)."""
        if isinstance(self.origin, ClientOrigin):
            return self.origin.identity
        return b"distill.job:" + self.origin.job_id.encode()


@dataclass
class WorkerEntry:
    identity: bytes
    service: bytes
    meta: dict[str, Any]
    registered_at: float
    last_seen: float
    expiry: float
    current: Request | None = None
    current_since: float | None = None

    @property
    def worker_id(self) -> str:
        return self.identity.hex()

    @property
    def state(self) -> str:
        return "busy" if self.current is not None else "idle"

    def describe(self, now: float) -> dict[str, Any]:
        job = None
        if self.current is not None and isinstance(self.current.origin, JobOrigin):
            job = self.current.origin.job_id
        return {
            "id": self.worker_id,
            "service": self.service.decode(errors="replace"),
            "host": self.meta.get("host"),
            "pid": self.meta.get("pid"),
            "device": self.meta.get("device"),
            "device_name": self.meta.get("device_name"),
            "state": self.state,
            "current_request": self.current.id if self.current else None,
            "current_job": job,
            "busy_for_s": round(now - self.current_since, 3) if self.current_since else None,
            "last_heartbeat_age_s": round(now - self.last_seen, 3),
            "registered_s": round(now - self.registered_at, 3),
            "meta": self.meta,
        }


@dataclass
class Service:
    name: bytes
    idle: deque[bytes] = field(default_factory=deque)  # identities of idle workers, LRU first
    requests: deque[Request] = field(default_factory=deque)
    workers: set[bytes] = field(default_factory=set)
    client_queued: int = 0  # requests in ``requests`` from clients (jobs have their own cap)


class Registry:
    """Services, their workers and their queued requests."""

    def __init__(self, liveness_s: float,
                 max_queued_without_worker: int = MAX_QUEUED_WITHOUT_WORKER) -> None:
        self.liveness_s = liveness_s
        self.max_queued_without_worker = max_queued_without_worker
        self.workers: dict[bytes, WorkerEntry] = {}
        self.services: dict[bytes, Service] = {}
        self._ids = itertools.count(1)

    # --- services and requests ---------------------------------------------------------------
    def service(self, name: bytes) -> Service:
        svc = self.services.get(name)
        if svc is None:
            svc = self.services[name] = Service(name)
        return svc

    def has_workers(self, name: bytes) -> bool:
        svc = self.services.get(name)
        return bool(svc and svc.workers)

    def new_request(
        self, service: bytes, body: list[bytes], origin: Origin, now: float, timeout_s: float | None
    ) -> Request:
        deadline = None if timeout_s is None else now + timeout_s
        return Request(next(self._ids), service, body, origin, now, deadline)

    def refusal(self, name: bytes) -> str | None:
        """Why a new client request to service ``name`` may not be queued, or None if it may.

        Only a service with no worker is capped: one with workers drains its queue, and each
        client's requests in flight are bounded apart (``access.OutstandingCounter``)."""
        svc = self.services.get(name)
        if svc is None or svc.workers or svc.client_queued < self.max_queued_without_worker:
            return None
        return (f"service {name.decode(errors='replace')!r} has no worker and already "
                f"{svc.client_queued} requests waiting for one (the cap is "
                f"{self.max_queued_without_worker}, DISTILL_MAX_QUEUED_WITHOUT_WORKER): start a "
                "worker for it, or check the service name")

    def enqueue(self, request: Request, *, front: bool = False) -> None:
        svc = self.service(request.service)
        if isinstance(request.origin, ClientOrigin):
            svc.client_queued += 1
        if front:
            svc.requests.appendleft(request)
        else:
            svc.requests.append(request)

    def dispatch(self, name: bytes, now: float) -> list[tuple[WorkerEntry, Request]]:
        """Pair queued requests with idle workers of a service; marks those workers busy."""
        svc = self.services.get(name)
        pairs: list[tuple[WorkerEntry, Request]] = []
        while svc and svc.idle and svc.requests:
            worker = self.workers[svc.idle.popleft()]
            request = svc.requests.popleft()
            if isinstance(request.origin, ClientOrigin):
                svc.client_queued -= 1
            request.deliveries += 1
            worker.current, worker.current_since = request, now
            pairs.append((worker, request))
        self._prune(name)
        return pairs

    def cancel_queued(self, predicate: Any) -> list[Request]:
        """Remove queued requests for which ``predicate(request)`` is true."""
        removed: list[Request] = []
        for svc in self.services.values():
            keep = deque(r for r in svc.requests if not predicate(r))
            removed += [r for r in svc.requests if predicate(r)]
            svc.requests = keep
            svc.client_queued = sum(isinstance(r.origin, ClientOrigin) for r in keep)
        return removed

    def expire_requests(self, now: float) -> list[Request]:
        """Queued requests past their deadline, removed from their queues."""
        expired = self.cancel_queued(lambda r: r.deadline is not None and r.deadline <= now)
        for name in list(self.services):
            self._prune(name)
        return expired

    # --- workers -----------------------------------------------------------------------------
    def register(self, identity: bytes, service: bytes, meta: dict[str, Any], now: float) -> WorkerEntry:
        entry = WorkerEntry(identity, service, meta, now, now, now + self.liveness_s)
        self.workers[identity] = entry
        svc = self.service(service)
        svc.workers.add(identity)
        svc.idle.append(identity)
        return entry

    def touch(self, identity: bytes, now: float) -> WorkerEntry | None:
        entry = self.workers.get(identity)
        if entry is not None:
            entry.last_seen, entry.expiry = now, now + self.liveness_s
        return entry

    def complete(self, identity: bytes) -> Request | None:
        """The worker replied: return the request it held and make it idle again."""
        entry = self.workers[identity]
        request, entry.current, entry.current_since = entry.current, None, None
        self.service(entry.service).idle.append(identity)
        return request

    def remove(self, identity: bytes) -> Request | None:
        """Forget a worker; returns the request it held (to be redelivered or failed)."""
        entry = self.workers.pop(identity, None)
        if entry is None:
            return None
        svc = self.services.get(entry.service)
        if svc is not None:
            svc.workers.discard(identity)
            if identity in svc.idle:
                svc.idle.remove(identity)
            self._prune(entry.service)
        return entry.current

    def expired_workers(self, now: float) -> list[WorkerEntry]:
        return [w for w in self.workers.values() if w.expiry <= now]

    def _prune(self, name: bytes) -> None:
        # An empty service with no workers and no requests is forgotten, so garbage service names
        # from the wire never accumulate.
        svc = self.services.get(name)
        if svc is not None and not svc.workers and not svc.requests:
            del self.services[name]

    def queued_count(self) -> int:
        return sum(len(s.requests) for s in self.services.values())
