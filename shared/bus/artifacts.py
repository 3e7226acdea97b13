"""Client side of ``distill.artifacts``: chunked, resumable put; credit-based chunked get into
a local cache by hash. Used by the CLI, scripts and workers alike.

Ops (one msgpack map per request): ``put_begin {sha256, size, kind, name, job}`` → ``{offset}``
(the bytes the broker already has: an interrupted put resumes there); ``put_chunk {sha256,
offset, data}`` → ``{offset}``; ``put_finish {sha256}`` → record; ``get {sha256, offset,
length}`` → ``{offset, data}``; ``stat``, ``list {kind?, job?, start?}`` → ``{artifacts, start,
more}`` (paged: :meth:`ArtifactClient.iter` walks every page), ``delete``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from distill.shared.bus import protocol as P
from distill.shared.bus.cache import ArtifactCache
from distill.shared.bus.client import Client
from distill.shared.errors import (
    DAMAGED,
    OFFSET_MISMATCH,
    TIMEOUT,
    ArtifactDamaged,
    ArtifactError,
    RequestError,
)
from distill.shared.ids import escaped, require_sha256, sha256_file
from distill.shared.logs import get_logger

log = get_logger("artifacts")

SERVICE = P.SERVICE_ARTIFACTS.decode()
Progress = Callable[[int, int], None]  # (bytes done, bytes total)
# A transfer whose broker stops answering (a restart loses the chunks in flight) resumes where
# it stopped, this many tries in all: each waits out the client's timeout first.
TRANSFER_TRIES = 3


class ChunkLost(ArtifactError):
    """A chunk's reply never came but a later one did (its request was lost to a restart)."""


def artifact_name(name: str) -> str:
    """A file's name as an artifact's name: control and format characters written as their
    escapes (the store refuses them; one such file failed a whole upload midway), and a long
    path cut to its end (the name is metadata; a manifest keeps the whole path)."""
    label = escaped(name)
    if len(label) <= P.MAX_ARTIFACT_NAME_CHARS:
        return label
    return "…" + label[-(P.MAX_ARTIFACT_NAME_CHARS - 1):]


