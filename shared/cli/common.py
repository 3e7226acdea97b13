"""What every command group shares: the ``--broker`` option, a client, errors and tables."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, NoReturn

import typer

BrokerOpt = typer.Option(None, "--broker", "-b", envvar="DISTILL_BROKER",
                         help="Broker endpoint: tcp://HOST:PORT, HOST:PORT or HOST.")


def data_home() -> Path:
    return Path(os.environ.get("DISTILL_HOME", Path.home() / ".local/share/distill"))


def client(broker: str | None, timeout_s: float = 10.0) -> Any:
    """A blocking client for ``broker`` (imported here so that ``--help`` stays fast)."""
    from distill.shared.bus.client import Client

    return Client(broker, timeout_s=timeout_s)


# The exit status of a broker or worker process that cannot run as configured (its data folder
# or port held by another broker, a device this machine lacks, a bad key file): restarting it
# would fail the same way, so `distill up` stops instead of restarting it (sysexits' EX_CONFIG).
EXIT_UNUSABLE = 78


def fail(message: str, code: int = 1) -> NoReturn:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def human_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def print_table(headers: list[str], rows: list[list[Any]]) -> None:
    cells = [[str(c) if c is not None else "-" for c in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    typer.echo("  ".join(h.upper().ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip())
    for row in cells:
        typer.echo("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
