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
    if value is not None and not isinstance(value, kind):
        raise DecodeError(f"field {name!r} has the wrong type ({type(value).__name__})")
    if isinstance(value, int) and not -(2**63) <= value < 2**63:  # what SQLite stores
        raise DecodeError(f"field {name!r} is out of range ({value})")
    return value
