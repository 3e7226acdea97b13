"""JobService without sockets: a fake loop host, a real journal and artifact store.

Each test names the behaviour before issue 9 that it would have caught.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from distill.broker.registry import Registry, Request, WorkerEntry
from distill.broker.services.jobs import JobService
from distill.broker.services.retention import Retention
from distill.broker.store.artifacts import ArtifactRecord, ArtifactStore
from distill.broker.store.journal import JobStore
from distill.shared.bus.codec import pack, unpack_map
from distill.shared.bus.jobs import owner_label
from distill.shared.errors import ArtifactError, JobError


class FakeHost:
    def __init__(self) -> None:
        self.registry = Registry(10.0)
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.submitted: list[str] = []
        self.replies: list[dict[str, Any]] = []
        self.worker_key = True  # what the loop says of the sender's key (always, without CURVE)
        self.client_key = True
        self.forgotten: list[str] = []  # topics whose kept events were dropped
        self.key: str | None = None  # the sender's z85 key under CURVE (None: no CURVE)
        self.admin = False
        self.clients: set[str] = set()  # keys with the client role now
        self.workers: set[str] = set()  # keys with the worker role only

    def caller_is_worker(self) -> bool:
        return self.worker_key

    def caller_is_client(self) -> bool:
        return self.client_key

    def caller_key(self) -> str | None:
        return self.key

    def caller_is_admin(self) -> bool:
        return self.admin

    def key_is_client(self, key: str) -> bool:
        return key in self.clients

    def describe_key(self, key: str) -> str:
        return f"'clients/{key}.key' ({key})"

    def key_file(self, key: str) -> str | None:
        if key in self.clients:
            return f"clients/{key}.key"
        return f"workers/{key}.key" if key in self.workers else None

    def forget_events(self, topic: str) -> None:
        self.forgotten.append(topic)

    def publish(self, topic: str, event: dict[str, Any]) -> dict[str, Any]:
        self.events.append((topic, event))
        return event

    def submit_internal(self, service: bytes, body: list[bytes], job_id: str) -> Request:
        self.submitted.append(job_id)
        return self.registry.new_request(service, body, None, 0.0, None)  # type: ignore[arg-type]

    def reply_later(self, identity: bytes, service: bytes, body: list[bytes]) -> bool:
        self.replies.append(unpack_map(body[0]))
        return True


def worker(name: bytes) -> WorkerEntry:
    return WorkerEntry(
        identity=name,
        service=b"s",
        meta={"host": "h"},
        registered_at=0.0,
        last_seen=0.0,
        expiry=10.0,
    )


@pytest.fixture
def parts(tmp_path: Path) -> tuple[FakeHost, JobService, ArtifactStore]:
    host, journal = FakeHost(), JobStore(tmp_path / "jobs.sqlite3")
    artifacts = ArtifactStore(tmp_path / "artifacts")

    def delete(shas: Sequence[str], in_use: set[str]) -> list[ArtifactRecord]:
        return artifacts.delete_many(shas, in_use=in_use)

    retention = Retention(journal, artifacts, delete, keep_preview_epochs=2)
    return host, JobService(host, journal, retention=retention), artifacts


def ok(result: Any) -> list[bytes]:
    return [pack({"ok": True, "result": result})]


def call(jobs: JobService, **msg: Any) -> dict[str, Any]:
    reply = unpack_map(jobs.serve(b"c", [pack(msg)])[0])  # type: ignore[index]
    assert reply["ok"], reply
    return reply["result"]  # type: ignore[no-any-return]


def start(service: JobService, w: WorkerEntry, params: dict[str, Any] | None = None) -> str:
    job_id = call(service, op="submit", service="s", params=params or {})["id"]
    service.on_dispatched(job_id, w)
    return job_id


def test_a_result_the_journal_refuses_fails_the_attempt(parts: Any) -> None:
    """Before: mark_succeeded's JobError (non-string keys) was logged as a "late reply" and
    dropped, leaving the job running with no worker for ever."""
    host, service, _ = parts
    w = worker(b"w1")
    job_id = start(service, w)
    service.on_reply(
        job_id,
        [
            pack(
                {"ok": True, "result": {1: "x"}},
            )
        ],
        w,
    )
    record = service.store.get(job_id)
    assert record.status == "queued"
    assert "could not store the result" in record.attempt_errors[0]
    assert "string keys" in record.attempt_errors[0]


def test_a_failed_commit_fails_the_attempt(parts: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Before: an sqlite3 error (disk full) escaped on_reply; the loop dropped the message."""
    host, service, _ = parts
    w = worker(b"w1")
    job_id = start(service, w)

    def disk_full(*a: Any, **k: Any) -> Any:
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(service.store, "mark_succeeded", disk_full)
    service.on_reply(job_id, ok({"v": 1}), w)
    record = service.store.get(job_id)
    assert record.status == "queued" and "disk is full" in record.attempt_errors[0]


