"""Artifact ids (sha256 hex digests) and the file helpers content addressing needs.

Every id is checked here before any string from the wire or a user becomes a path, a database
key or a reference.

An id is exactly 64 lowercase hex characters, so ``..``, ``/``, NUL, a trailing newline and
uppercase aliases of the same hash are all refused.
"""

from __future__ import annotations

import hashlib
import os
import re
import unicodedata
from pathlib import Path
from typing import TypeGuard

from distill.shared.errors import ArtifactError

_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_READ_BLOCK_BYTES = 1024 * 1024  # large enough to hash at disk speed, small enough to stream


def unprintable(text: str) -> str | None:
    """The first character of ``text`` a name must not hold, as ``U+XXXX``, or None: control
    characters (a terminal acts on ESC, BEL, NUL) and invisible format characters (U+202E
    reverses how the rest of a name is shown, U+200B hides in it), line separators too."""
    for c in text:
        if unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp"):
            return f"U+{ord(c):04X}"
    return None


def escaped(text: str, *, lines: bool = False) -> str:
    """``text`` with each character :func:`unprintable` refuses written as its escape (``\\x1b``,
    ``\\u202e``; ``lines``: newlines and tabs kept): shown, never acted on by a terminal."""
    if unprintable(text) is None:
        return text
    kept = "\n\t" if lines else ""
    return "".join(c if c in kept or unprintable(c) is None
                   else c.encode("unicode_escape").decode("ascii") for c in text)


def is_sha256(s: object) -> TypeGuard[str]:
    """True for exactly 64 lowercase hex characters (a sha256 digest as Distill writes it)."""
    # fullmatch, not match with "$": "$" also matches before a trailing newline.
    return isinstance(s, str) and _SHA256_RE.fullmatch(s) is not None


def require_sha256(s: object, what: str = "artifact id") -> str:
    """Return ``s`` if it is a sha256 hex digest, else raise :class:`ArtifactError`."""
    if not isinstance(s, str) or not is_sha256(s):
        shown = repr(s) if len(repr(s)) <= 80 else repr(s)[:77] + "..."
        raise ArtifactError(f"{what} must be 64 lowercase hex characters (sha256), got {shown}")
    return s


def sha256_file(path: Path) -> str:
    """The sha256 hex digest of a file, read in blocks (never the whole file in memory)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        while block := f.read(_READ_BLOCK_BYTES):
            digest.update(block)
    return digest.hexdigest()


def fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # Windows cannot open a directory; its renames are journaled by NTFS
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
