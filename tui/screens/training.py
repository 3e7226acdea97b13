"""The training screen: start a run; follow one (loss curves, per-level utilisation and
perplexity, the codebook usage heatmap, ETA); cancel or retry it; list and play its previews.

Opening a job draws its whole history first (the record, then its metric rows page by page),
then follows the event stream: rows that arrive while the record loads are merged by epoch, and when the app had to
drop events (a burst over the per-tick cap) the record is read again."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, ClassVar

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, VerticalScroll
from textual.widgets import (
    Button,
    DataTable,
    Header,
    Input,
    Label,
    ProgressBar,
    Select,
    Static,
    TabbedContent,
    TabPane,
)

from distill.shared.bus import protocol as P
from distill.shared.bus.jobs import add_metric_row, metric_history, metrics_pages
from distill.shared.errors import DistillError
from distill.tui.format import duration
from distill.tui.messages import EventsArrived
from distill.tui.playback import play_artifact
from distill.tui.screens.base import DistillScreen
from distill.tui.widgets.curves import LossCurves
from distill.tui.widgets.footer import Footer
from distill.tui.widgets.heatmap import NO_USAGE, CodebookHeatmap
from distill.tui.widgets.reason import Reason
from distill.tui.widgets.tables import fill_table

if TYPE_CHECKING:
    from distill.shared.cli.train import TrainRequest

TRAINING_SERVICES = ("distill.train.vqvae", "distill.train.prior")
PLOT_HZ = 4.0  # curves, tables and heatmap redraw at most this often (plotext is the slow part)
RELOAD_AFTER_DROP_S = 2.0  # after dropped events, re-read the record at most this often
# utilisation: the last epoch's batches (quantizer dropout thins the finer levels' share);
# in use: the model over every training chunk at the last decoded-audio check
LEVEL_COLUMNS = ("level", "utilisation", "in use", "perplexity", "dead codes")
PREVIEW_COLUMNS = ("epoch", "chunk", "which", "file", "artifact")
STAGES = [("RVQ-VAE + prior", "all"), ("RVQ-VAE only", "vqvae")]
NUMBER_FIELDS = (  # (option, the form's label, its Input)
    ("epochs", "epochs", "#epochs"),
    ("codebook_size", "codes", "#codebook-size"),
    ("levels", "levels", "#levels-opt"),
)
FORM_FIELDS = {"--train-opt": "train", "--vqvae-opt": "model"}  # distill train's: the form's


class TrainingScreen(DistillScreen):
    AUTO_FOCUS = "Tabs"  # letters stay navigation keys until a field is chosen
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("n", "start", "Start"),
        Binding("c", "cancel", "Cancel job"),
        Binding("r", "retry", "Retry job"),
        Binding("p", "play", "Play preview"),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.job_id: str | None = None
        self.record: dict[str, Any] = {}
        self.rows: list[dict[str, Any]] = []
        self.previews: list[dict[str, Any]] = []
        self.loading = False
        self.pending: list[dict[str, Any]] = []  # stream events that came while loading
        self.last_reload = 0.0
        self.stale = False  # rows or previews changed since the plots were last drawn
        self.pipeline: list[str] = []  # the jobs of the pipeline last started here, in order
        self.offered_dataset = ""  # the upload the form's dataset field was filled with
        self.previews_shown: list[tuple[Any, ...]] = []  # the Previews table's rows

    def compose(self) -> ComposeResult:
        yield Header()
        yield Static("no job: start one (Start tab) or pick one on the dashboard", id="job-line", markup=False)
        yield Reason(id="job-error")  # why it failed, whole (the job line is one row)
        yield ProgressBar(id="train-progress", total=1.0, show_eta=False)
        with TabbedContent(initial="tab-curves"):
            with TabPane("Curves", id="tab-curves"):
                yield LossCurves(id="curves")
            # scrolls: 12 levels need a table and a heatmap of 13 rows each, 18 rows at 80x24
            with TabPane("Codebooks", id="tab-codebooks"), VerticalScroll(id="codebooks"):
                yield DataTable(id="levels", cursor_type="none", zebra_stripes=True)
                yield CodebookHeatmap(id="heatmap")
            with TabPane("Previews", id="tab-previews"):
                yield DataTable(id="previews", cursor_type="row", zebra_stripes=True)
            with TabPane("Start", id="tab-start"):
                yield from self._form()
        yield Footer()

    def _form(self) -> ComposeResult:
        with VerticalScroll(classes="form"):
            with Horizontal(classes="row"):
                yield Label("dataset")
                yield Input(placeholder="dataset id (or prefix), preprocess job id, or a folder here", id="dataset")
            with Horizontal(classes="row opts"):
                yield Select(STAGES, value="all", allow_blank=False, id="stage")
                yield Label("epochs")
                yield Input(placeholder="auto", id="epochs", type="integer")
                yield Label("codes")
                yield Input(placeholder="auto", id="codebook-size", type="integer")
                yield Label("levels")
                yield Input(placeholder="auto", id="levels-opt", type="integer")
            with Horizontal(classes="row"):
                yield Label("model")
                yield Input(placeholder="KEY=VALUE … e.g. channels=128 blocks=2", id="model-opts")
            with Horizontal(classes="row"):
                yield Label("train")
                yield Input(placeholder="KEY=VALUE … e.g. batch_size=16 patience=20", id="train-opts")
            yield Button("Start training", id="start", variant="primary")

    def on_mount(self) -> None:
        fill_table(self.query_one("#levels", DataTable), LEVEL_COLUMNS, [])
        fill_table(self.query_one("#previews", DataTable), PREVIEW_COLUMNS, [])
        self.query_one("#curves", LossCurves).set_rows([])
        self.set_interval(1.0 / PLOT_HZ, self._draw_if_stale)

    def on_screen_resume(self) -> None:
        """Offer the dataset uploaded last, a newer upload replacing the one offered before;
        a dataset typed here stays."""
        dataset = self.distill.last_dataset
        box = self.query_one("#dataset", Input)
        if dataset and box.value in ("", self.offered_dataset):
            box.value = self.offered_dataset = dataset

    # --- showing a job ----------------------------------------------------------------------
    def show_job(self, job_id: str) -> None:
        """Follow ``job_id``: its whole history from the record, then the stream."""
        self.job_id = job_id
        self.record, self.rows, self.previews, self.pending = {"id": job_id}, [], [], []
        self.loading = True
        self._draw_all()
        self.load_history(job_id)

    @work(group="history", exclusive=True)
    async def load_history(self, job_id: str) -> None:
        """The record (its ``metric_count``, no rows), then the metric history in pages of
        ``metrics_page`` (each reply stays below the message limit; the curves grow as pages
        come), then the previews; :meth:`apply_history` merges what the stream brought."""
        client = self.distill.client
        try:
            record = await client.request(P.SERVICE_JOBS, {"op": "get", "id": job_id, "metrics": False})
            rows: list[dict[str, Any]] = []
            if record.get("metric_count"):
                async for page in metrics_pages(client, job_id):
                    if job_id != self.job_id:
                        return
                    rows += [r for r in page if isinstance(r, dict)]
                    self.show_history_page(record, rows)
            listed = await client.request(P.SERVICE_ARTIFACTS, {"op": "list", "kind": "preview", "job": job_id})
        except DistillError as e:
            self.loading = False
            self.notify_error(f"job {job_id}", e)
            return
        if job_id != self.job_id:
            return
        self.apply_history({**record, "metrics": rows}, listed.get("artifacts") or [])

    def show_history_page(self, record: dict[str, Any], rows: list[dict[str, Any]]) -> None:
        """The history read so far (still loading): drawn at the plots' pace."""
        self.record = {**record, "history_loaded": len(rows)}
        self.rows = metric_history(rows)
        self.stale = True

    def apply_history(self, record: dict[str, Any], previews: list[dict[str, Any]]) -> None:
        """The job record with its metric rows (``metrics``) and its preview artifacts; then
        whatever the stream brought meanwhile."""
        self.loading = False
        self.record = {k: v for k, v in record.items() if k != "metrics"}
        self.rows = metric_history(record.get("metrics") or [])
        self.previews = [_preview_from_artifact(a) for a in previews]
        pending, self.pending = self.pending, []
        self._apply_events(pending)
        self._draw_all()

    @on(EventsArrived)
    def _events(self, message: EventsArrived) -> None:
        if self.job_id is None:
            return
        mine = [e for e in message.events if e.get("job") == self.job_id]
        if self.loading:
            self.pending.extend(mine)
            return
        if message.dropped and time.monotonic() - self.last_reload > RELOAD_AFTER_DROP_S:
            self.last_reload = time.monotonic()
            self.pending = []
            self.loading = True
            self.load_history(self.job_id)
            return
        if mine and self._apply_events(mine):
            self._draw_line()  # cheap: every tick; the plots follow at PLOT_HZ
            self.stale = True

    def _apply_events(self, events: list[dict[str, Any]]) -> bool:
        changed = False
        for event in events:
            kind = event.get("type")
            if kind == "metrics" and isinstance(event.get("row"), dict):
                changed |= self._add_row(event["row"])
            elif kind == "progress":
                self.record["progress"] = event
                changed = True
            elif kind == "status":
                self.record.update(status=event.get("status"), error=event.get("error"),
                                   attempts=event.get("attempts"), result=event.get("result"))
                changed = True
                if event.get("status") == "succeeded":
                    self._next_stage(str(event.get("job")))
            elif kind == "preview":
                self.previews.append(event)
                changed = True
        return changed

    def _add_row(self, row: dict[str, Any]) -> bool:
        self.rows = add_metric_row(self.rows, row)
        return True

    def _next_stage(self, finished: str) -> None:
        if finished in self.pipeline[:-1]:
            self.call_later(self.show_job, self.pipeline[self.pipeline.index(finished) + 1])

    # --- drawing ------------------------------------------------------------------------------
    def _draw_if_stale(self) -> None:
        if self.stale:
            self._draw_all()

    def _draw_all(self) -> None:
        self.stale = False
        self._draw_line()
        self.query_one("#curves", LossCurves).set_rows(self.rows)
        self._draw_levels()
        self._draw_previews()

    def _draw_line(self) -> None:
        rec = self.record
        if not self.job_id:
            return
        last = self.rows[-1] if self.rows else {}
        progress = rec.get("progress") or {}
        epoch = last.get("epoch", progress.get("epoch"))
        epochs = last.get("epochs", progress.get("epochs"))
        parts = [f"job {self.job_id}", str(rec.get("service", "")).removeprefix("distill."),
                 str(rec.get("status", "loading…" if self.loading else "?"))]
        if epoch is not None:
            parts.append(f"epoch {epoch}" + (f"/{epochs}" if epochs else ""))
        if rec.get("status") == "running":
            parts.append(f"ETA {duration(last.get('eta_s', progress.get('eta_s')))}")
        if self.loading and isinstance(rec.get("metric_count"), int):
            parts.append(f"history {rec.get('history_loaded', 0)}/{rec['metric_count']}")
        self.query_one("#job-line", Static).update("  ".join(p for p in parts if p))
        error = rec.get("error")
        self.query_one("#job-error", Reason).show(str(error) if error else "")  # the line says its status
        fraction = progress.get("fraction")
        if rec.get("status") == "succeeded":
            fraction = 1.0
        if isinstance(fraction, (int, float)):
            self.query_one("#train-progress", ProgressBar).update(total=1.0, progress=fraction)

    def _draw_levels(self) -> None:
        table = self.query_one("#levels", DataTable)
        last = next((r for r in reversed(self.rows) if "utilisation" in r or "usage" in r), None)
        heatmap = self.query_one("#heatmap", CodebookHeatmap)
        if last is None:
            fill_table(table, LEVEL_COLUMNS, [])
            heatmap.set_usage([], None)
            # a prior's metrics never carry codebook usage: it learns the RVQ-VAE's codes
            prior = self.record.get("service") == "distill.train.prior"
            heatmap.empty = ("a prior has no codebooks of its own: its RVQ-VAE's job shows them"
                             if prior else NO_USAGE)  # fmt: skip
            return
        util, ppl, dead = last.get("utilisation") or [], last.get("perplexity") or [], last.get("dead_codes") or []
        used: list[float] = next((r["codes_in_use"] for r in reversed(self.rows) if isinstance(r.get("codes_in_use"), list)), [])
        fill_table(table, LEVEL_COLUMNS, [(f"L{i + 1}", _pct(util, i), _pct(used, i), _num(ppl, i), _num(dead, i))
                                          for i in range(max(len(util), len(ppl)))])
        row: dict[str, Any] = next((r for r in reversed(self.rows) if isinstance(r.get("usage"), list)), {})
        heatmap.set_usage(row.get("usage") or [], last.get("epoch"), int(row.get("usage_group") or 1))

    def _draw_previews(self) -> None:
        """Redrawn when its rows change, not only their number: another job (or the same job's
        record read again) may have as many previews as the table shows, and ``p`` plays the
        row's index in ``self.previews``."""
        rows = [(p.get("epoch", "-"), p.get("chunk", "-"), p.get("which", "-"),
                 str(p.get("file", ""))[:28], str(p.get("artifact", ""))[:12]) for p in self.previews]
        if rows == self.previews_shown:
            return
        self.previews_shown = rows
        fill_table(self.query_one("#previews", DataTable), PREVIEW_COLUMNS, rows)

    # --- actions ------------------------------------------------------------------------------
    def action_start(self) -> None:
        dataset = self.query_one("#dataset", Input).value.strip()
        if not dataset:
            self.notify("give a dataset id or a preprocess job id first", severity="warning")
            return
        from distill.shared.cli.train import (
            TrainRequest,
            model_name,
            parse_settings,
            stage_train_settings,
        )

        stage = str(self.query_one("#stage", Select).value)
        try:
            options = self.form_numbers()
            model = parse_settings(self.query_one("#model-opts", Input).value.split())
            model.update({k: options[k] for k in ("codebook_size", "levels") if k in options})
            # as `distill train` shares them out: the train settings and epochs go to every
            # stage that runs, vqvae.KEY=VALUE or prior.KEY=VALUE to that stage only
            train = stage_train_settings(self.query_one("#train-opts", Input).value.split(),
                                         {"epochs": options.get("epochs")}, None,
                                         ["vqvae", "prior"] if stage == "all" else [stage])  # fmt: skip
        except DistillError as e:
            self.notify_error("settings", form_words(str(e)))
            return
        self.start_training(TrainRequest(source=dataset, stage=stage, vqvae_ref=None,
                                         name=model_name(dataset, None), vqvae_model=model,
                                         train=train))  # fmt: skip

    def form_numbers(self) -> dict[str, int]:
        """The integer fields that are filled in, by option name. An integer Input lets a lone
        sign or a trailing ``_`` through while one types, so each value is checked here and a
        bad one named by its field (as the generate screen does)."""
        numbers: dict[str, int] = {}
        for key, label, selector in NUMBER_FIELDS:
            raw = self.query_one(selector, Input).value.strip()
            if not raw:  # left to the worker's default
                continue
            try:
                numbers[key] = int(raw)
            except ValueError:
                raise DistillError(f"{label}: {raw!r} is not a number") from None
        return numbers

    @on(Button.Pressed, "#start")
    def _start_pressed(self) -> None:
        self.action_start()

    @work(thread=True, group="actions")
    def start_training(self, request: TrainRequest) -> None:
        """Check the settings as ``distill train`` does (a misspelt key fails now, before any
        upload or job), then submit through its own pipeline function: blocking (the check
        imports torch the first time), so in a thread."""
        from distill.shared.bus.client import Client
        from distill.shared.cli.train import check_settings, submit_pipeline

        try:
            check_settings(request)
        except DistillError as e:
            self.app.call_from_thread(self.notify_error, "settings", form_words(str(e)))
            return
        try:
            with Client(self.distill.endpoint, timeout_s=30.0) as c:
                stages = submit_pipeline(c, request)
        except DistillError as e:
            self.app.call_from_thread(self.notify_error, "start training", e)
            return
        self.app.call_from_thread(self.follow_pipeline, [s.job_id for s in stages])

    def follow_pipeline(self, job_ids: list[str]) -> None:
        """Show the first stage; each next stage is shown when the one before succeeds."""
        self.notify("submitted " + ", ".join(job_ids))
        self.pipeline = list(job_ids)
        self.query_one(TabbedContent).active = "tab-curves"
        self.show_job(job_ids[0])

    async def _job_op(self, op: str) -> None:
        if not self.job_id:
            self.notify("no job shown", severity="warning")
            return
        job_id = self.job_id
        try:
            record = await self.distill.client.request(P.SERVICE_JOBS, {"op": op, "id": job_id})
            # The reply can be older than the events already applied: a worker that stops at
            # once sends "cancelled" down the event stream before this reply comes, and the
            # reply's "running" then stayed on screen for good. A read made after the reply
            # holds at least what those events said.
            now = await self.distill.client.request(P.SERVICE_JOBS, {"op": "get", "id": job_id,
                                                                     "metrics": False})  # fmt: skip
        except DistillError as e:
            self.notify_error(f"{op} {job_id}", e)
            return
        if job_id == self.job_id:
            self.record.update({k: v for k, v in now.items() if k != "metrics"})
        self._draw_line()
        self.notify(f"{job_id}: {record['status']}"
                    + (" (cancel requested)" if record.get("cancel_requested") else ""))

    @work(group="actions")
    async def action_cancel(self) -> None:
        await self._job_op("cancel")

    @work(group="actions")
    async def action_retry(self) -> None:
        await self._job_op("retry")

    def action_play(self) -> None:
        table = self.query_one("#previews", DataTable)
        if not self.previews or table.cursor_row < 0:
            self.notify("no preview selected", severity="warning")
            return
        preview = self.previews[min(table.cursor_row, len(self.previews) - 1)]
        self.play(str(preview.get("artifact")))

    @work(thread=True, group="play")
    def play(self, sha256: str) -> None:
        message = play_artifact(self.distill.endpoint, sha256)
        # markup off: the message may quote the broker's error or a player's own words
        self.app.call_from_thread(self.notify, message)


def form_words(message: str) -> str:
    """A settings error of ``distill train``'s, with its options named as the form's fields."""
    for option, field in FORM_FIELDS.items():
        message = message.replace(option, field)
    return message


def _preview_from_artifact(a: dict[str, Any]) -> dict[str, Any]:
    """A preview artifact as the stream describes one (its name is epochNNNN-CHUNK-WHICH.wav)."""
    stem = str(a.get("name", "")).removesuffix(".wav")
    head, _, which = stem.rpartition("-")
    epoch, _, chunk = head.partition("-")
    return {"artifact": a.get("sha256"), "epoch": int(epoch[5:]) if epoch[5:].isdigit() else "-",
            "chunk": int(chunk) if chunk.isdigit() else "-", "which": which or "-",
            "file": a.get("name", "")}


def _pct(values: list[Any], i: int) -> str:
    return f"{values[i] * 100:.0f}%" if i < len(values) and isinstance(values[i], (int, float)) else "-"


def _num(values: list[Any], i: int) -> str:
    if i >= len(values) or not isinstance(values[i], (int, float)):
        return "-"
    return f"{values[i]:.1f}" if isinstance(values[i], float) else str(values[i])
