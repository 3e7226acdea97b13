"""Jobs end to end: a real broker, real workers, kill -9, restarts, pipelines, cancel."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
import zmq

from distill.shared.bus import protocol as P
from distill.shared.bus.client import Subscription
from distill.shared.bus.codec import pack
from distill.shared.bus.jobs import JobsClient
from tests.conftest import Cluster, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def statuses(jobs: JobsClient) -> dict[str, int]:
    counts: dict[str, int] = {}
    for r in jobs.list(limit=10_000):
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    return counts


def test_200_jobs_survive_a_killed_worker_and_a_killed_broker(cluster: Cluster) -> None:
    cluster.start_broker()
    workers = [cluster.start_worker("sleep") for _ in range(3)]
    with cluster.client() as c:
        jobs = JobsClient(c)
        ids = [jobs.submit("distill.sleep", {"sleep_s": 0.05, "value": i}, max_attempts=5)["id"]
               for i in range(200)]
        wait_until(lambda: statuses(jobs).get("succeeded", 0) >= 40, 60, what="40 jobs done")
        workers[0].kill9()
        wait_until(lambda: statuses(jobs).get("succeeded", 0) >= 100, 60, what="100 jobs done")
    assert cluster.broker is not None
    cluster.broker.kill9()
    time.sleep(0.5)
    cluster.start_broker()
    with cluster.client() as c:
        jobs = JobsClient(c)
        wait_until(lambda: statuses(jobs) == {"succeeded": 200}, 120, interval_s=0.5,
                   what="all 200 jobs to succeed")
        records = jobs.list(limit=10_000)
    assert sorted(r["id"] for r in records) == sorted(ids)  # none lost, none duplicated
    assert sorted(r["result"]["value"] for r in records) == list(range(200))
    survivors = {w.pid for w in workers[1:]}
    assert {r["result"]["pid"] for r in records} <= {workers[0].pid} | survivors


def test_pipeline_runs_in_order_and_passes_results(cluster: Cluster) -> None:
    cluster.start_broker()
    cluster.start_worker("sleep")
    with cluster.client() as c:
        jobs = JobsClient(c)
        a = jobs.submit("distill.sleep", {"value": "a"})
        b = jobs.submit("distill.sleep", {"value": "b"}, depends_on=[a["id"]])
        d = jobs.submit("distill.sleep", {"value": "c"}, depends_on=[b["id"]])
        final = jobs.wait(d["id"], timeout_s=60)
        assert final["status"] == "succeeded"
        from distill.shared.errors import JobError

        for unknown in (lambda: jobs.wait("j-nothere", timeout_s=5), lambda: jobs.get("j-nothere")):
            with pytest.raises(JobError):  # wait raised a bare RequestError before
                unknown()
        rb, rc = jobs.get(b["id"]), jobs.get(d["id"])
        assert rb["result"]["deps"] == {a["id"]: jobs.get(a["id"])["result"]}
        assert rc["result"]["deps"][b["id"]]["value"] == "b"
        assert jobs.get(a["id"])["finished_at"] <= rb["started_at"] <= rb["finished_at"] <= rc["started_at"]


def test_failed_first_stage_cancels_the_rest_naming_it(cluster: Cluster) -> None:
    cluster.start_broker()
    cluster.start_worker("sleep")
    with cluster.client() as c:
        jobs = JobsClient(c)
        a = jobs.submit("distill.sleep", {"fail": "bad input file"}, max_attempts=2)
        b = jobs.submit("distill.sleep", {"value": 2}, depends_on=[a["id"]])
        d = jobs.submit("distill.sleep", {"value": 3}, depends_on=[b["id"]])
        ra = jobs.wait(a["id"], timeout_s=60)
        assert ra["status"] == "failed" and len(ra["attempt_errors"]) == 2
        assert all("bad input file" in e for e in ra["attempt_errors"])
        for dep in (b, d):
            r = jobs.wait(dep["id"], timeout_s=10)
            assert r["status"] == "cancelled" and a["id"] in r["error"], r


def test_retried_attempt_knows_it_is_a_retry(cluster: Cluster) -> None:
    cluster.start_broker()
    cluster.start_worker("sleep")
    with cluster.client() as c:
        jobs = JobsClient(c)
        job = jobs.submit("distill.sleep", {"fail_attempts": 1, "value": 1}, max_attempts=3)
        r = jobs.wait(job["id"], timeout_s=60)
        assert r["status"] == "succeeded" and r["result"]["attempt"] == 2
        assert r["attempt_errors"] == [r["attempt_errors"][0]] and "fail attempt 1" in r["attempt_errors"][0]


def _damage(path: Any) -> None:
    path.chmod(0o644)
    data = bytearray(path.read_bytes())
    data[0] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_checkpoint_damaged_in_the_store_is_trained_again_not_failed_for_ever(
    cluster: Cluster, tmp_path: Any
) -> None:
    """A bad disk sector under a job's checkpoint failed every attempt and every retry at the
    fetch; now the broker finds it damaged and removes it, and the attempt starts from scratch
    (saying so). A damaged copy in a worker's cache is fetched again. A dataset damaged in the
    store fails the job once, not three times."""
    from distill.shared.bus.artifacts import ArtifactClient
    from distill.shared.bus.cache import ArtifactCache

    cluster.start_broker()
    cluster.start_worker("sleep")
    objects = cluster.data_dir / "artifacts" / "objects"
    with cluster.client() as c:
        jobs = JobsClient(c)

        def retry(job: str) -> dict[str, Any]:
            jobs.retry(job)
            return jobs.wait(job, timeout_s=60)

        params = {"steps": 3, "checkpoint": True, "fail_attempts_at_end": 99}
        job = jobs.submit("distill.sleep", params, max_attempts=1)["id"]
        r = jobs.wait(job, timeout_s=60)
        assert r["status"] == "failed" and "resumed at step 0" in r["attempt_errors"][-1]
        damaged = r["checkpoint"]  # never fetched by the worker: only the store holds it
        _damage(objects / damaged[:2] / damaged[2:])
        with Subscription(c.endpoint, [f"job.{job}"]) as sub:
            r = retry(job)
            events = list(iter(lambda: sub.next(timeout_s=2), None))
        assert "resumed at step 0" in r["attempt_errors"][-1], r["attempt_errors"]
        notes = [e["message"] for e in events if e.get("type") == "note"]
        assert notes and "checkpoint was damaged in the broker's store" in notes[0], events
        assert (cluster.data_dir / "artifacts" / "damaged" / damaged).is_file()
        # the attempt stored its checkpoints afresh (the same bytes, so the same id): intact
        r = retry(job)
        assert "resumed at step 3" in r["attempt_errors"][-1], r["attempt_errors"]
        # the worker fetched it into its cache; a damaged cached copy is fetched again
        cached = next(cluster.cache_dir.glob(f"w*/{r['checkpoint'][:2]}/{r['checkpoint'][2:]}"))
        _damage(cached)
        r = retry(job)
        assert "resumed at step 3" in r["attempt_errors"][-1], r["attempt_errors"]
        assert cached.read_bytes() == b"3"
        # any other artifact found damaged ends the job at once, with the reason
        ac = ArtifactClient(c, cache=ArtifactCache(tmp_path / "client-cache"))
        sha = ac.put_bytes(b"a dataset, say" * 1000, kind="dataset", name="d")
        _damage(objects / sha[:2] / sha[2:])
        with pytest.raises(Exception, match="is damaged in the broker's store"):
            ac.get_bytes(sha)
        with pytest.raises(Exception, match="no artifact"):
            ac.stat(sha)


def test_a_full_store_fails_the_job_once_and_a_retry_resumes_once_there_is_room(
    cluster: Cluster,
) -> None:
    """Before: a store with no room for a checkpoint used up a job's three attempts in ~12 s
    (each met the same refusal a second after the last), saying nothing of what to do."""
    cluster.start_broker(env={"DISTILL_STORE_MAX_BYTES": "1"})  # no checkpoint fits
    cluster.start_worker("sleep")
    with cluster.client() as c:
        jobs = JobsClient(c)
        job = jobs.submit("distill.sleep", {"steps": 3, "checkpoint": True}, max_attempts=3)["id"]
        r = jobs.wait(job, timeout_s=60)
        assert r["status"] == "failed" and r["attempts"] == 1, r
        assert "artifact store is full" in r["error"] and "distill jobs retry" in r["error"], r
    cluster.start_broker()  # restarted with room
    wait_until(lambda: len(cluster.worker_list()) == 1, 30, what="the worker to register again")
    with cluster.client() as c:
        jobs = JobsClient(c)
        jobs.retry(job)
        assert jobs.wait(job, timeout_s=60)["status"] == "succeeded"


def test_cancel_running_job_stops_within_one_step(cluster: Cluster) -> None:
    cluster.start_broker()
    cluster.start_worker("sleep")
    with cluster.client() as c:
        jobs = JobsClient(c)
        job = jobs.submit("distill.sleep", {"sleep_s": 60, "steps": 200})  # 0.3 s a step
        steps_seen: list[int] = []
        with Subscription(c.endpoint, [f"job.{job['id']}"]) as sub:
            cancelled_at = None
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                event = sub.next(timeout_s=1)
                if event is None:
                    continue
                if event["type"] == "progress":
                    steps_seen.append(event["step"])
                    if event["step"] == 3 and cancelled_at is None:
                        cancelled_at = 3
                        assert jobs.cancel(job["id"])["cancel_requested"] is True
                if event["type"] == "status" and event["status"] == "cancelled":
                    break
        final = jobs.get(job["id"])
    assert final["status"] == "cancelled"
    assert max(steps_seen) <= 3 + 1, steps_seen


def test_cancel_queued_job_ends_at_once(cluster: Cluster) -> None:
    cluster.start_broker()  # no worker for the service: the job stays queued
    with cluster.client() as c:
        jobs = JobsClient(c)
        job = jobs.submit("distill.sleep", {"value": 1})
        assert jobs.cancel(job["id"])["status"] == "cancelled"
        assert jobs.wait(job["id"], timeout_s=5)["status"] == "cancelled"


def test_metric_history_is_kept_for_late_viewers(cluster: Cluster) -> None:
    cluster.start_broker()
    cluster.start_worker("sleep")
    with cluster.client() as c:
        jobs = JobsClient(c)
        job = jobs.submit("distill.sleep", {"sleep_s": 1.0, "steps": 10})
        assert jobs.wait(job["id"], timeout_s=30)["status"] == "succeeded"
        # events are flushed to the table on the broker's next tick
        record: dict[str, Any] = wait_until(
            lambda: (r := jobs.get(job["id"])) and len(r["metrics"]) == 10 and r["progress"]["fraction"] == 1.0 and r,
            5, what="metric history and latest progress")
    assert [row["step"] for row in record["metrics"]] == list(range(1, 11))
    assert record["progress"]["fraction"] == 1.0


def test_long_poll_wait_times_out_with_current_state(cluster: Cluster) -> None:
    cluster.start_broker()
    with cluster.client() as c:
        job = JobsClient(c).submit("distill.sleep", {})
        r = c.request("distill.jobs", {"op": "wait", "id": job["id"], "timeout_s": 0.3})
        assert r["status"] == "queued" and r["wait_timed_out"] is True


def test_waits_from_several_clients(cluster: Cluster) -> None:
    cluster.start_broker()
    cluster.start_worker("sleep")
    with cluster.client() as c:
        job = JobsClient(c).submit("distill.sleep", {"sleep_s": 0.5})
    results: list[str] = []

    def waiter() -> None:
        with cluster.client() as c2:
            results.append(JobsClient(c2).wait(job["id"], timeout_s=30)["status"])

    threads = [threading.Thread(target=waiter) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(40)
    assert results == ["succeeded"] * 3


def follow_a_sleep_job(cluster: Cluster, monkeypatch: pytest.MonkeyPatch,
                       subscription: type[Subscription], *, from_running: bool = False
                       ) -> tuple[dict[str, Any], list[dict[str, Any]]]:  # fmt: skip
    """A broker, a sleep worker and a 3-step job followed with ``JobsClient.follow`` through
    ``subscription`` (a doctored Subscription; with ``from_running``, once the job runs): the
    record it returns and the events it handed out."""
    from distill.shared.bus import jobs as jobs_module

    cluster.start_broker()
    cluster.start_worker("sleep")
    monkeypatch.setattr(jobs_module, "Subscription", subscription)
    with cluster.client() as c:
        jobs = JobsClient(c)
        job = jobs.submit("distill.sleep", {"sleep_s": 1.5, "steps": 3, "value": "x"})
        if from_running:
            wait_until(lambda: jobs.get(job["id"])["status"] == "running", 10, what="job to start")
        events: list[dict[str, Any]] = []
        record = jobs.follow(job["id"], events.append, timeout_s=30)
    return record, events


def test_follow_draws_the_end_from_the_record_when_the_last_events_are_lost(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Events are best effort: a follower that gets none after the first still ends with the
    job's last progress and its status, from the record."""

    class Lossy(Subscription):
        got = 0

        def next(self, timeout_s: float | None = None) -> dict[str, Any] | None:
            event = super().next(timeout_s=timeout_s)
            if event is not None:
                Lossy.got += 1
                if Lossy.got > 1:  # every event after the first is lost
                    return None
            return event

    record, events = follow_a_sleep_job(cluster, monkeypatch, Lossy, from_running=True)
    assert record["status"] == "succeeded" and Lossy.got > 1
    progress, status = events[-2], events[-1]
    assert progress["type"] == "progress" and progress["fraction"] == 1.0 and progress["step"] == 3
    assert status["type"] == "status" and status["status"] == "succeeded"
    assert status["result"] == record["result"]


