"""The broker's content-addressed artifact store: objects by sha256 on local disk, no sockets.

Layout under ``root``::

    objects/<aa>/<62 hex>   complete, verified artifacts (never modified once renamed in)
    partial/<64 hex>        uploads in progress; the file's length is the offset received
    index.sqlite3           metadata: artifacts and uploads in progress

Paths. No client string becomes a path: a sha256 must pass
:func:`~distill.shared.ids.is_sha256` (exactly 64 lowercase hex) before anything
touches the disk, and ``kind``, ``name`` and ``job`` are only metadata, bounded in length and
free of control characters (they end up on a terminal).

Metadata in SQLite rather than JSON sidecars: listing by kind or job and summing sizes for the
quota are indexed queries instead of a walk over every object, and an artifact's row and its
upload's row change in one transaction. It is its own database, under ``root``, so the store
moves or is backed up as one folder, apart from the job table.

Uploads. Chunks go straight to the partial file (never held in memory); the offset a chunk must
start at is the partial file's length, so an upload cut off by a client, a network or a broker
restart resumes where its bytes stop. Chunks are not fsynced: at :meth:`ArtifactStore.finish_put`
the content is hashed (incrementally as the chunks arrived), fsynced, and renamed into
``objects/`` with ``os.replace``; a torn partial file after a power cut fails that hash and is
discarded. A crash between the rename and the metadata commit is repaired when the store opens
next.

Bounded work after a restart. The running hash of an upload lives in memory; after a restart
the bytes already received are hashed again by :meth:`ArtifactStore.verify_step`, a bounded
number of bytes per call (the broker's timer calls it), never a whole file inside one request:
a ``put_finish`` that arrives before the hash has caught up is answered with a clear "still
verifying" error when more than :data:`MAX_FINISH_HASH_BYTES` remain.

Limits. The store holds at most ``max_bytes`` (artifacts plus the sizes uploads declared) and
leaves at least ``min_free_bytes`` free on its disk; a ``put_begin`` past either is refused at
once. An upload that has not advanced for ``upload_idle_s`` (its partial file's modification
time, so the clock survives a restart) is removed by :meth:`ArtifactStore.expire_uploads` and
its declared size released.

Damage. An object is never trusted blindly: a read that goes through an object in order from
its first byte hashes what it reads (the bytes are in memory already), and when that hash
reaches the end and does not match the object's id (a bad disk sector, a file changed by
hand), the object is moved to ``damaged/`` (for a look, never served again), its row is
deleted, and the last read answers :class:`~distill.shared.errors.ArtifactDamaged`. The
next upload of the same bytes then stores them afresh, and a job whose checkpoint it was
starts from scratch. Concurrent readers of one object can break the order; their reads are
then served unverified, never wrongly refused.

Threading: as :mod:`distill.broker.store.journal` (one connection, a lock, any one thread at a time).
"""

from __future__ import annotations

import builtins
import hashlib
import os
import shutil
import sqlite3
import threading
import time
from collections.abc import Callable, Container, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distill.shared.bus.protocol import (
    ARTIFACT_CHUNK_BYTES,
    MAX_ARTIFACT_NAME_CHARS,
    MAX_MESSAGE_BYTES,
)
from distill.shared.errors import OFFSET_MISMATCH, ArtifactDamaged, ArtifactError, StoreFull
from distill.shared.ids import fsync_dir, require_sha256, sha256_file, unprintable

MAX_KIND_CHARS = 64
MAX_NAME_CHARS = MAX_ARTIFACT_NAME_CHARS
MAX_JOB_CHARS = 64
# Uploads begun and not finished, at once: each is a row and a file until it finishes or
# idles out (an hour). Without a bound a script could begin ~2 million empty ones an hour. A
# guard on the store's files; each client is bounded far lower (services/artifacts.py).
MAX_UPLOADS_IN_PROGRESS = 20_000
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
MAX_READ_BYTES = MAX_MESSAGE_BYTES // 2  # a read chunk plus its envelope fits one message
MAX_FINISH_HASH_BYTES = 64 * 1024**2  # hashed inline at finish (~0.2 s); more: verify_step
VERIFY_STEP_BYTES = 32 * 1024**2  # re-hashed per verify_step call after a restart (~0.1 s)
SCHEMA_VERSION = 1
# What a store-full refusal tells the user to do (a job it fails keeps its checkpoint).
_MAKE_ROOM = ("make room (`distill artifacts ls` shows what holds it, `distill artifacts rm` "
              "frees it) or raise the setting; `distill jobs retry` resumes a job from its "
              "checkpoint")
