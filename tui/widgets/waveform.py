"""A sound drawn in the terminal: the peak of each column as a bar of eighth-blocks, mirrored
round the middle row. ``thumbnail`` gives the same as one line of text for a table cell."""

from __future__ import annotations

import numpy as np
from rich.text import Text
from textual.reactive import reactive
from textual.widget import Widget

from distill.shared.ids import escaped

EIGHTHS = " ▁▂▃▄▅▆▇█"  # filled from the bottom: the upper half's bars grow up from the middle
HANGING = " ▔▔▀▀▀▀██"  # filled from the top: the lower half's bars hang down (eighths, coarser)


def column_peaks(audio: np.ndarray, columns: int) -> np.ndarray:
    """The absolute peak of each of ``columns`` equal slices of ``audio`` (samples,), scaled so
    that the loudest column is 1 (silence stays 0)."""
    audio = np.asarray(audio, dtype=np.float32).reshape(-1)
    if audio.size == 0 or columns <= 0:
        return np.zeros(max(columns, 0), dtype=np.float32)
    edges = np.linspace(0, audio.size, columns + 1).astype(int)
    peaks = np.array([np.abs(audio[a:b]).max() if b > a else 0.0 for a, b in zip(edges[:-1], edges[1:], strict=True)],
                     dtype=np.float32)
    top = float(peaks.max())
    return peaks / top if top > 0 else peaks


def thumbnail(audio: np.ndarray, width: int = 24) -> str:
    return "".join(EIGHTHS[int(round(p * 8))] for p in column_peaks(audio, width))


class Waveform(Widget):
    DEFAULT_CSS = """
    Waveform { height: 5; color: $accent; padding: 0 1; }
    """

    audio: reactive[np.ndarray | None] = reactive(None, always_update=True)
    label: reactive[str] = reactive("")

    def show(self, audio: np.ndarray | None, label: str = "") -> None:
        self.audio = audio
        self.label = label

    def render(self) -> Text:
        width, height = max(1, self.content_size.width), max(2, self.content_size.height - 1)
        if self.audio is None:
            return Text("no sound selected", style="dim")
        peaks = column_peaks(self.audio, width)
        half = height / 2
        out = Text()
        for row in range(height):
            # Distance of this row's top from the middle, in rows; a bar of height p*half
            # fills the rows it covers, with an eighth-block at its tip.
            line = []
            blocks = EIGHTHS if row < half else HANGING
            depth = abs(row + 0.5 - half) - 0.5  # 0 for the rows next to the middle
            for p in peaks:
                fill = min(max(p * half - depth, 0.0), 1.0)
                line.append(blocks[int(round(fill * 8))])
            out.append("".join(line) + "\n")
        out.append(escaped(self.label), style="dim")  # it names a file: an ESC in it is shown
        return out
