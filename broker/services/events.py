"""``distill.events``: the snapshot half of snapshot-then-stream (the Clone pattern).

A subscriber subscribes to the event port first, then asks for the latest event of each
(topic, type) under its prefixes and the sequence number they stand at, and drops stream
events at or below it: no gap, no duplicate.
"""

from __future__ import annotations

from distill.broker.hub import EventHub
from distill.broker.services.common import ok_body
from distill.shared.bus.codec import unpack_map
from distill.shared.errors import DecodeError


class EventsService:
    def __init__(self, hub: EventHub) -> None:
        self.hub = hub

    def serve(self, identity: bytes, body: list[bytes]) -> list[bytes]:
        msg = unpack_map(body[0])
        if msg.get("op") != "snapshot":
            raise DecodeError(f"distill.events has no op {msg.get('op')!r} (ops: snapshot)")
        prefixes = msg.get("prefixes", [""])
        if not isinstance(prefixes, list) or not all(isinstance(p, str) for p in prefixes):
            raise DecodeError("prefixes must be a list of strings")
        return ok_body(self.hub.snapshot(prefixes))