MAX_READ_DIGESTS = 64  # objects whose in-order reads are being hashed at once (oldest dropped)
_IN_BATCH = 500  # ids per "IN (...)" query: well under SQLite's bound-parameter limit

_SCHEMA = """
CREATE TABLE IF NOT EXISTS artifacts (
    sha256 TEXT PRIMARY KEY,
    size INTEGER NOT NULL,
    kind TEXT NOT NULL,
    name TEXT NOT NULL,
    job TEXT,
    created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS artifacts_by_kind ON artifacts (kind);
CREATE INDEX IF NOT EXISTS artifacts_by_job ON artifacts (job);
CREATE TABLE IF NOT EXISTS uploads (
    sha256 TEXT PRIMARY KEY,
    size INTEGER NOT NULL,
    kind TEXT NOT NULL,
    name TEXT NOT NULL,
    job TEXT,
    started_at REAL NOT NULL
);
"""


@dataclass(frozen=True)
class ArtifactRecord:
    sha256: str
    size: int
    kind: str
    name: str
    job: str | None
    created_at: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "sha256": self.sha256,
            "size": self.size,
            "kind": self.kind,
            "name": self.name,
            "job": self.job,
            "created_at": self.created_at,
        }


class OffsetMismatch(ArtifactError):
    """A chunk did not start where the upload stands; ``expected`` is where it must start."""

    code = OFFSET_MISMATCH

    def __init__(self, message: str, expected: int) -> None:
        super().__init__(message)
        self.expected = expected


def _check_text(value: object, what: str, max_chars: int, *, empty_ok: bool = False) -> str:
    if not isinstance(value, str):
        raise ArtifactError(f"artifact {what} must be a string, got {type(value).__name__}")
    if len(value) > max_chars or (not value and not empty_ok):
        raise ArtifactError(f"artifact {what} must be 1..{max_chars} characters")
    if (bad := unprintable(value)) is not None:
        raise ArtifactError(f"artifact {what} {value!r} contains a control or format character "
                            f"({bad})")
    return value


def _check_metadata(size: object, kind: object, name: object, job: object) -> None:
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise ArtifactError(f"artifact size must be a non-negative integer, got {size!r}")
    _check_text(kind, "kind", MAX_KIND_CHARS)
    _check_text(name, "name", MAX_NAME_CHARS, empty_ok=True)
    if job is not None:
        _check_text(job, "job", MAX_JOB_CHARS)


def _record(row: sqlite3.Row) -> ArtifactRecord:
    return ArtifactRecord(
        sha256=row["sha256"],
        size=row["size"],
        kind=row["kind"],
        name=row["name"],
        job=row["job"],
        created_at=row["created_at"],
    )


