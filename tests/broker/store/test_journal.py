"""Behaviour of the broker's durable job table (no sockets, no wall-clock time)."""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from distill.broker.store.journal import (
    JOB_STATUSES,
    MAX_LOST_ATTEMPTS,
    MAX_METRIC_ROW_BYTES,
    MAX_PARAMS_BYTES,
    MAX_REASON_CHARS,
    SCHEMA_VERSION,
    JobStore,
    StaleAttempt,
    artifact_refs,
)
from distill.shared.bus import codec
from distill.shared.errors import JobError

SHA_A = "a" * 64
SHA_B = "0123456789abcdef" * 4
SHA_C = "c" * 64
SHA_D = "d" * 64  # a checkpoint


class FakeClock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def store(clock: FakeClock) -> Iterator[JobStore]:
    with JobStore(":memory:", clock=clock) as s:
        yield s


def run_to_success(store: JobStore, job_id: str, result: dict, worker: str = "w1") -> None:
    store.mark_running(job_id, worker)
    store.mark_succeeded(job_id, result)


def run_to_failure(store: JobStore, job_id: str, reasons: list[str]) -> None:
    for reason in reasons:
        store.mark_running(job_id, "w1")
        store.fail_attempt(job_id, reason)


# --- basics -------------------------------------------------------------------------------------


def test_submit_then_get_returns_a_queued_job(store: JobStore, clock: FakeClock) -> None:
    job = store.submit("distill.preprocess", {"files": [SHA_A], "sr": 48_000}, timeout_s=60)
    assert re.fullmatch(r"j-[0-9a-f]{10}", job.id)
    got = store.get(job.id)
    assert got.to_dict(with_metrics=False) == job.to_dict()
    assert (got.metrics, got.metrics_loaded, job.metrics_loaded) == ([], True, False)
    assert got.status == "queued"
    assert got.params == {"files": [SHA_A], "sr": 48_000}
    assert (got.attempts, got.max_attempts) == (0, 3)
    assert got.created_at == clock.now
    assert got.timeout_s == 60.0
    assert codec.unpack(codec.pack(got.to_dict())) == got.to_dict()


def test_ids_are_unique(store: JobStore) -> None:
    ids = {store.submit("s", {}).id for _ in range(200)}
    assert len(ids) == 200


def test_unknown_job_is_a_job_error(store: JobStore) -> None:
    with pytest.raises(JobError, match="no job j-missing"):
        store.get("j-missing")
    for call in (
        lambda: store.mark_running("j-missing", "w"),
        lambda: store.request_cancel("j-missing"),
        lambda: store.record_progress("j-missing", {"step": 1}),
        lambda: store.append_metrics("j-missing", {"loss": 1.0}),
        lambda: store.set_checkpoint("j-missing", SHA_A),
        lambda: store.deps_results("j-missing"),
    ):
        with pytest.raises(JobError, match="no job j-missing"):
            call()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"service": "", "params": {}},
        {"service": "s", "params": ["not", "a", "map"]},
        {"service": "s", "params": {1: "int key"}},
        {"service": "s", "params": {"x": object()}},
        {"service": "s", "params": {}, "max_attempts": 0},
        {"service": "s", "params": {}, "max_attempts": 10_000},
        {"service": "s", "params": {}, "timeout_s": -1},
        {"service": "s", "params": {}, "timeout_s": float("nan")},
        {"service": "s", "params": {}, "depends_on": "j-notalist"},
    ],
)
def test_bad_submissions_are_refused_and_store_nothing(store: JobStore, kwargs: dict) -> None:
    with pytest.raises(JobError):
        store.submit(**kwargs)
    assert store.list() == []


def test_unknown_dependency_is_refused_and_stores_nothing(store: JobStore) -> None:
    a = store.submit("s", {})
    with pytest.raises(JobError, match="j-nope"):
        store.submit("s", {}, depends_on=[a.id, "j-nope"])
    assert [j.id for j in store.list()] == [a.id]


def test_list_filters_newest_first_and_limits(store: JobStore) -> None:
    a = store.submit("distill.preprocess", {})
    b = store.submit("distill.infer", {})
    c = store.submit("distill.infer", {})
    store.mark_running(c.id, "w1")
    assert [j.id for j in store.list()] == [c.id, b.id, a.id]
    assert [j.id for j in store.list(service="distill.infer")] == [c.id, b.id]
    assert [j.id for j in store.list(status="queued")] == [b.id, a.id]
    assert [j.id for j in store.list(limit=1)] == [c.id]
    assert store.counts() == {
        "queued": 2,
        "running": 1,
        "succeeded": 0,
        "failed": 0,
        "cancelled": 0,
    }
    with pytest.raises(JobError, match="unknown job status"):
        store.list(status="paused")


# --- durability ---------------------------------------------------------------------------------


