"""A code grid (levels × time) drawn as coloured cells, one hue per code, with a cursor and a
rectangular selection. Keys move the cursor (arrows) and stretch the selection (shift+arrows);
what an edit does is the screen's business."""

from __future__ import annotations

import colorsys
from typing import ClassVar

import numpy as np
from rich.color import Color
from rich.style import Style
from rich.text import Text
from textual.binding import Binding, BindingType
from textual.geometry import Region
from textual.message import Message
from textual.reactive import reactive
from textual.widget import Widget

LABEL_W = 4  # "L1  "


def code_colour(code: int, codebook_size: int) -> Color:
    """A hue per code, spread round the wheel (golden-ratio steps keep neighbours apart)."""
    if code < 0:
        return Color.from_rgb(40, 40, 40)
    hue = (code * 0.618034) % 1.0
    r, g, b = colorsys.hls_to_rgb(hue, 0.35, 0.55)
    return Color.from_rgb(int(r * 255), int(g * 255), int(b * 255))


class CodeGridView(Widget, can_focus=True):
    DEFAULT_CSS = """
    CodeGridView { height: auto; min-height: 3; padding: 0 1; border: round $primary-darken-2; }
    CodeGridView:focus { border: round $accent; }
    """
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("left", "move(0, -1)", "←", show=False),
        Binding("right", "move(0, 1)", "→", show=False),
        Binding("up", "move(-1, 0)", "↑", show=False),
        Binding("down", "move(1, 0)", "↓", show=False),
        Binding("shift+left", "select(0, -1)", "select", show=False),
        Binding("shift+right", "select(0, 1)", "select", show=False),
        Binding("shift+up", "select(-1, 0)", "select", show=False),
        Binding("shift+down", "select(1, 0)", "select", show=False),
        Binding("home", "jump(0)", "start", show=False),
        Binding("end", "jump(-1)", "end", show=False),
    ]

    codes: reactive[np.ndarray | None] = reactive(None, always_update=True, layout=True)
    cursor: reactive[tuple[int, int]] = reactive((0, 0))
    mark: reactive[tuple[int, int] | None] = reactive(None)  # the selection's other corner

    class Moved(Message):
        def __init__(self, grid: CodeGridView) -> None:
            super().__init__()
            self.grid = grid

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.codebook_size = 1
        self.scroll_t = 0  # the first step drawn

    def set_codes(self, codes: np.ndarray, codebook_size: int) -> None:
        self.codebook_size = codebook_size
        self.codes = np.asarray(codes, dtype=np.int64)  # (Q, T)
        q, t = self.codes.shape
        self.cursor = (min(self.cursor[0], q - 1), min(self.cursor[1], t - 1))

    # --- selection ----------------------------------------------------------------------------
    def selection(self) -> tuple[int, int, int, int]:
        """[level0, level1) × [t0, t1): the selection, or the cursor's cell when none."""
        (q0, t0), (q1, t1) = self.cursor, self.mark or self.cursor
        return min(q0, q1), max(q0, q1) + 1, min(t0, t1), max(t0, t1) + 1

    def _clamp(self, q: int, t: int) -> tuple[int, int]:
        assert self.codes is not None
        levels, steps = self.codes.shape
        return min(max(q, 0), levels - 1), min(max(t, 0), steps - 1)

    def action_move(self, dq: int, dt: int) -> None:
        if self.codes is None:
            return
        self.mark = None
        self.cursor = self._clamp(self.cursor[0] + dq, self.cursor[1] + dt)
        self.show_cursor()
        self.post_message(self.Moved(self))

    def action_select(self, dq: int, dt: int) -> None:
        if self.codes is None:
            return
        if self.mark is None:
            self.mark = self.cursor
        self.cursor = self._clamp(self.cursor[0] + dq, self.cursor[1] + dt)
        self.show_cursor()
        self.post_message(self.Moved(self))

    def action_jump(self, t: int) -> None:
        if self.codes is not None:
            self.cursor = self._clamp(self.cursor[0], t if t >= 0 else self.codes.shape[1] - 1)

    def show_cursor(self) -> None:
        """Scroll the container so the cursor's row is on screen, down to the line under the
        grid that says what the cursor is on (the steps scroll inside the grid, see render).
        A grid is as tall as its levels: at 80x24 grid B's lower levels were below the fold,
        and an edit there changed a cell nobody could see."""
        parent = self.parent
        if self.codes is None or not isinstance(parent, Widget) or not self.region:
            return
        box = self.virtual_region  # in the container's (scrolled) space
        top = self.styles.gutter.top  # border and padding above level 1
        row = box.y + top + self.cursor[0]
        bottom = box.y + top + self.codes.shape[0] + 1 + self.styles.gutter.bottom  # the info line, the border
        parent.scroll_to_region(Region(box.x, row, box.width, bottom - row), animate=False,
                                immediate=True)

    # --- drawing ------------------------------------------------------------------------------
    def cell_width(self) -> int:
        return len(str(max(self.codebook_size - 1, 0))) + 1

    def get_content_height(self, container: object, viewport: object, width: int) -> int:
        return 1 + (self.codes.shape[0] if self.codes is not None else 1)

    def _visible_steps(self) -> int:
        return max(1, (self.content_size.width - LABEL_W) // self.cell_width())

    def render(self) -> Text:
        if self.codes is None:
            return Text("no codes: encode a sound (o)", style="dim")
        levels, steps = self.codes.shape
        visible = self._visible_steps()
        t_cur = self.cursor[1]
        if t_cur < self.scroll_t:
            self.scroll_t = t_cur
        elif t_cur >= self.scroll_t + visible:
            self.scroll_t = t_cur - visible + 1
        q0, q1, t0, t1 = self.selection()
        w = self.cell_width()
        out = Text()
        for q in range(levels):
            out.append(f"L{q + 1:<3}", style="bold")
            for t in range(self.scroll_t, min(steps, self.scroll_t + visible)):
                code = int(self.codes[q, t])
                style = Style(bgcolor=code_colour(code, self.codebook_size), color="white")
                if (q, t) == self.cursor:
                    style = Style(bgcolor="white", color="black", bold=True)
                elif self.mark is not None and q0 <= q < q1 and t0 <= t < t1:
                    style = Style(bgcolor="grey70", color="black")
                label = "·" if code < 0 else str(code)
                out.append(label.rjust(w - 1) + " ", style)
            out.append("\n")
        q, t = self.cursor
        sel = f"  selection L{q0 + 1}-L{q1} × {t0}..{t1 - 1}" if self.mark is not None else ""
        out.append(f"L{q + 1} t{t} = {int(self.codes[q, t])}   steps {self.scroll_t}.."
                   f"{min(steps, self.scroll_t + visible) - 1} of {steps}{sel}", style="dim")
        return out
