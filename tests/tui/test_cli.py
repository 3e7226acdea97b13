"""``distill tui``: registered, and ``--serve`` runs this same UI for each browser session."""

from __future__ import annotations

import shlex
import sys

import pytest
from typer.testing import CliRunner

from distill.shared.cli.main import app
from distill.shared.cli.tui import TUI_ENTRY, _entry, serve_command


def test_tui_command_is_registered_with_serve() -> None:
    out = CliRunner().invoke(app, ["tui", "--help"])
    assert out.exit_code == 0 and "--serve" in out.output and "--broker" in out.output


def test_serve_runs_the_same_ui_against_the_same_broker() -> None:
    args = shlex.split(serve_command("tcp://gpu box:5555"))  # quoting survives odd endpoints
    assert args == [sys.executable, "-m", "distill.shared.cli", "tui", "--broker", "tcp://gpu box:5555"]
    assert shlex.split(serve_command(None))[-1] == "tui"


def test_the_entry_point_is_the_apps_run() -> None:
    from distill.tui.app import run

    assert TUI_ENTRY == "distill.tui.app:run" and _entry() is run


@pytest.mark.parametrize("broker", ["http://127.0.0.1:18750", "not a url", "tcp://gpu-box"])
@pytest.mark.parametrize("command", [["tui"], ["tui", "--serve"], ["jobs", "ls"]])
def test_a_malformed_broker_address_is_one_line_naming_it(broker: str, command: list[str]) -> None:
    """Before: ZeroMQ refused it deep in the first request: a ZMQError traceback out of the UI
    (and of `distill jobs ls`). The address is checked where every client reads it."""
    out = CliRunner().invoke(app, [*command, "--broker", broker])
    assert out.exit_code == 1, out.output
    assert isinstance(out.exception, SystemExit), repr(out.exception)  # an exit, not an error
    lines = [line for line in out.output.splitlines() if line.strip()]
    assert len(lines) == 1 and f"broker address {broker!r} is not tcp://HOST:PORT" in lines[0], out.output


def test_serve_on_a_port_in_use_is_one_line_naming_it() -> None:
    """Before: aiohttp's bind error, a 50-line traceback, after "serving the Distill UI on …"."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = CliRunner().invoke(app, ["tui", "--serve", "--port", str(port)])
    assert out.exit_code == 1 and isinstance(out.exception, SystemExit), repr(out.exception)
    assert out.output.strip() == (f"error: --serve: port {port} on 127.0.0.1 is in use by another "
                                  "program: give another with --port")  # fmt: skip
