"""``distill tui``: the terminal UI, in this terminal or served to a browser (``--serve``).

The UI lives in ``distill.tui``, a room above ``shared``: like the broker and workers it is
imported by module path when the command runs, never at import time."""

from __future__ import annotations

import errno
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
    from distill.shared.bus.core import broker_endpoint
    from distill.shared.errors import DistillError

    try:
        broker_endpoint(broker)  # a malformed address in one line, not a traceback from the UI
    except DistillError as e:
        fail(str(e))
    if not serve:
        _entry()(broker)
        return
    problem = listen_problem(host, port)
    if problem is not None:
        fail(problem)
    try:
        from textual_serve.server import Server
    except ImportError:
        fail("--serve needs textual-serve: pip install 'distill[serve]'")
    typer.echo(f"serving the Distill UI on http://{host}:{port} (Ctrl-C stops)")
    try:
        Server(serve_command(broker), host=host, port=port, title="Distill").serve()
    except OSError as e:  # taken since listen_problem looked
        fail(f"--serve: cannot listen on {host}:{port}: {e.strerror or e}")


def listen_problem(host: str, port: int) -> str | None:
    """Why the server could not listen on ``host``:``port`` (taken by another program, a host
    not of this machine), or None: said in one line before it starts (aiohttp's bind error was
    a 50-line traceback)."""
    import socket

    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds
            probe.bind(address)
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            return f"--serve: port {port} on {host} is in use by another program: give another with --port"
        return f"--serve: cannot listen on {host}:{port}: {e.strerror or e}"
    return None
