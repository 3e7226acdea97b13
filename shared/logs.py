"""Structured logging: one event name and key-value fields; JSON lines when not on a TTY.

Every line carries the process role (``broker``, ``worker``, ``cli``…) and an id, so the
interleaved logs of ``distill up`` stay readable and machine-parseable.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Hashable
from typing import Any

import structlog

REPEAT_KEYS = 1024  # distinct repeated warnings tracked at once (see Repeats)


def configure(role: str, ident: str | None = None, *, level: str | None = None) -> None:
    """Configure structlog for this process. Safe to call more than once."""
    level_name = (level or os.environ.get("DISTILL_LOG_LEVEL", "info")).upper()
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if sys.stderr.isatty() and os.environ.get("DISTILL_LOG_JSON") != "1":
        processors.append(structlog.dev.ConsoleRenderer(colors=True))
    else:
        processors += [structlog.processors.format_exc_info, structlog.processors.JSONRenderer()]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level_name)),
        # WriteLogger writes a record and its newline in one call (PrintLogger's print makes
        # two): the processes of `distill up` share one stderr, and between two writes another
        # process's record ran into the same line, which then was not JSON any more.
        logger_factory=structlog.WriteLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(role=role, id=ident or f"{role}-{os.getpid()}")


def get_logger(name: str | None = None) -> Any:
    return structlog.get_logger(name)


class Repeats:
    """A warning a peer can repeat without end (a refused handshake every 0.1 s, for ever) said
    once per ``every_s`` for each key, with how many were held back since: a misconfigured
    machine left running overnight writes a line a minute, not a million."""

    def __init__(self, every_s: float = 60.0) -> None:
        self.every_s = every_s
        self._last: dict[Hashable, tuple[float, int]] = {}  # key -> (said at, held back since)

    def due(self, key: Hashable, now: float | None = None) -> int | None:
        """None: hold this one back (it is counted); else say it, with this many held back."""
        now = time.monotonic() if now is None else now
        said = self._last.get(key)
        if said is not None and now - said[0] < self.every_s:
            self._last[key] = (said[0], said[1] + 1)
            return None
        if len(self._last) >= REPEAT_KEYS:  # keys come from peers: keep the table bounded
            self._last.clear()
        self._last[key] = (now, 0)
        return 0 if said is None else said[1]
