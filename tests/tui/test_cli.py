"""``distill tui``: registered, and ``--serve`` runs this same UI for each browser session."""

from __future__ import annotations

import shlex
import sys

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
