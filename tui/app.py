"""The Distill terminal UI: one app, one mode per screen (dashboard, dataset, training), a
link to the broker that polls and follows the event stream, and a refresh tick that hands
events to the screens in batches.

Run it with ``distill tui [--broker tcp://HOST:5555] [--serve]``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar

import numpy as np
from textual import work
from textual.app import App, SystemCommand
from textual.binding import Binding, BindingType
from textual.message import Message
from textual.screen import Screen

from distill.shared.bus.aclient import AsyncClient
from distill.tui.link import BrokerLink, LinkConfig
from distill.tui.messages import ClusterPolled, ConnectionChanged, EventsArrived
from distill.tui.screens.base import DistillScreen
from distill.tui.screens.dashboard import DashboardScreen
from distill.tui.screens.dataset import DatasetScreen
from distill.tui.screens.editor import EditorScreen
from distill.tui.screens.generate import GenerateScreen
from distill.tui.screens.help import HelpScreen
from distill.tui.screens.training import TrainingScreen

REFRESH_HZ = 20.0  # how often buffered events reach the screens: smooth, and at most 20 batches/s


class DistillApp(App[None]):
    TITLE = "Distill"
    CSS_PATH = "app.tcss"
    MODES: ClassVar[dict[str, Any]] = {
        "dashboard": DashboardScreen,
        "dataset": DatasetScreen,
        "training": TrainingScreen,
        "generate": GenerateScreen,
        "editor": EditorScreen,
    }
    BINDINGS: ClassVar[list[BindingType]] = [
        # Letters while no text field has focus (escape leaves one); F-keys always.
        Binding("d,f2", "switch_mode('dashboard')", "Dashboard"),
        Binding("s,f3", "switch_mode('dataset')", "Dataset"),
        Binding("t,f4", "switch_mode('training')", "Training"),
        Binding("g,f5", "switch_mode('generate')", "Generate"),
        Binding("e,f6", "switch_mode('editor')", "Editor"),
        Binding("question_mark,f1", "help", "Help", key_display="?"),
        Binding("escape", "leave_field", "Leave field", show=False),
        Binding("q", "quit", "Quit"),
    ]

    def __init__(self, broker: str | None = None, *, connect: bool = True,
                 link_config: LinkConfig | None = None) -> None:
        super().__init__()
        self.link = BrokerLink(broker, link_config)
        self.endpoint = self.link.endpoint
        self.connect = connect
        # Requests the screens make (submit, cancel, get): longer timeout than the poll's.
        self.client = AsyncClient(self.endpoint, timeout_s=30.0)
        # The inference worker's requests (encode, edit, generate) on a connection of their
        # own: a client sends one request at a time, and a 14-s encode held a cancel on the
        # training screen for 147 s behind it.
        self.infer_client = AsyncClient(self.endpoint, timeout_s=30.0)
        self.connected: bool | None = None
        self.cluster_workers: list[dict[str, Any]] = []
        self.polled = False  # cluster_workers holds a poll's answer (not only the empty start)
        self.cluster_queued: dict[str, int] = {}
        self.cluster_jobs: list[dict[str, Any]] = []
        self.screens_listening: list[DistillScreen] = []
        self.events_delivered = 0  # events handed to screens (the bench reads this)
        self.last_dataset: str | None = None  # the dataset screen sets it; the training form reads it
        self.last_generated: tuple[list[np.ndarray], int] | None = None  # (sounds, rate): for the editor

    def on_mount(self) -> None:
        self.sub_title = self.endpoint
        self.switch_mode("dashboard")
        if self.connect:
            self._poll()
            self._subscribe()
            self.set_interval(1.0 / REFRESH_HZ, self.flush_events)

    def on_unmount(self) -> None:
        self.link.close()
        self.client.close()
        self.infer_client.close()

    # --- the link -------------------------------------------------------------------------
    @work(group="poll", exclusive=True)
    async def _poll(self) -> None:
        await self.link.poll_forever(self._on_connection, self._on_poll)

    @work(group="events", exclusive=True)
    async def _subscribe(self) -> None:
        await self.link.subscribe_forever()

    def _on_connection(self, connected: bool, detail: str) -> None:
        was = self.connected
        if connected and was is False:
            self._subscribe()  # exclusive: the old subscription is cancelled (see link.py)
        self.set_connection(connected, detail)

    def _on_poll(self, workers: list[dict[str, Any]], queued: dict[str, int],
                 jobs: list[dict[str, Any]]) -> None:
        self.set_cluster(workers, queued, jobs)

    # --- state the screens read ----------------------------------------------------------
    def set_connection(self, connected: bool, detail: str = "") -> None:
        """Record the broker's state and tell every screen (tests feed this directly)."""
        if not connected and self.connected is not False:
            # what was on its way to the broker is lost with it: say so now, not at the end
            # of the request's timeout (up to minutes for an encode or a generate)
            reason = ("the broker stopped answering while this request was on its way; its "
                      "reply is lost: try again once it is back")  # fmt: skip
            self.client.abort_pending(reason)
            self.infer_client.abort_pending(reason)
        self.connected = connected
        self.sub_title = f"{self.endpoint} — {'connected' if connected else 'DISCONNECTED'}"
        self.broadcast(lambda: ConnectionChanged(connected, self.endpoint, detail))

    def set_cluster(self, workers: list[dict[str, Any]], queued: dict[str, int],
                    jobs: list[dict[str, Any]]) -> None:
        self.cluster_workers, self.cluster_queued, self.cluster_jobs = workers, queued, jobs
        self.polled = True
        self.broadcast(lambda: ClusterPolled(workers, queued, jobs))

    def deliver_events(self, events: list[dict[str, Any]], dropped: int = 0) -> None:
        self.events_delivered += len(events)
        self.broadcast(lambda: EventsArrived(events, dropped))

    def flush_events(self) -> None:
        events, dropped = self.link.events.take()
        if events or dropped:
            self.deliver_events(events, dropped)

    def broadcast(self, make: Any) -> None:
        """Post a fresh message to every screen that listens (one instance per screen:
        Textual messages carry per-delivery state)."""
        for screen in list(self.screens_listening):
            message: Message = make()
            screen.post_message(message)

    # --- navigation ---------------------------------------------------------------------
    def action_leave_field(self) -> None:
        self.screen.set_focus(None)

    def action_help(self) -> None:
        self.push_screen(HelpScreen())

    async def open_training(self, job_id: str) -> None:
        await self.switch_mode("training")  # the screen is mounted once this returns
        screen = self.screen
        if isinstance(screen, TrainingScreen):
            screen.show_job(job_id)

    def get_system_commands(self, screen: Screen[Any]) -> Iterable[SystemCommand]:
        yield from super().get_system_commands(screen)
        yield SystemCommand("Dashboard", "Workers, jobs and the event log",
                            lambda: self.switch_mode("dashboard"))
        yield SystemCommand("Dataset", "Upload and preprocess a folder of sounds",
                            lambda: self.switch_mode("dataset"))
        yield SystemCommand("Training", "Start, follow, cancel and retry training",
                            lambda: self.switch_mode("training"))
        yield SystemCommand("Generate", "Sample new sounds from a trained model",
                            lambda: self.switch_mode("generate"))
        yield SystemCommand("Code editor", "Encode a sound, edit its codes, listen",
                            lambda: self.switch_mode("editor"))
        yield SystemCommand("Help", "Keys and screens", self.action_help)



def run(broker: str | None = None) -> None:
    """Run the app in this terminal (the ``distill tui`` command)."""
    DistillApp(broker).run()
