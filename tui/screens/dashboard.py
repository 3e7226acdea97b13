"""The dashboard: is the broker there, which workers serve what, which jobs run, what
happens (the event log)."""

from __future__ import annotations

from typing import Any

from textual import on
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import DataTable, Header, RichLog, Static

from distill.shared.bus.jobs import owner_label
from distill.shared.ids import escaped
from distill.tui.format import ago, event_line, job_progress, short_job
from distill.tui.messages import ClusterPolled, ConnectionChanged, EventsArrived
from distill.tui.screens.base import DistillScreen
from distill.tui.widgets.footer import Footer
from distill.tui.widgets.reason import Reason
from distill.tui.widgets.tables import fill_table

WORKER_COLUMNS = ("service", "host", "device", "state", "job", "heartbeat")
JOB_COLUMNS = ("id", "kind", "status", "progress", "ETA")
LOG_LINES = 500  # the log is a window on the stream; the job records hold the history


class DashboardScreen(DistillScreen):
    def __init__(self) -> None:
        super().__init__()
        self.jobs: list[dict[str, Any]] = []  # as the jobs table lists them

    def compose(self) -> ComposeResult:
        yield Header()
        yield Static("connecting…", id="connection", markup=False)
        with Vertical(id="tables"):
            yield DataTable(id="workers", cursor_type="row", zebra_stripes=True)
            yield DataTable(id="jobs", cursor_type="row", zebra_stripes=True)
            yield Reason(id="job-detail")  # why the job under the cursor failed (no column holds it)
        yield RichLog(id="events", max_lines=LOG_LINES, markup=False, wrap=False)
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#workers", DataTable).border_title = "workers"
        self.query_one("#jobs", DataTable).border_title = "jobs"
        self.query_one("#events", RichLog).border_title = "events"
        app = self.distill
        if app.connected is not None:
            self._show_connection(app.connected, "")
        self._fill(app.cluster_workers, app.cluster_queued, app.cluster_jobs)

    @on(ConnectionChanged)
    def _connection(self, message: ConnectionChanged) -> None:
        self._show_connection(message.connected, message.detail)

    def _show_connection(self, connected: bool, detail: str) -> None:
        box = self.query_one("#connection", Static)
        box.set_class(connected, "connected")
        box.set_class(not connected, "disconnected")
        if connected:
            box.update(f"● connected to {self.distill.endpoint}")
        else:
            # whole, wrapped (cut at 160 characters it stopped mid-word, "DISTILL_")
            box.update(f"✖ disconnected from {self.distill.endpoint} — retrying"
                       + (f" ({escaped(detail)})" if detail else ""))

    @on(ClusterPolled)
    def _polled(self, message: ClusterPolled) -> None:
        self._fill(message.workers, message.queued, message.jobs)

    def _fill(self, workers: list[dict[str, Any]], queued: dict[str, int],
              jobs: list[dict[str, Any]]) -> None:
        table = self.query_one("#workers", DataTable)
        rows = [(w.get("service", "?"), w.get("host") or "-", w.get("device") or "-",
                 w.get("state", "?"), short_job(w.get("current_job")),
                 ago(w.get("last_heartbeat_age_s"))) for w in workers]
        fill_table(table, WORKER_COLUMNS, rows, [str(w.get("id")) for w in workers])
        waiting = sum(queued.values())
        table.border_subtitle = f"{len(workers)} workers, {waiting} requests queued"
        jtable = self.query_one("#jobs", DataTable)
        owners = any(j.get("owner") for j in jobs)  # a shared broker under CURVE: whose job
        jrows = [(j["id"], j.get("service", "?").removeprefix("distill."), j.get("status", "?"),
                  *job_progress(j), *([owner_label(j)] if owners else [])) for j in jobs]
        fill_table(jtable, (*JOB_COLUMNS, *(["owner"] if owners else [])), jrows,
                   [j["id"] for j in jobs])
        self.jobs = jobs
        self._show_detail()

    @on(DataTable.RowHighlighted, "#jobs")
    def _show_detail(self) -> None:
        """The reason of the job under the cursor, when it has one (a failed job's), whole."""
        row = self.query_one("#jobs", DataTable).cursor_row
        job: dict[str, Any] = self.jobs[row] if 0 <= row < len(self.jobs) else {}
        error = job.get("error")
        detail = self.query_one("#job-detail", Reason)
        shown = detail.display
        detail.show(f"{job.get('id')} {job.get('status', '?')}: {error}" if error else "")
        if detail.display != shown:  # the table grows or shrinks: its cursor's row stays in view
            table = self.query_one("#jobs", DataTable)
            table.call_after_refresh(lambda: table.move_cursor(row=table.cursor_row))

    @on(EventsArrived)
    def _events(self, message: EventsArrived) -> None:
        log = self.query_one("#events", RichLog)
        lines = [line for line in map(event_line, log_worthy(message.events)[-LOG_LINES:]) if line]
        if message.dropped:
            lines.append(f"… {message.dropped} events not shown (too many at once)")
        if lines:
            log.write("\n".join(lines))

    @on(DataTable.RowSelected, "#jobs")
    async def _open_job(self, message: DataTable.RowSelected) -> None:
        if message.row_key.value:
            await self.distill.open_training(str(message.row_key.value))


def log_worthy(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The events of one batch that get a log line: all but progress, and of a topic's
    progress events only its latest (a fast job sends hundreds a second)."""
    last_progress = {e.get("topic"): i for i, e in enumerate(events) if e.get("type") == "progress"}
    return [e for i, e in enumerate(events)
            if e.get("type") != "progress" or last_progress.get(e.get("topic")) == i]