def test_everything_survives_close_and_reopen(tmp_path: Path, clock: FakeClock) -> None:
    db = tmp_path / "jobs.sqlite3"
    with JobStore(db, clock=clock) as store:
        a = store.submit("distill.preprocess", {"files": [SHA_A]}, max_attempts=2)
        b = store.submit("distill.train.vqvae", {"epochs": 3}, depends_on=[a.id], timeout_s=9.5)
        c = store.submit("distill.infer", {"n": 1})
        run_to_success(store, a.id, {"dataset": SHA_B, "files": 1})
        store.mark_running(b.id, "w2")
        store.record_progress(b.id, {"fraction": 0.5, "step": 10})
        for epoch in range(3):
            store.append_metrics(b.id, {"epoch": epoch, "loss": 1.0 / (epoch + 1)})
        store.set_checkpoint(b.id, SHA_C)
        store.fail_attempt(b.id, "worker w2 missed its heartbeats")
        store.request_cancel(c.id)
        before = {j.id: j.to_dict() for j in store.list(with_metrics=True)}
    with JobStore(db, clock=clock) as reopened:
        after = {j.id: j.to_dict() for j in reopened.list(with_metrics=True)}
        assert after == before
        assert reopened.get(b.id).metrics[2] == {"epoch": 2, "loss": 1.0 / 3}
        assert reopened.get(b.id).attempt_errors == ["worker w2 missed its heartbeats"]
        assert [j.id for j in reopened.dispatchable()] == [b.id]


def test_database_uses_wal(tmp_path: Path) -> None:
    path = tmp_path / "jobs.sqlite3"
    JobStore(path).close()
    with sqlite3.connect(path) as raw:
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "jobs.sqlite3"
    JobStore(path).close()
    raw = sqlite3.connect(path)
    raw.execute("PRAGMA user_version=99")
    raw.close()
    with pytest.raises(JobError, match=f"the job table {path} has schema version 99; .* newer "
                                       "Distill. Upgrade Distill to open it, or start this one "
                                       "with another --data-dir"):  # fmt: skip
        JobStore(path)
    raw = sqlite3.connect(path)
    assert raw.execute("PRAGMA user_version").fetchone()[0] == 99  # untouched
    raw.close()


# --- attempts -----------------------------------------------------------------------------------


def test_failed_attempts_requeue_until_max_attempts_then_fail_with_each_reason(
    store: JobStore,
) -> None:
    job = store.submit("distill.train.vqvae", {}, max_attempts=3)
    store.mark_running(job.id, "w1")
    again = store.fail_attempt(job.id, "CUDA out of memory")
    assert (again.status, again.attempts, again.worker) == ("queued", 1, None)
    assert [j.id for j in store.dispatchable()] == [job.id]

    store.mark_running(job.id, "w2")
    store.fail_attempt(job.id, "worker w2 missed its heartbeats")
    store.mark_running(job.id, "w3")
    final = store.fail_attempt(job.id, "NaN loss at step 12")

    assert final.status == "failed"
    assert final.attempts == 3
    assert final.attempt_errors == [
        "CUDA out of memory",
        "worker w2 missed its heartbeats",
        "NaN loss at step 12",
    ]
    assert final.error is not None
    for reason in final.attempt_errors:
        assert reason in final.error
    assert "3 attempts" in final.error
    assert store.dispatchable() == []


def test_long_reasons_are_clipped(store: JobStore) -> None:
    job = store.submit("s", {}, max_attempts=1)
    store.mark_running(job.id, "w1")
    failed = store.fail_attempt(job.id, "Traceback (most recent call last):\n" * 1000)
    assert len(failed.attempt_errors[0]) <= MAX_REASON_CHARS
    assert failed.attempt_errors[0].startswith("Traceback")


def test_mark_running_counts_attempts_and_records_the_worker(
    store: JobStore, clock: FakeClock
) -> None:
    job = store.submit("s", {})
    clock.now = 1_010.0
    running = store.mark_running(job.id, "worker-7")
    assert (running.status, running.attempts, running.worker) == ("running", 1, "worker-7")
    assert running.started_at == 1_010.0
    with pytest.raises(JobError, match="not queued"):
        store.mark_running(job.id, "worker-8")


def test_results_only_from_the_running_worker(store: JobStore, clock: FakeClock) -> None:
    job = store.submit("s", {})
    with pytest.raises(JobError, match="not running"):
        store.mark_succeeded(job.id, {"ok": True})
    store.mark_running(job.id, "w1")
    with pytest.raises(JobError, match="not on w2"):
        store.mark_succeeded(job.id, {"ok": True}, worker="w2")
    with pytest.raises(JobError, match="not on w2"):
        store.fail_attempt(job.id, "late reply", worker="w2")
    clock.now = 1_050.0
    done = store.mark_succeeded(job.id, {"ok": True}, worker="w1")
    assert (done.status, done.result, done.finished_at) == ("succeeded", {"ok": True}, 1_050.0)
    with pytest.raises(JobError, match="succeeded"):
        store.fail_attempt(job.id, "too late")


# --- dependencies -------------------------------------------------------------------------------


def pipeline(store: JobStore) -> tuple[str, str, str]:
    a = store.submit("distill.preprocess", {"files": [SHA_A]})
    b = store.submit("distill.train.vqvae", {"epochs": 5}, depends_on=[a.id])
    c = store.submit("distill.train.prior", {"epochs": 5}, depends_on=[b.id, a.id])
    return a.id, b.id, c.id


def test_pipeline_dispatches_in_dependency_order_and_passes_results(store: JobStore) -> None:
    a, b, c = pipeline(store)
    assert store.get(c).depends_on == [b, a]
    assert [j.id for j in store.dispatchable()] == [a]

    run_to_success(store, a, {"dataset": SHA_B})
    assert [j.id for j in store.dispatchable()] == [b]
    assert store.dispatchable("distill.train.prior") == []
    assert store.deps_results(b) == {a: {"dataset": SHA_B}}

    run_to_success(store, b, {"model": SHA_C})
    assert [j.id for j in store.dispatchable("distill.train.prior")] == [c]
    assert store.deps_results(c) == {b: {"model": SHA_C}, a: {"dataset": SHA_B}}


