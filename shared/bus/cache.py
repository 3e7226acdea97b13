"""A worker's local cache of artifacts, by sha256.

Artifacts are content-addressed, so a cached file never goes stale: if ``<root>/<aa>/<rest>``
exists, it holds exactly the bytes whose sha256 is ``aa + rest`` (it was verified before it
was renamed into place). Writers stream into a private temporary file and rename it in
atomically, so two workers (threads or processes) fetching the same artifact at once both
succeed and a reader never sees half a file.

No string from the wire becomes a path until :func:`distill.shared.ids.require_sha256`
accepts it.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import stat
from pathlib import Path
from types import TracebackType

from distill.shared.errors import ArtifactError
from distill.shared.ids import fsync_dir, require_sha256


def default_cache_root() -> Path:
    """``$DISTILL_CACHE``, else ``$XDG_CACHE_HOME/distill/artifacts``, else ``~/.cache/...``."""
    if env := os.environ.get("DISTILL_CACHE"):
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "distill" / "artifacts"


class CacheWriter:
    """Streams one artifact into a temporary file; :meth:`commit` verifies and renames it in.

    Use as a context manager: leaving the block without :meth:`commit` (or with an exception)
    discards the temporary file.
    """

    def __init__(self, final_path: Path, tmp_path: Path, sha256: str) -> None:
        self.sha256 = sha256
        self._final = final_path
        self._tmp = tmp_path
        self._digest = hashlib.sha256()
        self._size = 0
        self._file = tmp_path.open("xb")
        self._done = False

    @property
    def size(self) -> int:
        """Bytes written so far."""
        return self._size

    def write(self, data: bytes) -> int:
        """Append a chunk; returns the total number of bytes written so far."""
        if self._done:
            raise ArtifactError(f"writer for artifact {self.sha256} is already closed")
        self._file.write(data)
        self._digest.update(data)
        self._size += len(data)
        return self._size

    def commit(self) -> Path:
        """Verify the hash, then atomically rename into the cache; returns the cached path.

        A mismatch removes the temporary file and raises :class:`ArtifactError`.
        """
        if self._done:
            raise ArtifactError(f"writer for artifact {self.sha256} is already closed")
        actual = self._digest.hexdigest()
        if actual != self.sha256:
            self.abort()
            raise ArtifactError(
                f"artifact {self.sha256}: received {self._size} bytes hashing to {actual}; "
                "discarded"
            )
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self._done = True
        # Read-only: handlers get this path and must not edit a content-addressed file.
        os.chmod(self._tmp, stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)
        self._final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(self._tmp, self._final)
        fsync_dir(self._final.parent)
        return self._final

    def abort(self) -> None:
        """Discard what was written. Safe to call twice or after a commit."""
        if self._done:
            return
        self._done = True
        self._file.close()
        self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> CacheWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.abort()


class ArtifactCache:
    """Artifacts this machine already holds, at ``<root>/<first 2 hex>/<other 62 hex>``."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = Path(root) if root is not None else default_cache_root()
        self._tmp_dir = self.root / "tmp"
        self._tmp_dir.mkdir(parents=True, exist_ok=True)

    def path_for(self, sha256: str) -> Path:
        """Where artifact ``sha256`` lives in the cache (it may not exist)."""
        sha = require_sha256(sha256)
        return self.root / sha[:2] / sha[2:]

    def has(self, sha256: str) -> bool:
        return self.path_for(sha256).is_file()

    def open_writer(self, sha256: str) -> CacheWriter:
        """A writer for ``sha256``; each writer has its own temporary file."""
        final = self.path_for(sha256)
        tmp = self._tmp_dir / f"{sha256}.{secrets.token_hex(4)}.part"
        return CacheWriter(final, tmp, sha256)

    def read_bytes(self, sha256: str) -> bytes:
        path = self.path_for(sha256)
        try:
            return path.read_bytes()
        except FileNotFoundError:
            raise ArtifactError(f"artifact {sha256} is not in the local cache") from None

    def put_bytes(self, data: bytes) -> str:
        """Cache bytes (e.g. an artifact this worker just uploaded); returns their sha256."""
        sha = hashlib.sha256(data).hexdigest()
        if not self.has(sha):
            with self.open_writer(sha) as writer:
                writer.write(data)
                writer.commit()
        return sha

    def remove(self, sha256: str) -> None:
        """Drop an artifact from the cache (missing is fine)."""
        self.path_for(sha256).unlink(missing_ok=True)