def test_follow_ends_with_the_last_progress_when_it_comes_after_the_final_status(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worker publishes its progress on another socket than the broker's final status,
    so the 100% event can come after it: `distill jobs watch` under load once ended on 66.7%.
    A follower that gets every progress event late (after the status) still ends with the
    job's last progress, then its status, once each."""

    class Late(Subscription):
        held: list[dict[str, Any]] = []

        def next(self, timeout_s: float | None = None) -> dict[str, Any] | None:
            while True:  # a progress event is kept back (never handed out): the next one comes
                event = super().next(timeout_s=timeout_s)
                if event is None or event.get("type") != "progress":
                    return event
                Late.held.append(event)

    record, events = follow_a_sleep_job(cluster, monkeypatch, Late)
    assert record["status"] == "succeeded" and Late.held
    progress, status = events[-2], events[-1]
    assert progress["type"] == "progress" and progress["fraction"] == 1.0 and progress["step"] == 3
    assert status["type"] == "status" and status["status"] == "succeeded"
    assert [e["type"] for e in events].count("progress") == 1  # from the record, once
    assert [e.get("status") for e in events if e["type"] == "status"].count("succeeded") == 1


def test_a_jobs_record_holds_its_last_progress_when_its_final_status_is_announced(
    cluster: Cluster,
) -> None:
    """A worker's reply carries the last progress it published (events travel on another
    socket, and the broker could announce the result before the 100% event came: a record
    that said succeeded at 66.7%). A worker by hand: it publishes no progress before its
    reply, then an older one after; the record holds the reply's from the moment the status
    is announced, and keeps it."""
    cluster.start_broker()
    assert cluster.endpoint is not None
    port = int(cluster.endpoint.rsplit(":", 1)[1])
    ctx = zmq.Context.instance()
    worker = ctx.socket(zmq.DEALER)
    worker.setsockopt(zmq.LINGER, 0)
    worker.connect(cluster.endpoint)
    worker.send_multipart([b"", P.MDPW, P.W_READY, b"hand.made"])
    pub = ctx.socket(zmq.PUB)
    pub.setsockopt(zmq.LINGER, 0)
    pub.connect(f"tcp://127.0.0.1:{port + 2}")
    last = {"type": "progress", "fraction": 1.0, "step": 3, "phase": "done"}
    try:
        with cluster.client() as c:
            jobs = JobsClient(c)
            job = jobs.submit("hand.made", {})["id"]
            with Subscription(c.endpoint, [f"job.{job}"]) as sub:
                deadline = time.monotonic() + 10
                while time.monotonic() < deadline:  # heartbeat until the job comes
                    if worker.poll(100):
                        frames = worker.recv_multipart()
                        if frames[2] == P.W_REQUEST:
                            break
                    worker.send_multipart([b"", P.MDPW, P.W_HEARTBEAT])
                else:
                    pytest.fail("the job never came")
                address = frames[3]
                worker.send_multipart([b"", P.MDPW, P.W_REPLY, address, b"",
                                       pack({"ok": True, "result": {"value": 1},
                                             "progress": {**last, "job": job}})])  # fmt: skip
                status = None
                while status is None and time.monotonic() < deadline:
                    event = sub.next(timeout_s=1)
                    if event and event["type"] == "status" and event["status"] == "succeeded":
                        status = event
                assert status is not None, "no final status"
                at_once = jobs.get(job)
                stale = {"type": "progress", "job": job, "fraction": 0.5, "step": 1}
                end = time.monotonic() + 1.0
                while time.monotonic() < end:  # PUB/SUB join: send for a while
                    pub.send_multipart([f"job.{job}".encode(), pack(stale)])
                    time.sleep(0.05)
                later = jobs.get(job)
    finally:
        worker.close(linger=0)
        pub.close(linger=0)
    assert at_once["status"] == "succeeded" and at_once["progress"] == last
    assert later["progress"] == last  # the older event came after: dropped


def test_cli_jobs_ls_show_watch_cancel_retry(cluster: Cluster) -> None:
    import os
    import subprocess
    import sys

    cluster.start_broker()
    cluster.start_worker("sleep")
    env = {**os.environ, "DISTILL_BROKER": cluster.endpoint}

    def distill(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "distill.shared.cli", *args], capture_output=True,
                              text=True, env=env, timeout=60)

    with cluster.client() as c:
        jobs = JobsClient(c)
        ok = jobs.submit("distill.sleep", {"sleep_s": 0.6, "steps": 3, "value": "x"})
        watched = distill("jobs", "watch", ok["id"])
        assert watched.returncode == 0 and f"{ok['id']}: succeeded" in watched.stdout
        assert "100.0%" in watched.stderr  # the progress bar was drawn from events
        bad = jobs.submit("distill.sleep", {"fail": "boom"}, max_attempts=1)
        assert distill("jobs", "watch", bad["id"]).returncode == 1
        listed = distill("jobs", "ls").stdout
        assert ok["id"] in listed and bad["id"] in listed and "failed" in listed
        shown = distill("jobs", "show", bad["id"]).stdout
        assert "attempt 1: attempt on" in shown and "boom" in shown
        retried = distill("jobs", "retry", bad["id"])
        assert retried.returncode == 0 and "queued" in retried.stdout
        assert jobs.wait(bad["id"], timeout_s=30)["status"] == "failed"
        long = jobs.submit("distill.sleep", {"sleep_s": 30, "steps": 100})
        wait_until(lambda: jobs.get(long["id"])["status"] == "running", 10, what="job to start")
        assert "cancel requested" in distill("jobs", "cancel", long["id"]).stdout
        assert jobs.wait(long["id"], timeout_s=10)["status"] == "cancelled"
        missing = distill("jobs", "show", "j-doesnotexist")
        assert missing.returncode != 0 and "no job" in missing.stderr


