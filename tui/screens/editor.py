"""The code editor: encode a sound (a file here, or one from the generate screen) into its
code grid, edit it cell by cell or by region, hear a coarse preview after every edit, undo and
redo, and export the result decoded at full quality.

Two grids (A and B; tab moves between them) make copy/paste, swap and blend between sounds
possible. Every edit goes to ``distill.infer`` as an ``edit`` request carrying the whole edit
session (base grid and edits), so the worker holds no state and undo survives anything.

Keys are queued, not raced: each edit runs when the one before it has come back, and reads the
grid that one left, so fast typing loses nothing. A key that reads or changes a grid whose
encode is still queued or running is refused with a word: its cursor and codes are not known
until the encode comes back."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from textual import events, on, work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, VerticalScroll
from textual.widgets import Header, Input, Label, Select, Static

from distill.shared.errors import DistillError
from distill.shared.ids import escaped
from distill.shared.model.codes import CodeGrid, EditSession
from distill.tui.screens.base import DistillScreen
from distill.tui.widgets.codegrid import CodeGridView
from distill.tui.widgets.footer import Footer
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
    sample_rate: int = 0  # the preview's (the model's rate)
    can_undo: bool = False
    can_redo: bool = False
    source_audio: np.ndarray | None = None  # what was encoded (blend needs the sound itself)
    source_rate: int = 0  # its rate (the file's), not the preview's (the model's)
    history: list[str] = field(default_factory=list)


Job = Callable[[], Awaitable[None]]


class EditorScreen(DistillScreen):
    AUTO_FOCUS = "#grid-a"
    # Short descriptions, the keys of the encode-edit-listen loop first, and `?` ahead of them:
    # thirteen keys share the footer with the screens' and most were cut at 80 columns (`?`
    # among them); the help lists every key in full.
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("question_mark", "app.help", "Help", key_display="?"),
        Binding("o", "encode", "Encode"),
        Binding("plus,equals_sign", "bump(1)", "+1", key_display="+"),
        Binding("minus", "bump(-1)", "-1", key_display="-"),
        Binding("u", "undo", "Undo"),
        Binding("r", "redo", "Redo"),
        Binding("p", "play", "Play"),
        Binding("x", "export", "Export"),
        Binding("y", "copy", "Copy"),
        Binding("v", "paste", "Paste"),
        Binding("w", "swap", "Swap"),
        Binding("b", "blend", "Blend"),
        Binding("a", "resample", "Resample"),
        Binding("k", "keep_levels", "Keep"),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.slots = [Slot(), Slot()]
        self.clip: np.ndarray | None = None  # (levels, steps) copied codes
        self.codebook_size = 0
        self.jobs: asyncio.Queue[tuple[str, Job]] = asyncio.Queue()
        self.pending = 0  # jobs queued or running
        self.encoding: set[int] = set()  # grids with an encode queued or running
        self.last_grid = 0  # the grid focused last (see active)

    def compose(self) -> ComposeResult:
        yield Header()
        with VerticalScroll():
            # compact fields, as the generate screen's: the grids get the rows at 80x24
            with Horizontal(classes="form row compact"):
                yield Label("model")
                yield Select[str]([], prompt="no models (m on the generate screen)", id="edit-model",
                                  compact=True)  # fmt: skip
            with Horizontal(classes="form row compact"):
                yield Label("sound")
                yield Input(placeholder="a file here, or gen:N (a generated sound)", id="source",
                            compact=True)  # fmt: skip
                yield Label("export")
                yield Input(placeholder="~/distill-edits", id="edit-export", compact=True)
            yield CodeGridView(id="grid-a")
            yield CodeGridView(id="grid-b")
        # Outside the scroll, the preview (what each edit sounds like) and the status line
        # (every result and error): two tall grids (12 levels each) pushed them below the fold
        # at 80x24, where the arrow keys never take them.
        yield Waveform(id="edit-wave")
        yield Static("encode a sound into grid A (o); tab moves to grid B", id="edit-status", markup=False,
                     classes="status-line")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#grid-a", CodeGridView).border_title = "A"
        self.query_one("#grid-b", CodeGridView).border_title = "B"
        self.run_jobs()
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
        self.fill_models(self.query_one("#edit-model", Select), models)

    # --- which grid ---------------------------------------------------------------------------
    @property
    def active(self) -> int:
        """The grid a key acts on: the focused one, else the one focused last (enter in the
        sound field encodes into the grid one came from)."""
        if isinstance(self.focused, CodeGridView):
            return 1 if self.focused is self.grid(1) else 0
        return self.last_grid

    def on_descendant_focus(self, event: events.DescendantFocus) -> None:
        if isinstance(event.widget, CodeGridView):
            self.last_grid = 1 if event.widget is self.grid(1) else 0

    @on(Input.Submitted, "#source")
    def _source_submitted(self) -> None:
        self.action_encode()  # as generate takes enter in its fields

    @on(Input.Submitted, "#edit-export")
    def _export_submitted(self) -> None:
        self.action_export()

    def grid(self, i: int) -> CodeGridView:
        return self.query_one("#grid-b" if i else "#grid-a", CodeGridView)

    def model(self) -> str:
        value = self.query_one("#edit-model", Select).value
        if not isinstance(value, str):
            raise DistillError("choose a model first")
        return value

    # --- the queue ---------------------------------------------------------------------------
    @work(group="edit-queue")
    async def run_jobs(self) -> None:
        """Runs the queued jobs one at a time, in the order their keys were pressed; a job that
        fails says so on the status line and the next one runs."""
        while True:
            what, job = await self.jobs.get()
            try:
                await job()
            except DistillError as e:
                self.status(f"{what}: {e}")
            finally:
                self.pending -= 1

    def enqueue(self, what: str, job: Job) -> None:
        """Queue ``job`` (``what`` names it in an error) behind the ones already queued."""
        self.pending += 1
        self.jobs.put_nowait((what, job))
        if self.pending > 1:
            self.status(f"{what}: queued ({self.pending - 1} ahead)")

    def _ready(self, *grids: int) -> None:
        """Refuse a key that would read or change a grid being encoded (or an empty one)."""
        for i in grids:
            if i in self.encoding:
                raise DistillError(f"grid {'AB'[i]} is being encoded: wait until it is shown")
            if self.slots[i].session is None:
                raise DistillError(f"grid {'AB'[i]} is empty: encode a sound into it first (o)")

    # --- requests -----------------------------------------------------------------------------
    async def infer(self, body: dict[str, Any], timeout_s: float = EDIT_TIMEOUT_S
                    ) -> dict[str, Any]:  # fmt: skip
        self.check_worker(INFER)  # said now, not after the broker's 30-s request timeout
        reply: dict[str, Any] = await self.distill.infer_client.request(
            INFER, {**body, "model": self.model()}, timeout_s=timeout_s)
        return reply

    def action_encode(self) -> None:
        raw = self.query_one("#source", Input).value.strip()
        if not raw:
            self.notify("type a sound file (or gen:N) first", severity="warning")
            return
        i = self.active
        if i in self.encoding:
            self.notify(f"grid {'AB'[i]} is being encoded already", severity="warning")
            return
        # Read in a thread from now on (the first read imports torch, and a long file decodes
        # for a second or more: both froze the screen), its sound taken in the queue's order.
        reading = asyncio.ensure_future(asyncio.to_thread(self.source_audio, raw))
        self.encoding.add(i)

        async def job() -> None:
            try:
                try:
                    audio, rate, name = await reading
                except (DistillError, OSError) as e:
                    self.notify_error("sound", e)
                    return
                await self.encode(i, audio, rate, name)
            finally:
                self.encoding.discard(i)

        self.enqueue("encode failed", job)

    def source_audio(self, raw: str) -> tuple[np.ndarray, int, str]:
        if raw.startswith("gen:"):
            generated = self.distill.last_generated
            index = int(raw[4:]) if raw[4:].isdigit() else -1
            if generated is None or not 0 <= index < len(generated[0]):
                raise DistillError(f"{raw}: no such generated sound (generate some first)")
            return generated[0][index], generated[1], raw
        return file_audio(Path(raw).expanduser())

    async def encode(self, i: int, audio: np.ndarray, rate: int, name: str) -> None:
        seconds = len(audio) / rate
        self.status(f"encoding {name} into {'AB'[i]} ({seconds:.1f} s: its codes are searched "
                    "by what they decode to) …")  # fmt: skip
        reply = await self.infer({"op": "encode", "audio": audio.astype(np.float32),
                                  "sample_rate": rate},
                                 timeout_s=EDIT_TIMEOUT_S + ENCODE_S_PER_SECOND * seconds)  # fmt: skip
        codes = np.asarray(reply["codes"], dtype=np.int64)
        session = EditSession(CodeGrid(codes, int(reply["codebook_size"]))).to_dict()
        slot = Slot(name=name, session=session, source_audio=audio.astype(np.float32),
                    source_rate=rate)
        first = await self._request(slot, "none", None)
        self.codebook_size = int(reply["codebook_size"])
        self.slots[i] = slot
        self._commit(i, first, f"encoded {name}")

    async def _request(self, slot: Slot, action: str, edit: dict[str, Any] | None
                       ) -> dict[str, Any]:  # fmt: skip
        """The worker's answer to an edit of ``slot``'s session as it is now; nothing changes
        until :meth:`_commit` (so a swap can have both halves before it shows either)."""
        if slot.session is None:
            raise DistillError("the grid is empty: encode a sound into it first (o)")
        body: dict[str, Any] = {"op": "edit", "session": slot.session, "action": action,
                                "quality": "preview"}
        if edit is not None:
            body["edit"] = edit
        return await self.infer(body)

    def _commit(self, i: int, reply: dict[str, Any], what: str) -> None:
        slot = self.slots[i]
        slot.session = reply["session"]
        slot.codes = np.asarray(reply["codes"], dtype=np.int64)
        slot.audio = np.asarray(reply["audio"], dtype=np.float32)
        slot.sample_rate = int(reply["sample_rate"])
        slot.can_undo, slot.can_redo = bool(reply["can_undo"]), bool(reply["can_redo"])
        slot.history.append(what)
        self.grid(i).set_codes(slot.codes, self.codebook_size)
        self.query_one("#edit-wave", Waveform).show(
            slot.audio, f"{'AB'[i]}: {slot.name} — {what} (coarse preview)")
        waiting = self.pending - 1  # the job committing now is still counted
        self.status(f"{'AB'[i]}: {what}" + ("  [u undo]" if slot.can_undo else "")
                    + ("  [r redo]" if slot.can_redo else "")
                    + (f"  ({waiting} more queued)" if waiting > 0 else ""))

    async def _edit(self, i: int, action: str, edit: dict[str, Any] | None, what: str) -> None:
        self._commit(i, await self._request(self.slots[i], action, edit), what)

    def edit(self, i: int, action: str, edit: dict[str, Any] | None, what: str) -> None:
        """Queue an edit whose content is known when its key is pressed."""
        async def job() -> None:
            await self._edit(i, action, edit, what)

        self.enqueue(what, job)

    def status(self, text: str) -> None:
        # it quotes file names and errors: control characters shown, not acted on
        self.query_one("#edit-status", Static).update(escaped(text, lines=True))

    # --- edits --------------------------------------------------------------------------------
    def _codes(self, i: int) -> np.ndarray:
        codes = self.slots[i].codes
        if codes is None:
            raise DistillError(f"grid {'AB'[i]} is empty: encode a sound into it first (o)")
        return codes

    def _guard(self, fn: Any, what: str = "edit") -> None:
        try:
            fn()
        except DistillError as e:
            self.notify_error(what, e)

    # Each edit's cell, region or level is taken when its key is pressed (where the cursor was);
    # the codes it reads are taken when it runs, from the grid the edits queued before it left.
    def action_bump(self, delta: int) -> None:
        def run() -> None:
            i = self.active
            self._ready(i)
            q, t = self.grid(i).cursor

            async def job() -> None:
                code = (int(self._codes(i)[q, t]) + delta) % max(self.codebook_size, 1)
                await self._edit(i, "apply", {"op": "set_cell", "level": q, "t": t, "code": code},
                                 f"L{q + 1} t{t} = {code}")

            self.enqueue(f"L{q + 1} t{t} {delta:+d}", job)
        self._guard(run)

    def action_copy(self) -> None:
        def run() -> None:
            i = self.active
            self._ready(i)
            q0, q1, t0, t1 = self.grid(i).selection()

            async def job() -> None:  # queued: it copies what the edits before it made
                self.clip = self._codes(i)[q0:q1, t0:t1].copy()  # (levels, steps)
                self.status(f"copied {q1 - q0} levels × {t1 - t0} steps from {'AB'[i]}")

            self.enqueue("copy", job)
        self._guard(run)

    def action_paste(self) -> None:
        def run() -> None:
            i = self.active
            self._ready(i)
            q, t = self.grid(i).cursor

            async def job() -> None:  # the clip of the copy queued before it
                if self.clip is None:
                    raise DistillError("nothing copied yet (y copies the selection)")
                codes = self._codes(i)
                clip = self.clip[: codes.shape[0] - q, : codes.shape[1] - t]  # cropped at the edges
                await self._edit(i, "apply", {"op": "replace", "level": q, "t": t,
                                              "codes": clip.tolist(), "source": "paste"},
                                 f"pasted at L{q + 1} t{t}")

            self.enqueue("paste", job)
        self._guard(run)

    def action_swap(self) -> None:
        self._guard(self._swap)

    def _swap(self) -> None:
        i, j = self.active, 1 - self.active
        self._ready(i, j)
        q0, q1, t0, t1 = self.grid(i).selection()

        async def job() -> None:
            await self.swap(i, j, q0, q1, t0, t1)

        self.enqueue("swap", job)

    async def swap(self, i: int, j: int, q0: int, q1: int, t0: int, t1: int) -> None:
        """Both halves are asked for before either is shown: a swap that fails (or is stopped)
        between them changes neither grid."""
        mine, theirs = self._codes(i), self._codes(j)
        if t1 > theirs.shape[1] or q1 > theirs.shape[0]:
            raise DistillError(f"the selection reaches past grid {'AB'[j]}'s end")
        what = f"swapped L{q0 + 1} t{t0} region with {'AB'[j]}"
        incoming_j = {"op": "replace", "level": q0, "t": t0, "source": "swap",
                      "codes": mine[q0:q1, t0:t1].tolist()}
        incoming_i = {**incoming_j, "codes": theirs[q0:q1, t0:t1].tolist()}
        reply_j = await self._request(self.slots[j], "apply", incoming_j)
        reply_i = await self._request(self.slots[i], "apply", incoming_i)
        self._commit(j, reply_j, what)
        self._commit(i, reply_i, what)

    def action_blend(self) -> None:
        def run() -> None:
            i, j = self.active, 1 - self.active
            self._ready(i, j)

            async def job() -> None:
                await self.blend(i, j)

            self.enqueue("blend", job)
        self._guard(run)

    async def blend(self, i: int, j: int) -> None:
        """Blend the two sounds as they were encoded. The request has one rate for both: the
        other sound is brought to this one's rate here when theirs differ."""
        mine, theirs = self.slots[i], self.slots[j]
        a, b = mine.source_audio, theirs.source_audio
        if a is None or b is None:
            raise DistillError("blend needs a sound in both grids")
        if theirs.source_rate != mine.source_rate:
            import torch

            from distill.shared.audio.io import resample

            b = resample(torch.from_numpy(b), theirs.source_rate, mine.source_rate).numpy()
        reply = await self.infer({"op": "blend", "a": a, "b": b, "amount": 0.5,
                                  "sample_rate": mine.source_rate})
        codes = np.asarray(reply["codes"], dtype=np.int64)[:, : self._codes(i).shape[1]]  # (Q, T) crop
        await self._edit(i, "apply", {"op": "replace", "level": 0, "t": 0,
                                      "codes": codes.tolist(), "source": "blend"},
                         "blended with the other sound")

    def action_resample(self) -> None:
        def run() -> None:
            i = self.active
            self._ready(i)
            _, _, t0, t1 = self.grid(i).selection()

            async def job() -> None:
                await self.resample(i, t0, t1)

            self.enqueue("resample", job)
        self._guard(run)

    async def resample(self, i: int, t0: int, t1: int) -> None:
        reply = await self.infer({"op": "resample_region", "codes": self._codes(i), "t0": t0,
                                  "t1": t1, "seed": len(self.slots[i].history),
                                  "quality": "preview"})  # fmt: skip
        new = np.asarray(reply["codes"], dtype=np.int64)[:, t0:t1]  # (Q, t1 - t0)
        await self._edit(i, "apply", {"op": "replace", "level": 0, "t": t0,
                                      "codes": new.tolist(), "source": "resample"},
                         f"resampled steps {t0}..{t1 - 1} with the prior")

    def action_keep_levels(self) -> None:
        def run() -> None:
            i = self.active
            self._ready(i)
            q = self.grid(i).cursor[0]
            self.edit(i, "apply", {"op": "keep_levels", "k": q + 1}, f"kept the first {q + 1} levels")
        self._guard(run)

    def action_undo(self) -> None:
        def run() -> None:
            self._ready(self.active)
            self.edit(self.active, "undo", None, "undo")
        self._guard(run)

    def action_redo(self) -> None:
        def run() -> None:
            self._ready(self.active)
            self.edit(self.active, "redo", None, "redo")
        self._guard(run)

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

        # markup off: the message quotes a file's path and a player's own words
        self.app.call_from_thread(self.notify, play_audio(audio, rate))

    def action_export(self) -> None:
        def run() -> None:
            i = self.active
            folder = self.query_one("#edit-export", Input).value.strip()
            if not folder:
                raise DistillError("type an export folder first")
            self._ready(i)

            async def job() -> None:  # queued: it exports what the edits before it made
                await self.export(self.slots[i], Path(folder).expanduser())

            self.enqueue("export", job)
        self._guard(run, "export")

    async def export(self, slot: Slot, folder: Path) -> None:
        from distill.shared.audio.export import ExportMetadata, export_audio, free_path

        try:
            reply = await self.infer({"op": "decode", "codes": slot.codes, "quality": "best"})
            folder.mkdir(parents=True, exist_ok=True)
            # an earlier export of this sound (before more edits) is kept, not replaced
            name = free_path(folder / f"edit-{Path(slot.name).stem or 'sound'}.wav").name
            # threads: the worker's torch thread count, which the last bits of the decode
            # depend on: `distill regenerate` makes the same samples only with the same count
            data: dict[str, Any] = {"session": slot.session, "levels": None, "quality": "best"}
            if reply.get("threads") is not None:
                data["threads"] = reply["threads"]
            if reply.get("phase") is not None:  # the preset "best" named (a later one may differ)
                data["phase"] = reply["phase"]
            meta = ExportMetadata(kind="edit", model_id=str(reply.get("model_id", "")), title=name,
                                  data=data)
            report = export_audio(folder / name, np.asarray(reply["audio"]), int(reply["sample_rate"]),
                                  metadata=meta)
        except OSError as e:
            self.status(f"export: {e}")
            return
        self.status(f"exported {report.path}")


