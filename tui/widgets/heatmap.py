"""Codebook usage heatmap: levels × codes, one terminal row per level, codes binned into the
columns there are. Brighter is used more (log scale, per level); a dim dot is a code nobody
used this epoch."""

from __future__ import annotations

import math
from collections.abc import Sequence

from rich.color import Color
from rich.style import Style
from rich.text import Text
from textual.reactive import reactive
from textual.widget import Widget

LOW = (24, 30, 80)  # rarely used: dark blue
HIGH = (250, 220, 60)  # most used in its level: yellow
LABEL_W = 4  # "L1  "
NO_USAGE = "no codebook usage yet (it comes with each epoch's metrics)"


def shade(t: float) -> Color:
    """A colour between LOW (t=0) and HIGH (t=1)."""
    t = min(max(t, 0.0), 1.0)
    r, g, b = (round(lo + (hi - lo) * t) for lo, hi in zip(LOW, HIGH, strict=True))
    return Color.from_rgb(r, g, b)


def bin_counts(counts: Sequence[float], columns: int) -> list[float]:
    """Sum ``counts`` into ``columns`` bins of near-equal size (``columns`` ≤ len(counts))."""
    n = len(counts)
    columns = max(1, min(columns, n))
    edges = [round(i * n / columns) for i in range(columns + 1)]
    return [float(sum(counts[edges[i]:edges[i + 1]])) for i in range(columns)]


def heat_line(counts: Sequence[float], columns: int) -> Text:
    binned = bin_counts(counts, columns)
    top = max(binned) if binned else 0.0
    line = Text()
    for value in binned:
        if value <= 0:
            line.append("·", Style(color="grey35"))
        else:
            t = math.log1p(value) / math.log1p(top) if top > 0 else 0.0
            line.append("█", Style(color=shade(t)))
    return line


class CodebookHeatmap(Widget):
    DEFAULT_CSS = """
    CodebookHeatmap { height: auto; min-height: 2; padding: 0 1; }
    """

    usage: reactive[list[list[float]]] = reactive(list, layout=True)
    epoch: reactive[int | None] = reactive(None)
    group: int = 1  # codes summed in each count
    empty: reactive[str] = reactive(NO_USAGE)  # what it says with no usage

    def set_usage(self, usage: list[list[float]], epoch: int | None, group: int = 1) -> None:
        """Per level, code counts; ``group``: codes summed in each count (large codebooks)."""
        self.group = max(1, int(group))  # before usage: setting that redraws
        self.usage = [list(map(float, level)) for level in usage]
        self.epoch = epoch

    def get_content_height(self, container: object, viewport: object, width: int) -> int:
        return max(1, len(self.usage)) + 1

    def render(self) -> Text:
        if not self.usage:
            return Text(self.empty, style="dim")
        width = max(8, self.content_size.width - LABEL_W)
        codes = len(self.usage[0]) * self.group
        per = max(1, math.ceil(len(self.usage[0]) / width)) * self.group
        out = Text()
        for level, counts in enumerate(self.usage, 1):
            out.append(f"L{level:<3}", style="bold")
            out.append_text(heat_line(counts, width))
            out.append("\n")
        epoch = f"epoch {self.epoch}: " if self.epoch is not None else ""
        out.append(f"{epoch}{len(self.usage)} levels × {codes} codes"
                   + (f", {per} codes per column" if per > 1 else ""), style="dim")
        return out
