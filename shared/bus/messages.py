"""Typed messages: frozen dataclasses that encode to and decode from msgpack maps.

Decoding validates the schema: a missing field, a wrong type or an unknown op raises
:class:`DecodeError` naming it. Bodies that are just forwarded (echo) never come here.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any, TypeVar, Union, get_args, get_origin, get_type_hints

from distill.shared.bus.codec import pack, unpack_map
from distill.shared.errors import DecodeError

M = TypeVar("M", bound="Message")


def _matches(value: Any, hint: Any) -> bool:
    origin = get_origin(hint)
    if hint is Any:
        return True
    if origin in (Union, types.UnionType):
        return any(_matches(value, h) for h in get_args(hint))
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin in (list, typing.List):  # noqa: UP006
        (item,) = get_args(hint) or (Any,)
        return isinstance(value, list) and all(_matches(v, item) for v in value)
    if origin in (dict, typing.Dict):  # noqa: UP006
        key, val = get_args(hint) or (Any, Any)
        return isinstance(value, dict) and all(_matches(k, key) and _matches(v, val) for k, v in value.items())
    return isinstance(value, origin or hint)


class Message:
    """Mixin for frozen dataclasses: ``to_map``/``from_map``, ``encode``/``decode``."""

    def to_map(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}  # type: ignore[arg-type]

    def encode(self) -> bytes:
        return pack(self.to_map())

    @classmethod
    def from_map(cls: type[M], data: dict[str, Any]) -> M:
        hints = get_type_hints(cls)
        kwargs: dict[str, Any] = {}
        for f in dataclasses.fields(cls):  # type: ignore[arg-type]
            if f.name not in data:
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                    raise DecodeError(f"{cls.__name__}: missing field {f.name!r}")
                continue
            value = data[f.name]
            if not _matches(value, hints[f.name]):
                raise DecodeError(f"{cls.__name__}: field {f.name!r} should be {hints[f.name]}, "
                                  f"got {type(value).__name__}")
            kwargs[f.name] = value
        return cls(**kwargs)

    @classmethod
    def decode(cls: type[M], body: bytes) -> M:
        return cls.from_map(unpack_map(body, cls.__name__))


@dataclass(frozen=True)
class WorkerMeta(Message):
    """The optional extra frame of a worker's READY."""

    host: str | None = None
    pid: int | None = None
    name: str | None = None
    service: str | None = None
    device: str | None = None
    device_name: str | None = None
    device_memory: int | None = None
    versions: dict[str, Any] = field(default_factory=dict)
    registrations: int = 0


@dataclass(frozen=True)
class JobSubmit(Message):
    service: str
    params: dict[str, Any] = field(default_factory=dict)
    depends_on: list[str] = field(default_factory=list)
    max_attempts: int = 3
    timeout_s: float | None = None


@dataclass(frozen=True)
class JobDispatch(Message):
    """What the broker sends a worker for one attempt of a job."""

    id: str
    service: str
    params: dict[str, Any]
    attempt: int = 1
    previous_errors: list[str] = field(default_factory=list)
    deps: dict[str, Any] = field(default_factory=dict)
    checkpoint: str | None = None


@dataclass(frozen=True)
class Reply(Message):
    """Every Distill service reply: ``ok`` with a result, or an error (``cancelled`` for jobs).

    A job's successful reply also carries the last progress its worker published
    (``progress``): events travel on another socket than the reply, so the broker may get the
    last of them after the result, and it records this one with the result instead. Brokers
    before it ignore the key."""

    ok: bool
    result: Any = None
    error: dict[str, Any] | None = None
    cancelled: bool = False
    progress: dict[str, Any] | None = None

    @classmethod
    def success(cls, result: Any, *, progress: dict[str, Any] | None = None) -> Reply:
        return cls(ok=True, result=result, progress=progress)

    @classmethod
    def failure(cls, code: str, message: str, *, cancelled: bool = False) -> Reply:
        return cls(ok=False, error={"code": code, "message": message}, cancelled=cancelled)

    def to_map(self) -> dict[str, Any]:
        out: dict[str, Any] = {"ok": self.ok}
        if self.ok:
            out["result"] = self.result
            if self.progress is not None:
                out["progress"] = self.progress
        else:
            out["error"] = self.error
            if self.cancelled:
                out["cancelled"] = True
        return out