def file_audio(path: Path) -> tuple[np.ndarray, int, str]:
    """A file here as the editor encodes it, as ``distill encode`` prepares one: mono, its
    leading and trailing silence trimmed (and a DC offset it sat at taken off), not
    normalised, at most MAX_SECONDS once trimmed (the worker's
    bound), at its own rate; (samples,), the rate, its name. Past the bound it says so: the
    request was refused by its size instead, with advice ("submit a job") that is not the UI's."""
    import torch

    from distill.shared.audio.io import read_audio, stated_duration_s, trim_to_sound
    from distill.shared.model.inference import INPUT_SLACK_S, MAX_SECONDS

    limit = f"the editor encodes at most {MAX_SECONDS:g} s of a sound once its silence is trimmed"
    stated = stated_duration_s(path)
    if stated is not None and stated > MAX_SECONDS + INPUT_SLACK_S:  # not decoded for nothing
        raise DistillError(f"{path.name}: {stated:.1f} s long; {limit}")
    decoded = read_audio(path, max_s=MAX_SECONDS + INPUT_SLACK_S)
    mono = torch.from_numpy(np.ascontiguousarray(decoded.samples.mean(axis=0)))  # (samples,)
    trimmed = trim_to_sound(mono, decoded.sample_rate).numpy()  # (a DC offset taken off too)
    if trimmed.size > MAX_SECONDS * decoded.sample_rate:
        raise DistillError(f"{path.name}: {trimmed.size / decoded.sample_rate:.1f} s once its "
                           f"silence is trimmed; {limit}")  # fmt: skip
    return trimmed, decoded.sample_rate, path.name
