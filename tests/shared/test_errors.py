"""Errors cross the wire as stable codes, defined once (distill.shared.errors)."""

from __future__ import annotations

import re
from pathlib import Path

import distill.shared.errors as errors
from distill.shared.errors import ERROR_CODES, DistillError, code_of

README = Path(__file__).resolve().parents[2] / "README.md"


def _subclasses(cls: type) -> list[type]:
    out = []
    for sub in cls.__subclasses__():
        out += [sub, *_subclasses(sub)]
    return out


def test_every_error_class_has_a_documented_code() -> None:
    for cls in [DistillError, *_subclasses(DistillError)]:
        if cls.__module__ == errors.__name__ and cls.__init__ is DistillError.__init__:
            assert cls.code in ERROR_CODES, cls.__name__


def test_codes_are_not_class_names() -> None:
    names = {cls.__name__ for cls in _subclasses(DistillError)}
    assert not names & set(ERROR_CODES)
    assert all(re.fullmatch(r"[a-z_]+", code) for code in ERROR_CODES)


def test_code_of() -> None:
    assert code_of(errors.JobError("x")) == errors.JOB
    assert code_of(errors.JobCancelled("x")) == errors.CANCELLED
    assert code_of(errors.DecodeError("x")) == errors.BAD_REQUEST
    assert code_of(errors.RequestError("x", code=errors.EXPIRED)) == errors.EXPIRED
    assert code_of(RuntimeError("x")) == errors.INTERNAL


def test_readme_lists_every_code() -> None:
    text = README.read_text()
    start = text.index("| error code | meaning |")
    block = text[start : text.find("\n\n", start)]  # the table ends at the first blank line
    table = {m for m in re.findall(r"^\| `([a-z_]+)` \|", block, flags=re.MULTILINE)}
    assert table == set(ERROR_CODES)
