"""Removing finished jobs through JobService (a fake loop host, a real journal and store, the
journal on a clock the test moves): what goes, what stays, in bounded steps."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from distill.broker.services import removal
from distill.broker.services.jobs import PRUNE_EVERY_S, JobService
from distill.broker.services.removal import JobRemoval, PruneRule
from distill.broker.services.retention import Retention
from distill.broker.store.artifacts import ArtifactRecord, ArtifactStore
from distill.broker.store.journal import JobStore
from distill.shared.bus.codec import pack
from distill.shared.errors import DistillError, code_of
from tests.broker.services.test_job_service import FakeHost, call, ok, put, worker

DAY_S = 86_400.0


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


class Parts:
    """A job service on a journal whose clock the test moves, and its artifact store."""

    def __init__(self, tmp: Path, keep_finished_s: float = 0.0) -> None:
        self.clock = FakeClock()
        self.host = FakeHost()
        self.journal = JobStore(tmp / "jobs.sqlite3", clock=self.clock)
        self.artifacts = ArtifactStore(tmp / "artifacts")
        self.released: list[str] = []  # what went through the delete path (quota release)

        def delete(shas: Sequence[str], in_use: set[str]) -> list[ArtifactRecord]:
            removed = self.artifacts.delete_many(shas, in_use=in_use)
            self.released += [a.sha256 for a in removed]
            return removed

        self.retention = Retention(self.journal, self.artifacts, delete, keep_preview_epochs=2)
        self.service = JobService(self.host, self.journal, retention=self.retention,
                                  keep_finished_s=keep_finished_s)  # fmt: skip

    def finished(self, status: str = "succeeded", params: dict[str, Any] | None = None,
                 made: dict[str, str] | None = None, deps: Sequence[str] = ()) -> str:  # fmt: skip
        """A job run to ``status``, having uploaded ``made`` (kind -> bytes' text) under its id:
        kinds other than checkpoint and preview are its result."""
        job_id = call(self.service, op="submit", service="s", params=params or {},
                      depends_on=list(deps), max_attempts=1)["id"]  # fmt: skip
        w = worker(job_id.encode())
        self.service.on_dispatched(job_id, w)
        result = {}
        for kind, text in (made or {}).items():
            sha = put(self.artifacts, text.encode(), kind, f"{kind}.bin", job_id)
            if kind == "checkpoint":
                call(self.service, op="checkpoint", id=job_id, sha256=sha, attempt=1)
            elif kind != "preview":
                result[kind] = sha
        if status == "succeeded":
            self.service.on_reply(job_id, ok(result), w)
        elif status == "failed":
            self.service.on_reply(job_id, [pack({"ok": False, "error": {"message": "boom"}})], w)
        else:
            call(self.service, op="cancel", id=job_id)
            self.service.on_reply(job_id, [pack({"ok": False, "cancelled": True})], w)
        assert self.journal.get(job_id).status == status
        return job_id

    def kinds(self) -> list[str]:
        return sorted(a.kind for a in self.artifacts.list())


@pytest.fixture
def parts(tmp_path: Path) -> Parts:
    return Parts(tmp_path)


def refused(service: JobService, **msg: Any) -> dict[str, Any]:
    """The error the loop would answer ``msg`` with (it replies with the code of what the
    service raises)."""
    with pytest.raises(DistillError) as error:
        service.serve(b"c", [pack(msg)])
    return {"code": code_of(error.value), "message": str(error.value)}


@pytest.mark.parametrize("status", ["succeeded", "failed", "cancelled"])
def test_removing_a_job_takes_its_checkpoints_and_previews_and_keeps_its_results(
    parts: Parts, status: str
) -> None:
    job = parts.finished(status, made={"checkpoint": "ckpt", "preview": "wav", "vqvae": "weights"})
    assert parts.kinds() == (["preview", "vqvae"] if status == "succeeded"  # its checkpoint went
                             else ["checkpoint", "preview", "vqvae"])  # fmt: skip
    reply = call(parts.service, op="remove", ids=[job])
    assert [j["id"] for j in reply["jobs"]] == [job] and reply["jobs"][0]["status"] == status
    gone = 1 if status == "succeeded" else 2
    assert reply["released"]["count"] == gone and reply["kept_results"] == {"count": 1, "bytes": 7}
    assert parts.kinds() == ["vqvae"] and len(parts.released) == gone + (status == "succeeded")
    assert parts.journal.counts() == dict.fromkeys(parts.journal.counts(), 0)
    assert f"job.{job}" in parts.host.forgotten  # the hub drops the events it kept for it


def test_artifacts_also_removes_its_results_once_no_job_that_stays_names_them(
    parts: Parts,
) -> None:
    job = parts.finished(made={"preview": "wav", "vqvae": "weights", "audio": "kick"})
    twin = parts.finished(made={"audio": "kick"})  # the same bytes: one artifact, job's
    user = parts.finished(params={"model": parts.journal.get(job).result["vqvae"]})
    other = parts.finished(made={"audio": "snare"})
    dry = call(parts.service, op="remove", ids=[job], artifacts=True, dry_run=True)
    assert dry["dry_run"] and dry["released"]["count"] == 1 and dry["kept_in_use"]["count"] == 2
    assert parts.kinds() == ["audio", "audio", "preview", "vqvae"] and parts.journal.get(job)
    reply = call(parts.service, op="remove", ids=[job], artifacts=True)
    assert reply["released"] == {"count": 1, "bytes": 3} and reply["kept_in_use"]["count"] == 2
    assert parts.kinds() == ["audio", "audio", "vqvae"]  # named by twin's result, user's params
    # they go with the last job that names them, however that one is removed; what twin and
    # user made themselves (other: nothing asked) stays
    reply = call(parts.service, op="remove", ids=[twin, user, other])
    assert reply["released"] == {"count": 2, "bytes": 11} and reply["kept_results"]["count"] == 1
    assert [a.name for a in parts.artifacts.list()] == ["audio.bin"]
    assert parts.journal._db.execute("SELECT COUNT(*) FROM release_later").fetchone()[0] == 0


def test_a_queued_or_running_job_keeps_what_it_needs(parts: Parts) -> None:
    """A dependency a queued job reads is refused, naming both; a finished job's artifact a
    running job names stays however the removal is asked for."""
    dataset = parts.finished(made={"dataset": "mels"})
    waiting = call(parts.service, op="submit", service="s", params={}, depends_on=[dataset])["id"]
    error = refused(parts.service, op="remove", ids=[dataset])
    assert error["code"] == "job" and error["message"] == (
        f"cannot remove job {dataset}: queued job {waiting} depends on it (it reads this job's "
        "result when an attempt starts)")  # fmt: skip
    assert "is queued" in refused(parts.service, op="remove", ids=[waiting])["message"]
    call(parts.service, op="cancel", id=waiting)
    sha = parts.journal.get(dataset).result["dataset"]
    running = call(parts.service, op="submit", service="s", params={"dataset": sha})["id"]
    parts.service.on_dispatched(running, worker(b"w9"))
    reply = call(parts.service, op="remove", ids=[dataset, waiting], artifacts=True)
    assert reply["kept_in_use"] == {"count": 1, "bytes": 4} and parts.artifacts.has(sha)


def test_bad_remove_and_prune_requests_are_refused_naming_the_field(parts: Parts) -> None:
    for msg, text in [({"op": "remove", "ids": []}, "'ids' must list 1 to"),
                      ({"op": "remove", "ids": ["j-1"] * 101}, "'ids' must list 1 to 100"),
                      ({"op": "remove", "ids": "j-1"}, "'ids' has the wrong type"),
                      ({"op": "prune"}, "missing field 'older_than_s'"),
                      ({"op": "prune", "older_than_s": -1}, "seconds >= 0, got -1"),
                      ({"op": "prune", "older_than_s": 1, "status": "running"}, "got 'running'"),
                      ({"op": "prune", "older_than_s": 1, "cursor": ["x"]}, "'cursor' must be")]:  # fmt: skip
        assert text in refused(parts.service, **msg)["message"], msg


def test_only_a_client_key_removes_jobs(parts: Parts) -> None:
    """Under CURVE a worker key may cancel, as before, but not remove: what the user keeps is
    the user's to change."""
    job = parts.finished("cancelled")
    parts.host.client_key = False
    for msg in ({"op": "remove", "ids": [job]}, {"op": "prune", "older_than_s": 0}):
        message = refused(parts.service, **msg)["message"]
        assert message == "cannot remove jobs: only a client key may (this is a worker key)"
    assert parts.journal.get(job).status == "cancelled"


def test_automatic_pruning_removes_jobs_past_the_setting_and_keeps_the_pinned(
    tmp_path: Path,
) -> None:
    parts = Parts(tmp_path, keep_finished_s=30 * DAY_S)
    old = [parts.finished(status, made={"checkpoint": f"{status} ckpt", "vqvae": status})
           for status in ("succeeded", "failed", "cancelled")]  # fmt: skip
    pinned = parts.finished()
    waiting = call(parts.service, op="submit", service="s", params={}, depends_on=[pinned])["id"]
    parts.clock.now += 29 * DAY_S
    young = parts.finished()
    parts.service.tick(0.0)
    assert len(parts.journal.list()) == 6  # none is 30 days old yet
    parts.clock.now += 1 * DAY_S
    parts.service.tick(1.0)  # a pass looks again PRUNE_EVERY_S after the last
    assert len(parts.journal.list()) == 6
    parts.service.tick(PRUNE_EVERY_S)
    assert {j.id for j in parts.journal.list()} == {pinned, waiting, young}
    assert parts.kinds() == ["vqvae"] * 3  # results stay; checkpoints went
    assert {f"job.{j}" for j in old} <= set(parts.host.forgotten)
    call(parts.service, op="cancel", id=waiting)  # now nothing needs pinned
    parts.clock.now += 30 * DAY_S
    parts.service.tick(2 * PRUNE_EVERY_S)
    assert parts.journal.list() == []


class StepTimer:
    """A timer that moves a step each time it is read: every chunk spends the step's budget."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


def test_pruning_goes_in_bounded_steps_and_reaches_every_job(parts: Parts) -> None:
    """However many jobs are due, one step removes one chunk once its budget is spent, and
    the cursor takes the next step on, past jobs that stay, to the end."""
    jobs = [parts.finished() for _ in range(50)]
    pinned = jobs[5]
    call(parts.service, op="submit", service="s", params={}, depends_on=[pinned])
    remover = JobRemoval(parts.journal, parts.retention, timer=StepTimer())
    rule, cursor, steps, removed = PruneRule(older_than_s=0), None, 0, []
    while True:
        tally, cursor = remover.prune_step(rule, cursor, budget_s=0.5)
        steps += 1
        assert len(tally.jobs) <= removal.FIRST_CHUNK_JOBS
        removed += [j.id for j in tally.jobs]
        if cursor is None:
            break
    assert steps >= 3 and sorted(removed) == sorted(set(jobs) - {pinned})
    assert [j.id for j in parts.journal.list(status="succeeded")] == [pinned]


def test_a_prune_request_is_one_step_and_the_client_walks_them(
    parts: Parts, monkeypatch: pytest.MonkeyPatch
) -> None:
    jobs = [parts.finished("failed") for _ in range(7)] + [parts.finished()]
    monkeypatch.setattr(removal, "FIRST_CHUNK_JOBS", 3)
    monkeypatch.setattr(parts.service, "removal", JobRemoval(parts.journal, parts.retention,
                                                             timer=StepTimer()))  # fmt: skip
    first = call(parts.service, op="prune", older_than_s=0, status="failed", dry_run=True)
    assert len(first["jobs"]) == 3 and first["more"] and first["cursor"]
    assert len(parts.journal.list()) == 8  # a dry run changes nothing
    cursor, seen = first["cursor"], [j["id"] for j in first["jobs"]]
    while cursor is not None:
        step = call(parts.service, op="prune", older_than_s=0, status="failed", cursor=cursor)
        seen += [j["id"] for j in step["jobs"]]
        cursor = step["cursor"]
    assert sorted(seen) == sorted(jobs[:7])  # the first three were only looked at (dry run)
    assert [j.id for j in parts.journal.list()] == [jobs[7], *jobs[:3][::-1]]
