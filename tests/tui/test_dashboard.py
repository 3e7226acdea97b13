"""The dashboard against a real broker: it lists the workers, shows the events, says
"disconnected" when the broker stops and recovers by itself when it comes back."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from textual.widgets import DataTable, RichLog, Static

from distill.shared.bus import protocol as P
from distill.tui.app import DistillApp
from distill.tui.link import EventBuffer, LinkConfig
from distill.tui.screens.dashboard import log_worthy
from tests.conftest import Cluster
from tests.tui.conftest import until


def connection_text(app: DistillApp) -> str:
    return str(app.screen.query_one("#connection", Static).render())


def table_column(app: DistillApp, selector: str, column: int) -> list[str]:
    table = app.screen.query_one(selector, DataTable)
    return [str(table.get_row_at(i)[column]) for i in range(table.row_count)]


def test_a_stopped_broker_is_noticed_within_one_heartbeat_by_design() -> None:
    cfg = LinkConfig()
    # A poll that gets no answer costs its timeout plus an mmi.service question as long.
    assert cfg.poll_s + 2 * cfg.poll_timeout_s < P.HEARTBEAT_INTERVAL_S


def test_event_buffer_caps_batches_and_counts_what_it_dropped() -> None:
    buf = EventBuffer(capacity=10, batch=4)
    for i in range(15):
        buf.add({"seq": i})
    batch, dropped = buf.take()
    assert [e["seq"] for e in batch] == [5, 6, 7, 8] and dropped == 5
    batch, dropped = buf.take()
    assert [e["seq"] for e in batch] == [9, 10, 11, 12] and dropped == 0
    assert buf.received == 15 and len(buf) == 2


def test_the_log_keeps_the_latest_progress_of_each_topic_per_batch() -> None:
    events = [{"topic": "job.a", "type": "progress", "fraction": f / 10} for f in range(5)]
    events += [{"topic": "job.a", "type": "metrics", "row": {}},
               {"topic": "job.b", "type": "progress", "fraction": 0.5},
               {"topic": "job.a", "type": "status", "status": "running"}]
    kept = log_worthy(events)
    assert [(e["topic"], e["type"]) for e in kept] == [
        ("job.a", "progress"), ("job.a", "metrics"), ("job.b", "progress"), ("job.a", "status")]
    assert kept[0]["fraction"] == 0.4


@pytest.mark.slow
async def test_dashboard_lists_workers_and_jobs(module_cluster: Cluster) -> None:
    module_cluster.start_broker()
    module_cluster.start_worker("echo")
    module_cluster.start_worker("sleep")
    with module_cluster.client() as c:
        job = c.request(P.SERVICE_JOBS, {"op": "submit", "service": "distill.sleep",
                                         "params": {"seconds": 0.2}})
    app = DistillApp(module_cluster.endpoint)
    async with app.run_test(size=(120, 40)) as pilot:
        await until(pilot, lambda: "connected to" in connection_text(app), what="connected")
        await until(pilot, lambda: sorted(table_column(app, "#workers", 0)) == ["distill.sleep", "echo"],
                    what="both workers listed")
        await until(pilot, lambda: job["id"] in table_column(app, "#jobs", 0), what="the job listed")
        log = app.screen.query_one("#events", RichLog)
        await until(pilot, lambda: any(job["id"] in line.text for line in log.lines),
                    what="the job's events in the log",
                    detail=lambda: f"{app.link.events.received} events received, "
                                   f"{app.events_delivered} delivered, log {len(log.lines)} lines")


@pytest.mark.slow
async def test_disconnected_then_recovers_by_itself(cluster: Cluster) -> None:
    cluster.start_broker()
    cluster.start_worker("echo")
    app = DistillApp(cluster.endpoint)
    async with app.run_test(size=(80, 24)) as pilot:
        await until(pilot, lambda: table_column(app, "#workers", 0) == ["echo"], what="worker listed")
        assert cluster.broker is not None
        cluster.broker.stop()
        await until(pilot, lambda: "disconnected" in connection_text(app), what="disconnected shown")
        assert app.connected is False
        # and why, once a fresh socket's monitor knows (the first poll only timed out)
        await until(pilot, lambda: "nothing accepts connections there" in connection_text(app),
                    what="the reason shown")
        # The screen still answers keys while the broker is away.
        await pilot.press("question_mark")
        assert type(app.screen).__name__ == "HelpScreen"
        await pilot.press("escape")
        cluster.start_broker()
        await until(pilot, lambda: "connected to" in connection_text(app), what="reconnected")
        await until(pilot, lambda: table_column(app, "#workers", 0) == ["echo"], 30,
                    what="the worker registered again")
        events: list[dict[str, Any]] = []
        app.screens_listening.append(_Recorder(events))  # type: ignore[arg-type]
        with cluster.client() as c:
            c.request(P.SERVICE_JOBS, {"op": "submit", "service": "distill.sleep", "params": {}})
        await until(pilot, lambda: any(e.get("type") == "status" for e in events), 30,
                    what="events flow again after the restart")


class _Recorder:
    """Stands in for a screen: keeps the events the app hands out."""

    def __init__(self, sink: list[dict[str, Any]]) -> None:
        self.sink = sink

    def post_message(self, message: Any) -> bool:
        self.sink.extend(getattr(message, "events", []))
        return True


async def test_the_cursor_stays_on_its_job_when_a_new_job_arrives() -> None:
    """Before: the table kept the cursor's row index; jobs are listed newest first, so each
    new job moved another job under the cursor and enter opened that one."""
    jobs = [{"id": f"j-{n:04d}", "service": "distill.sleep", "status": "queued"} for n in range(9, 0, -1)]
    app = DistillApp("tcp://gpu-box:5555", connect=False)
    async with app.run_test(size=(120, 40)) as pilot:
        app.set_cluster([], {}, jobs)
        await pilot.pause()
        table = app.screen.query_one("#jobs", DataTable)
        table.focus()
        await pilot.press("down", "down", "down")
        assert table_column(app, "#jobs", 0)[table.cursor_row] == "j-0006"
        app.set_cluster([], {}, [{"id": "j-0010", "service": "distill.sleep", "status": "queued"}, *jobs])
        await pilot.pause()
        assert table_column(app, "#jobs", 0)[table.cursor_row] == "j-0006"
        app.set_cluster([], {}, [j for j in jobs if j["id"] != "j-0006"])  # gone: the same place
        await pilot.pause()
        assert table.cursor_row == 4


async def test_a_shared_brokers_jobs_show_whose_they_are() -> None:
    """Under CURVE each job has an owner: the list says whose (a revoked key's as such); without
    owners (a broker without CURVE) the column is not there."""
    plain = [{"id": "j-0001", "service": "distill.sleep", "status": "queued"}]
    owned = [{"id": "j-0003", "service": "distill.train.prior", "status": "running",
              "owner": "k1", "owner_file": "clients/laptop.key",
              "owner_name": "'clients/laptop.key' (k1)"},
             {"id": "j-0002", "service": "distill.sleep", "status": "failed", "owner": "k2",
              "owner_file": None,
              "owner_name": "k2 (no longer a client key: anyone may manage its jobs)"}, *plain]
    app = DistillApp("tcp://gpu-box:5555", connect=False)
    async with app.run_test(size=(120, 40)) as pilot:
        app.set_cluster([], {}, plain)
        await pilot.pause()
        table = app.screen.query_one("#jobs", DataTable)
        assert [str(c.label) for c in table.columns.values()] == ["id", "kind", "status", "progress", "ETA"]
        app.set_cluster([], {}, owned)
        await pilot.pause()
        assert str(list(table.columns.values())[-1].label) == "owner"
        assert table_column(app, "#jobs", 5) == ["laptop", "(revoked)", "-"]


async def _slow_request_on_its_way(app: DistillApp, pilot: Any,
                                   seconds: float) -> asyncio.Future[Any]:  # fmt: skip
    """The app connected to a cluster with a sleep worker, and a request of ``seconds`` to it
    on its way through the inference connection (it stands in for an encode)."""
    await until(pilot, lambda: "connected to" in connection_text(app), what="connected")
    slow = asyncio.ensure_future(app.infer_client.request(
        "distill.sleep", {"seconds": seconds}, timeout_s=300))  # fmt: skip
    await pilot.pause(0.5)  # on its way
    return slow


@pytest.mark.slow
async def test_a_long_inference_request_does_not_hold_the_screens_requests(
    module_cluster: Cluster,
) -> None:
    """Before: every screen shared one client, which sends one request at a time: a cancel
    on the training screen waited 147 s behind a 14-s encode in the editor. Inference requests
    now have a connection of their own."""
    module_cluster.start_broker()
    module_cluster.start_worker("sleep")
    app = DistillApp(module_cluster.endpoint)
    async with app.run_test(size=(120, 40)) as pilot:
        slow = await _slow_request_on_its_way(app, pilot, 20.0)
        counts = await app.client.request(P.SERVICE_JOBS, {"op": "counts"}, timeout_s=10)
        assert isinstance(counts, dict) and not slow.done()  # answered while the other waits
        slow.cancel()


@pytest.mark.slow
async def test_requests_on_their_way_fail_when_the_broker_is_lost(module_cluster: Cluster) -> None:
    """Before: a request lost with a restarting broker held its screen until its timeout (up
    to 300 s for a generate); the link's "disconnected" now fails it at once, with why."""
    from distill.shared.errors import RequestTimeout

    module_cluster.start_broker()
    module_cluster.start_worker("sleep")
    app = DistillApp(module_cluster.endpoint)
    async with app.run_test(size=(120, 40)) as pilot:
        lost = await _slow_request_on_its_way(app, pilot, 30.0)
        app.set_connection(False, "no broker answered")  # what the link says when it is gone
        with pytest.raises(RequestTimeout, match="its reply is lost: try again"):
            await asyncio.wait_for(lost, 10)


async def test_a_request_to_a_service_with_no_worker_is_refused_at_once() -> None:
    """Before: generate with no inference worker said "generating…" for the 30 s of the
    broker's request timeout before it said there was none."""
    from distill.shared.errors import DistillError

    app = DistillApp("tcp://gpu-box:5555", connect=False)
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.press("g")
        screen = app.screen
        screen.check_worker("distill.infer")  # type: ignore[attr-defined]  # nothing polled yet
        app.set_connection(True)
        app.set_cluster([{"service": "distill.train.prior", "id": "w1"}], {}, [])
        with pytest.raises(DistillError, match="no distill.infer worker is registered"):
            screen.check_worker("distill.infer")  # type: ignore[attr-defined]
        app.set_cluster([{"service": "distill.infer", "id": "w2"}], {}, [])
        screen.check_worker("distill.infer")  # type: ignore[attr-defined]


LONG_ERROR = ("failed after 3 attempts: " + "; ".join(
    f"attempt {n}: RuntimeError: [red]boom[/red] while reading chunk {n} of the set" for n in (1, 2, 3))
    + "\nsecond line: the worker's own words, ending here: THE-REASON-ENDS")


def screen_text(app: DistillApp) -> str:
    """What the screen shows, as plain text (lines joined with spaces: wrapped words rejoin)."""
    strips = app.screen._compositor.render_strips()
    return " ".join("".join(seg.text for seg in strip).strip() for strip in strips)


async def test_the_dashboard_shows_why_the_job_under_the_cursor_failed() -> None:
    """Before: the jobs table had no room for a reason and nothing else showed it: a failed
    job's "why" was on no screen of the dashboard."""
    jobs = [{"id": "j-0002", "service": "distill.sleep", "status": "running"},
            {"id": "j-0001", "service": "distill.sleep", "status": "failed", "error": LONG_ERROR}]
    app = DistillApp("tcp://gpu-box:5555", connect=False)
    async with app.run_test(size=(80, 24)) as pilot:
        app.set_cluster([], {}, jobs)
        await pilot.pause()
        assert "THE-REASON" not in screen_text(app)  # the running job under the cursor: none
        app.screen.query_one("#jobs", DataTable).focus()
        await pilot.press("down")
        await pilot.pause()
        shown = screen_text(app)
        assert "j-0001 failed: failed after 3 attempts" in shown and "[red]boom[/red]" in shown
        detail = app.screen.query_one("#job-detail")
        assert detail.region.height > 1  # wrapped, not cut at 80 columns
        detail.scroll_end(animate=False)  # past a few lines it scrolls
        await pilot.pause()
        assert "THE-REASON-ENDS" in screen_text(app)
        await pilot.press("up")
        await pilot.pause()
        assert "THE-REASON" not in screen_text(app) and not detail.display
