"""The one way a frozen dataclass config is read from a plain map (msgpack, JSON, CLI settings)
and checked: used by ``MelConfig``, ``VQVAEConfig`` and ``TrainConfig`` alike.

Types come from the resolved type hints (never from annotation strings), so ``int | None``,
``tuple[int, ...]`` and ``float`` fields are read the same way everywhere: an int is accepted
for a float (and becomes a float), a bool is never a number, a list becomes a tuple, and an
unknown key is an error naming the known ones.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

from distill.shared.errors import ConfigError, UnknownSettings

C = TypeVar("C")


def is_int(v: object) -> bool:
    """An int that is not a bool (``True`` is an int in Python, never a count here)."""
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v: object) -> bool:
    """A finite int or float that is not a bool."""
    return (is_int(v) or isinstance(v, float)) and math.isfinite(float(v))  # type: ignore[arg-type]


def require(checks: Iterable[tuple[bool, str]], what: str) -> None:
    """Raise ``ConfigError("<what>: <reason>")`` for the first check that is false."""
    for ok, why in checks:
        if not ok:
            raise ConfigError(f"{what}: {why}")


def at_most(value: object, bound: int | float, name: str, why: str) -> tuple[bool, str]:
    """A :func:`require` check that ``value`` (when a number) is at most ``bound``; the message
    names the field, the bound and why it exists, so a refused request says what to change."""
    ok = not is_number(value) or float(value) <= bound  # type: ignore[arg-type]
    return ok, f"{name} {value!r} is over the limit of {bound:g} ({why})"


def config_from_dict(cls: type[C], data: object, what: str) -> C:
    """Build config ``cls`` from a plain map: missing keys take their defaults, unknown keys and
    values of the wrong type raise :class:`ConfigError` naming ``what`` and the key."""
    if not isinstance(data, dict):
        raise ConfigError(f"{what} must be a map, got {type(data).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(str(k) for k in data if k not in known)
    if unknown:
        raise UnknownSettings(f"{what}: unknown keys {unknown}; known keys {sorted(known)}", unknown)
    hints = typing.get_type_hints(cls)
    return cls(**{key: _read(what, key, value, hints[key]) for key, value in data.items()})


def _read(what: str, key: str, value: Any, hint: Any) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (hint,) = [a for a in args if a is not type(None)]  # configs use only "X | None"
        origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{what}: {key} must be true or false, got {value!r}")
    if hint is int:
        if is_int(value):
            return int(value)
        raise ConfigError(f"{what}: {key} must be an integer, got {value!r}")
    if hint is float:
        if is_int(value) or isinstance(value, float):
            return float(value)
        raise ConfigError(f"{what}: {key} must be a number, got {value!r}")
    if hint is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{what}: {key} must be a string, got {value!r}")
    if origin is tuple and args[1:] == (Ellipsis,):
        if isinstance(value, (list, tuple)):
            return tuple(_read(what, key, v, args[0]) for v in value)
        raise ConfigError(f"{what}: {key} must be a list, got {value!r}")
    raise ConfigError(f"{what}: cannot read {key} of type {hint}")  # pragma: no cover - new type


def nested(value: Any) -> Iterator[tuple[Any, int]]:
    """Every value inside ``value`` (maps' values, lists' items; depth first, without
    recursion) with how deep it sits, ``value`` itself at 1: what a reader of data from outside
    walks to bound its nesting before anything recurses into it."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        yield item, depth
        if isinstance(item, dict):
            stack.extend((child, depth + 1) for child in item.values())
        elif isinstance(item, list):
            stack.extend((child, depth + 1) for child in item)
