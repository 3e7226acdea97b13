"""What every broker-hosted service uses: reply bodies and request field checks."""

from __future__ import annotations

from typing import Any

from distill.shared.bus.messages import Reply
from distill.shared.errors import DecodeError


def ok_body(result: Any) -> list[bytes]:
    """A success reply's body frames."""
    return [Reply.success(result).encode()]


def error_body(code: str, message: str) -> list[bytes]:
    """An error reply's body frames; ``code`` is one of ``distill.shared.errors.ERROR_CODES``."""
    return [Reply.failure(code, message).encode()]


def field(msg: dict[str, Any], name: str, kind: type | tuple[type, ...], default: Any = ...) -> Any:
    """``msg[name]`` checked against ``kind`` (None allowed when a default is given); a missing
    required field or a wrong type raises DecodeError, which the loop answers as bad_request."""
    value = msg.get(name, default)
    if value is ...:
        raise DecodeError(f"missing field {name!r}")
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if value is not None and (not isinstance(value, kind)
                              or (isinstance(value, bool) and bool not in kinds)):
        raise DecodeError(f"field {name!r} has the wrong type ({type(value).__name__})")
    if isinstance(value, int) and not -(2**63) <= value < 2**63:  # what SQLite stores
        raise DecodeError(f"field {name!r} is out of range ({value})")
    return value


def page(msg: dict[str, Any], default: int, cap: int) -> tuple[int, int]:
    """A paged list's ``start`` (from 0) and ``limit`` (1.., ``default`` when absent, at most
    ``cap``). A negative start or a limit under 1 is refused: a client paging on ``more``
    would never reach the end of an empty page that says more follows."""
    start = field(msg, "start", int, 0)
    limit = field(msg, "limit", int, None)
    start = 0 if start is None else start
    if start < 0:
        raise DecodeError(f"field 'start' must be 0 or more, got {start}")
    if limit is not None and limit < 1:
        raise DecodeError(f"field 'limit' must be 1 or more, got {limit}")
    return start, min(default if limit is None else limit, cap)
