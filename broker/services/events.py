"""``distill.events``: the snapshot half of snapshot-then-stream (the Clone pattern).

A subscriber subscribes to the event port first, then asks for the latest event of each
(topic, type) under its prefixes and the sequence number they stand at, and drops stream
events at or below it: no gap, no duplicate.
"""

from __future__ import annotations

from distill.broker.hub import MAX_TOPIC_BYTES, EventHub
from distill.broker.services.common import ok_body
from distill.shared.bus.codec import unpack_map
from distill.shared.errors import DecodeError

MAX_PREFIXES = 64


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
        # Each remembered event is matched against every prefix on the broker's loop: a few
        # hundred thousand prefixes froze it for seconds (workers then declared it lost).
        if len(prefixes) > MAX_PREFIXES:
            raise DecodeError(f"prefixes holds {len(prefixes)} entries, over the limit of "
                              f"{MAX_PREFIXES}: ask for a shorter common prefix")
        if any(len(p) > MAX_TOPIC_BYTES for p in prefixes):
            raise DecodeError(f"a prefix is longer than a topic may be ({MAX_TOPIC_BYTES})")
        return ok_body(self.hub.snapshot(prefixes))