class ArtifactClient:
    def __init__(self, client: Client, cache: ArtifactCache | None = None,
                 chunk_bytes: int = P.ARTIFACT_CHUNK_BYTES, credit: int = P.ARTIFACT_CREDIT) -> None:
        self.client = client
        self.cache = cache or ArtifactCache()
        self.chunk_bytes = chunk_bytes
        self.credit = credit

    # --- put ---------------------------------------------------------------------------------
    def put_bytes(self, data: bytes, *, kind: str, name: str, job: str | None = None) -> str:
        sha = hashlib.sha256(data).hexdigest()
        self._put(sha, len(data), lambda off, n: data[off:off + n], kind=kind, name=name, job=job)
        return sha

    def put_file(self, path: Path, *, kind: str, name: str, job: str | None = None,
                 progress: Progress | None = None) -> str:
        path = Path(path)
        sha = sha256_file(path)
        size = path.stat().st_size
        with open(path, "rb") as f:
            self._put(sha, size, lambda off, n: _read_at(f, off, n), kind=kind, name=name, job=job,
                      progress=progress)
        return sha

    def _put(self, sha: str, size: int, read: Callable[[int, int], bytes], *, kind: str, name: str,
             job: str | None, progress: Progress | None = None) -> None:
        """Upload, resuming where the broker's copy stops when it stops answering (a restart
        loses the chunks in flight; ``put_begin`` says where to go on) up to TRANSFER_TRIES
        times in all."""
        for tries_left in reversed(range(TRANSFER_TRIES)):
            try:
                self._put_once(sha, size, read, kind=kind, name=name, job=job, progress=progress)
                return
            except RequestError as e:
                if not tries_left or e.code not in (TIMEOUT, OFFSET_MISMATCH):
                    raise
                log.warning("upload_resumed", artifact=sha, reason=str(e))

    def _put_once(self, sha: str, size: int, read: Callable[[int, int], bytes], *, kind: str,
                  name: str, job: str | None, progress: Progress | None = None) -> None:
        begin = {"op": "put_begin", "sha256": sha, "size": size, "kind": kind, "name": name, "job": job}
        offset = int(self.client.request(SERVICE, begin)["offset"])
        if progress:
            progress(offset, size)
        if offset < size:
            offsets = range(offset, size, self.chunk_bytes)
            bodies = ({"op": "put_chunk", "sha256": sha, "offset": off,
                       "data": read(off, self.chunk_bytes)} for off in offsets)
            for result in self.client.pipeline(SERVICE, bodies, window=self.credit):
                if progress:
                    progress(int(result["offset"]), size)
        self.client.request(SERVICE, {"op": "put_finish", "sha256": sha})

    # --- get ---------------------------------------------------------------------------------
    def stat(self, sha256: str) -> dict[str, Any]:
        result: dict[str, Any] = self.client.request(SERVICE, {"op": "stat", "sha256": require_sha256(sha256)})
        return result

    def iter_chunks(self, sha256: str, size: int, start: int = 0) -> Iterator[bytes]:
        """Chunks in order from ``start``, with ``credit`` chunk requests in flight. An object
        the broker finds damaged as it is read raises ArtifactDamaged (the broker has removed
        it)."""
        bodies = ({"op": "get", "sha256": sha256, "offset": off, "length": self.chunk_bytes}
                  for off in range(start, size, self.chunk_bytes))
        expected = start
        try:
            for result in self.client.pipeline(SERVICE, bodies, window=self.credit):
                if int(result["offset"]) != expected:  # one was lost: a broker restart
                    raise ChunkLost(f"artifact {sha256}: chunk at {result['offset']} "
                                    f"arrived, expected {expected}")
                expected += len(result["data"])
                yield result["data"]
        except RequestError as e:
            if e.code == DAMAGED:
                raise ArtifactDamaged(str(e)) from None
            raise

    def _fetch(self, sha256: str, size: int, sink: Callable[[bytes], object],
               progress: Progress | None) -> None:
        """Every chunk into ``sink`` in order, resuming after the last one received when the
        broker stops answering (a restart), up to TRANSFER_TRIES times in all."""
        done = 0
        for tries_left in reversed(range(TRANSFER_TRIES)):
            try:
                for chunk in self.iter_chunks(sha256, size, done):
                    sink(chunk)
                    done += len(chunk)
                    if progress:
                        progress(done, size)
                return
            except (RequestError, ChunkLost) as e:
                if not tries_left or (isinstance(e, RequestError) and e.code != TIMEOUT):
                    raise
                log.warning("download_resumed", artifact=sha256, offset=done, reason=str(e))

    def get_file(self, sha256: str, progress: Progress | None = None) -> Path:
        """Fetch into the local cache (once); returns the cached file's path. A cached copy
        is checked against its id first: a damaged one is removed and fetched again."""
        require_sha256(sha256)
        if self.cache.has(sha256) and self.cache.verify(sha256):
            return self.cache.path_for(sha256)
        size = int(self.stat(sha256)["size"])
        writer = self.cache.open_writer(sha256)
        try:
            self._fetch(sha256, size, writer.write, progress)
            writer.commit()
        except BaseException:
            writer.abort()
            raise
        return self.cache.path_for(sha256)

    def download(self, sha256: str, out: Path, progress: Progress | None = None) -> Path:
        """Stream an artifact from the broker to ``out`` (no cache), verifying its hash."""
        require_sha256(sha256)
        size = int(self.stat(sha256)["size"])
        out = Path(out)
        tmp = out.with_name(f".{out.name}.part")
        digest = hashlib.sha256()
        try:
            with open(tmp, "wb") as f:

                def sink(chunk: bytes) -> None:
                    f.write(chunk)
                    digest.update(chunk)

                self._fetch(sha256, size, sink, progress)
            if digest.hexdigest() != sha256:
                raise ArtifactError(f"artifact {sha256}: downloaded bytes hash to {digest.hexdigest()}")
            tmp.replace(out)
        finally:
            tmp.unlink(missing_ok=True)
        return out

    def get_bytes(self, sha256: str) -> bytes:
        """The artifact's bytes, through the local cache, checked against its id (read once:
        a damaged cached copy is removed and fetched again)."""
        require_sha256(sha256)
        if self.cache.has(sha256):
            data = self.cache.read_verified(sha256)
            if data is not None:
                return data
        return self.get_file(sha256).read_bytes()

    def iter(self, *, kind: str | None = None, job: str | None = None) -> Iterator[dict[str, Any]]:
        """Every artifact record (of a kind, of a job), fetched page by page."""
        start = 0
        while True:
            page = self.client.request(SERVICE, {"op": "list", "kind": kind, "job": job,
                                                 "start": start})
            records = page["artifacts"]
            yield from records
            if not records or not page.get("more"):
                return
            start += len(records)

    def list(self, *, kind: str | None = None, job: str | None = None) -> list[dict[str, Any]]:
        """Every artifact record (of a kind, of a job): all pages, not just the first."""
        return list(self.iter(kind=kind, job=job))

    def delete(self, sha256: str) -> None:
        self.client.request(SERVICE, {"op": "delete", "sha256": require_sha256(sha256)})


def _read_at(f: BinaryIO, offset: int, n: int) -> bytes:
    f.seek(offset)
    return f.read(n)