def test_a_reply_from_a_stale_attempt_is_ignored(parts: Any) -> None:
    host, service, _ = parts
    w = worker(b"w1")
    job_id = start(service, w)
    service.on_lost(job_id, "heartbeat")
    service.on_dispatched(job_id, w)  # the same worker, reconnected, holds attempt 2
    service._attempt_of[(job_id, w.worker_id)] = 1  # the reply it sends is attempt 1's
    service.on_reply(job_id, ok({"v": "old"}), w)
    assert service.store.get(job_id).status == "running"


def put(artifacts: ArtifactStore, data: bytes, kind: str, name: str, job: str) -> str:
    return artifacts.put_bytes(data, kind=kind, name=name, job=job).sha256


def test_superseded_checkpoints_go_and_a_finished_job_keeps_only_its_model(parts: Any) -> None:
    """Before: every checkpoint ever uploaded stayed in the store (39 GB for one long run)."""
    host, service, artifacts = parts
    w = worker(b"w1")
    job_id = start(service, w)
    shas = [put(artifacts, f"ckpt {i}".encode(), "checkpoint", "ckpt", job_id) for i in range(3)]
    for sha in shas:
        call(service, op="checkpoint", id=job_id, sha256=sha, attempt=1)
    assert [a.sha256 for a in artifacts.list(kind="checkpoint")] == [shas[-1]]
    model = put(artifacts, b"model", "vqvae", "vqvae.pt", job_id)
    service.on_reply(job_id, ok({"model": model}), w)
    assert artifacts.list(kind="checkpoint") == []
    assert [a.sha256 for a in artifacts.list(job=job_id)] == [model]


def test_a_failed_job_keeps_its_checkpoint_and_retry_says_when_it_is_gone(parts: Any) -> None:
    host, service, artifacts = parts
    w = worker(b"w1")
    job_id = call(service, op="submit", service="s", params={}, max_attempts=1)["id"]
    service.on_dispatched(job_id, w)
    sha = put(artifacts, b"ckpt", "checkpoint", "ckpt", job_id)
    call(service, op="checkpoint", id=job_id, sha256=sha, attempt=1)
    service.on_reply(job_id, [pack({"ok": False, "error": {"message": "nan loss"}})], w)
    assert service.store.get(job_id).status == "failed" and artifacts.has(sha)
    artifacts.delete(sha, in_use=set())
    reply = call(service, op="retry", id=job_id)
    assert "starts from scratch" in reply["note"] and reply["checkpoint"] is None


def test_previews_of_old_epochs_are_trimmed(parts: Any) -> None:
    host, service, artifacts = parts
    job_id = start(service, worker(b"w1"))
    for epoch in (5, 10, 15, 20):
        for chunk in range(2):
            put(
                artifacts,
                f"{epoch}-{chunk}".encode(),
                "preview",
                f"epoch{epoch:04d}-{chunk}-x.wav",
                job_id,
            )
        service.on_event(f"job.{job_id}", {"type": "preview", "epoch": epoch})
    service.periodic.tick(1e9)
    names = sorted(a.name for a in artifacts.list(kind="preview"))
    assert names == [
        "epoch0015-0-x.wav",
        "epoch0015-1-x.wav",
        "epoch0020-0-x.wav",
        "epoch0020-1-x.wav",
    ]


