"""``distill.artifacts``: the content-addressed store, in chunks (policy over
:mod:`distill.broker.store.artifacts`).

Ops (one msgpack map per request): ``put_begin {sha256, size, kind, name, job}`` → ``{offset}``
(an interrupted put resumes there); ``put_chunk {sha256, offset, data}`` → ``{offset}``;
``put_finish {sha256}`` → record; ``get {sha256, offset, length}`` → ``{offset, data}``;
``stat``, ``list {kind?, job?, start?, limit?}`` → ``{artifacts, start, more}`` (paged),
``usage`` (bytes by kind and job, uploads in progress), ``delete``.

New uploads are charged to the uploading key's quota (:mod:`distill.broker.services.quota`);
``owner_of`` names that key for the request being served.
"""

from __future__ import annotations

from collections.abc import Callable, Container, Iterable
from typing import Any

from distill.broker.services.common import field, ok_body, page
from distill.broker.services.quota import ArtifactQuota
from distill.broker.store.artifacts import ArtifactStore, OffsetMismatch
from distill.shared.bus import protocol as P
from distill.shared.bus.codec import pack, unpack_map
from distill.shared.errors import OFFSET_MISMATCH, ArtifactDamaged, ArtifactError, DecodeError
from distill.shared.logs import get_logger

log = get_logger("artifacts")

# Records per list reply: ~300 bytes each packed, so a page stays near 1 MiB, far below the
# clients' message limit; ``more`` says another page follows.
MAX_LIST_ARTIFACTS = 4_000
# Uploads one client (a CURVE key; a socket without CURVE) may have begun and not finished: the
# store's own bound is for all clients, and one client holding it (2000 made-up uploads in 5 s)
# stopped every other upload for the hour an idle upload is kept.
MAX_UPLOADS_PER_CLIENT = 256