def test_the_broker_prunes_finished_jobs_by_its_setting_keeping_one_still_needed(
    cluster: Cluster,
) -> None:
    """DISTILL_STORE_KEEP_FINISHED_JOBS_DAYS (here 2 s): the broker process removes finished
    jobs by itself, but not one that a queued job still depends on."""
    cluster.start_broker(env={"DISTILL_STORE_KEEP_FINISHED_JOBS_DAYS": str(2 / 86_400)})
    cluster.start_worker("sleep")
    with cluster.client() as c:
        jobs = JobsClient(c)
        a = jobs.submit("distill.sleep", {"value": "a"})["id"]
        b = jobs.submit("distill.sleep", {"value": "b"}, depends_on=[a])["id"]
        waiting = jobs.submit("nobody.serves.this", {}, depends_on=[a])["id"]  # queued for ever
        assert jobs.wait(b, timeout_s=60)["status"] == "succeeded"
        assert jobs.get(b)["removed_deps"] == []

        def left() -> set[str]:
            return {r["id"] for r in jobs.list()}

        wait_until(lambda: left() == {a, waiting}, 30, what="b to be pruned, a kept")
        jobs.cancel(waiting)
        wait_until(lambda: left() == set(), 30, what="a and the cancelled job to be pruned")
    assert cluster.broker is not None
    assert '"event": "jobs_pruned"' in cluster.broker.log()
