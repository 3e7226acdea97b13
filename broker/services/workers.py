"""``distill.workers``: the registered workers and the requests queued per service."""

from __future__ import annotations

import os
import time

from distill.broker.registry import Registry
from distill.broker.services.common import ok_body
from distill.shared.version import distill_version


class WorkersService:
    def __init__(self, registry: Registry) -> None:
        self.registry = registry

    def serve(self, identity: bytes, body: list[bytes]) -> list[bytes]:
        now = time.monotonic()
        workers = [w.describe(now) for w in self.registry.workers.values()]
        workers.sort(key=lambda w: (w["service"], w["id"]))
        queued = {s.name.decode(errors="replace"): len(s.requests)
                  for s in self.registry.services.values()}
        # broker_pid: which broker answers at an endpoint (`distill up` waits for its own)
        return ok_body({"workers": workers, "queued": queued, "broker_pid": os.getpid(),
                        "broker_version": distill_version()})
