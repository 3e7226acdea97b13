"""Event stamping and the latest-state cache (the Clone pattern's server side).

Workers publish ``[topic, msgpack map]``; the broker stamps each event with a sequence number
and the broker's time, remembers the latest event per (topic, type) for late joiners, and
republishes. Pure policy: the socket loop moves the frames.

Epochs. Sequence numbers start again at 1 when the broker restarts, so a number alone cannot
tell a viewer that an event is new. Each hub draws a random epoch id when it is made and
stamps it on every event and snapshot beside ``seq`` as ``broker_epoch`` (never ``epoch``, which
training events use for their own epochs): a subscriber that sees an epoch other
than its snapshot's knows the broker restarted and takes a fresh snapshot, instead of dropping
every event as already seen.
"""

from __future__ import annotations

import secrets
import time
from collections import OrderedDict
from typing import Any

from distill.shared.bus.codec import pack, unpack_map
from distill.shared.errors import DecodeError

MAX_TOPIC_BYTES = 255
MAX_EVENT_BYTES = 1024 * 1024
MAX_LATEST = 20_000  # (topic, type) pairs kept for snapshots; the oldest are dropped beyond
# A snapshot reply keeps the newest events up to this many packed bytes: well below the
# clients' message limit even when many large events are remembered.
MAX_SNAPSHOT_BYTES = 4 * 1024 * 1024


class EventHub:
    def __init__(self) -> None:
        self.epoch = secrets.token_hex(8)  # this broker run; sequence numbers are per epoch
        self.seq = 0
        self._latest: OrderedDict[tuple[str, str], dict[str, Any]] = OrderedDict()

    def parse(self, frames: list[bytes]) -> tuple[str, dict[str, Any]]:
        """Validate a published event; raise DecodeError for anything malformed."""
        if len(frames) != 2:
            raise DecodeError(f"an event has 2 frames (topic, body), got {len(frames)}")
        raw_topic, body = frames
        if not raw_topic or len(raw_topic) > MAX_TOPIC_BYTES:
            raise DecodeError("event topic must be 1..255 bytes")
        try:
            topic = raw_topic.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DecodeError("event topic is not utf-8") from e
        if len(body) > MAX_EVENT_BYTES:
            raise DecodeError(f"event body of {len(body)} bytes is over {MAX_EVENT_BYTES}")
        event = unpack_map(body, "event body")
        if not isinstance(event.get("type", ""), str):
            raise DecodeError("event type must be a string")
        return topic, event

    def stamp(self, topic: str, event: dict[str, Any]) -> tuple[dict[str, Any], list[bytes]]:
        """Give the event the next sequence number; remember it; return it and its frames."""
        self.seq += 1
        stamped = dict(event)
        stamped["seq"] = self.seq
        stamped["broker_epoch"] = self.epoch
        stamped["topic"] = topic
        stamped["type"] = str(event.get("type", "event"))
        stamped["broker_ts"] = time.time()
        key = (topic, stamped["type"])
        self._latest[key] = stamped
        self._latest.move_to_end(key)
        while len(self._latest) > MAX_LATEST:
            self._latest.popitem(last=False)
        return stamped, [topic.encode(), pack(stamped)]

    def forget(self, topic: str) -> None:
        for key in [k for k in self._latest if k[0] == topic]:
            del self._latest[key]

    def snapshot(self, prefixes: list[str]) -> dict[str, Any]:
        """Latest events whose topic starts with any prefix (all for ``[""]``), the seq and the
        epoch they stand at."""
        events = [
            e for (topic, _), e in self._latest.items() if any(topic.startswith(p) for p in prefixes)
        ]
        events.sort(key=lambda e: e["seq"], reverse=True)
        kept, size = [], 0
        for event in events:  # newest first, while they fit
            size += len(pack(event))
            if size > MAX_SNAPSHOT_BYTES:
                break
            kept.append(event)
        kept.reverse()
        return {"seq": self.seq, "broker_epoch": self.epoch, "events": kept,
                "truncated": len(kept) < len(events)}
