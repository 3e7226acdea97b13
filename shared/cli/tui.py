"""``distill tui``: the terminal UI, in this terminal or served to a browser (``--serve``).

The UI lives in ``distill.tui``, a room above ``shared``: like the broker and workers it is
imported by module path when the command runs, never at import time."""

from __future__ import annotations

import importlib
import shlex
import sys
from collections.abc import Callable
from typing import Any

import typer

from distill.shared.cli.common import BrokerOpt, fail

TUI_ENTRY = "distill.tui.app:run"


def register(app: typer.Typer) -> None:
    app.command()(tui)


def _entry() -> Callable[..., Any]:
    module, _, function = TUI_ENTRY.partition(":")
    run: Callable[..., Any] = getattr(importlib.import_module(module), function)
    return run


def serve_command(broker: str | None) -> str:
    """The shell command each browser session runs: this same UI, in a terminal the server owns."""
    args = [sys.executable, "-m", "distill.shared.cli", "tui"]
    if broker:
        args += ["--broker", broker]
    return shlex.join(args)


def tui(
    broker: str = BrokerOpt,
    serve: bool = typer.Option(False, "--serve", help="Serve the UI to a browser (textual-serve) instead."),
    host: str = typer.Option("127.0.0.1", help="With --serve: address to listen on (loopback by default; "
                             "no authentication, so only a trusted network)."),
    port: int = typer.Option(8000, help="With --serve: HTTP port."),
) -> None:
    """The terminal UI: dashboard, datasets, training (keyboard first; ? for help)."""
    if not serve:
        _entry()(broker)
        return
    try:
        from textual_serve.server import Server
    except ImportError:
        fail("--serve needs textual-serve: pip install 'distill[serve]'")
    typer.echo(f"serving the Distill UI on http://{host}:{port} (Ctrl-C stops)")
    Server(serve_command(broker), host=host, port=port, title="Distill").serve()