def test_deps_results_refuses_unfinished_dependencies(store: JobStore) -> None:
    a, b, _ = pipeline(store)
    with pytest.raises(JobError, match=f"dependency {a} is queued"):
        store.deps_results(b)


def test_final_failure_cancels_the_whole_pipeline_naming_the_cause(store: JobStore) -> None:
    a, b, c = pipeline(store)
    run_to_failure(store, a, ["bad audio", "bad audio", "bad audio"])
    assert store.get(a).status == "failed"
    for dependent in (b, c):
        job = store.get(dependent)
        assert job.status == "cancelled"
        assert job.error is not None
        assert job.error.startswith(f"dependency {a} failed: ")
        assert "bad audio" in job.error
    assert store.dispatchable() == []


def test_submitting_after_a_dependency_failed_creates_a_cancelled_job(store: JobStore) -> None:
    a = store.submit("s", {}, max_attempts=1)
    run_to_failure(store, a.id, ["boom"])
    late = store.submit("t", {}, depends_on=[a.id])
    assert late.status == "cancelled"
    assert late.error is not None and f"dependency {a.id} failed" in late.error
    assert late.cancelled_by == a.id


def test_retry_requeues_the_job_and_the_dependents_it_cancelled(store: JobStore) -> None:
    a, b, c = pipeline(store)
    run_to_failure(store, a, ["disk full"] * 3)
    late = store.submit("distill.infer", {}, depends_on=[c])
    assert late.status == "cancelled"

    retried = store.retry(a)
    assert (retried.status, retried.error, retried.attempts) == ("queued", None, 3)
    assert retried.max_attempts == 6  # a fresh budget of the 3 it was submitted with
    assert retried.attempt_errors == ["disk full"] * 3  # history kept
    for dependent in (b, c, late.id):
        job = store.get(dependent)
        assert (job.status, job.error, job.cancelled_by) == ("queued", None, None)
    assert [j.id for j in store.dispatchable()] == [a]

    store.mark_running(a, "w1")
    again = store.fail_attempt(a, "disk full again")
    assert again.status == "queued"  # the new budget allows more attempts


def test_retry_leaves_user_cancelled_dependents_alone(store: JobStore) -> None:
    a, b, c = pipeline(store)
    store.request_cancel(b, "not this one")
    run_to_failure(store, a, ["x"] * 3)
    store.retry(a)
    assert store.get(b).status == "cancelled"
    assert store.get(c).status == "cancelled"  # still blocked by b, cancelled by the user


def test_retry_of_a_job_blocked_by_its_dependency_is_refused(store: JobStore) -> None:
    a, b, _ = pipeline(store)
    run_to_failure(store, a, ["x"] * 3)
    with pytest.raises(JobError, match=f"retry {a}"):
        store.retry(b)


def test_retry_refuses_jobs_that_are_not_failed_or_cancelled(store: JobStore) -> None:
    job = store.submit("s", {})
    with pytest.raises(JobError, match="queued"):
        store.retry(job.id)


def test_dependent_of_two_failures_comes_back_only_when_both_are_retried(
    store: JobStore,
) -> None:
    a = store.submit("s", {}, max_attempts=1)
    b = store.submit("s", {}, max_attempts=1)
    c = store.submit("t", {}, depends_on=[a.id, b.id])
    run_to_failure(store, a.id, ["x"])
    run_to_failure(store, b.id, ["y"])
    store.retry(a.id)
    blocked = store.get(c.id)
    assert (blocked.status, blocked.cancelled_by) == ("cancelled", b.id)
    assert blocked.error is not None and f"dependency {b.id} failed" in blocked.error
    store.retry(b.id)
    assert store.get(c.id).status == "queued"


# --- cancel -------------------------------------------------------------------------------------


def test_cancel_of_a_queued_job_is_immediate_and_cascades(store: JobStore) -> None:
    a, b, c = pipeline(store)
    cancelled = store.request_cancel(a, "changed my mind")
    assert (cancelled.status, cancelled.error) == ("cancelled", "changed my mind")
    for dependent in (b, c):
        job = store.get(dependent)
        assert job.status == "cancelled"
        assert job.error == f"dependency {a} cancelled: changed my mind"


def test_cancel_of_a_running_job_is_a_request_the_worker_honours(store: JobStore) -> None:
    a, b, _ = pipeline(store)
    store.mark_running(a, "w1")
    flagged = store.request_cancel(a)
    assert (flagged.status, flagged.cancel_requested) == ("running", True)
    assert store.get(b).status == "queued"

    done = store.mark_cancelled(a, "cancelled by user")
    assert (done.status, done.cancel_requested, done.error) == (
        "cancelled",
        False,
        "cancelled by user",
    )
    assert store.get(b).status == "cancelled"


def test_a_failure_after_a_cancel_request_ends_cancelled_not_requeued(store: JobStore) -> None:
    job = store.submit("s", {}, max_attempts=5)
    store.mark_running(job.id, "w1")
    store.request_cancel(job.id, "stop please")
    ended = store.fail_attempt(job.id, "KeyboardInterrupt")
    assert (ended.status, ended.error) == ("cancelled", "stop please")
    assert ended.attempt_errors == ["KeyboardInterrupt"]


