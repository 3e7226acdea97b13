"""Textual's footer, without the leak that made a long session grow by ~0.4 MB a screen switch.

Textual's ``Footer`` builds its keys again whenever the bindings change (every screen switch),
and each key binds the footer's ``compact`` reactive, which registers a watcher on the footer;
the old keys are removed but their watchers stay until ``compact`` changes, which it never does
(Textual issue #6666, open with 8.2.8). Measured: 18 keys a switch kept alive, 67 -> 245 MB
over 400 switches. This footer drops the watchers of keys no longer attached after it
recomposes (67 -> 84 MB over the same 400, its keys alive constant). Where a later Textual
keeps its watchers elsewhere, there is nothing here to drop and it is Textual's footer.
"""

from __future__ import annotations

from textual.widgets import Footer as TextualFooter


class Footer(TextualFooter):
    async def recompose(self) -> None:
        await super().recompose()
        watchers = getattr(self, "__watchers", None)  # Textual's name for them (reactive.py)
        if not isinstance(watchers, dict):
            return
        for entries in watchers.values():
            if isinstance(entries, list):
                entries[:] = [entry for entry in entries if _attached(entry)]


def _attached(entry: object) -> bool:
    """Whether a watcher entry, ``(node, callback)``, belongs to a node still on screen."""
    node = entry[0] if isinstance(entry, tuple) and entry else None
    return bool(getattr(node, "is_attached", True))
