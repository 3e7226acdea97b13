"""A worker's local cache of artifacts, by sha256.

Artifacts are content-addressed, so a cached file never goes stale: if ``<root>/<aa>/<rest>``
exists, it was verified to hold exactly the bytes whose sha256 is ``aa + rest`` before it was
renamed into place. A disk can still change it later: the artifact client checks a cached
copy's hash as it reads it (:meth:`ArtifactCache.read_verified`, :meth:`ArtifactCache.verify`)
and removes a damaged one, which it then fetches again. Writers stream into a private temporary file and rename it in
atomically, so two workers (threads or processes) fetching the same artifact at once both
succeed and a reader never sees half a file.

No string from the wire becomes a path until :func:`distill.shared.ids.require_sha256`
accepts it.

Size. The cache holds at most ``max_bytes`` (``$DISTILL_CACHE_MAX_BYTES``, default 20 GiB):
after each new artifact, the least recently used ones go first (a file's modification time is
its last use: a hit touches it, so the order survives restarts and is shared by every worker on
the machine). Temporary ``*.part`` files carry their writer's pid; at start, those of writers
that are no longer running (a worker killed mid-download) are removed, and so are the scratch
folders (``*.dir``, :func:`scratch_folder`) of jobs whose worker was killed.
"""

from __future__ import annotations

import glob
import hashlib
import os
import secrets
import shutil
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

from distill.shared.errors import ArtifactError
from distill.shared.ids import fsync_dir, require_sha256, sha256_file
from distill.shared.logs import get_logger

log = get_logger("cache")

ENV_CACHE_MAX_BYTES = "DISTILL_CACHE_MAX_BYTES"
# 20 GiB: a few datasets, models and the checkpoints of running jobs, on any workstation disk.
DEFAULT_CACHE_MAX_BYTES = 20 * 1024**3


def default_cache_max_bytes() -> int:
    """``$DISTILL_CACHE_MAX_BYTES``, else :data:`DEFAULT_CACHE_MAX_BYTES`."""
    raw = os.environ.get(ENV_CACHE_MAX_BYTES, "").strip()
    if not raw:
        return DEFAULT_CACHE_MAX_BYTES
    try:
        value = int(raw)
    except ValueError:
        raise ArtifactError(
            f"{ENV_CACHE_MAX_BYTES}={raw!r} is not a whole number of bytes"
        ) from None
    if value < 0:
        raise ArtifactError(f"{ENV_CACHE_MAX_BYTES} must be >= 0, got {value}")
    return value


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def default_cache_root() -> Path:
    """``$DISTILL_CACHE``, else ``$XDG_CACHE_HOME/distill/artifacts``, else ``~/.cache/...``."""
    if env := os.environ.get("DISTILL_CACHE"):
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "distill" / "artifacts"


def pid_folder(parent: Path, prefix: str) -> tempfile.TemporaryDirectory[str]:
    """A new private folder ``<prefix>.<pid>.<random>.dir`` in ``parent``, as a context manager
    (gone when the block ends); :func:`remove_dead_pid_folders` removes it once its process is
    gone (killed before the block could end)."""
    parent.mkdir(parents=True, exist_ok=True)
    return tempfile.TemporaryDirectory(prefix=f"{prefix}.{os.getpid()}.", suffix=".dir",
                                       dir=parent, ignore_cleanup_errors=True)  # fmt: skip


def remove_dead_pid_folders(parent: Path, prefix: str = "") -> list[str]:
    """Remove the :func:`pid_folder` folders in ``parent`` (of ``prefix`` only, when given)
    whose process is no longer running; the names removed."""
    removed = []
    for folder in parent.glob(f"{glob.escape(prefix)}.*.dir" if prefix else "*.dir"):
        pid = _owner_pid(folder.name, ".dir")
        if pid is not None and pid != os.getpid() and not _pid_alive(pid) and folder.is_dir():
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder.name)
    return removed


def scratch_folder(prefix: str, root: Path | None = None) -> tempfile.TemporaryDirectory[str]:
    """A private folder for a job's working files (a generate job's sounds before they are
    stored: up to gigabytes), in the cache's ``tmp/`` (:func:`pid_folder`): it goes when the
    block ends, or, when its process is killed, at the start of the next worker on this
    machine (:class:`ArtifactCache`)."""
    return pid_folder((Path(root) if root is not None else default_cache_root()) / "tmp", prefix)


def _owner_pid(name: str, suffix: str) -> int | None:
    """The pid in a temporary ``<what>.<pid>.<token><suffix>`` name (None: not such a name)."""
    fields = name.removesuffix(suffix).split(".")
    return int(fields[1]) if len(fields) == 3 and fields[1].isdigit() else None


