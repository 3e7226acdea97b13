"""Refilling a DataTable with columns sized to their content at once."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from textual.widgets import DataTable


def fill_table(table: DataTable[Any], columns: Sequence[str], rows: Sequence[Sequence[Any]],
               keys: Sequence[str] | None = None) -> None:
    """Replace a table's rows, keeping the cursor on the same row index. The columns are made
    again with widths measured here: auto widths only catch up when the app next goes idle, so
    a busy screen (or a snapshot) would show them cut short meanwhile."""
    row = table.cursor_row
    table.clear(columns=True)
    for i, label in enumerate(columns):
        table.add_column(label, width=max([len(label), *(len(str(r[i])) for r in rows)]))
    for n, cells in enumerate(rows):
        table.add_row(*cells, key=keys[n] if keys is not None else None)
    if rows:
        table.move_cursor(row=min(max(row, 0), len(rows) - 1), animate=False)
