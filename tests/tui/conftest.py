"""Fixtures for the UI tests: one real cluster per test module (a broker and the workers the
module asks for), and helpers that wait on the app without blocking its event loop."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.conftest import Cluster


@pytest.fixture(scope="module")
def module_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = Cluster(tmp_path_factory.mktemp("cluster"))
    try:
        yield c
    finally:
        c.stop()


async def until(pilot: Any, predicate: Callable[[], Any], timeout_s: float = 30.0,
                what: str = "condition", detail: Callable[[], str] | None = None) -> Any:
    """Let the app run (``pilot.pause``) until ``predicate`` holds; fail after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        await pilot.pause(0.05)
        await asyncio.sleep(0)
    extra = f" ({detail()})" if detail else ""
    raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}{extra}")


def notices(app: Any) -> list[str]:
    """The messages of the app's notifications (toasts) still shown."""
    return [n.message for n in app._notifications]


async def fed_training(app: Any, record: dict[str, Any], previews: list[dict[str, Any]] | None = None) -> Any:
    """The training screen of ``record``'s job, opened with no broker behind it: its history
    request cancelled and the record (and ``previews``) fed instead. The screen."""
    from distill.tui.screens.training import TrainingScreen

    await app.open_training(record["id"])
    screen = app.screen
    assert isinstance(screen, TrainingScreen)
    screen.workers.cancel_group(screen, "history")
    screen.apply_history(record, previews or [])
    return screen