def test_cancel_leaves_finished_jobs_unchanged(store: JobStore) -> None:
    job = store.submit("s", {})
    run_to_success(store, job.id, {"ok": 1})
    assert store.request_cancel(job.id).status == "succeeded"
    assert store.mark_cancelled(job.id, "late").status == "succeeded"


# --- restart, progress, metrics, timeouts -------------------------------------------------------


def test_requeue_running_loses_the_attempt_without_counting_it(store: JobStore) -> None:
    """Before: a broker restart counted as a failed attempt, so a job on its last attempt failed
    (``last_try`` ended "failed"). Now it is lost, not counted: both are queued again."""
    fresh = store.submit("s", {}, max_attempts=2)
    last_try = store.submit("s", {}, max_attempts=1)
    queued = store.submit("s", {})
    store.mark_running(fresh.id, "w1")
    store.mark_running(last_try.id, "w2")

    touched = store.requeue_running("broker restarted")
    assert {j.id for j in touched} == {fresh.id, last_try.id}
    assert store.get(fresh.id).status == "queued"
    assert store.get(fresh.id).attempt_errors == ["broker restarted (not counted: lost 1 of 20)"]
    again = store.get(last_try.id)
    assert again.status == "queued" and again.lost_attempts == 1 and again.counted_attempts == 0
    assert store.get(queued.id).attempts == 0
    assert store.requeue_running("again") == []


def test_lost_attempts_have_their_own_bound(store: JobStore) -> None:
    """A job lost again and again (it kills every worker it meets) still ends, after
    MAX_LOST_ATTEMPTS losses; a counted failure meanwhile still uses max_attempts."""
    job = store.submit("s", {}, max_attempts=2)
    store.mark_running(job.id, "w")
    assert store.fail_attempt(job.id, "boom").status == "queued"  # counted: 1 of 2
    for n in range(1, MAX_LOST_ATTEMPTS + 1):
        store.mark_running(job.id, "w")
        record = store.fail_attempt(job.id, "worker lost", lost=True)
        assert record.status == "queued", n
    store.mark_running(job.id, "w")
    final = store.fail_attempt(job.id, "worker lost", lost=True)
    assert final.status == "failed" and final.lost_attempts == MAX_LOST_ATTEMPTS + 1
    # its error: the first attempts and the last, not all 22 reasons in one line
    assert final.error is not None and len(final.error) < 400, final.error
    assert final.error.startswith("failed after 22 attempts: attempt 1: boom; (19 more); ")
    assert final.error.endswith(f"attempt 22: worker lost (lost {MAX_LOST_ATTEMPTS + 1}: more "
                                f"than the {MAX_LOST_ATTEMPTS} not counted)")
    assert len(final.attempt_errors) == 22  # every reason is kept in the record


def test_a_version_1_table_is_upgraded_in_place(tmp_path: Path) -> None:
    """A job table written before lost_attempts existed opens, keeps its jobs, counts 0 lost."""
    path = tmp_path / "jobs.sqlite3"
    with JobStore(path) as store:
        job = store.submit("s", {"a": 1})
    db = sqlite3.connect(path)
    db.executescript("ALTER TABLE jobs DROP COLUMN lost_attempts; PRAGMA user_version=1;")
    db.close()
    with JobStore(path) as store:
        assert store.get(job.id).params == {"a": 1} and store.get(job.id).lost_attempts == 0


def test_progress_is_replaced_and_metrics_are_appended_in_order(store: JobStore) -> None:
    job = store.submit("s", {})
    store.mark_running(job.id, "w1")
    for step in range(50):
        store.record_progress(job.id, {"step": step, "fraction": step / 50})
        store.append_metrics(job.id, {"step": step, "loss": 100.0 - step})
    got = store.get(job.id)
    assert got.progress == {"step": 49, "fraction": 49 / 50}
    assert [row["step"] for row in got.metrics] == list(range(50))
    assert "metrics" in got.to_dict()
    assert "metrics" not in got.to_dict(with_metrics=False)

    listed = store.list()[0]
    assert (listed.metrics, listed.metrics_loaded) == ([], False)
    assert "metrics" not in listed.to_dict()
    assert len(store.list(with_metrics=True)[0].metrics) == 50


def test_checkpoint_must_be_a_sha256(store: JobStore) -> None:
    job = store.submit("s", {})
    store.set_checkpoint(job.id, SHA_A)
    assert store.get(job.id).checkpoint == SHA_A
    with pytest.raises(JobError, match="sha256"):
        store.set_checkpoint(job.id, "../../etc/passwd")


def test_overdue_uses_the_time_it_is_given(store: JobStore, clock: FakeClock) -> None:
    short = store.submit("s", {}, timeout_s=10)
    untimed = store.submit("s", {})
    store.mark_running(short.id, "w1")
    store.mark_running(untimed.id, "w2")
    assert store.overdue(clock.now + 9.9) == []
    assert [j.id for j in store.overdue(clock.now + 10)] == [short.id]


# --- artifacts in use ---------------------------------------------------------------------------


