"""Structured logging: one event name and key-value fields; JSON lines when not on a TTY.

Every line carries the process role (``broker``, ``worker``, ``cli``…) and an id, so the
interleaved logs of ``distill up`` stay readable and machine-parseable.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

import structlog


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
