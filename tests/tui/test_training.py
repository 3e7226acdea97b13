"""The dataset and training screens against a real cluster with a tiny model: a folder is
uploaded and preprocessed with every file accounted for; a training run started from the form
shows progress and a heatmap that changes per epoch; cancel and retry work; a screen opened in
the middle of a run draws the history from the job record."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from textual.widgets import DataTable, Input, Select, Static

from distill.shared.bus import protocol as P
from distill.tui.app import DistillApp
from distill.tui.screens.dataset import DatasetScreen
from distill.tui.screens.training import TrainingScreen
from distill.tui.widgets.heatmap import CodebookHeatmap
from tests.conftest import Cluster, percussion_dir
from tests.tui.conftest import notices, until

pytestmark = [pytest.mark.slow]

FILES = ["bd_808.flac", "bd_haus.flac", "sn_dub.flac", "hat_bdu.flac", "drum_cymbal_open.flac",
         "tabla_na.flac"]
TINY_MODEL = "channels=32 latent_dim=16 blocks=1"
TINY_TRAIN = "batch_size=8 preview_every=0 patience=0 warmup_steps=4"


@pytest.fixture(scope="module")
def cluster(module_cluster: Cluster) -> Cluster:
    module_cluster.start_broker()
    module_cluster.start_worker("preprocess")
    module_cluster.start_worker("vqvae")
    return module_cluster


@pytest.fixture(scope="module")
def sounds(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("sounds")
    for name in FILES:
        (folder / name).write_bytes((percussion_dir() / name).read_bytes())
    (folder / "README.txt").write_text("not a sound\n")
    return folder


async def _upload(app: DistillApp, pilot: Any, folder: Path) -> str:
    await pilot.press("s")
    screen = app.screen
    assert isinstance(screen, DatasetScreen)
    screen.query_one("#folder", Input).value = str(folder)
    screen.action_upload()
    table = screen.query_one("#manifest", DataTable)
    await until(pilot, lambda: table.row_count == len(FILES) + 1, 120, what="the manifest")
    rows = [[str(c) for c in table.get_row_at(i)] for i in range(table.row_count)]
    skipped = [r for r in rows if r[1] != "ok"]
    assert [r[0] for r in skipped] == ["README.txt"] and skipped[0][5], rows
    assert "skipped" in str(screen.query_one("#summary", Static).render())
    return str(app.last_dataset)


async def test_upload_then_train_with_progress_heatmap_cancel_and_retry(cluster: Cluster,
                                                                         sounds: Path) -> None:
    app = DistillApp(cluster.endpoint)
    async with app.run_test(size=(160, 48)) as pilot:
        dataset = await _upload(app, pilot, sounds)
        assert len(dataset) == 64
        await pilot.press("t")
        screen = app.screen
        assert isinstance(screen, TrainingScreen)
        assert screen.query_one("#dataset", Input).value == dataset  # carried over
        screen.query_one("#stage", Select).value = "vqvae"
        screen.query_one("#epochs", Input).value = "5000"  # cancelled long before its end
        screen.query_one("#codebook-size", Input).value = "16"
        screen.query_one("#levels-opt", Input).value = "2"
        screen.query_one("#model-opts", Input).value = TINY_MODEL
        screen.query_one("#train-opts", Input).value = TINY_TRAIN
        screen.action_start()
        await until(pilot, lambda: screen.job_id is not None, 30, what="the job submitted")
        heatmap = screen.query_one("#heatmap", CodebookHeatmap)
        seen: list[list[list[float]]] = []

        def usage_changed() -> bool:
            if heatmap.usage and (not seen or seen[-1] != heatmap.usage):
                seen.append(heatmap.usage)
            return len(seen) >= 2

        await until(pilot, usage_changed, 180, what="the heatmap to change between epochs")
        assert len(heatmap.usage) == 2 and len(heatmap.usage[0]) == 16
        line = str(screen.query_one("#job-line", Static).render())
        assert "running" in line and "epoch" in line and "ETA" in line, line
        assert screen.query_one("#levels", DataTable).row_count == 2
        epochs_shown = len(screen.rows)

        # A second app opened mid-run draws the whole history from the job record.
        job_id = screen.job_id
        assert job_id is not None
        late = DistillApp(cluster.endpoint)
        async with late.run_test(size=(80, 24)) as late_pilot:
            await late.open_training(job_id)
            late_screen = late.screen
            assert isinstance(late_screen, TrainingScreen)
            await until(late_pilot, lambda: len(late_screen.rows) >= epochs_shown, 60,
                        what="the history from the record")
            assert [r["epoch"] for r in late_screen.rows] == list(range(1, len(late_screen.rows) + 1))

        screen.set_focus(None)  # the key, not a letter typed into a form field
        await pilot.press("c")
        await until(pilot, lambda: screen.record.get("status") == "cancelled", 60, what="cancelled",
                    detail=lambda: (f"status {screen.record.get('status')}, cancel requested "
                                    f"{screen.record.get('cancel_requested')}, focus "
                                    f"{app.focused!r}"))  # fmt: skip
        # A reply older than the events already applied (the worker stopped at once, its
        # "cancelled" came down the stream first) no longer puts "running" back for good.
        real = screen.distill.client.request

        async def stale_cancel(service: Any, body: dict[str, Any], **kw: Any) -> Any:
            if body.get("op") == "cancel":
                return {"id": job_id, "status": "running", "cancel_requested": True}
            return await real(service, body, **kw)

        screen.distill.client.request = stale_cancel  # type: ignore[method-assign]
        try:
            await screen._job_op("cancel")
        finally:
            screen.distill.client.request = real  # type: ignore[method-assign]
        assert screen.record.get("status") == "cancelled", screen.record
        screen.set_focus(None)
        await pilot.press("r")
        await until(pilot, lambda: screen.record.get("status") in ("queued", "running"), 30,
                    what="queued again after retry")
        with cluster.client() as c:
            c.request(P.SERVICE_JOBS, {"op": "cancel", "id": job_id})


def _preprocess_jobs(cluster: Cluster) -> list[str]:
    with cluster.client() as c:
        jobs = c.request(P.SERVICE_JOBS, {"op": "list"})["jobs"]
    return [j["id"] for j in jobs if j["service"] == "distill.preprocess"]


async def test_u_twice_uploads_once(cluster: Cluster, tmp_path: Path) -> None:
    """Before: the second ``u`` started a second upload beside the first (a thread is not
    stopped by cancelling its worker): two preprocess jobs, one status line for both."""
    for name in FILES[:2]:
        (tmp_path / name).write_bytes((percussion_dir() / name).read_bytes())
    before = _preprocess_jobs(cluster)
    app = DistillApp(cluster.endpoint)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("s")
        screen = app.screen
        assert isinstance(screen, DatasetScreen)
        screen.query_one("#folder", Input).value = str(tmp_path)
        # both before the loop turns: the first upload cannot have ended (its steps go
        # through the loop), as keys pressed in a row could let it on two tiny files
        screen.action_upload()
        screen.action_upload()
        await until(pilot, lambda: any("already" in m for m in notices(app)), 5, what="the refusal")
        table = screen.query_one("#manifest", DataTable)
        await until(pilot, lambda: table.row_count == 2, 120, what="the manifest")
        await pilot.pause(1.0)  # a second upload would have submitted by now
    assert len(_preprocess_jobs(cluster)) == len(before) + 1