class ArtifactStore:
    """Artifacts by sha256 under ``root``, at most ``max_bytes`` in all (uploads included)."""

    def __init__(
        self,
        root: Path,
        *,
        max_bytes: int = 64 * 1024**3,
        min_free_bytes: int = 0,
        upload_idle_s: float = 3600.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.root = Path(root)
        self.max_bytes = max_bytes
        self.min_free_bytes = min_free_bytes  # refuse uploads that would leave the disk below
        self.upload_idle_s = upload_idle_s  # an upload idle this long is removed
        self._clock = clock
        self._objects = self.root / "objects"
        self._partial = self.root / "partial"
        self._objects.mkdir(parents=True, exist_ok=True)
        self._partial.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        # sha -> (running hash of the upload's first ``covered`` bytes, covered); an upload
        # resumed after a restart starts at 0 and catches up in verify_step
        self._digests: dict[str, tuple[Any, int]] = {}
        # sha -> (hash of an object's first ``covered`` bytes, covered), from reads in order
        self._read_digests: dict[str, tuple[Any, int]] = {}
        self._damaged = self.root / "damaged"
        self._db = sqlite3.connect(
            str(self.root / "index.sqlite3"), isolation_level=None, check_same_thread=False
        )
        self._db.row_factory = sqlite3.Row
        try:
            self._open_schema()
            self._recover()
        except BaseException:
            self._db.close()
            raise

    def _open_schema(self) -> None:
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # puts are rare: make each one power-safe
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise ArtifactError(
                f"the artifact index {self.root / 'index.sqlite3'} has schema version {version}; "
                f"this Distill reads up to {SCHEMA_VERSION}: it was written by a newer Distill. "
                "Upgrade Distill to open it, or start this one with another --data-dir (nothing "
                "was changed)"
            )
        self._db.executescript(
            f"BEGIN IMMEDIATE;\n{_SCHEMA}\nPRAGMA user_version={SCHEMA_VERSION};\nCOMMIT;"
        )

    def _recover(self) -> None:
        """Finish uploads whose object was renamed in before a crash; drop orphan partials."""
        with self._write() as db:
            for row in db.execute("SELECT * FROM uploads").fetchall():
                if self._object_path(row["sha256"]).is_file():
                    self._commit_upload(db, row)
        known = {r[0] for r in self._db.execute("SELECT sha256 FROM uploads")}
        for path in self._partial.iterdir():
            if path.name not in known:
                path.unlink(missing_ok=True)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> ArtifactStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    # --- paths and rows (the sha256 is validated before any of these is called) ---

    def _object_path(self, sha: str) -> Path:
        return self._objects / sha[:2] / sha[2:]

    def _partial_path(self, sha: str) -> Path:
        return self._partial / sha

    def _artifact_row(self, sha: str) -> sqlite3.Row | None:
        row: sqlite3.Row | None = self._db.execute(
            "SELECT * FROM artifacts WHERE sha256 = ?", (sha,)
        ).fetchone()
        return row

    def is_uploading(self, sha256: str) -> bool:
        """Whether an upload of ``sha256`` has begun and not finished (nor idled out)."""
        with self._lock:
            return self._upload_row(sha256) is not None

    def _upload_row(self, sha: str) -> sqlite3.Row | None:
        row: sqlite3.Row | None = self._db.execute(
            "SELECT * FROM uploads WHERE sha256 = ?", (sha,)
        ).fetchone()
        return row

    def _received(self, sha: str) -> int:
        try:
            return self._partial_path(sha).stat().st_size
        except FileNotFoundError:
            return 0

    def used_bytes(self) -> int:
        """Bytes held by artifacts plus bytes promised to uploads in progress."""
        with self._lock:
            (stored,) = self._db.execute("SELECT COALESCE(SUM(size), 0) FROM artifacts").fetchone()
            (pending,) = self._db.execute("SELECT COALESCE(SUM(size), 0) FROM uploads").fetchone()
        return int(stored) + int(pending)

    # --- uploads ---

    def begin_put(self, sha256: str, size: int, *, kind: str, name: str, job: str | None) -> int:
        """Start or resume an upload; returns the offset to send from (``size``: nothing to send).

        0 for a new upload, the bytes already received for a cut-off one, ``size`` when the
        artifact is already stored (then call :meth:`finish_put`, which is a no-op).
        """
        sha = require_sha256(sha256)
        _check_metadata(size, kind, name, job)
        with self._lock:
            existing = self._artifact_row(sha)
            if existing is not None:
                if existing["size"] != size:
                    raise ArtifactError(
                        f"artifact {sha} is stored with {existing['size']} bytes, not {size}"
                    )
                return size
            upload = self._upload_row(sha)
            if upload is not None and upload["size"] == size:
                received = self._received(sha)
                if received <= size:
                    return received
            self._start_upload(sha, size, kind, name, job)
            return 0

    def _start_upload(self, sha: str, size: int, kind: str, name: str, job: str | None) -> None:
        """A fresh upload (replacing an inconsistent one: another size, an overlong file)."""
        self._discard_upload(sha)
        if size == 0 and sha != EMPTY_SHA256:
            raise ArtifactError(f"artifact {sha} cannot be empty: an empty file's id is "
                                f"{EMPTY_SHA256}")  # fmt: skip
        (uploading,) = self._db.execute("SELECT COUNT(*) FROM uploads").fetchone()
        if uploading >= MAX_UPLOADS_IN_PROGRESS:
            raise StoreFull(f"{uploading} uploads are in progress, the most the store takes at "
                            "once: finish them (an abandoned one is forgotten after "
                            f"{self.upload_idle_s / 3600:g} h of no chunks)")  # fmt: skip
        free = self.max_bytes - self.used_bytes()
        if size > free:
            raise StoreFull(
                f"artifact store is full: {sha} needs {size} bytes, {max(free, 0)} of "
                f"{self.max_bytes} are free (setting DISTILL_STORE_MAX_BYTES); {_MAKE_ROOM}"
            )
        disk_free = shutil.disk_usage(self.root).free
        if disk_free - size < self.min_free_bytes:
            raise StoreFull(
                f"artifact {sha} needs {size} bytes but the disk of {self.root} has {disk_free} "
                f"free and keeps at least {self.min_free_bytes} (setting "
                f"DISTILL_STORE_MIN_FREE_BYTES); {_MAKE_ROOM}"
            )
        with self._write() as db:
            db.execute(
                "INSERT INTO uploads (sha256, size, kind, name, job, started_at)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (sha, size, kind, name, job, self._clock()),
            )
        self._partial_path(sha).touch()

    def put_chunk(self, sha256: str, offset: int, data: bytes | bytearray | memoryview) -> int:
        """Append ``data`` at ``offset``; returns the bytes received after it.

        ``offset`` past the bytes received is an :class:`OffsetMismatch` (a gap). A chunk the
        copy already holds, whole or in part, is another uploader of the same content ahead of
        this one (its bytes are the same: the id is their hash, checked at the finish): what it
        holds past the copy is appended, the rest ignored. Two scripts uploading one file at
        once used to refuse each other's chunks until both gave up. Once the artifact is
        stored (a concurrent upload of the same content finished), returns its size and
        ignores ``data``: the caller goes on to :meth:`finish_put`.
        """
        sha = require_sha256(sha256)
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise ArtifactError(f"chunk of artifact {sha} must be bytes")
        with self._lock:
            upload = self._upload_row(sha)
            if upload is None:
                if (stored := self._artifact_row(sha)) is not None:
                    # Another uploader of the same content finished first: nothing left to send.
                    return int(stored["size"])
                raise ArtifactError(f"no upload of artifact {sha} in progress; begin the put first")
            received = self._received(sha)
            if not isinstance(offset, int) or not 0 <= offset <= received:
                raise OffsetMismatch(
                    f"chunk of artifact {sha} at offset {offset!r}: expected offset {received}",
                    expected=received,
                )
            if offset + len(data) <= received:  # held already: another uploader's copy
                return received
            data = memoryview(data)[received - offset :]  # the part past the copy
            end = received + len(data)
            if end > upload["size"]:
                raise ArtifactError(
                    f"chunk of artifact {sha} ends at {end}, past its declared size {upload['size']}"
                )
            with self._partial_path(sha).open("ab") as f:
                f.write(data)
            self._advance_digest(sha, received, data)
            return end

    def _advance_digest(self, sha: str, offset: int, data: bytes | bytearray | memoryview) -> None:
        digest, covered = self._digests.get(sha, (None, 0))
        if offset == 0 or digest is None:
            digest, covered = hashlib.sha256(), 0
        if covered == offset:
            digest.update(data)
            covered += len(data)
        self._digests[sha] = (digest, covered)  # behind: verify_step catches it up

    def _catch_up(self, sha: str, budget: int) -> int:
        """Hash up to ``budget`` more received bytes of an upload; returns the bytes read."""
        digest, covered = self._digests.get(sha, (None, 0))
        if digest is None:
            digest, covered = hashlib.sha256(), 0
        want = min(self._received(sha) - covered, budget)
        if want <= 0:
            self._digests[sha] = (digest, covered)
            return 0
        with self._partial_path(sha).open("rb") as f:
            f.seek(covered)
            data = f.read(want)
        digest.update(data)
        self._digests[sha] = (digest, covered + len(data))
        return len(data)

    def verify_step(self, budget_bytes: int = VERIFY_STEP_BYTES) -> int:
        """Re-hash at most ``budget_bytes`` of uploads whose hash is behind (after a restart);
        returns the bytes hashed. The broker calls it from its timer."""
        done = 0
        with self._lock:
            for (sha,) in self._db.execute("SELECT sha256 FROM uploads").fetchall():
                if done >= budget_bytes:
                    break
                done += self._catch_up(sha, budget_bytes - done)
        return done

    def expire_uploads(self) -> builtins.list[str]:
        """Remove uploads that have not advanced for ``upload_idle_s``; returns their ids."""
        now, gone = self._clock(), []
        with self._lock:
            for row in self._db.execute("SELECT sha256, started_at FROM uploads").fetchall():
                sha = row["sha256"]
                try:
                    advanced = max(row["started_at"], self._partial_path(sha).stat().st_mtime)
                except FileNotFoundError:
                    advanced = row["started_at"]
                if now - advanced >= self.upload_idle_s:
                    self._discard_upload(sha)
                    gone.append(sha)
        return gone

    def finish_put(self, sha256: str) -> ArtifactRecord:
        """Verify the upload's hash and store it; a mismatch discards it and raises."""
        sha = require_sha256(sha256)
        with self._lock:
            existing = self._artifact_row(sha)
            if existing is not None:
                return _record(existing)
            upload = self._upload_row(sha)
            if upload is None:
                raise ArtifactError(f"no upload of artifact {sha} in progress")
            received = self._received(sha)
            if received != upload["size"]:
                raise ArtifactError(
                    f"upload of artifact {sha} is incomplete: {received} of {upload['size']} bytes"
                )
            actual = self._partial_digest(sha, received)
            if actual != sha:
                self._discard_upload(sha)
                raise ArtifactError(
                    f"artifact {sha}: the {received} bytes received hash to {actual}; "
                    "upload discarded"
                )
            self._install(sha)
            with self._write() as db:
                return self._commit_upload(db, upload)

    def _partial_digest(self, sha: str, received: int) -> str:
        _, covered = self._digests.get(sha, (None, 0))
        if received - covered > MAX_FINISH_HASH_BYTES:
            self._catch_up(sha, MAX_FINISH_HASH_BYTES)
            _, covered = self._digests[sha]
            raise ArtifactError(
                f"upload of artifact {sha} is still being verified after a broker restart "
                f"({covered} of {received} bytes hashed); send put_finish again shortly"
            )
        self._catch_up(sha, received - covered)
        digest, _ = self._digests.pop(sha)
        return str(digest.hexdigest())

    def _install(self, sha: str) -> None:
        """fsync the verified partial file, rename it into objects/, fsync the directory."""
        partial, final = self._partial_path(sha), self._object_path(sha)
        with partial.open("rb+") as f:
            os.fsync(f.fileno())
        final.parent.mkdir(exist_ok=True)
        os.replace(partial, final)
        fsync_dir(final.parent)
        fsync_dir(self._partial)

    def _commit_upload(self, db: sqlite3.Connection, upload: sqlite3.Row) -> ArtifactRecord:
        record = ArtifactRecord(
            sha256=upload["sha256"],
            size=upload["size"],
            kind=upload["kind"],
            name=upload["name"],
            job=upload["job"],
            created_at=self._clock(),
        )
        db.execute(
            "INSERT OR REPLACE INTO artifacts (sha256, size, kind, name, job, created_at)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (record.sha256, record.size, record.kind, record.name, record.job, record.created_at),
        )
        db.execute("DELETE FROM uploads WHERE sha256 = ?", (record.sha256,))
        return record

    def _discard_upload(self, sha: str) -> None:
        with self._write() as db:
            db.execute("DELETE FROM uploads WHERE sha256 = ?", (sha,))
        self._partial_path(sha).unlink(missing_ok=True)
        self._digests.pop(sha, None)

    def uploads(self) -> builtins.list[dict[str, Any]]:
        """Uploads in progress: sha256, size, received, kind, name, job, started_at."""
        with self._lock:
            rows = self._db.execute("SELECT * FROM uploads ORDER BY started_at").fetchall()
            return [{**dict(row), "received": self._received(row["sha256"])} for row in rows]

    # --- convenience for the broker's own artifacts ---

    def put_bytes(
        self, data: bytes, kind: str, name: str, job: str | None = None
    ) -> ArtifactRecord:
        """Store bytes in one go (the broker's own use); a no-op if already stored."""
        sha = hashlib.sha256(data).hexdigest()
        offset = self.begin_put(sha, len(data), kind=kind, name=name, job=job)
        if offset < len(data):
            self.put_chunk(sha, offset, data[offset:])
        return self.finish_put(sha)

    def put_file(self, path: Path, kind: str, name: str, job: str | None = None) -> ArtifactRecord:
        """Store a local file, streamed in chunks; a no-op if already stored."""
        sha, size = sha256_file(path), path.stat().st_size
        offset = self.begin_put(sha, size, kind=kind, name=name, job=job)
        with path.open("rb") as f:
            f.seek(offset)
            while offset < size and (block := f.read(ARTIFACT_CHUNK_BYTES)):
                offset = self.put_chunk(sha, offset, block)
        return self.finish_put(sha)

    # --- reading and deleting ---

    def stat(self, sha256: str) -> ArtifactRecord:
        sha = require_sha256(sha256)
        with self._lock:
            row = self._artifact_row(sha)
        if row is None:
            raise ArtifactError(f"no artifact {sha}")
        return _record(row)

    def has(self, sha256: str) -> bool:
        sha = require_sha256(sha256)
        with self._lock:
            return self._artifact_row(sha) is not None

    def read_chunk(self, sha256: str, offset: int, length: int) -> bytes:
        """Up to ``length`` bytes from ``offset`` (fewer at the end; none at ``size``)."""
        record = self.stat(sha256)
        if (
            isinstance(offset, bool)
            or not isinstance(offset, int)
            or not 0 <= offset <= record.size
        ):
            raise ArtifactError(
                f"offset {offset!r} is outside artifact {record.sha256} ({record.size} bytes)"
            )
        if (
            isinstance(length, bool)
            or not isinstance(length, int)
            or not 0 < length <= MAX_READ_BYTES
        ):
            raise ArtifactError(f"read length must be 1..{MAX_READ_BYTES} bytes, got {length!r}")
        try:
            with self._object_path(record.sha256).open("rb") as f:
                f.seek(offset)
                data = f.read(length)
        except FileNotFoundError:  # deleted between the stat and the read
            raise ArtifactError(f"no artifact {record.sha256}") from None
        self._verify_read(record, offset, data)
        return data

    def _verify_read(self, record: ArtifactRecord, offset: int, data: bytes) -> None:
        """Hash reads that go through the object in order; at its end, a hash that does not
        match removes the object (see Damage) and raises ArtifactDamaged."""
        sha = record.sha256
        with self._lock:
            digest, covered = self._read_digests.pop(sha, (None, 0))
            if offset == 0:
                digest, covered = hashlib.sha256(), 0
            if digest is None or covered != offset:
                return  # not in order: this read goes unverified
            digest.update(data)
            covered += len(data)
            if covered < record.size:
                self._read_digests[sha] = (digest, covered)
                while len(self._read_digests) > MAX_READ_DIGESTS:
                    self._read_digests.pop(next(iter(self._read_digests)))
                return
            actual = digest.hexdigest()
            if actual == sha or covered != record.size:
                return
            self._set_aside(sha)
        raise ArtifactDamaged(
            f"artifact {sha} is damaged in the broker's store: its {record.size} bytes hash to "
            f"{actual} (a bad disk, or the file changed by hand); removed from the store, so "
            f"that it can be uploaded or made again"
        )  # fmt: skip

    def _set_aside(self, sha: str) -> None:
        """A damaged object out of the store: its row deleted, its file moved to damaged/."""
        with self._write() as db:
            db.execute("DELETE FROM artifacts WHERE sha256 = ?", (sha,))
        self._damaged.mkdir(exist_ok=True)
        try:
            os.replace(self._object_path(sha), self._damaged / sha)
        except FileNotFoundError:
            pass

    def usage(self, top_jobs: int = 10) -> dict[str, Any]:
        """What holds the space: totals, bytes and counts by kind, the ``top_jobs`` jobs with
        the most bytes, and uploads in progress (declared bytes)."""
        with self._lock:
            kinds = self._db.execute(
                "SELECT kind, COUNT(*), SUM(size) FROM artifacts GROUP BY kind ORDER BY 3 DESC"
            ).fetchall()
            jobs = self._db.execute(
                "SELECT job, COUNT(*), SUM(size) FROM artifacts WHERE job IS NOT NULL"
                " GROUP BY job ORDER BY 3 DESC LIMIT ?",
                (top_jobs,),
            ).fetchall()
            (n_up, up_bytes) = self._db.execute(
                "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM uploads"
            ).fetchone()
        return {
            "used_bytes": self.used_bytes(),
            "max_bytes": self.max_bytes,
            "min_free_bytes": self.min_free_bytes,
            "disk_free_bytes": shutil.disk_usage(self.root).free,
            "by_kind": [{"kind": k, "count": n, "bytes": b} for k, n, b in kinds],
            "top_jobs": [{"job": j, "count": n, "bytes": b} for j, n, b in jobs],
            "uploads": {"count": n_up, "bytes": up_bytes},
        }

    def list(
        self,
        *,
        kind: str | None = None,
        job: str | None = None,
        start: int = 0,
        limit: int | None = None,
    ) -> builtins.list[ArtifactRecord]:
        """Stored artifacts, oldest first, optionally of one kind and/or job; ``start`` and
        ``limit`` page through them."""
        where, args = [], []
        if kind is not None:
            where.append("kind = ?")
            args.append(kind)
        if job is not None:
            where.append("job = ?")
            args.append(job)
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        with self._lock:
            rows = self._db.execute(
                f"SELECT * FROM artifacts {clause} ORDER BY created_at, rowid LIMIT ? OFFSET ?",
                (*args, -1 if limit is None else max(0, limit), max(0, start)),
            ).fetchall()
        return [_record(r) for r in rows]

    def of_jobs(self, job_ids: Sequence[str]) -> builtins.list[ArtifactRecord]:
        """The artifacts uploaded under any of ``job_ids`` (their ``job``), oldest first."""
        ids = list(dict.fromkeys(job_ids))
        found: builtins.list[ArtifactRecord] = []
        with self._lock:
            for start in range(0, len(ids), _IN_BATCH):
                batch = ids[start : start + _IN_BATCH]
                rows = self._db.execute(
                    f"SELECT * FROM artifacts WHERE job IN ({','.join('?' * len(batch))})"
                    " ORDER BY created_at, rowid",
                    batch,
                )
                found.extend(_record(r) for r in rows)
        return found

    def records(self, shas: Sequence[str]) -> builtins.list[ArtifactRecord]:
        """The records of those of ``shas`` the store holds."""
        wanted = [require_sha256(sha) for sha in dict.fromkeys(shas)]
        found: builtins.list[ArtifactRecord] = []
        with self._lock:
            for start in range(0, len(wanted), _IN_BATCH):
                batch = wanted[start : start + _IN_BATCH]
                rows = self._db.execute(
                    f"SELECT * FROM artifacts WHERE sha256 IN ({','.join('?' * len(batch))})",
                    batch,
                )
                found.extend(_record(r) for r in rows)
        return found

    def delete_many(
        self, shas: Sequence[str], *, in_use: Container[str]
    ) -> builtins.list[ArtifactRecord]:
        """Remove every stored artifact of ``shas`` that ``in_use`` does not hold, in one
        transaction: one fsync for all, where :meth:`delete` pays one each (a journal pruned
        of thousands of jobs releases thousands). The others (in use, not stored) are left
        as they are. Returns the records removed."""
        with self._lock:
            removed = self.records([sha for sha in shas if sha not in in_use])
            if not removed:
                return removed
            # Rows first: a crash before the unlinks leaves orphan files, never a row without one.
            with self._write() as db:
                db.executemany(
                    "DELETE FROM artifacts WHERE sha256 = ?", [(r.sha256,) for r in removed]
                )
            for record in removed:
                self._object_path(record.sha256).unlink(missing_ok=True)
        return removed

    def delete(self, sha256: str, *, in_use: Container[str]) -> None:
        """Remove an artifact; refused while ``in_use`` holds it (e.g. JobStore.in_use())."""
        sha = require_sha256(sha256)
        if sha in in_use:
            raise ArtifactError(f"artifact {sha} is in use by a queued or running job")
        with self._lock:
            if self._artifact_row(sha) is None:
                raise ArtifactError(f"no artifact {sha}")
            # Row first: a crash before the unlink leaves an orphan file, never a row without one.
            with self._write() as db:
                db.execute("DELETE FROM artifacts WHERE sha256 = ?", (sha,))
            self._object_path(sha).unlink(missing_ok=True)

    def path_of(self, sha256: str) -> Path:
        """The stored file of an artifact (the broker's own use; never write to it)."""
        record = self.stat(sha256)
        return self._object_path(record.sha256)