class ArtifactService:
    def __init__(self, store: ArtifactStore, in_use: Callable[[], Container[str]],
                 quota: ArtifactQuota | None = None,
                 owner_of: Callable[[], str] = lambda: "anonymous",
                 describe_owner: Callable[[str], str] = str,
                 peer_of: Callable[[], bytes] = lambda: b"",
                 known_jobs: Callable[[Iterable[str]], set[str]] | None = None,
                 refuse_delete: Callable[[str], str | None] = lambda sha: None,
                 refuse_store: Callable[[str | None], str | None] = lambda job: None,
                 name_owners: Callable[[list[dict[str, Any]]], None] = lambda items: None,
                 ) -> None:  # fmt: skip
        self.store = store
        # which of these jobs the journal still holds: an artifact whose job was removed (kept
        # by `jobs rm` without --artifacts) is listed with its job marked removed
        self.known_jobs = known_jobs
        self.in_use = in_use  # artifacts a queued or running job needs: refused to delete
        self.quota = quota
        self.owner_of = owner_of  # the key of the peer whose request is being served
        self.describe_owner = describe_owner  # that key as its errors name it (its file)
        self.peer_of = peer_of  # the sender: its key, or its socket without CURVE
        self._uploading: dict[bytes, set[str]] = {}  # each sender's uploads begun, not finished
        # why the sender may not delete an artifact (another key's, under CURVE); None: it may
        self.refuse_delete = refuse_delete
        self.refuse_store = refuse_store  # why the sender may not store under that job
        self.name_owners = name_owners  # whose each listed artifact is (under CURVE)

    def _check_uploads(self, sha: str) -> None:
        """ArtifactError if the sender may not begin another upload (see MAX_UPLOADS_PER_CLIENT);
        its uploads that finished or idled out since are forgotten first."""
        peer = self.peer_of()
        mine = self._uploading.get(peer)
        if not mine or sha in mine:
            return
        mine.intersection_update({s for s in mine if self.store.is_uploading(s)})
        if not mine:
            del self._uploading[peer]
        elif len(mine) >= MAX_UPLOADS_PER_CLIENT and not self.store.is_uploading(sha):
            raise ArtifactError(f"this client has {len(mine)} uploads begun and not finished, "
                                f"the most one client may: finish them (an abandoned one is "
                                "forgotten after an hour of no chunks)")  # fmt: skip

    def _mark_removed_jobs(self, items: list[dict[str, Any]]) -> None:
        """``job_removed: true`` on each item whose ``job`` the journal no longer holds."""
        if self.known_jobs is None:
            return
        known = self.known_jobs(item["job"] for item in items if item.get("job"))
        for item in items:
            if item.get("job") and item["job"] not in known:
                item["job_removed"] = True

    def serve(self, identity: bytes, body: list[bytes]) -> list[bytes]:
        msg = unpack_map(body[0])
        op = msg.get("op")
        if op == "put_begin":
            sha, size = field(msg, "sha256", str), field(msg, "size", int)
            if why := self.refuse_store(field(msg, "job", str, None)):
                raise ArtifactError(why)
            self._check_uploads(sha)
            if self.quota is not None and not self.store.has(sha):
                owner = self.owner_of()
                self.quota.charge(owner, sha, size, label=self.describe_owner(owner))
            offset = self.store.begin_put(sha, size,
                                          kind=field(msg, "kind", str), name=field(msg, "name", str),
                                          job=field(msg, "job", str, None))
            if offset < size:
                self._uploading.setdefault(self.peer_of(), set()).add(sha)
            return ok_body({"offset": offset})
        if op == "put_chunk":
            try:
                offset = self.store.put_chunk(field(msg, "sha256", str), field(msg, "offset", int),
                                              field(msg, "data", bytes))
            except OffsetMismatch as e:
                return [pack({"ok": False, "error": {"code": OFFSET_MISMATCH, "message": str(e),
                                                     "expected": e.expected}})]
            return ok_body({"offset": offset})
        if op == "put_finish":
            sha = field(msg, "sha256", str)
            record = self.store.finish_put(sha)
            self._uploading.get(self.peer_of(), set()).discard(sha)
            return ok_body(record.to_dict())
        if op == "get":
            sha, offset = field(msg, "sha256", str), field(msg, "offset", int)
            try:
                data = self.store.read_chunk(sha, offset,
                                             field(msg, "length", int, P.ARTIFACT_CHUNK_BYTES))
            except ArtifactDamaged as e:
                log.error("artifact_damaged", artifact=sha, reason=str(e))
                if self.quota is not None:
                    self.quota.forget(sha)
                raise
            return ok_body({"offset": offset, "data": data})
        if op == "stat":
            return ok_body(self.store.stat(field(msg, "sha256", str)).to_dict())
        if op == "list":  # paged: at most MAX_LIST_ARTIFACTS records from ``start``
            start, limit = page(msg, MAX_LIST_ARTIFACTS, MAX_LIST_ARTIFACTS)
            records = self.store.list(kind=field(msg, "kind", str, None), job=field(msg, "job", str, None),
                                      start=start, limit=limit + 1)
            items = [r.to_dict() for r in records[:limit]]
            self._mark_removed_jobs(items)
            self.name_owners(items)
            return ok_body({"artifacts": items, "start": start, "more": len(records) > limit})
        if op == "usage":  # what holds the space (``distill artifacts ls``)
            usage = self.store.usage()
            self._mark_removed_jobs(usage["top_jobs"])
            return ok_body(usage)
        if op == "delete":
            sha = field(msg, "sha256", str)
            if self.store.has(sha) and (why := self.refuse_delete(sha)):
                raise ArtifactError(why)
            self.store.delete(sha, in_use=self.in_use())
            if self.quota is not None:
                self.quota.forget(sha)
            return ok_body({})
        raise DecodeError(f"distill.artifacts has no op {op!r} (ops: put_begin, put_chunk, put_finish, "
                          "get, stat, list, usage, delete)")
