"""Clients page through lists and metric histories instead of taking the first reply for the
whole: each helper against the broker's real services (no sockets), with pages small enough
that several are needed."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from distill.broker.services.jobs import JobService
from distill.broker.store.journal import JobStore
from distill.shared.bus.artifacts import ArtifactClient
from distill.shared.bus.codec import pack, unpack_map
from distill.shared.bus.jobs import JobsClient, metrics_pages, next_metrics_start
from distill.shared.errors import JobError, RequestError
from tests.broker.services.test_job_service import FakeHost


class ServiceClient:
    """A ``Client`` whose requests go straight to one broker service (and are counted)."""

    def __init__(self, service: Any) -> None:
        self.service, self.requests = service, 0

    def request(self, name: str, body: dict[str, Any], **_: Any) -> Any:
        self.requests += 1
        reply = unpack_map(self.service.serve(b"c", [pack(body)])[0])
        if not reply["ok"]:
            raise RequestError(reply["error"]["message"], reply["error"]["code"])
        return reply["result"]


class AsyncServiceClient(ServiceClient):
    async def request(self, name: str, body: dict[str, Any], **_: Any) -> Any:
        return super().request(name, body)


@pytest.fixture
def jobs(tmp_path: Path) -> JobService:
    return JobService(FakeHost(), JobStore(tmp_path / "jobs.sqlite3"))


def test_iter_jobs_walks_every_page_newest_first(jobs: JobService) -> None:
    client = ServiceClient(jobs)
    ids = [JobsClient(client).submit("s")["id"] for _ in range(25)]
    JobsClient(client).submit("other")
    client.requests = 0
    walked = [r["id"] for r in JobsClient(client).iter_jobs(service="s", page=10)]
    assert walked == ids[::-1] and client.requests == 3
    assert len(JobsClient(client).list(service="s", limit=10)) == 10


def test_iter_metrics_reads_the_whole_history_in_pages(jobs: JobService) -> None:
    """Before: only ``get``, whose rows stop at one page (the latest 1000)."""
    client = JobsClient(ServiceClient(jobs))
    job_id = client.submit("s")["id"]
    for epoch in range(2_345):
        jobs.store.append_metrics(job_id, {"epoch": epoch})
    assert client.metric_count(job_id) == 2_345
    assert [r["epoch"] for r in client.iter_metrics(job_id)] == list(range(2_345))
    assert [r["epoch"] for r in client.iter_metrics(job_id, start=2_340)] == list(
        range(2_340, 2_345)
    )
    assert list(client.iter_metrics(job_id, start=5_000)) == []
    page = client.metrics_page(job_id, start=10, limit=5)
    assert [r["epoch"] for r in page["rows"]] == list(range(10, 15)) and page["count"] == 2_345

    async def pages() -> list[list[dict[str, Any]]]:
        aclient = AsyncServiceClient(jobs)
        return [p async for p in metrics_pages(aclient, job_id, page_rows=1_000)]

    got = asyncio.run(pages())
    assert [len(p) for p in got] == [1_000, 1_000, 345]
    assert [r["epoch"] for p in got for r in p] == list(range(2_345))


def test_a_metrics_page_reply_without_its_count_is_a_clear_error() -> None:
    with pytest.raises(RequestError, match="rows, start and count"):
        next_metrics_start({"rows": []})


class PagedArtifacts:
    """The artifact service's ``list`` op as the broker pages it (``page`` records a reply)."""

    def __init__(self, n: int, page: int) -> None:
        self.records = [{"sha256": f"{i:064x}", "kind": "preview"} for i in range(n)]
        self.page = page

    def serve(self, identity: bytes, body: list[bytes]) -> list[bytes]:
        msg = unpack_map(body[0])
        start = msg.get("start") or 0
        chunk = self.records[start : start + self.page]
        more = start + self.page < len(self.records)
        return [pack({"ok": True, "result": {"artifacts": chunk, "start": start, "more": more}})]


def test_artifact_list_returns_every_page() -> None:
    """Before: the first page only (4000 records), silently."""
    service = PagedArtifacts(9_001, page=4_000)
    records = ArtifactClient(ServiceClient(service)).list(kind="preview")
    assert [r["sha256"] for r in records] == [r["sha256"] for r in service.records]


def test_a_resumed_attempts_rows_replace_the_older_ones_in_the_drawn_history() -> None:
    """The stored history keeps every row in the order it came; curves read it with the epochs
    an attempt repeated after its checkpoint replaced (they doubled back: 5, 6, 6, 7)."""
    from distill.shared.bus.jobs import metric_history

    stored = [{"epoch": 1, "a": 1}, {"epoch": 2, "a": 1}, {"epoch": 3, "a": 1},
              {"epoch": 2, "a": 2}, {"epoch": 3, "a": 2}, {"epoch": 4, "a": 2}, "junk",
              {"step": 9}]  # fmt: skip
    drawn = metric_history(stored)
    assert [(r.get("epoch"), r.get("a")) for r in drawn] == [
        (1, 1), (2, 2), (3, 2), (4, 2), (None, None)]


def test_remove_of_more_ids_than_a_request_takes_is_still_all_or_none(jobs: JobService) -> None:
    client = ServiceClient(jobs)
    ids = []
    with jobs.store.batch():
        for _ in range(250):
            job_id = jobs.store.submit("s", {}).id
            jobs.store.mark_running(job_id, "w")
            jobs.store.mark_succeeded(job_id, {})
            ids.append(job_id)
    running = jobs.store.submit("s", {}).id
    jobs.store.mark_running(running, "w")
    with pytest.raises(JobError, match=f"job {running}: it is running"):
        JobsClient(client).remove([*ids, running])  # the third request of 100 would refuse
    assert len(jobs.store.list(limit=1_000)) == 251
    client.requests = 0
    reply = JobsClient(client).remove(ids)
    assert len(reply["jobs"]) == 250 and client.requests == 6  # each request looked first
    assert [j.id for j in jobs.store.list()] == [running]


def test_prune_walks_every_step_and_adds_them_up(jobs: JobService) -> None:
    from distill.broker.services.removal import JobRemoval

    ticks = iter(range(1_000_000))  # a timer that spends a step's budget at every read
    jobs.removal = JobRemoval(jobs.store, None, timer=lambda: float(next(ticks)))
    client = ServiceClient(jobs)
    with jobs.store.batch():
        for _ in range(100):
            job_id = jobs.store.submit("s", {}).id
            jobs.store.mark_running(job_id, "w")
            jobs.store.fail_attempt(job_id, "boom", final=True)
    reply = JobsClient(client).prune(0, status="failed")
    assert len(reply["jobs"]) == 100 and client.requests > 3 and not reply["more"]
    assert reply["released"] == {"count": 0, "bytes": 0} and jobs.store.list() == []