def test_a_lost_worker_with_a_checkpoint_does_not_use_an_attempt(parts: Any) -> None:
    """Before: a worker kill -9 during a resumable training used one of its 3 attempts."""
    host, service, artifacts = parts
    w = worker(b"w1")
    job_id = call(service, op="submit", service="s", params={}, max_attempts=1)["id"]
    service.on_dispatched(job_id, w)
    service.on_lost(job_id, "no checkpoint yet")
    assert service.store.get(job_id).status == "failed"  # no checkpoint: counted
    job_id = call(service, op="submit", service="s", params={}, max_attempts=1)["id"]
    service.on_dispatched(job_id, w)
    sha = put(artifacts, b"c", "checkpoint", "c", job_id)
    call(service, op="checkpoint", id=job_id, sha256=sha, attempt=1)
    service.on_lost(job_id, "killed")
    record = service.store.get(job_id)
    assert record.status == "queued" and record.lost_attempts == 1


def test_a_failing_periodic_task_is_logged_and_the_others_still_run(
    parts: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before: an exception in tick (a journal flush on a full disk) escaped to the loop and
    skipped dispatch, cancels and waiter expiry on every turn after."""
    host, service, _ = parts

    def broken() -> None:
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(service, "_flush_events", broken)
    job_id = call(service, op="submit", service="s", params={})
    host.submitted.clear()
    service.tick(1.0)
    service.tick(2.0)
    assert host.submitted == [job_id["id"]]  # the dispatch scan still ran
    assert service.periodic.failures("flush_events") == 2


def test_list_and_get_replies_are_bounded(parts: Any) -> None:
    """Before: ``get`` returned every metric row and ``list`` any number of jobs in one reply."""
    host, service, _ = parts
    job_id = start(service, worker(b"w1"))
    for i in range(1_500):
        service.store.append_metrics(job_id, {"epoch": i})
    record = call(service, op="get", id=job_id)
    assert record["metric_count"] == 1_500 and len(record["metrics"]) == 1_000
    assert record["metrics_start"] == 500 and record["metrics"][0] == {"epoch": 500}
    page = call(service, op="metrics_page", id=job_id, start=0, limit=10)
    assert [r["epoch"] for r in page["rows"]] == list(range(10)) and page["count"] == 1_500
    big = {"blob": "x" * 200_000}
    for _ in range(30):
        call(service, op="submit", service="s", params=big)
    listed = call(service, op="list", limit=10_000)
    assert listed["truncated"] and len(pack(listed)) < 16 * 1024 * 1024 // 4 + 300_000


def test_a_failure_to_free_a_superseded_checkpoint_does_not_refuse_the_new_one(
    parts: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    host, service, artifacts = parts
    job_id = start(service, worker(b"w1"))
    old, new = (put(artifacts, d, "checkpoint", "c", job_id) for d in (b"old", b"new"))
    call(service, op="checkpoint", id=job_id, sha256=old, attempt=1)

    def broken(sha: str) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(service.retention, "delete", broken)
    assert call(service, op="checkpoint", id=job_id, sha256=new, attempt=1)["checkpoint"] == new
    assert service.store.get(job_id).checkpoint == new


@pytest.mark.parametrize("code", ["config", "bad_request", "model_format", "store_full"])
def test_a_failure_that_would_repeat_fails_the_job_at_once(parts: Any, code: str) -> None:
    """Before: a job with a bad setting ran all its attempts into the same ConfigError."""
    _, service, _ = parts
    w = worker(b"w1")
    job_id = start(service, w)
    error = {"code": code, "message": "TrainConfig: lr must be > 0"}
    service.on_reply(job_id, [pack({"ok": False, "error": error})], w)
    record = service.store.get(job_id)
    assert record.status == "failed" and record.attempts == 1
    assert "lr must be > 0" in (record.error or "")


def test_a_failure_of_the_moment_is_retried_and_the_watchers_are_told_why(parts: Any) -> None:
    """Before: a job queued again (an error of the moment, a lost worker) showed only
    "queued", then epoch 1 again, with no reason where the user watches."""
    host, service, artifacts = parts
    w = worker(b"w1")
    job_id = start(service, w)
    service.on_reply(job_id, [pack({"ok": False, "error": {"code": "artifact", "message": "x"}})], w)
    assert service.store.get(job_id).status == "queued"
    notes = [e["message"] for topic, e in host.events if e["type"] == "note"]
    assert notes == ["attempt 1 ended (attempt on h: x): queued again; it starts again (no "
                     "checkpoint yet)"]  # fmt: skip
    service.on_dispatched(job_id, w)
    sha = put(artifacts, b"ckpt", "checkpoint", "c", job_id)
    call(service, op="checkpoint", id=job_id, sha256=sha, attempt=2)
    service.on_lost(job_id, "unreachable")
    notes = [e["message"] for topic, e in host.events if e["type"] == "note"]
    assert notes[-1] == ("attempt 2 ended (worker lost: unreachable (not counted: lost 1 of 20)):"
                         " queued again; it resumes from its last checkpoint")  # fmt: skip


def test_requests_the_service_cannot_hold_are_bad_requests_naming_the_field(parts: Any) -> None:
    """Before: an unhashable op and a start past SQLite's integers were `internal` errors
    with Python's own text, and a job for a service the broker answers itself was queued for
    ever (no worker may register it)."""
    from distill.shared.errors import DecodeError, JobError

    _, jobs, _ = parts
    with pytest.raises(DecodeError, match="has no op"):
        jobs.serve(b"c", [pack({"op": ["counts"]})])
    with pytest.raises(DecodeError, match="field 'start' is out of range"):
        jobs.serve(b"c", [pack({"op": "list", "start": 2**63})])
    for service in ("distill.jobs", "distill.events", "mmi.service"):
        with pytest.raises(JobError, match="the broker's own service"):
            jobs.serve(b"c", [pack({"op": "submit", "service": service, "params": {}})])


def test_a_job_naming_an_artifact_the_store_lacks_is_refused_at_submit(parts: Any) -> None:
    """Before: `artifacts rm` of an upload racing the submit of the job that names it let
    the job in without its input (rm checks the jobs, submit did not check the store); it
    then failed three attempts with "no artifact <sha>", naming no file."""
    _, service, artifacts = parts
    kick = put(artifacts, b"kick", "audio", "kick.wav", None)
    hat = put(artifacts, b"hat", "audio", "hat.wav", None)
    params = {"files": [{"name": "kick.wav", "sha256": kick}, {"name": "hat.wav", "sha256": hat}]}
    artifacts.delete(hat, in_use=service.store.referenced_artifacts())  # the rm came first
    with pytest.raises(JobError, match=r"params\.files\[1\]\.sha256 \(hat\.wav\) names "
                       rf"artifact {hat[:16]}.*upload it again"):  # fmt: skip
        call(service, op="submit", service="distill.preprocess", params=params)
    assert service.store.list() == []
    params["files"].pop()
    job = call(service, op="submit", service="distill.preprocess", params=params)
    with pytest.raises(ArtifactError, match="in use"):  # and from now on rm is refused
        artifacts.delete(kick, in_use=service.store.referenced_artifacts())
    assert service.store.get(job["id"]).status == "queued"


def test_a_retry_whose_input_was_deleted_is_refused_as_a_submit_would_be(parts: Any) -> None:
    """Before: `jobs retry` of a cancelled job whose input had been deleted meanwhile (allowed:
    no queued or running job needed it) was accepted, and the job failed three attempts on
    "no artifact"."""
    _, service, artifacts = parts
    kick = put(artifacts, b"kick", "audio", "kick.wav", None)
    job = call(service, op="submit", service="distill.preprocess",
               params={"files": [{"name": "kick.wav", "sha256": kick}]})  # fmt: skip
    call(service, op="cancel", id=job["id"])
    artifacts.delete(kick, in_use=service.store.referenced_artifacts())
    with pytest.raises(JobError, match=r"params\.files\[0\]\.sha256 \(kick\.wav\) names "
                                       rf"artifact {kick[:16]}.*upload it again"):  # fmt: skip
        call(service, op="retry", id=job["id"])
    assert service.store.get(job["id"]).status == "cancelled"


def test_a_failure_announces_every_job_it_cancels_at_any_depth(parts: Any) -> None:
    """Before: only the direct dependents of a failed or cancelled job were announced (found
    by reading every cancelled job in the journal): a pipeline's third stage was cancelled in
    the journal, but its waiters were not answered and no status event said so."""
    host, service, _ = parts
    a = call(service, op="submit", service="s", params={})["id"]
    b = call(service, op="submit", service="s", params={}, depends_on=[a])["id"]
    d = call(service, op="submit", service="s", params={}, depends_on=[b])["id"]
    assert service.serve(b"waiter", [pack({"op": "wait", "id": d, "timeout_s": 30})]) is None
    call(service, op="cancel", id=a)
    cancelled = {e["job"] for topic, e in host.events
                 if e["type"] == "status" and e["status"] == "cancelled"}  # fmt: skip
    assert cancelled == {a, b, d}
    assert [r["result"]["id"] for r in host.replies] == [d]  # the waiter is answered
    assert host.replies[0]["result"]["status"] == "cancelled"
    assert [r.id for r in service.store.cancelled_because_of(a)] == [b, d]


def test_rows_are_kept_only_from_the_worker_running_the_job(parts: Any) -> None:
    """A row published as an event was stored into a running job from any publisher (a lost
    attempt's worker, anyone on the events port); a row as a request needs the running job."""
    host, service, _ = parts
    w = worker(b"w1")
    job_id = start(service, w)
    service.on_event(f"job.{job_id}", {"type": "metrics", "row": {"spoofed_loss": 123}})
    service._flush_events()
    assert service.store.metric_count(job_id) == 0
    call(service, op="metrics", id=job_id, row={"loss": 1.0}, attempt=1)
    with pytest.raises(JobError, match="attempt 1 is the current one"):
        service.serve(b"c", [pack({"op": "metrics", "id": job_id, "row": {}, "attempt": 2})])
    assert service.store.metric_count(job_id) == 1
    host.worker_key = False  # under CURVE, a client key
    with pytest.raises(JobError, match="only a worker key may"):
        service.serve(b"c", [pack({"op": "metrics", "id": job_id, "row": {}, "attempt": 1})])


# --- owners (under CURVE) -----------------------------------------------------------------------


def as_key(host: FakeHost, key: str | None, *, admin: bool = False) -> None:
    host.key, host.admin = key, admin


def alices_job(host: FakeHost, jobs: JobService) -> str:
    """Two people's keys, alice's and bob's; a job alice submitted (its id)."""
    host.clients = {"alice", "bob"}
    as_key(host, "alice")
    return str(call(jobs, op="submit", service="s", params={})["id"])


def refused(jobs: JobService, **msg: Any) -> str:
    with pytest.raises(JobError) as caught:
        jobs.serve(b"c", [pack(msg)])
    return str(caught.value)


def test_a_job_is_managed_by_the_key_that_submitted_it_or_an_admin(
    parts: tuple[FakeHost, JobService, ArtifactStore],
) -> None:
    """Before, any client key cancelled, retried or removed any job: one person's slip (or a
    script of theirs) ended another's overnight training."""
    host, jobs, _ = parts
    host.clients = {"alice", "bob"}
    as_key(host, "alice")
    job = call(jobs, op="submit", service="s", params={})
    assert job["owner"] == "alice"
    got = call(jobs, op="get", id=job["id"])
    assert (got["owner_file"], got["owner_name"]) == ("clients/alice.key", "'clients/alice.key' (alice)")
    as_key(host, "bob")
    for op in ("cancel", "retry"):
        message = refused(jobs, op=op, id=job["id"])
        assert message == (f"cannot {op} job {job['id']}: it belongs to the key "
                           "'clients/alice.key' (alice), which submitted it; only that key or "
                           "an admin key (in the allowed folder's admins/) may")
    assert call(jobs, op="get", id=job["id"])["status"] == "queued"  # nothing changed
    as_key(host, "alice")
    assert call(jobs, op="cancel", id=job["id"])["status"] == "cancelled"
    as_key(host, "bob")
    assert "belongs to the key 'clients/alice.key'" in refused(jobs, op="retry", id=job["id"])
    as_key(host, "carol", admin=True)  # an admin key manages every job
    assert call(jobs, op="retry", id=job["id"])["status"] == "queued"
    assert call(jobs, op="cancel", id=job["id"])["status"] == "cancelled"
    assert call(jobs, op="get", id=job["id"])["owner"] == "alice"  # still alice's


def test_removal_takes_only_the_callers_jobs_all_or_none(
    parts: tuple[FakeHost, JobService, ArtifactStore],
) -> None:
    host, jobs, _ = parts
    host.clients = {"alice", "bob"}
    owned: dict[str | None, str] = {}
    for key in ("alice", "bob", None):  # None: a job from before owners, or without CURVE
        as_key(host, key)
        owned[key] = call(jobs, op="submit", service="s", params={})["id"]
        call(jobs, op="cancel", id=owned[key])
    as_key(host, "bob")
    message = refused(jobs, op="remove", ids=[owned["bob"], owned["alice"], owned[None]])
    assert message.startswith("cannot remove 1 of the 3 jobs, so none was removed: job "
                              f"{owned['alice']}: it belongs to the key 'clients/alice.key'")
    assert len(call(jobs, op="list")["jobs"]) == 3
    pruned = call(jobs, op="prune", older_than_s=0, dry_run=True)
    assert ({j["id"] for j in pruned["jobs"]}, pruned["others"]) == ({owned["bob"], owned[None]}, 1)
    pruned = call(jobs, op="prune", older_than_s=0)
    assert ({j["id"] for j in pruned["jobs"]}, pruned["others"]) == ({owned["bob"], owned[None]}, 1)
    assert [j["id"] for j in call(jobs, op="list")["jobs"]] == [owned["alice"]]
    as_key(host, "carol", admin=True)
    assert call(jobs, op="prune", older_than_s=0)["others"] == 0
    assert call(jobs, op="list")["jobs"] == []


def test_a_revoked_owners_jobs_are_anyones_and_without_curve_nobody_owns_a_job(
    parts: tuple[FakeHost, JobService, ArtifactStore],
) -> None:
    """A key that left the allowed folder cannot end its jobs any more: any client may."""
    host, jobs, _ = parts
    job = alices_job(host, jobs)
    host.clients.discard("alice")
    as_key(host, "bob")
    got = call(jobs, op="get", id=job)
    assert got["owner_file"] is None and got["owner_name"] == (
        "'clients/alice.key' (alice) (no longer a client key: anyone may manage its jobs)")
    assert call(jobs, op="cancel", id=job)["status"] == "cancelled"
    assert call(jobs, op="remove", ids=[job])["jobs"][0]["id"] == job
    as_key(host, None)
    plain = call(jobs, op="submit", service="s", params={})
    assert plain["owner"] is None and "owner_name" not in call(jobs, op="get", id=plain["id"])
    assert len(call(jobs, op="list", mine=True)["jobs"]) == 1  # without CURVE: every job


def test_a_job_a_worker_key_submitted_is_anyones_but_not_called_revoked(
    parts: tuple[FakeHost, JobService, ArtifactStore],
) -> None:
    """`jobs ls` called a worker key's job "(revoked)", and `jobs show` its key "no longer a
    client key", while the key was allowed all along (as a worker)."""
    host, jobs, _ = parts
    host.clients, host.workers = {"bob"}, {"gpu"}
    as_key(host, "gpu")
    job = call(jobs, op="submit", service="s", params={})["id"]
    as_key(host, "bob")
    got = call(jobs, op="get", id=job)
    assert (got["owner_file"], got["owner_role"]) == (None, "worker")
    assert got["owner_name"].endswith("(a worker's key: anyone may manage its jobs)")
    assert owner_label(got) == "(worker)"
    assert call(jobs, op="cancel", id=job)["status"] == "cancelled"
    host.workers.clear()  # its file removed: revoked
    got = call(jobs, op="get", id=job)
    assert "owner_role" not in got and owner_label(got) == "(revoked)"


def test_a_key_lists_its_own_jobs(parts: tuple[FakeHost, JobService, ArtifactStore]) -> None:
    host, jobs, _ = parts
    host.clients = {"alice", "bob"}
    made = {}
    for key in ("alice", "bob", "alice"):
        as_key(host, key)
        made.setdefault(key, []).append(call(jobs, op="submit", service="s", params={})["id"])
    as_key(host, "alice")
    listed = call(jobs, op="list", mine=True)["jobs"]
    assert [j["id"] for j in listed] == made["alice"][::-1]  # newest first
    assert {j["owner_name"] for j in listed} == {"'clients/alice.key' (alice)"}
    assert len(call(jobs, op="list")["jobs"]) == 3


def test_a_workers_upload_for_a_job_is_the_jobs_owners_and_a_shared_upload_both_keys(
    parts: tuple[FakeHost, JobService, ArtifactStore],
) -> None:
    """A review's finds: a worker key that is a client too locked a job's owner out of its own
    result (the worker's key paid for it); of two keys that began the same upload at once,
    whichever the ledger listed first counted as its only uploader."""
    host, jobs, artifacts = parts
    host.clients = {"alice", "bob", "gpu"}  # gpu: a worker key copied into clients/ too
    as_key(host, "alice")
    job = call(jobs, op="submit", service="s", params={})["id"]
    result = artifacts.put_bytes(b"model", kind="model", name="m", job=job).sha256
    as_key(host, "alice")
    assert jobs.deletion_refusal(result, job, {"gpu"}) is None  # the job's owner decides
    as_key(host, "bob")
    assert jobs.deletion_refusal(result, job, {"gpu"}) == (
        f"cannot delete artifact {result[:16]}: it was stored for job {job} of the key "
        "'clients/alice.key' (alice); only that key or an admin key (in the allowed folder's "
        "admins/) may")
    both = artifacts.put_bytes(b"same bytes", kind="audio", name="a.wav").sha256
    for key, other in (("alice", "bob"), ("bob", "alice")):
        as_key(host, key)
        assert f"the key 'clients/{other}.key' ({other}) uploaded it" in (
            jobs.deletion_refusal(both, None, {"alice", "bob"}) or "")
    as_key(host, "carol", admin=True)
    assert jobs.deletion_refusal(both, None, {"alice", "bob"}) is None
    mine = artifacts.put_bytes(b"bob's", kind="audio", name="b.wav").sha256
    as_key(host, "alice")  # naming bob's file in a job does not keep it from him
    call(jobs, op="cancel", id=call(jobs, op="submit", service="s", params={"input": mine})["id"])
    as_key(host, "bob")
    assert jobs.deletion_refusal(mine, None, {"bob"}) is None


def test_refusals_name_every_problem_at_once_and_whose_job_is_in_the_way(
    parts: tuple[FakeHost, JobService, ArtifactStore],
) -> None:
    """One remove names both another key's job and a queued one (before: two rounds, and the
    owner's sentence repeated per job); a retry blocked by another key's failed dependency says
    whose it is (before: "retry X", which was then refused); a prune does not list another
    key's pinned jobs as its own."""
    host, jobs, _ = parts
    host.clients = {"alice", "bob"}
    as_key(host, "alice")
    dep = call(jobs, op="submit", service="s", params={})["id"]
    call(jobs, op="cancel", id=dep)
    call(jobs, op="retry", id=dep)
    w = worker(b"w1")
    jobs.on_dispatched(dep, w)
    jobs.on_reply(dep, ok({}), w)
    as_key(host, "bob")
    call(jobs, op="submit", service="s", params={}, depends_on=[dep])  # pins alice's dep
    queued = call(jobs, op="submit", service="s", params={})["id"]
    message = refused(jobs, op="remove", ids=[dep, queued])
    assert f"job {dep}: it belongs to the key 'clients/alice.key' (alice); job {queued}" in message
    assert "depends on it" not in message  # what else keeps alice's job is alice's business
    assert f"job {queued}: it is queued" in message and message.count("admins/") == 1
    assert message.endswith("(another key's job: only that key or an admin key, in the allowed "
                            "folder's admins/, may remove it)")
    pruned = call(jobs, op="prune", older_than_s=0, dry_run=True)
    assert (pruned["pinned"], pruned["others"]) == ([], 1)  # dep: alice's, pinned by bob's child
    as_key(host, "alice")
    assert [p["id"] for p in call(jobs, op="prune", older_than_s=0, dry_run=True)["pinned"]] == [dep]
    as_key(host, "alice")
    other = call(jobs, op="submit", service="s", params={})["id"]
    as_key(host, "bob")
    blocked = call(jobs, op="submit", service="s", params={}, depends_on=[other])["id"]
    as_key(host, "alice")
    assert call(jobs, op="cancel", id=other)["cascaded"] == [blocked]  # bob's dependent
    as_key(host, "bob")
    assert call(jobs, op="get", id=blocked)["status"] == "cancelled"
    message = refused(jobs, op="retry", id=blocked)
    assert message.endswith(f"(job {other} belongs to the key 'clients/alice.key' "
                            "(alice): only that key or an admin key may retry it)")
    as_key(host, "alice")
    assert call(jobs, op="retry", id=other)["requeued"] == [blocked]  # said, not silent


def test_only_a_jobs_owner_an_admin_or_a_worker_stores_files_for_it(
    parts: tuple[FakeHost, JobService, ArtifactStore],
) -> None:
    """A file stored for a job is its owner's: another client key could plant one there."""
    host, jobs, _ = parts
    job = alices_job(host, jobs)
    assert jobs.storing_refusal(job) is None and jobs.storing_refusal(None) is None
    host.worker_key = False  # bob's key is a client's only
    as_key(host, "bob")
    assert jobs.storing_refusal(job) == (
        f"cannot store an artifact for job {job}: it belongs to the key "
        "'clients/alice.key' (alice), which submitted it; only that key or an admin key (in the "
        "allowed folder's admins/) may")
    assert jobs.storing_refusal("j-unknown") is None  # a tag of its own choosing
    host.worker_key = True  # a worker stores checkpoints, previews and results for its jobs
    assert jobs.storing_refusal(job) is None


def test_listed_artifacts_say_whose_they_are(parts: tuple[FakeHost, JobService, ArtifactStore]) -> None:
    """`artifacts ls` under CURVE: a file stored for a job is its owner's, one uploaded on its
    own its uploader's (the first of two that began it at once); none without CURVE."""
    host, jobs, artifacts = parts
    job = alices_job(host, jobs)
    items = [{"sha256": "a" * 64, "job": job}, {"sha256": "b" * 64, "job": None},
             {"sha256": "c" * 64, "job": "j-unknown"}, {"sha256": "d" * 64}]
    charged = {"b" * 64: {"bob", "carol"}}
    as_key(host, "bob")
    jobs.name_artifact_owners(items, lambda sha: charged.get(sha, set()))
    assert [(i.get("owner"), i.get("owner_name")) for i in items] == [
        ("alice", "'clients/alice.key' (alice)"),
        ("bob", "'clients/bob.key' (bob)"), (None, None), (None, None)]
    as_key(host, None)
    plain = [{"sha256": "b" * 64, "job": None}]
    jobs.name_artifact_owners(plain, lambda sha: charged.get(sha, set()))
    assert plain == [{"sha256": "b" * 64, "job": None}]
