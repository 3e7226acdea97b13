"""The dataset screen: choose a folder on this machine, upload it and preprocess it with
progress, then read the manifest: every file, used or skipped with its reason."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal
from textual.suggester import Suggester
from textual.widgets import Button, DataTable, Header, Input, Label, ProgressBar, Static
from textual.worker import Worker

from distill.shared.ids import escaped
from distill.tui.screens.base import DistillScreen
from distill.tui.widgets.footer import Footer
from distill.tui.widgets.reason import Reason
from distill.tui.widgets.tables import fill_table

MANIFEST_COLUMNS = ("file", "status", "split", "seconds", "chunks", "reason")


class FolderSuggester(Suggester):
    """Completes the last part of a path with a folder that exists on this machine."""

    def __init__(self) -> None:
        super().__init__(use_cache=False, case_sensitive=True)

    async def get_suggestion(self, value: str) -> str | None:
        return complete_folder(value)


def complete_folder(value: str) -> str | None:
    """``value`` completed to the first folder whose name starts with its last part."""
    if not value:
        return None
    path = Path(value).expanduser()
    parent, stem = (path, "") if value.endswith("/") else (path.parent, path.name)
    try:
        names = sorted(p.name for p in parent.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError:
        return None
    match = next((n for n in names if n.startswith(stem) and n != stem), None)
    return None if match is None else value + match[len(stem):] + "/"


class DatasetScreen(DistillScreen):
    AUTO_FOCUS = "#manifest"  # letters stay navigation keys until a field is chosen
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("u", "upload", "Upload + preprocess"),
    ]

    def compose(self) -> ComposeResult:
        yield Header()
        with Horizontal(classes="form row"):
            yield Label("folder")
            yield Input(placeholder="~/sounds/drums (→ accepts a suggested folder)", id="folder",
                        suggester=FolderSuggester())
            yield Button("Upload", id="upload", variant="primary")
        yield Static("choose a folder of sounds on this machine", id="dataset-status", markup=False,
                     classes="status-line")
        yield Reason(id="dataset-error")  # why the preprocess job failed, whole
        yield ProgressBar(id="progress", total=1.0, show_eta=False)
        yield DataTable(id="manifest", cursor_type="row", zebra_stripes=True)
        yield Static("", id="summary", classes="status-line", markup=False)
        yield Footer()

    def on_mount(self) -> None:
        table = self.query_one("#manifest", DataTable)
        table.border_title = "manifest"
        fill_table(table, MANIFEST_COLUMNS, [])

    def __init__(self) -> None:
        super().__init__()
        self.uploading: Worker[None] | None = None

    # --- actions ---------------------------------------------------------------------------
    def action_upload(self) -> None:
        # One upload at a time: a thread worker goes on when cancelled, so a second one would
        # upload again and submit a second preprocess job beside the first.
        if self.uploading is not None and not self.uploading.is_finished:
            self.notify("an upload is running already: wait for its manifest", severity="warning")
            return
        raw = self.query_one("#folder", Input).value.strip()
        if not raw:
            self.notify("type the folder to upload first", severity="warning")
            return
        folder = Path(raw).expanduser()
        if not folder.is_dir():
            self.notify(f"{folder}: not a folder on this machine", severity="error")
            return
        self.query_one("#manifest", DataTable).clear()
        self.query_one("#dataset-error", Reason).show("")  # the last upload's
        self.uploading = self.upload(folder)

    @on(Button.Pressed, "#upload")
    @on(Input.Submitted, "#folder")
    def _upload_pressed(self) -> None:
        self.action_upload()

    @work(thread=True, group="dataset")
    def upload(self, folder: Path) -> None:
        """Upload every file, submit the preprocess job, follow it: blocking calls, so in a
        thread; the screen gets each step through ``call_from_thread``."""
        from distill.shared.audio.io import left_out, scan_folder
        from distill.shared.bus.artifacts import ArtifactClient, artifact_name
        from distill.shared.bus.client import Client
        from distill.shared.bus.jobs import JobsClient
        from distill.shared.errors import DistillError

        call = self.app.call_from_thread
        try:
            paths = scan_folder(folder)
            skipped = left_out(folder)
            if skipped:  # in no manifest (nothing is uploaded): said here, as the CLI says it
                listed = "; ".join(f"{p.relative_to(folder).as_posix()}: {why}"
                                   for p, why in skipped[:20])
                more = f"; and {len(skipped) - 20} more" if len(skipped) > 20 else ""
                call(self.notify, f"{len(skipped)} left out of {folder}: {listed}{more}",
                     severity="warning", timeout=15)
            if not paths:
                raise DistillError(f"{folder}: no files in this folder")
            with Client(self.distill.endpoint, timeout_s=60.0) as c:
                store, jobs = ArtifactClient(c), JobsClient(c)
                files = []
                for i, path in enumerate(paths):
                    name = path.relative_to(folder).as_posix()
                    call(self.show_step, f"uploading {i + 1}/{len(paths)}: {name}", i / len(paths))
                    files.append({"name": name, "sha256": store.put_file(path, kind="audio",
                                                                         name=artifact_name(name))})
                job = jobs.submit("distill.preprocess", {"files": files})
                call(self.show_step, f"preprocess job {job['id']}: queued", 0.0)
                record = jobs.follow(job["id"], lambda e: call(self.show_event, job["id"], e))
        except (DistillError, OSError) as e:
            call(self.show_step, f"failed: {e}", None)
            return
        call(self.show_record, record)

    # --- what the worker shows ---------------------------------------------------------------
    def show_step(self, text: str, fraction: float | None) -> None:
        # it quotes file names and errors: control characters shown, not acted on
        self.query_one("#dataset-status", Static).update(escaped(text, lines=True))
        if fraction is not None:
            bar = self.query_one("#progress", ProgressBar)
            bar.update(total=1.0, progress=fraction)
            bar.display = True

    def show_event(self, job_id: str, event: dict[str, Any]) -> None:
        if event.get("type") == "progress":
            done, total = event.get("done"), event.get("total")
            status = f"{event.get('status', '')} {event.get('reason') or ''}".strip()
            self.show_step(f"preprocess job {job_id}: {done}/{total} {event.get('file', '')} {status}",
                           float(event.get("fraction") or 0.0))
        elif event.get("type") == "status":
            self.show_step(f"preprocess job {job_id}: {event.get('status')}", None)

    def show_record(self, record: dict[str, Any]) -> None:
        if record.get("status") != "succeeded":
            self.show_step(f"preprocess job {record['id']} {record['status']}", None)
            # a bar left full (every file read, then the job failed) would read as done
            self.query_one("#progress", ProgressBar).display = False
            self.query_one("#dataset-error", Reason).show(str(record.get("error") or "no reason given"))
            return
        result = record.get("result") or {}
        self.show_step(f"preprocess job {record['id']}: succeeded", 1.0)
        self.show_manifest(result.get("manifest") or [], result)

    def show_manifest(self, rows: list[dict[str, Any]], result: dict[str, Any]) -> None:
        cells = [(r["name"][:32], r["status"], r.get("split") or "-",
                  f"{float(r.get('duration_s') or 0):.2f}", r.get("chunks", 0), r.get("reason") or "")
                 for r in rows]
        fill_table(self.query_one("#manifest", DataTable), MANIFEST_COLUMNS, cells)
        ok = sum(r["status"] == "ok" for r in rows)
        dataset = str(result.get("dataset") or "-")
        self.query_one("#summary", Static).update(
            f"{ok} of {len(rows)} files used, {len(rows) - ok} skipped — dataset {dataset[:16]}")
        self.distill.last_dataset = result.get("dataset")
