"""The generate screen: sample new sounds from a trained model (``distill.infer`` generate),
list them with a waveform drawn in the terminal, play them here, export them to a folder."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal
from textual.widgets import Button, DataTable, Header, Input, Label, Select, Static

from distill.shared.errors import DistillError
from distill.shared.ids import escaped
from distill.tui.playback import player_name
from distill.tui.screens.base import DistillScreen
from distill.tui.widgets.footer import Footer
from distill.tui.widgets.tables import fill_table
from distill.tui.widgets.waveform import Waveform, thumbnail

INFER = "distill.infer"
RESULT_COLUMNS = ("#", "seed", "seconds", "peak", "waveform")
GENERATE_TIMEOUT_S = 300.0  # 16 sounds of 60 s on a CPU worker take a while
FIELDS = (  # (id, label, default, Input type)
    ("count", "n", "4", "integer"),
    ("seconds", "sec", "2", "number"),
    ("temperature", "temp", "1.0", "number"),
    ("top_k", "k", "0", "integer"),
    ("top_p", "p", "1.0", "number"),
    ("min_p", "min-p", "0.01", "number"),  # the sampler's default: cuts the smoothing floor
    ("change_temperature", "move-t", "", "number"),  # empty: the model's (chosen in training)
    ("trim", "trim", "", "number"),  # dB under its peak where a sound ends; empty: off
    ("seed", "seed", "0", "integer"),
)
EMPTY_MEANS = {"change_temperature": "model's", "trim": "off"}  # an empty field's placeholder


class GenerateScreen(DistillScreen):
    AUTO_FOCUS = "#results"
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("n", "generate", "Generate"),
        Binding("m", "models", "Models"),
        Binding("p", "play", "Play"),
        Binding("x", "export", "Export"),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.sounds: list[np.ndarray] = []
        self.reply: dict[str, Any] = {}
        self.exporting = asyncio.Lock()  # exports run one at a time, in the order asked

    def compose(self) -> ComposeResult:
        yield Header()
        # Compact fields (a row each, no borders): with bordered ones the form took 9 rows and
        # the results list showed one sound at a time at 80x24.
        with Horizontal(classes="form row compact"):
            yield Label("model")
            yield Select[str]([], prompt="no models yet (m: refresh)", id="model", compact=True)
        # how many, how long, which seed, how hot and where sounds end; then the filters (each
        # value whole at 80 columns)
        by_key = {f[0]: f for f in FIELDS}
        for row in (("count", "seconds", "seed", "temperature", "trim"),
                    ("top_k", "top_p", "min_p", "change_temperature")):  # fmt: skip
            with Horizontal(classes="form row opts compact"):
                for key, label, default, kind in (by_key[k] for k in row):
                    yield Label(label)
                    yield Input(default, id=f"gen-{key}", type=kind,  # type: ignore[arg-type]
                                placeholder=EMPTY_MEANS.get(key, ""), compact=True)  # fmt: skip
        yield Static("", id="gen-status", classes="status-line", markup=False)
        yield DataTable(id="results", cursor_type="row", zebra_stripes=True)
        yield Waveform(id="wave")
        with Horizontal(classes="form row compact"):
            yield Label("export to")
            yield Input(placeholder="~/distill-sounds", id="export-dir", compact=True)
            yield Button("Export", id="export", compact=True)
        yield Footer()

    def on_mount(self) -> None:
        fill_table(self.query_one("#results", DataTable), RESULT_COLUMNS, [])
        self.status(_player_line())
        if self.distill.connect:
            self.action_models()

    def status(self, text: str) -> None:
        # an error may quote a model's name or a path: control characters shown, not acted on
        self.query_one("#gen-status", Static).update(escaped(text, lines=True))

    # --- models -------------------------------------------------------------------------------
    @work(group="models", exclusive=True)
    async def action_models(self) -> None:
        models = await self.fetch_models()
        if models is not None:
            self.set_models(models)

    def set_models(self, models: list[tuple[str, str]]) -> None:
        self.fill_models(self.query_one("#model", Select), models)

    # --- generate -----------------------------------------------------------------------------
    def request_body(self) -> dict[str, Any]:
        model = self.query_one("#model", Select).value
        if not isinstance(model, str):
            raise DistillError("choose a model first (m refreshes the list)")
        body: dict[str, Any] = {"op": "generate", "model": model, "quality": "fast"}
        for key, _, default, kind in FIELDS:
            raw = self.query_one(f"#gen-{key}", Input).value.strip() or default
            if not raw:  # left to the model
                continue
            try:
                body[key] = int(raw) if kind == "integer" else float(raw)
            except ValueError:
                raise DistillError(f"{field_name(key)}: {raw!r} is not a number") from None
        return body

    @on(Input.Submitted)
    def _submitted(self, message: Input.Submitted) -> None:
        if message.input.id == "export-dir":
            self.action_export()
        else:
            self.action_generate()

    def action_generate(self) -> None:
        try:
            body = self.request_body()
            self.check_worker(INFER)
        except DistillError as e:
            self.notify_error("generate", e)
            return
        self.status(f"generating {body['count']} × {body['seconds']:g} s …")
        self.generate(body)

    @work(group="generate", exclusive=True)
    async def generate(self, body: dict[str, Any]) -> None:
        try:
            reply = await self.distill.infer_client.request(INFER, body, timeout_s=GENERATE_TIMEOUT_S)
        except DistillError as e:
            self.status(f"generate failed: {form_words(str(e))}")
            return
        self.show_results(reply)

    def show_results(self, reply: dict[str, Any]) -> None:
        self.reply = reply
        audio = np.asarray(reply["audio"], dtype=np.float32)  # (count, samples)
        # a sound ended where it fades (trim) is zero past its length
        lengths = reply.get("lengths") or [audio.shape[-1]] * audio.shape[0]
        self.sounds = [audio[i, : int(lengths[i])] for i in range(audio.shape[0])]
        rate = int(reply["sample_rate"])
        self.distill.last_generated = (self.sounds, rate)  # the editor encodes these (gen:N)
        seed = (reply.get("params") or {}).get("seed", "-")
        rows = [(i, seed, f"{sound.size / rate:.2f}", f"{float(np.abs(sound).max()) if sound.size else 0.0:.2f}",
                 thumbnail(sound)) for i, sound in enumerate(self.sounds)]
        fill_table(self.query_one("#results", DataTable), RESULT_COLUMNS, rows)
        self.status(f"{len(self.sounds)} sounds at {rate} Hz — {_player_line()}")
        if self.sounds:
            self._show_wave(0)

    @on(DataTable.RowHighlighted, "#results")
    def _highlighted(self, message: DataTable.RowHighlighted) -> None:
        if 0 <= message.cursor_row < len(self.sounds):
            self._show_wave(message.cursor_row)

    def _show_wave(self, i: int) -> None:
        rate = int(self.reply.get("sample_rate") or 1)
        self.query_one("#wave", Waveform).show(self.sounds[i], f"sound {i}: {self.sounds[i].size / rate:.2f} s")

    # --- play and export ----------------------------------------------------------------------
    def _selected(self) -> int | None:
        row = self.query_one("#results", DataTable).cursor_row
        return row if 0 <= row < len(self.sounds) else None

    def action_play(self) -> None:
        i = self._selected()
        if i is None:
            self.notify("no sound selected", severity="warning")
            return
        self.play(self.sounds[i], int(self.reply["sample_rate"]))

    @work(thread=True, group="play")
    def play(self, audio: np.ndarray, rate: int) -> None:
        from distill.tui.playback import play_audio

        # markup off: the message quotes a file's path and a player's own words
        self.app.call_from_thread(self.notify, play_audio(audio, rate))

    @on(Button.Pressed, "#export")
    def action_export(self) -> None:
        raw = self.query_one("#export-dir", Input).value.strip()
        if not self.sounds or not raw:
            self.notify("generate sounds and type a folder first", severity="warning")
            return
        self.export(Path(raw).expanduser(), list(self.sounds), dict(self.reply))  # these sounds

    @work(group="export")
    async def export(self, folder: Path, sounds: list[np.ndarray], reply: dict[str, Any]) -> None:
        """Written in a thread (16 sounds of 5 s froze the screen for 1.7 s), one export at a
        time in the order asked (two at once could choose the same free file name)."""
        async with self.exporting:
            self.status(f"exporting {len(sounds)} sounds to {folder} …")
            try:
                written = await asyncio.to_thread(export_sounds, folder, sounds, reply)
            except (DistillError, OSError) as e:
                self.status(f"export failed: {e}")
                self.notify_error("export", e)
                return
        self.status(f"exported {len(written)} sounds to {written[0].parent} — {_player_line()}")
        self.notify(f"exported {len(written)} sounds to {written[0].parent}")


def field_name(key: str) -> str:
    """A field as the form labels it, with the worker's name for it where the two differ
    ("move-t (change_temperature)"): the one the user typed into, and the one the docs use."""
    label = next(f[1] for f in FIELDS if f[0] == key)
    return key if label == key else f"{label} ({key})"


def form_words(message: str) -> str:
    """The worker's error with its parameters named as the form's fields: "change_temperature
    must be > 0" named no field on the screen (its label is move-t). Only the names with an
    underscore: "count" and "seconds" are words too."""
    keys = "|".join(f[0] for f in FIELDS if "_" in f[0])
    return re.sub(rf"\b({keys})\b", lambda m: field_name(m.group(1)), message)


def export_sounds(folder: Path, sounds: list[np.ndarray], reply: dict[str, Any]) -> list[Path]:
    """WAV files with the recipe in their metadata (what made them, so they can be made again)."""
    from distill.shared.audio.export import ExportMetadata, export_audio, free_path

    folder.mkdir(parents=True, exist_ok=True)
    params = dict(reply.get("params") or {})
    recipe: dict[str, Any] = {**params, "quality": reply.get("quality", "fast")}
    # threads: the worker's torch thread count, which the last bits of the samples depend on:
    # `distill regenerate` makes the same sounds only with the same count (as the editor's)
    if reply.get("threads") is not None:
        recipe["threads"] = reply["threads"]
    written = []
    for i, sound in enumerate(sounds):
        name = free_path(folder / f"gen-{params.get('seed', 0)}-{i:03d}.wav").name  # never replace
        meta = ExportMetadata(kind="generate", model_id=str(reply.get("model_id", "")), title=name,
                              data={**recipe, "index": i})
        written.append(export_audio(folder / name, sound, int(reply["sample_rate"]), metadata=meta).path)
    return written


def _player_line() -> str:
    name = player_name()
    return f"playback: {name}" if name else "no audio player on this machine: export to listen"
