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
from collections.abc import Callable
from typing import Any

from distill.shared.bus.codec import pack, unpack_map
from distill.shared.errors import DecodeError

MAX_TOPIC_BYTES = 255
MAX_EVENT_BYTES = 1024 * 1024
MAX_LATEST = 20_000  # (topic, type) pairs kept for snapshots; the oldest are dropped beyond
MAX_LATEST_BYTES = 64 * 1024 * 1024  # and their packed bytes (events may be up to 1 MiB each)
# A finished job's last events are kept this long for late joiners, then forgotten (a viewer
# that comes later reads the job's record, as `jobs watch` does); at most this many finished
# jobs' at a time. Before, every job's stayed until the 20 000-pair cap: a broker that had run
# 10 000 jobs of 100-file datasets held ~640 MB, and each subscription scanned it all.
FINISHED_KEEP_S = 15 * 60
MAX_FINISHED_TOPICS = 2_000
FINAL_STATUSES = frozenset({"succeeded", "failed", "cancelled"})
# A snapshot reply keeps the newest events up to this many packed bytes: well below the
# clients' message limit even when many large events are remembered.
MAX_SNAPSHOT_BYTES = 4 * 1024 * 1024


class EventHub:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.epoch = secrets.token_hex(8)  # this broker run; sequence numbers are per epoch
        self.seq = 0
        self._clock = clock
        self._latest: OrderedDict[tuple[str, str], dict[str, Any]] = OrderedDict()
        self._sizes: dict[tuple[str, str], int] = {}  # packed bytes of each remembered event
        self._types: dict[str, set[str]] = {}  # the types remembered of each topic
        self.latest_bytes = 0
        # job topics whose last status was final, oldest first, with when it came
        self._finished: OrderedDict[str, float] = OrderedDict()

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
        frames = [topic.encode(), pack(stamped)]
        self._drop(key)
        self._latest[key] = stamped
        self._types.setdefault(topic, set()).add(key[1])
        self._sizes[key] = len(frames[1])
        self.latest_bytes += len(frames[1])
        while len(self._latest) > MAX_LATEST or self.latest_bytes > MAX_LATEST_BYTES:
            self._drop(next(iter(self._latest)))
        if stamped["type"] == "status" and topic.startswith("job."):
            self._finished.pop(topic, None)  # a retry makes it live again
            if event.get("status") in FINAL_STATUSES:
                self._finished[topic] = self._clock()
        self.sweep()
        return stamped, frames

    def _drop(self, key: tuple[str, str]) -> None:
        if self._latest.pop(key, None) is not None:
            self.latest_bytes -= self._sizes.pop(key)
            types = self._types[key[0]]
            types.discard(key[1])
            if not types:
                del self._types[key[0]]

    def forget(self, topic: str) -> None:
        for kind in list(self._types.get(topic, ())):
            self._drop((topic, kind))
        self._finished.pop(topic, None)

    def remembered(self) -> int:
        """How many (topic, type) events are kept for snapshots."""
        return len(self._latest)

    def sweep(self) -> None:
        """Forget the events of jobs finished over FINISHED_KEEP_S ago (and of the oldest
        finished beyond MAX_FINISHED_TOPICS)."""
        now = self._clock()
        while self._finished:
            topic, at = next(iter(self._finished.items()))
            if now - at < FINISHED_KEEP_S and len(self._finished) <= MAX_FINISHED_TOPICS:
                break
            self.forget(topic)

    def snapshot(self, prefixes: list[str]) -> dict[str, Any]:
        """Latest events whose topic starts with any prefix (all for ``[""]``), the seq and the
        epoch they stand at."""
        self.sweep()
        starts = tuple(prefixes)
        found = [(e["seq"], key) for key, e in self._latest.items() if key[0].startswith(starts)]
        found.sort(reverse=True)
        kept, size = [], 0
        for _, key in found:  # newest first, while they fit; one too big to fit is skipped
            if size + self._sizes[key] > MAX_SNAPSHOT_BYTES:
                continue
            size += self._sizes[key]
            kept.append(self._latest[key])
        kept.reverse()
        return {"seq": self.seq, "broker_epoch": self.epoch, "events": kept,
                "truncated": len(kept) < len(found)}