def test_referenced_artifacts_covers_what_unfinished_jobs_need(store: JobStore) -> None:
    nested = {"inputs": [{"audio": SHA_A}, "A" * 64, "a" * 63], SHA_B: "as a key too"}
    a = store.submit("distill.preprocess", {"dataset_name": "drums"})
    b = store.submit("distill.train.vqvae", nested, depends_on=[a.id])
    done = store.submit("distill.infer", {"model": "f" * 64})
    run_to_success(store, done.id, {"audio": "e" * 64})
    assert store.referenced_artifacts() == {SHA_A, SHA_B}
    every = (SHA_A, SHA_B, SHA_C, "d" * 64, "e" * 64, "f" * 64)
    assert {sha for sha in every if sha in store.in_use()} == {SHA_A, SHA_B}

    run_to_success(store, a.id, {"dataset": SHA_C})  # b will read this dataset
    store.set_checkpoint(b.id, "d" * 64)
    assert store.referenced_artifacts() == {SHA_A, SHA_B, SHA_C, "d" * 64}
    assert {sha for sha in every if sha in store.in_use()} == {SHA_A, SHA_B, SHA_C, "d" * 64}

    run_to_success(store, b.id, {})
    assert store.referenced_artifacts() == set()
    assert not any(sha in store.in_use() for sha in every)


# --- removal ------------------------------------------------------------------------------------


def _rows_of(store: JobStore, job_id: str) -> dict[str, int]:
    """How many rows name ``job_id`` in each of the journal's tables."""
    db = store._db
    return {
        "jobs": db.execute("SELECT COUNT(*) FROM jobs WHERE id = ?", (job_id,)).fetchone()[0],
        **{table: db.execute(f"SELECT COUNT(*) FROM {table} WHERE job_id = ?", (job_id,)).fetchone()[0]
           for table in ("job_deps", "job_metrics", "job_artifacts")},
    }  # fmt: skip


@pytest.mark.parametrize("status", ["succeeded", "failed", "cancelled"])
def test_a_finished_job_is_removed_with_its_rows_in_every_table(
    store: JobStore, status: str
) -> None:
    first = store.submit("s", {})
    run_to_success(store, first.id, {"dataset": SHA_C})
    job = store.submit("distill.train.vqvae", {"input": SHA_A}, depends_on=[first.id])
    store.mark_running(job.id, "w1")
    store.record_progress(job.id, {"fraction": 0.5})
    for epoch in range(3):
        store.append_metrics(job.id, {"epoch": epoch})
    if status == "succeeded":
        store.mark_succeeded(job.id, {"model": SHA_B})
    elif status == "failed":
        store.fail_attempt(job.id, "boom", final=True)
    else:
        store.request_cancel(job.id)
        store.mark_cancelled(job.id, "cancelled by user")
    assert store.get(job.id).status == status
    assert min(_rows_of(store, job.id).values()) > 0  # it has rows everywhere to lose
    assert store.remove([job.id]) == 3
    assert set(_rows_of(store, job.id).values()) == {0}
    with pytest.raises(JobError, match=f"no job {job.id}"):
        store.get(job.id)
    assert store.get(first.id).status == "succeeded"  # its dependency stays
    assert store.counts()["succeeded"] == 1


def test_removal_refuses_unknown_unfinished_and_needed_jobs_naming_each_and_removes_none(
    store: JobStore,
) -> None:
    done = store.submit("s", {})
    run_to_success(store, done.id, {"dataset": SHA_C})
    waiting = store.submit("s", {}, depends_on=[done.id])  # reads done's result when it starts
    running = store.submit("s", {})
    store.mark_running(running.id, "w1")
    other = store.submit("s", {})
    run_to_success(store, other.id, {})
    asked = [other.id, done.id, waiting.id, running.id, "j-nothere"]
    with pytest.raises(JobError) as refused:
        store.remove(asked)
    message = str(refused.value)
    assert message.startswith("cannot remove 4 of the 5 jobs, so none was removed: "), message
    assert f"job {done.id}: queued job {waiting.id} depends on it" in message
    assert f"job {waiting.id}: it is queued (only a finished job can be removed" in message
    assert f"job {running.id}: it is running" in message
    assert "job j-nothere: no such job" in message and "\n" not in message
    assert other.id not in message
    assert {j.id for j in store.list()} == {done.id, waiting.id, running.id, other.id}
    assert [why for _, why in store.removal_refusals([other.id])] == []
    with pytest.raises(JobError, match=f"^cannot remove job {running.id}: it is running"):
        store.remove([running.id])
    with pytest.raises(JobError, match=r"job x{40}… \(5000 characters\): no such job$"):
        store.remove(["x" * 5000])  # a long id is not echoed whole


def test_a_dependent_that_stays_shows_its_removed_dependency_and_cannot_be_retried(
    store: JobStore,
) -> None:
    a = store.submit("s", {})
    run_to_success(store, a.id, {})
    b = store.submit("s", {})
    run_to_failure(store, b.id, ["boom"] * 3)
    child = store.submit("s", {}, depends_on=[a.id, b.id])  # cancelled at once: b failed
    assert store.get(child.id).status == "cancelled"
    store.remove([a.id])
    record = store.get(child.id)
    assert record.depends_on == [a.id, b.id] and record.removed_deps == [a.id]
    assert record.to_dict()["removed_deps"] == [a.id]
    assert store.list()[0].removed_deps == [a.id]
    with pytest.raises(JobError, match=f"cannot retry job {child.id}: dependency {a.id} was "
                                       "removed from the journal; submit the work again"):  # fmt: skip
        store.retry(child.id)
    # retrying b brings back what it cancelled, but not a dependent of a removed job
    assert store.retry(b.id).status == "queued"
    assert store.get(child.id).status == "cancelled"
    assert store.get(child.id).error == f"dependency {a.id} was removed from the journal"
    with pytest.raises(JobError, match=f"cannot depend on job {a.id}: no such job"):
        store.submit("s", {}, depends_on=[a.id])


