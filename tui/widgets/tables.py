"""Refilling a DataTable with columns sized to their content at once."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rich.text import Text
from textual.widgets import DataTable

from distill.shared.ids import escaped


def fill_table(table: DataTable[Any], columns: Sequence[str], rows: Sequence[Sequence[Any]],
               keys: Sequence[str] | None = None) -> None:
    """Replace a table's rows, keeping the cursor on the same row: the row with the same key
    when the rows have keys and that key is still there (a job list that gains a job at the
    top must not move another job under the cursor), else the same row index. The columns are
    made again with widths measured here: auto widths only catch up when the app next goes
    idle, so a busy screen (or a snapshot) would show them cut short meanwhile."""
    row = table.cursor_row
    key = None
    if keys is not None and 0 <= row < table.row_count:
        key = table.ordered_rows[row].key.value
    table.clear(columns=True)
    for i, label in enumerate(columns):
        table.add_column(label, width=max([len(label), *(len(escaped(str(r[i]))) for r in rows)]))
    for n, cells in enumerate(rows):
        # text as it is: a str cell is read as markup ("[/red].wav" crashed the dataset
        # screen, "[reverse blink]" styled a name), and a control character is escaped
        shown = [Text(escaped(c)) if isinstance(c, str) else c for c in cells]
        table.add_row(*shown, key=keys[n] if keys is not None else None)
    if keys is not None and key is not None and key in keys:
        row = list(keys).index(key)
    if rows:
        table.move_cursor(row=min(max(row, 0), len(rows) - 1), animate=False)
