"""``distill.workers``: the registered workers and the requests queued per service."""

from __future__ import annotations

import os
import time

from distill.broker.registry import Registry
from distill.broker.services.common import ok_body
from distill.shared.bus import protocol as P
from distill.shared.bus.codec import pack
from distill.shared.version import distill_version

MAX_REPLY_BYTES = P.MAX_MESSAGE_BYTES // 4


class WorkersService:
    def __init__(self, registry: Registry) -> None:
        self.registry = registry

    def serve(self, identity: bytes, body: list[bytes]) -> list[bytes]:
        now = time.monotonic()
        workers = [w.describe(now) for w in self.registry.workers.values()]
        workers.sort(key=lambda w: (w["service"], w["id"]))
        queued = {s.name.decode(errors="replace"): len(s.requests)
                  for s in self.registry.services.values()}
        # The reply must fit a message: 1200 workers of 16 KiB of metadata each made it too big
        # for any client (`distill workers` and `distill up` then timed out). Past the bound the
        # metadata goes (the rest of each entry stays), then the last workers (`truncated`).
        size = sum(len(pack(w)) for w in workers)
        truncated = False
        if size > MAX_REPLY_BYTES:
            for w in workers:
                w["meta"] = {}
            while workers and len(pack(workers)) > MAX_REPLY_BYTES:
                del workers[len(workers) // 2:]
                truncated = True
        # broker_pid: which broker answers at an endpoint (`distill up` waits for its own)
        return ok_body({"workers": workers, "queued": queued, "broker_pid": os.getpid(),
                        "broker_version": distill_version(), "truncated": truncated})