def test_prunable_pages_old_finished_jobs_oldest_first_and_names_the_pinned(
    store: JobStore, clock: FakeClock
) -> None:
    ids = []
    for i in range(5):
        job = store.submit("s", {})
        clock.now += 10
        if i == 3:
            run_to_failure(store, job.id, ["boom"] * 3)
        else:
            run_to_success(store, job.id, {})
        ids.append(job.id)
    waiting = store.submit("s", {}, depends_on=[ids[1]])
    young = store.submit("s", {})
    clock.now += 100
    run_to_success(store, young.id, {})  # finished just now
    page = store.prunable(older_than_s=50, limit=2)
    assert [j.id for j in page.jobs] == [ids[0]] and page.pinned == [
        (ids[1], f"queued job {waiting.id} depends on it")]  # fmt: skip
    assert page.cursor is not None
    rest = store.prunable(older_than_s=50, after=page.cursor, limit=10)
    assert [j.id for j in rest.jobs] == ids[2:] and rest.cursor is None
    assert [j.status for j in rest.jobs] == ["succeeded", "failed", "succeeded"]
    assert [j.id for j in store.prunable(older_than_s=50, status="failed").jobs] == [ids[3]]
    assert young.id in [j.id for j in store.prunable(older_than_s=0).jobs]
    assert store.prunable(older_than_s=10_000).jobs == []
    for bad in ({"status": "running"}, {"older_than_s": -1}, {"older_than_s": float("nan")}):
        with pytest.raises(JobError):
            store.prunable(**{"older_than_s": 1, **bad})  # type: ignore[arg-type]


def test_needed_artifacts_are_those_that_jobs_staying_name(store: JobStore) -> None:
    made = store.submit("s", {})
    run_to_success(store, made.id, {"model": SHA_A, "audio": [SHA_B, SHA_C]})
    again = store.submit("s", {})  # the same bytes made twice: one artifact, two results
    run_to_success(store, again.id, {"audio": [SHA_B]})
    user = store.submit("s", {"model": SHA_C})  # a finished job whose params name it
    run_to_success(store, user.id, {})
    assert store.needed_artifacts([SHA_A, SHA_B, SHA_C], besides=[made.id]) == {SHA_B, SHA_C}
    everyone = [made.id, again.id, user.id]
    assert store.needed_artifacts([SHA_A, SHA_B, SHA_C], besides=everyone) == set()
    running = store.submit("s", {})
    store.mark_running(running.id, "w1")
    store.set_checkpoint(running.id, "d" * 64)  # a running job resumes from it
    assert store.needed_artifacts(["d" * 64], besides=[running.id]) == {"d" * 64}
    # a retried job's result is gone: it names what it will make again, not what it made
    failed = store.submit("s", {"input": SHA_A})
    run_to_failure(store, failed.id, ["boom"] * 3)
    store.retry(failed.id)
    assert store.needed_artifacts([SHA_A], besides=[made.id]) == {SHA_A}  # its params still do


def test_a_version_2_table_is_upgraded_indexing_what_its_jobs_name(tmp_path: Path) -> None:
    """A job table written before jobs could be removed opens, indexes the artifacts its jobs
    name, and lets a dependency of a finished job go."""
    path = tmp_path / "jobs.sqlite3"
    with JobStore(path) as store:
        a = store.submit("s", {"input": SHA_A})
        run_to_success(store, a.id, {"model": SHA_B})
        b = store.submit("s", {}, depends_on=[a.id])
        run_to_success(store, b.id, {})
    db = sqlite3.connect(path)
    db.executescript(
        "DROP TABLE job_artifacts; DROP INDEX jobs_by_finished;"
        "CREATE TABLE deps2 (job_id TEXT NOT NULL REFERENCES jobs (id), dep_id TEXT NOT NULL"
        " REFERENCES jobs (id), pos INTEGER NOT NULL, PRIMARY KEY (job_id, dep_id)) WITHOUT ROWID;"
        "INSERT INTO deps2 SELECT * FROM job_deps; DROP TABLE job_deps;"
        "ALTER TABLE deps2 RENAME TO job_deps; PRAGMA user_version=2;"
    )
    db.close()
    with JobStore(path) as store:
        assert store.needed_artifacts([SHA_A, SHA_B, SHA_C]) == {SHA_A, SHA_B}
        store.remove([a.id])
        assert store.get(b.id).removed_deps == [a.id]
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert db.execute("PRAGMA foreign_key_check").fetchall() == []
    db.close()


