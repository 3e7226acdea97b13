"""The training screen reads a job's metric history in pages (``metric_count``, then
``metrics_page``), so a long run draws every epoch, not only the last page of them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from distill.broker.services.jobs import JobService
from distill.broker.store.journal import JobStore
from distill.shared.bus import protocol as P
from distill.shared.bus.codec import pack, unpack_map
from distill.shared.errors import RequestError
from distill.tui.app import DistillApp
from distill.tui.screens.training import TrainingScreen
from tests.broker.services.test_job_service import FakeHost
from tests.tui.conftest import until

EPOCHS = 2_345  # more than two pages of the broker's 1000 rows


class JobsOnlyClient:
    """The app's asyncio client, answered by a real JobService (no sockets); the artifact
    service has no previews. Records every request body."""

    def __init__(self, jobs: JobService) -> None:
        self.jobs = jobs
        self.sent: list[dict[str, Any]] = []

    async def request(self, service: str | bytes, body: dict[str, Any], **_: Any) -> Any:
        self.sent.append(body)
        if service in (P.SERVICE_ARTIFACTS, P.SERVICE_ARTIFACTS.decode()):
            return {"artifacts": [], "start": 0, "more": False}
        reply = unpack_map(self.jobs.serve(b"ui", [pack(body)])[0])
        if not reply["ok"]:
            raise RequestError(reply["error"]["message"], reply["error"]["code"])
        return reply["result"]

    def close(self) -> None:
        pass


async def test_a_long_history_is_read_in_pages_and_drawn_whole(tmp_path: Path) -> None:
    """Before: one ``get`` with its rows, which holds the latest 1000 only: epochs 1..1345
    were missing from the curves."""
    jobs = JobService(FakeHost(), JobStore(tmp_path / "jobs.sqlite3"))
    job_id = jobs.store.submit("distill.train.vqvae", {}).id
    for epoch in range(1, EPOCHS + 1):
        row = {
            "epoch": epoch,
            "epochs": EPOCHS,
            "train_recon": 1.0 / epoch,
            "val_recon": 1.1 / epoch,
        }
        jobs.store.append_metrics(job_id, row)
    app = DistillApp("tcp://gpu-box:5555", connect=False)
    client = JobsOnlyClient(jobs)
    app.client = client  # type: ignore[assignment]
    async with app.run_test(size=(80, 24)) as pilot:
        await app.open_training(job_id)
        screen = app.screen
        assert isinstance(screen, TrainingScreen)
        await until(pilot, lambda: not screen.loading, 60, what="the history to load")
        assert [r["epoch"] for r in screen.rows] == list(range(1, EPOCHS + 1))
    ops = [body["op"] for body in client.sent if "op" in body and body.get("id") == job_id]
    assert ops == ["get", "metrics_page", "metrics_page", "metrics_page"]
    assert next(b for b in client.sent if b["op"] == "get")["metrics"] is False
