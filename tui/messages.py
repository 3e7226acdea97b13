"""Messages the app posts to its screens. The bus link is the only producer of cluster
messages; a screen never talks to sockets itself except through the app's clients."""

from __future__ import annotations

from typing import Any

from textual.message import Message


class ConnectionChanged(Message, bubble=False):
    """The broker answered (``connected``) or stopped answering a poll."""

    def __init__(self, connected: bool, endpoint: str, detail: str = "") -> None:
        super().__init__()
        self.connected = connected
        self.endpoint = endpoint
        self.detail = detail


class ClusterPolled(Message, bubble=False):
    """One poll of the broker: registered workers, queued requests per service, recent jobs."""

    def __init__(self, workers: list[dict[str, Any]], queued: dict[str, int],
                 jobs: list[dict[str, Any]]) -> None:
        super().__init__()
        self.workers = workers
        self.queued = queued
        self.jobs = jobs


class EventsArrived(Message, bubble=False):
    """A batch of bus events, coalesced: at most one of these per refresh tick, however fast
    events come. Screens take what they need; the job record keeps every metric row."""

    def __init__(self, events: list[dict[str, Any]], dropped: int = 0) -> None:
        super().__init__()
        self.events = events
        self.dropped = dropped  # events left out of this batch (over the per-tick cap)