def test_a_version_3_table_gains_owners_its_jobs_have_none(tmp_path: Path) -> None:
    """A job table written before jobs had owners opens with its jobs unowned (anyone may
    manage them, as before); a job submitted now keeps its owner through a prune page."""
    path = tmp_path / "jobs.sqlite3"
    with JobStore(path) as store:
        old = store.submit("s", {"a": 1})
        run_to_success(store, old.id, {})
    db = sqlite3.connect(path)
    db.executescript("ALTER TABLE jobs DROP COLUMN owner; PRAGMA user_version=3;")
    db.close()
    with JobStore(path) as store:
        assert store.get(old.id).owner is None and store.get(old.id).to_dict()["owner"] is None
        new = store.submit("s", {}, owner="laptop-key")
        assert store.get(new.id).owner == "laptop-key"
        assert store.list()[0].to_dict()["owner"] == "laptop-key"
        run_to_success(store, new.id, {})
        page = store.prunable(older_than_s=0)
        assert {(job.id, job.owner) for job in page.jobs} == {(old.id, None), (new.id, "laptop-key")}
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 4
    db.close()


# --- invariants under any sequence of operations ------------------------------------------------


class JobTableMachine(RuleBasedStateMachine):
    """Random submits, dispatches, failures, cancels and retries keep the table consistent."""

    def __init__(self) -> None:
        super().__init__()
        self.store = JobStore(":memory:")
        self.ids: list[str] = []

    def teardown(self) -> None:
        self.store.close()

    def _pick(self, data: st.DataObject) -> str | None:
        return data.draw(st.sampled_from(self.ids)) if self.ids else None

    @rule(data=st.data(), n_deps=st.integers(0, 2), max_attempts=st.integers(1, 3),
          uses=st.sampled_from([[], [SHA_A], [SHA_A, SHA_B]]))  # fmt: skip
    def submit(self, data: st.DataObject, n_deps: int, max_attempts: int, uses: list[str]) -> None:
        deps = [d for _ in range(n_deps) if (d := self._pick(data)) is not None]
        job = self.store.submit("s", {"in": uses}, depends_on=deps, max_attempts=max_attempts)
        self.ids.append(job.id)

    @rule(data=st.data())
    def dispatch_then_finish(self, data: st.DataObject) -> None:
        ready = self.store.dispatchable()
        if not ready:
            return
        job = data.draw(st.sampled_from(ready))
        self.store.mark_running(job.id, "w")
        outcome = data.draw(st.sampled_from(["succeed", "fail", "cancel", "keep running",
                                             "checkpoint"]))  # fmt: skip
        if outcome == "checkpoint":  # and keep running
            self.store.set_checkpoint(job.id, SHA_D)
        if outcome == "succeed":
            made = data.draw(st.sampled_from([SHA_B, SHA_C]))
            self.store.mark_succeeded(job.id, {"n": 1, "out": made})
        elif outcome == "fail":
            self.store.fail_attempt(job.id, "boom")
        elif outcome == "cancel":
            self.store.request_cancel(job.id)

    @rule(data=st.data())
    def cancel(self, data: st.DataObject) -> None:
        if (job_id := self._pick(data)) is not None:
            self.store.request_cancel(job_id)

    @rule(data=st.data())
    def retry(self, data: st.DataObject) -> None:
        job_id = self._pick(data)
        if job_id is None:
            return
        try:
            self.store.retry(job_id)
        except JobError:
            job = self.store.get(job_id)
            assert (
                job.status not in ("failed", "cancelled")
                or job.removed_deps
                or any(self.store.get(d).status in ("failed", "cancelled") for d in job.depends_on)
            )

    @rule(data=st.data())
    def remove(self, data: st.DataObject) -> None:
        picked = {d for _ in range(data.draw(st.integers(1, 3))) if (d := self._pick(data))}
        refusals = self.store.removal_refusals(sorted(picked))
        try:
            self.store.remove(sorted(picked))
        except JobError:
            assert refusals
            return
        assert not refusals
        self.ids = [i for i in self.ids if i not in picked]

    @rule()
    def restart(self) -> None:
        self.store.requeue_running("restart")

    @invariant()
    def the_artifact_index_is_what_the_jobs_name(self) -> None:
        """What needed_artifacts reads (no job decoded) agrees with the jobs' params and results."""
        jobs = self.store.list(limit=10_000)
        for job in jobs:
            named = {sha for _, sha in artifact_refs(job.params)}
            named |= {sha for _, sha in artifact_refs(job.result)}
            others = [j.id for j in jobs if j.id != job.id]
            assert self.store.needed_artifacts([SHA_A, SHA_B, SHA_C], besides=others) == named

    @invariant()
    def what_is_in_use_is_what_unfinished_jobs_need(self) -> None:
        """referenced_artifacts and in_use (both from the index) agree with the records: the
        params and checkpoint of every queued or running job and its dependencies' results."""
        jobs = {j.id: j for j in self.store.list(limit=10_000)}
        needed: set[str] = set()
        for job in jobs.values():
            if job.status in ("queued", "running"):
                needed |= {sha for _, sha in artifact_refs(job.params)}
                needed |= {job.checkpoint} if job.checkpoint else set()
                for dep in job.depends_on:
                    needed |= {sha for _, sha in artifact_refs(jobs[dep].result)}
        assert self.store.referenced_artifacts() == needed
        in_use = self.store.in_use()
        assert {sha for sha in (SHA_A, SHA_B, SHA_C, SHA_D) if sha in in_use} == needed

    @invariant()
    def table_is_consistent(self) -> None:
        jobs = {j.id: j for j in self.store.list(limit=10_000)}
        for job in jobs.values():
            assert job.status in JOB_STATUSES
            assert job.attempts <= job.max_attempts
            assert len(job.attempt_errors) <= job.attempts
            if job.status in ("queued", "running"):
                # nothing waits on a dependency that will never succeed, nor on one removed
                assert not job.removed_deps
                assert all(jobs[d].status not in ("failed", "cancelled") for d in job.depends_on)
            if job.status == "running":
                assert all(jobs[d].status == "succeeded" for d in job.depends_on)
        for ready in self.store.dispatchable():
            assert ready.status == "queued"
            assert all(jobs[d].status == "succeeded" for d in ready.depends_on)


