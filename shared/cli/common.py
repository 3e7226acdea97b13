"""What every command group shares: the ``--broker`` option, a client, errors and tables."""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any, NoReturn

import typer

from distill.shared.ids import escaped

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
    typer.secho(f"error: {shown(message, lines=True)}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def output_file_problem(path: Path, force: bool, option: str = "-o") -> str | None:
    """Why a file cannot be written at ``path`` (given as ``option``), or None: checked before
    the work that makes it, so that minutes of it are not lost at the end. A folder, a missing
    or unwritable folder, and (without ``force``) an existing file are refused: nothing is
    replaced by surprise."""
    if path.is_dir():
        return f"{option} {path}: that is a folder; give a file's name"
    if (path.exists() or path.is_symlink()) and not force:
        return f"{path} exists: give another {option}, or --force to replace it"
    folder = path.parent
    if not folder.is_dir():
        return f"{option} {path}: no folder {folder}"
    return write_problem(folder, option, path)


def write_problem(folder: Path, option: str, shown: Path) -> str | None:
    """Why no file can be made in ``folder`` (``option`` ``shown``: what the user gave, for the
    message), or None: tried with a temporary file, as permissions alone do not say (a
    read-only mount, root)."""
    import tempfile

    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        return f"{option} {shown}: cannot write files in {folder} ({e.strerror or e})"
    return None


class LiveLine:
    """A progress line. On a terminal it rewrites itself (``\r``); written to a file or a pipe
    (the log of an overnight ``nohup distill train``) each update is a line of its own, at most
    one every ``every_s`` seconds, the latest kept for :meth:`end` (a log held thousands of
    ``\r`` updates on one line: 193 kB for one upload)."""

    def __init__(self, every_s: float = 10.0, stream: Any = None) -> None:
        import sys

        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.every_s = every_s
        self._last = -math.inf
        self._pending: str | None = None
        self._open = False  # a terminal's line written without its newline

    def say(self, text: str) -> None:
        """A line of its own between updates (a job's status, a note): after the live line,
        which goes on below it (it ran into the next update: "j-…: runningepoch 1/25")."""
        if self._open:
            self.stream.write("\n")
            self._open = False
        elif self._pending is not None:  # the latest state first, then what happened
            self.stream.write(self._pending.rstrip() + "\n")
            self._pending = None
        self.stream.write(text + "\n")
        self.stream.flush()

    def update(self, text: str, width: int | None = None) -> None:
        text = shown(text)  # a file's name in it is shown, not acted on
        if self.tty:
            self.stream.write("\r" + (text[:width].ljust(width) if width else text))
            self._open = True
        else:
            now = time.monotonic()
            if now - self._last < self.every_s:
                self._pending = text
                return
            self._last, self._pending = now, None
            self.stream.write(text.rstrip() + "\n")
        self.stream.flush()

    def end(self) -> None:
        """The latest update held back (off a terminal), on its own line; a terminal's line is
        ended."""
        if self.tty:
            if self._open:
                self.stream.write("\n")
            self._open = False
        elif self._pending is not None:
            self.stream.write(self._pending.rstrip() + "\n")
            self._pending = None
        self.stream.flush()


def ago(ts: float | None) -> str:
    """How long ago ``ts`` (a Unix time) was: seconds, minutes, hours, then days."""
    if not ts:
        return "-"
    s = time.time() - ts
    if s < 120:
        return f"{s:.0f}s ago"
    if s < 7200:
        return f"{s / 60:.0f}m ago"
    return f"{s / 3600:.1f}h ago" if s < 48 * 3600 else f"{s / 86400:.1f}d ago"


def human_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def shown(value: Any, *, lines: bool = False) -> str:
    """``value`` as text a terminal shows and does not act on: a control or format character
    (ESC, BEL, NUL, U+202E) written as its escape (``lines``: newlines and tabs kept). Names
    come from peers and other people's files; an ESC sequence in one could clear the screen
    or retitle the window."""
    return escaped(str(value), lines=lines)


def print_table(headers: list[str], rows: list[list[Any]]) -> None:
    """Columns padded by the terminal cells a text takes (a CJK character or an emoji takes
    two: padded by characters, such names shifted the columns after them); control and format
    characters shown escaped (see :func:`shown`)."""
    from rich.cells import cell_len

    cells = [[shown(c) if c is not None else "-" for c in row] for row in rows]
    widths = [max([len(h)] + [cell_len(r[i]) for r in cells]) for i, h in enumerate(headers)]

    def pad(text: str, width: int) -> str:
        return text + " " * (width - cell_len(text))

    typer.echo("  ".join(pad(h.upper(), w) for h, w in zip(headers, widths, strict=True)).rstrip())
    for row in cells:
        typer.echo("  ".join(pad(c, w) for c, w in zip(row, widths, strict=True)).rstrip())
