"""Why a job failed, wrapped on as many lines as it takes, up to a few; longer than that it
scrolls (tab reaches it, the arrows scroll it). A one-row line kept the first 80 characters of
reasons that often run to hundreds (a retried job's says what each attempt met)."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.containers import VerticalScroll
from textual.widgets import Static

from distill.shared.ids import escaped


class Reason(VerticalScroll):
    DEFAULT_CSS = """
    Reason { height: auto; max-height: 5; padding: 0 1; display: none; }
    Reason > Static { height: auto; color: $text-error; }
    """

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.text = ""
        self.body = Static("", markup=False)  # the broker's words as they are, never markup

    def compose(self) -> ComposeResult:
        yield self.body

    def show(self, text: str | None) -> None:
        """Show ``text`` (hidden when empty); control characters written out, lines kept."""
        text = escaped(text or "", lines=True)
        if text == self.text:
            return
        self.text = text
        self.display = bool(text)
        self.body.update(text)
        self.scroll_home(animate=False)