JobTableMachine.TestCase.settings = settings(
    max_examples=60,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_job_table_invariants = JobTableMachine.TestCase


# --- batches ------------------------------------------------------------------------------------


def test_a_batch_commits_its_events_together(tmp_path: Path) -> None:
    path = tmp_path / "jobs.sqlite3"
    with JobStore(path) as store:
        job = store.submit("s", {})
        store.mark_running(job.id, "w1")
        with store.batch():
            for step in range(100):
                store.record_progress(job.id, {"step": step})
                store.append_metrics(job.id, {"step": step})
            with pytest.raises(JobError, match="no job j-gone"):
                store.append_metrics("j-gone", {"step": 0})  # undone alone
            store.set_checkpoint(job.id, SHA_A)  # a durable change makes the batch durable
    with JobStore(path) as reopened:
        got = reopened.get(job.id)
        assert got.progress == {"step": 99}
        assert len(got.metrics) == 100
        assert got.checkpoint == SHA_A


def test_an_exception_leaving_a_batch_rolls_it_back(store: JobStore) -> None:
    job = store.submit("s", {})
    with pytest.raises(RuntimeError), store.batch():
        store.record_progress(job.id, {"step": 1})
        with store.batch():  # nested batches join the outer one
            store.append_metrics(job.id, {"step": 1})
        raise RuntimeError("socket loop stopped")
    got = store.get(job.id)
    assert (got.progress, got.metrics) == (None, [])
    store.record_progress(job.id, {"step": 2})  # the store is usable afterwards
    assert store.get(job.id).progress == {"step": 2}


# --- fencing by attempt, size limits, paging (issue 9) -------------------------------------------


def test_writes_from_a_stale_attempt_are_refused(store: JobStore) -> None:
    """Before: set_checkpoint and append_metrics took no attempt, so a worker the broker had
    given up on overwrote its successor's checkpoint and doubled its metric rows."""
    job = store.submit("s", {})
    store.mark_running(job.id, "w1")
    store.fail_attempt(job.id, "worker lost", lost=True)
    store.mark_running(job.id, "w2")  # attempt 2 is current
    old, new = "a" * 64, "b" * 64
    assert store.set_checkpoint(job.id, new, attempt=2) is None
    with pytest.raises(StaleAttempt, match="attempt 2 is the current one"):
        store.set_checkpoint(job.id, old, attempt=1)
    with pytest.raises(StaleAttempt):
        store.append_metrics(job.id, {"epoch": 1}, attempt=1)
    store.append_metrics(job.id, {"epoch": 1}, attempt=2)
    with pytest.raises(StaleAttempt):
        store.mark_succeeded(job.id, {"x": 1}, attempt=1)
    record = store.get(job.id)
    assert record.checkpoint == new and record.metrics == [{"epoch": 1}]
    assert record.status == "running"
    assert store.set_checkpoint(job.id, old, attempt=2) == new  # the superseded one


def test_a_result_that_cannot_be_stored_is_a_job_error_not_a_stale_attempt(store: JobStore) -> None:
    job = store.submit("s", {})
    store.mark_running(job.id, "w1")
    with pytest.raises(JobError) as caught:
        store.mark_succeeded(job.id, {1: "non-string key"})  # type: ignore[dict-item]
    assert not isinstance(caught.value, StaleAttempt)
    assert store.get(job.id).status == "running"


def test_params_and_metric_rows_have_size_limits(store: JobStore) -> None:
    """Before: any size was stored (a 10 MB params map bloated every list reply)."""
    with pytest.raises(JobError, match=f"over the limit of {MAX_PARAMS_BYTES}"):
        store.submit("s", {"blob": b"x" * MAX_PARAMS_BYTES})
    job = store.submit("s", {})
    with pytest.raises(JobError, match=f"over the limit of {MAX_METRIC_ROW_BYTES}"):
        store.append_metrics(job.id, {"blob": "x" * MAX_METRIC_ROW_BYTES})


def test_metrics_are_counted_and_paged(store: JobStore) -> None:
    job = store.submit("s", {})
    for i in range(25):
        store.append_metrics(job.id, {"epoch": i})
    assert store.metric_count(job.id) == 25
    assert [r["epoch"] for r in store.metrics_page(job.id, start=20, limit=10)] == [
        20,
        21,
        22,
        23,
        24,
    ]
    assert store.metrics_page(job.id, start=25) == []
    assert store.dispatchable_ids() == [job.id]


def test_queued_jobs_are_capped_per_service(
    store: JobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before: a service with no worker took any number of queued jobs."""
    import distill.broker.store.journal as journal

    monkeypatch.setattr(journal, "MAX_QUEUED_PER_SERVICE", 3)
    for _ in range(3):
        store.submit("nobody", {})
    with pytest.raises(JobError, match="'nobody' already has 3 queued jobs"):
        store.submit("nobody", {})
    store.submit("other", {})  # per service