class CacheWriter:
    """Streams one artifact into a temporary file; :meth:`commit` verifies and renames it in.

    Use as a context manager: leaving the block without :meth:`commit` (or with an exception)
    discards the temporary file.
    """

    def __init__(
        self,
        final_path: Path,
        tmp_path: Path,
        sha256: str,
        on_commit: Callable[[], object] | None = None,
    ) -> None:
        self.sha256 = sha256
        self._on_commit = on_commit
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
        if self._on_commit is not None:
            self._on_commit()
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
    """Artifacts this machine already holds, at ``<root>/<first 2 hex>/<other 62 hex>``, at most
    ``max_bytes`` of them (least recently used go first; None: ``$DISTILL_CACHE_MAX_BYTES``)."""

    def __init__(self, root: Path | None = None, *, max_bytes: int | None = None) -> None:
        self.root = Path(root) if root is not None else default_cache_root()
        self.max_bytes = default_cache_max_bytes() if max_bytes is None else max_bytes
        self._tmp_dir = self.root / "tmp"
        self._tmp_dir.mkdir(parents=True, exist_ok=True)
        self._remove_leftovers()

    def _remove_leftovers(self) -> None:
        """Delete ``*.part`` files whose writer is gone (named ``<sha>.<pid>.<token>.part``) and
        scratch folders whose job's process is gone (``<prefix>.<pid>.<token>.dir``)."""
        for part in self._tmp_dir.glob("*.part"):
            pid = _owner_pid(part.name, ".part")
            if pid is None or (pid != os.getpid() and not _pid_alive(pid)):
                part.unlink(missing_ok=True)
                log.info("cache_leftover_removed", file=part.name)
        for name in remove_dead_pid_folders(self._tmp_dir):
            log.info("cache_leftover_removed", folder=name)

    def _entries(self) -> list[tuple[float, int, Path]]:
        """(last use, size, path) of every cached artifact."""
        out = []
        for shard in self.root.iterdir():
            if len(shard.name) != 2 or not shard.is_dir():
                continue  # tmp/ and anything that is not a shard
            for path in shard.iterdir():
                try:
                    st = path.stat()
                except FileNotFoundError:  # evicted by another worker meanwhile
                    continue
                out.append((st.st_mtime, st.st_size, path))
        return out

    def used_bytes(self) -> int:
        return sum(size for _, size, _ in self._entries())

    def evict(self, keep: Path | None = None) -> int:
        """Remove least recently used artifacts until the cache fits ``max_bytes``; ``keep``
        (the one just stored) stays even if it alone is larger. Returns the bytes freed."""
        entries = sorted(self._entries())
        total, freed = sum(size for _, size, _ in entries), 0
        for _, size, path in entries:
            if total - freed <= self.max_bytes:
                break
            if path == keep:
                continue
            path.unlink(missing_ok=True)
            freed += size
            log.info("cache_evicted", artifact=path.parent.name + path.name, size=size)
        return freed

    def _touch(self, path: Path) -> None:
        try:
            os.utime(path)  # a hit is a use: it moves to the back of the eviction order
        except OSError:  # read-only file owned by someone else, or just evicted: no harm
            pass

    def path_for(self, sha256: str) -> Path:
        """Where artifact ``sha256`` lives in the cache (it may not exist)."""
        sha = require_sha256(sha256)
        return self.root / sha[:2] / sha[2:]

    def has(self, sha256: str) -> bool:
        """Whether the artifact is cached; a hit counts as a use (see eviction)."""
        path = self.path_for(sha256)
        if not path.is_file():
            return False
        self._touch(path)
        return True

    def open_writer(self, sha256: str) -> CacheWriter:
        """A writer for ``sha256``; each writer has its own temporary file. Committing it may
        evict older artifacts to keep the cache within ``max_bytes``."""
        final = self.path_for(sha256)
        tmp = self._tmp_dir / f"{sha256}.{os.getpid()}.{secrets.token_hex(4)}.part"
        return CacheWriter(final, tmp, sha256, on_commit=lambda: self.evict(keep=final))

    def read_bytes(self, sha256: str) -> bytes:
        path = self.path_for(sha256)
        try:
            data = path.read_bytes()
            self._touch(path)
            return data
        except FileNotFoundError:
            raise ArtifactError(f"artifact {sha256} is not in the local cache") from None

    def read_verified(self, sha256: str) -> bytes | None:
        """The cached bytes of ``sha256`` if they still hash to it; None when it is not cached
        or its copy is damaged (then removed, and logged)."""
        try:
            data = self.read_bytes(sha256)
        except ArtifactError:
            return None
        if hashlib.sha256(data).hexdigest() != sha256:
            self._damaged(sha256)
            return None
        return data

    def verify(self, sha256: str) -> bool:
        """Whether the cached copy of ``sha256`` still hashes to it; a damaged one is removed
        (and logged)."""
        path = self.path_for(sha256)
        try:
            ok = sha256_file(path) == sha256
        except FileNotFoundError:
            return False
        if not ok:
            self._damaged(sha256)
        return ok

    def _damaged(self, sha256: str) -> None:
        log.warning("cache_damaged", artifact=sha256, path=str(self.path_for(sha256)),
                    action="removed; fetched again")  # fmt: skip
        self.remove(sha256)

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
