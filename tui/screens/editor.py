"""The code editor: encode a sound (a file here, or one from the generate screen) into its
code grid, edit it cell by cell or by region, hear a coarse preview after every edit, undo and
redo, and export the result decoded at full quality.

Two grids (A and B; tab moves between them) make copy/paste, swap and blend between sounds
possible. Every edit goes to ``distill.infer`` as an ``edit`` request carrying the whole edit
session (base grid and edits), so the worker holds no state and undo survives anything."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, VerticalScroll
from textual.widgets import Footer, Header, Input, Label, Select, Static

from distill.shared.errors import DistillError
from distill.shared.model.codes import CodeGrid, EditSession
from distill.tui.screens.base import DistillScreen
from distill.tui.widgets.codegrid import CodeGridView
from distill.tui.widgets.waveform import Waveform

INFER = "distill.infer"
EDIT_TIMEOUT_S = 60.0  # a coarse preview is quick; the first request also loads the model
# Encoding searches each sound's codes by what they decode to: ~2 s per second of sound on a
# CPU thread, more on a busy machine; the request waits this long per second on top.
ENCODE_S_PER_SECOND = 6.0


@dataclass
class Slot:
    """One grid: its edit session (the worker's format), the last preview, where it came from."""

    name: str = ""
    session: dict[str, Any] | None = None
    codes: np.ndarray | None = None  # (Q, T) the current grid
    audio: np.ndarray | None = None  # (samples,) its latest preview
    sample_rate: int = 0
    can_undo: bool = False
    can_redo: bool = False
    source_audio: np.ndarray | None = None  # what was encoded (blend needs the sound itself)
    history: list[str] = field(default_factory=list)


class EditorScreen(DistillScreen):
    AUTO_FOCUS = "#grid-a"
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("o", "encode", "Encode"),
        Binding("plus,equals_sign", "bump(1)", "Code +1", key_display="+"),
        Binding("minus", "bump(-1)", "Code -1", key_display="-"),
        Binding("y", "copy", "Copy"),
        Binding("v", "paste", "Paste"),
        Binding("w", "swap", "Swap A/B"),
        Binding("b", "blend", "Blend"),
        Binding("a", "resample", "Resample"),
        Binding("k", "keep_levels", "Keep k"),
        Binding("u", "undo", "Undo"),
        Binding("r", "redo", "Redo"),
        Binding("p", "play", "Play"),
        Binding("x", "export", "Export"),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.slots = [Slot(), Slot()]
        self.clip: np.ndarray | None = None  # (levels, steps) copied codes
        self.codebook_size = 0
        self.busy = False

    def compose(self) -> ComposeResult:
        yield Header()
        with VerticalScroll():
            with Horizontal(classes="form row"):
                yield Label("model")
                yield Select[str]([], prompt="no models (m on the generate screen)", id="edit-model")
            with Horizontal(classes="form row"):
                yield Label("sound")
                yield Input(placeholder="a file here, or gen:N (a generated sound)", id="source")
                yield Label("export")
                yield Input(placeholder="~/distill-edits", id="edit-export")
            yield CodeGridView(id="grid-a")
            yield CodeGridView(id="grid-b")
            yield Static("encode a sound into grid A (o); tab moves to grid B", id="edit-status",
                         classes="status-line")
            yield Waveform(id="edit-wave")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#grid-a", CodeGridView).border_title = "A"
        self.query_one("#grid-b", CodeGridView).border_title = "B"
        if self.distill.connect:
            self.load_models()

    def on_screen_resume(self) -> None:
        if self.distill.connect:
            self.load_models()

    @work(group="models", exclusive=True)
    async def load_models(self) -> None:
        models = await self.fetch_models()
        if models is not None:
            self.set_models(models)

    def set_models(self, models: list[tuple[str, str]]) -> None:
        select = self.query_one("#edit-model", Select)
        current = select.value
        select.set_options([(f"{name}  {sha[:12]}", sha) for name, sha in models])
        shas = [sha for _, sha in models]
        if models:
            select.value = current if current in shas else shas[0]

    # --- which grid ---------------------------------------------------------------------------
    @property
    def active(self) -> int:
        return 1 if self.focused is self.query_one("#grid-b", CodeGridView) else 0

    def grid(self, i: int) -> CodeGridView:
        return self.query_one("#grid-b" if i else "#grid-a", CodeGridView)

    def model(self) -> str:
        value = self.query_one("#edit-model", Select).value
        if not isinstance(value, str):
            raise DistillError("choose a model first")
        return value

    # --- requests -----------------------------------------------------------------------------
    async def infer(self, body: dict[str, Any], timeout_s: float = EDIT_TIMEOUT_S
                    ) -> dict[str, Any]:  # fmt: skip
        reply: dict[str, Any] = await self.distill.client.request(
            INFER, {**body, "model": self.model()}, timeout_s=timeout_s)
        return reply

    def action_encode(self) -> None:
        raw = self.query_one("#source", Input).value.strip()
        if not raw:
            self.notify("type a sound file (or gen:N) first", severity="warning")
            return
        try:
            audio, rate, name = self.source_audio(raw)
        except (DistillError, OSError) as e:
            self.notify_error("sound", e)
            return
        self.encode(self.active, audio, rate, name)

    def source_audio(self, raw: str) -> tuple[np.ndarray, int, str]:
        if raw.startswith("gen:"):
            generated = self.distill.last_generated
            index = int(raw[4:]) if raw[4:].isdigit() else -1
            if generated is None or not 0 <= index < len(generated[0]):
                raise DistillError(f"{raw}: no such generated sound (generate some first)")
            return generated[0][index], generated[1], raw
        from distill.shared.audio.io import read_audio

        decoded = read_audio(Path(raw).expanduser())
        return decoded.samples.mean(axis=0), decoded.sample_rate, Path(raw).name  # (samples,) mono

    @work(group="edit", exclusive=True)
    async def encode(self, i: int, audio: np.ndarray, rate: int, name: str) -> None:
        seconds = len(audio) / rate
        self.status(f"encoding {name} ({seconds:.1f} s: its codes are searched by what they "
                    "decode to) …")  # fmt: skip
        try:
            reply = await self.infer({"op": "encode", "audio": audio.astype(np.float32),
                                      "sample_rate": rate},
                                     timeout_s=EDIT_TIMEOUT_S + ENCODE_S_PER_SECOND * seconds)  # fmt: skip
            codes = np.asarray(reply["codes"], dtype=np.int64)
            session = EditSession(CodeGrid(codes, int(reply["codebook_size"]))).to_dict()
            self.codebook_size = int(reply["codebook_size"])
            self.slots[i] = Slot(name=name, session=session, source_audio=audio.astype(np.float32))
            await self._edit(i, "none", None, f"encoded {name}")
        except DistillError as e:
            self.status(f"encode failed: {e}")

    async def _edit(self, i: int, action: str, edit: dict[str, Any] | None, what: str) -> None:
        slot = self.slots[i]
        if slot.session is None:
            raise DistillError(f"grid {'AB'[i]} is empty: encode a sound into it first (o)")
        body: dict[str, Any] = {"op": "edit", "session": slot.session, "action": action,
                                "quality": "preview"}
        if edit is not None:
            body["edit"] = edit
        reply = await self.infer(body)
        slot.session = reply["session"]
        slot.codes = np.asarray(reply["codes"], dtype=np.int64)
        slot.audio = np.asarray(reply["audio"], dtype=np.float32)
        slot.sample_rate = int(reply["sample_rate"])
        slot.can_undo, slot.can_redo = bool(reply["can_undo"]), bool(reply["can_redo"])
        slot.history.append(what)
        self.grid(i).set_codes(slot.codes, self.codebook_size)
        self.query_one("#edit-wave", Waveform).show(
            slot.audio, f"{'AB'[i]}: {slot.name} — {what} (coarse preview)")
        self.status(f"{'AB'[i]}: {what}" + ("  [u undo]" if slot.can_undo else "")
                    + ("  [r redo]" if slot.can_redo else ""))

    @work(group="edit", exclusive=True)
    async def edit(self, i: int, action: str, edit: dict[str, Any] | None, what: str) -> None:
        try:
            await self._edit(i, action, edit, what)
        except DistillError as e:
            self.status(f"{what}: {e}")

    def status(self, text: str) -> None:
        self.query_one("#edit-status", Static).update(text)

    # --- edits --------------------------------------------------------------------------------
    def _codes(self, i: int) -> np.ndarray:
        codes = self.slots[i].codes
        if codes is None:
            raise DistillError(f"grid {'AB'[i]} is empty: encode a sound into it first (o)")
        return codes

    def _guard(self, fn: Any) -> None:
        try:
            fn()
        except DistillError as e:
            self.notify_error("edit", e)

    def action_bump(self, delta: int) -> None:
        def run() -> None:
            i = self.active
            codes = self._codes(i)
            q, t = self.grid(i).cursor
            code = (int(codes[q, t]) + delta) % max(self.codebook_size, 1)
            self.edit(i, "apply", {"op": "set_cell", "level": q, "t": t, "code": code},
                      f"L{q + 1} t{t} = {code}")
        self._guard(run)

    def action_copy(self) -> None:
        def run() -> None:
            i = self.active
            q0, q1, t0, t1 = self.grid(i).selection()
            self.clip = self._codes(i)[q0:q1, t0:t1].copy()  # (levels, steps)
            self.status(f"copied {q1 - q0} levels × {t1 - t0} steps from {'AB'[i]}")
        self._guard(run)

    def action_paste(self) -> None:
        def run() -> None:
            if self.clip is None:
                raise DistillError("nothing copied yet (y copies the selection)")
            i = self.active
            codes = self._codes(i)
            q, t = self.grid(i).cursor
            clip = self.clip[: codes.shape[0] - q, : codes.shape[1] - t]  # cropped at the edges
            self.edit(i, "apply", {"op": "replace", "level": q, "t": t, "codes": clip.tolist(),
                                   "source": "paste"}, f"pasted at L{q + 1} t{t}")
        self._guard(run)

    def action_swap(self) -> None:
        self._guard(self._swap)

    def _swap(self) -> None:
        i, j = self.active, 1 - self.active
        mine, theirs = self._codes(i), self._codes(j)
        q0, q1, t0, t1 = self.grid(i).selection()
        if t1 > theirs.shape[1] or q1 > theirs.shape[0]:
            raise DistillError(f"the selection reaches past grid {'AB'[j]}'s end")
        region_mine, region_theirs = mine[q0:q1, t0:t1].tolist(), theirs[q0:q1, t0:t1].tolist()
        self.swap(i, j, q0, t0, region_mine, region_theirs)

    @work(group="edit", exclusive=True)
    async def swap(self, i: int, j: int, q0: int, t0: int, mine: list[list[int]],
                   theirs: list[list[int]]) -> None:
        what = f"swapped L{q0 + 1} t{t0} region with {'AB'[j]}"
        try:
            await self._edit(j, "apply", {"op": "replace", "level": q0, "t": t0, "codes": mine,
                                          "source": "swap"}, what)
            await self._edit(i, "apply", {"op": "replace", "level": q0, "t": t0, "codes": theirs,
                                          "source": "swap"}, what)
        except DistillError as e:
            self.status(f"swap: {e}")

    def action_blend(self) -> None:
        def run() -> None:
            i, j = self.active, 1 - self.active
            a, b = self.slots[i].source_audio, self.slots[j].source_audio
            if a is None or b is None:
                raise DistillError("blend needs a sound in both grids")
            self.blend(i, a, b)
        self._guard(run)

    @work(group="edit", exclusive=True)
    async def blend(self, i: int, a: np.ndarray, b: np.ndarray) -> None:
        try:
            reply = await self.infer({"op": "blend", "a": a, "b": b, "amount": 0.5,
                                      "sample_rate": self.slots[i].sample_rate})
            mine = self._codes(i)
            codes = np.asarray(reply["codes"], dtype=np.int64)[:, : mine.shape[1]]  # (Q, T) crop
            await self._edit(i, "apply", {"op": "replace", "level": 0, "t": 0,
                                          "codes": codes.tolist(), "source": "blend"},
                             "blended with the other sound")
        except DistillError as e:
            self.status(f"blend: {e}")

    def action_resample(self) -> None:
        def run() -> None:
            i = self.active
            codes = self._codes(i)
            _, _, t0, t1 = self.grid(i).selection()
            self.resample(i, codes, t0, t1)
        self._guard(run)

    @work(group="edit", exclusive=True)
    async def resample(self, i: int, codes: np.ndarray, t0: int, t1: int) -> None:
        try:
            reply = await self.infer({"op": "resample_region", "codes": codes, "t0": t0, "t1": t1,
                                      "seed": len(self.slots[i].history), "quality": "preview"})
            new = np.asarray(reply["codes"], dtype=np.int64)[:, t0:t1]  # (Q, t1 - t0)
            await self._edit(i, "apply", {"op": "replace", "level": 0, "t": t0,
                                          "codes": new.tolist(), "source": "resample"},
                             f"resampled steps {t0}..{t1 - 1} with the prior")
        except DistillError as e:
            self.status(f"resample: {e}")

    def action_keep_levels(self) -> None:
        def run() -> None:
            i = self.active
            q = self.grid(i).cursor[0]
            self._codes(i)
            self.edit(i, "apply", {"op": "keep_levels", "k": q + 1}, f"kept the first {q + 1} levels")
        self._guard(run)

    def action_undo(self) -> None:
        self._guard(lambda: self.edit(self.active, "undo", None, "undo"))

    def action_redo(self) -> None:
        self._guard(lambda: self.edit(self.active, "redo", None, "redo"))

    @on(CodeGridView.Moved)
    def _moved(self) -> None:
        slot = self.slots[self.active]
        if slot.audio is not None:
            self.query_one("#edit-wave", Waveform).show(slot.audio, f"{'AB'[self.active]}: {slot.name}")

    # --- listen and export --------------------------------------------------------------------
    def action_play(self) -> None:
        slot = self.slots[self.active]
        if slot.audio is None:
            self.notify("nothing to play: encode a sound first", severity="warning")
            return
        self.play(slot.audio, slot.sample_rate)

    @work(thread=True, group="play")
    def play(self, audio: np.ndarray, rate: int) -> None:
        from distill.tui.playback import play_audio

        self.app.call_from_thread(self.notify, play_audio(audio, rate))

    def action_export(self) -> None:
        slot = self.slots[self.active]
        folder = self.query_one("#edit-export", Input).value.strip()
        if slot.codes is None or not folder:
            self.notify("encode a sound and type an export folder first", severity="warning")
            return
        self.export(slot, Path(folder).expanduser())

    @work(group="edit", exclusive=True)
    async def export(self, slot: Slot, folder: Path) -> None:
        from distill.shared.audio.export import ExportMetadata, export_audio

        try:
            reply = await self.infer({"op": "decode", "codes": slot.codes, "quality": "best"})
            folder.mkdir(parents=True, exist_ok=True)
            name = f"edit-{Path(slot.name).stem or 'sound'}.wav"
            # threads: the worker's torch thread count, which the last bits of the decode
            # depend on: `distill regenerate` makes the same samples only with the same count
            data: dict[str, Any] = {"session": slot.session, "levels": None, "quality": "best"}
            if reply.get("threads") is not None:
                data["threads"] = reply["threads"]
            meta = ExportMetadata(kind="edit", model_id=str(reply.get("model_id", "")), title=name,
                                  data=data)
            report = export_audio(folder / name, np.asarray(reply["audio"]), int(reply["sample_rate"]),
                                  metadata=meta)
        except (DistillError, OSError) as e:
            self.status(f"export: {e}")
            return
        self.status(f"exported {report.path}")
