"""The app's link to the broker: a poll loop that says whether the broker answers (and what
it holds), and an event subscription whose events are buffered and handed out in batches.

Both loops are asyncio coroutines that the app runs as Textual workers, so nothing here blocks
the screen. The poll uses its own client with a short timeout: a request that gets no answer
costs ``poll_timeout_s`` plus an ``mmi.service`` question of the same length, so a broker that
stops is seen as disconnected within ``poll_s + 2 * poll_timeout_s`` (2 s by default, under one
2.5 s heartbeat period).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from distill.shared.bus import protocol as P
from distill.shared.bus.aclient import AsyncClient
from distill.shared.errors import DistillError

TOPICS = ["job.", "worker.", "broker"]
SUBSCRIBE_TIMEOUT_S = 5.0  # a busy broker on a loaded machine still answers the hello and snapshot


@dataclass(frozen=True)
class LinkConfig:
    poll_s: float = 0.5  # a broker that stops is noticed within one heartbeat (module docstring)
    poll_timeout_s: float = 0.75  # a loaded loopback broker answers in milliseconds
    jobs_shown: int = 50  # the newest jobs the dashboard lists; the rest stay in the journal
    retry_s: float = 0.5  # pause before a new event subscription after one failed
    buffer_events: int = 5000  # events held between two refresh ticks; older ones are dropped
    batch_events: int = 500  # events handed to the screens per tick (the rest wait or drop)


class EventBuffer:
    """Events between two refresh ticks. ``take`` returns at most ``batch`` of them and how many
    were dropped because the buffer overflowed; screens that need every row of a job re-read it
    from the job record when anything was dropped."""

    def __init__(self, capacity: int, batch: int) -> None:
        self._events: deque[dict[str, Any]] = deque()
        self.capacity = capacity
        self.batch = batch
        self.dropped = 0
        self.received = 0

    def add(self, event: dict[str, Any]) -> None:
        self.received += 1
        if len(self._events) >= self.capacity:
            self._events.popleft()
            self.dropped += 1
        self._events.append(event)

    def take(self) -> tuple[list[dict[str, Any]], int]:
        n = min(len(self._events), self.batch)
        out = [self._events.popleft() for _ in range(n)]
        dropped, self.dropped = self.dropped, 0
        return out, dropped

    def __len__(self) -> int:
        return len(self._events)


class BrokerLink:
    """Poll and subscribe; report through callbacks (the app turns them into messages)."""

    def __init__(self, endpoint: str | None, config: LinkConfig | None = None) -> None:
        self.config = config or LinkConfig()
        self.poll_client = AsyncClient(endpoint, timeout_s=self.config.poll_timeout_s)
        self.endpoint = self.poll_client.endpoint
        self.events = EventBuffer(self.config.buffer_events, self.config.batch_events)
        self.connected: bool | None = None  # None until the first poll ends
        self.detail = ""  # why it is disconnected

    async def poll_once(self) -> tuple[list[dict[str, Any]], dict[str, int], list[dict[str, Any]]]:
        workers = await self.poll_client.request(P.SERVICE_WORKERS, {"op": "list"})
        jobs = await self.poll_client.request(
            P.SERVICE_JOBS, {"op": "list", "limit": self.config.jobs_shown})
        return list(workers["workers"]), dict(workers.get("queued") or {}), list(jobs["jobs"])

    async def poll_forever(self, on_state: Callable[[bool, str], None],
                           on_poll: Callable[[list[dict[str, Any]], dict[str, int],
                                              list[dict[str, Any]]], None]) -> None:
        while True:
            try:
                polled = await self.poll_once()
            except (DistillError, OSError) as e:
                self._set(False, getattr(e, "why", str(e)), on_state)  # why: without the endpoint
            else:
                self._set(True, "", on_state)
                on_poll(*polled)
            await asyncio.sleep(self.config.poll_s)

    def _set(self, connected: bool, detail: str, on_state: Callable[[bool, str], None]) -> None:
        """Report a change of state, or of why it is disconnected (the first failed poll of a
        broker that went away times out; the next, on a fresh socket, is told it is refused)."""
        if connected != self.connected or (not connected and detail != self.detail):
            self.connected, self.detail = connected, detail
            on_state(connected, detail)

    async def subscribe_forever(self) -> None:
        """Follow the event stream into the buffer; start over when the stream fails. The app
        also restarts this after a reconnection, because a restarted broker numbers its events
        from the start again (and the old subscription would drop them as already seen)."""
        client = AsyncClient(self.endpoint, timeout_s=SUBSCRIBE_TIMEOUT_S)
        try:
            while True:
                try:
                    async for event in client.subscribe(TOPICS, timeout_s=SUBSCRIBE_TIMEOUT_S):
                        self.events.add(event)
                except (DistillError, OSError):
                    client.close()
                    await asyncio.sleep(self.config.retry_s)
        finally:
            client.close()

    def close(self) -> None:
        self.poll_client.close()
