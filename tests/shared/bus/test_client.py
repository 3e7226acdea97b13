"""Client errors and the event subscription (snapshot, then stream, no gap, no duplicate)."""

from __future__ import annotations

import time

import pytest
import zmq

from distill.shared.bus.client import Client, Subscription, events_endpoint
from distill.shared.bus.codec import pack
from distill.shared.errors import RequestTimeout, UnknownService
from tests.conftest import Cluster

pytestmark = [pytest.mark.integration, pytest.mark.slow]  # spawns broker and worker processes


def test_unknown_service_and_dead_broker_give_clear_errors(cluster: Cluster) -> None:
    cluster.start_broker(request_timeout_s=30)
    with cluster.client(timeout_s=0.5) as client, pytest.raises(UnknownService, match="no worker for service 'nobody'"):
        client.request("nobody", {"op": "x"})
    with Client("tcp://127.0.0.1:9", timeout_s=0.3) as client, pytest.raises(RequestTimeout, match="no broker answered"):
        client.request("echo", {"x": 1})


def test_subscription_snapshot_then_stream(cluster: Cluster) -> None:
    cluster.start_broker()
    pub = zmq.Context.instance().socket(zmq.PUB)
    pub.connect(events_endpoint(cluster.endpoint, "in"))
    time.sleep(0.3)  # PUB slow joiner: the broker's XSUB subscription must arrive first
    for i in range(5):
        pub.send_multipart([b"job.a", pack({"type": "progress", "i": i})])
    pub.send_multipart([b"job.b", pack({"type": "progress", "i": 100})])
    pub.send_multipart([b"job.a", b"\xc1garbage"])  # dropped by the broker, not fatal
    time.sleep(0.3)
    with Subscription(cluster.endpoint, ["job.a"]) as sub:
        first = sub.next(timeout_s=2)
        assert first is not None and first["topic"] == "job.a" and first["i"] == 4  # latest state
        assert sub.next(timeout_s=0.3) is None  # the snapshot holds just the latest
        for i in range(5, 205):
            pub.send_multipart([b"job.a", pack({"type": "progress", "i": i})])
            pub.send_multipart([b"job.b", pack({"type": "progress", "i": -i})])
        seen = [sub.next(timeout_s=5) for _ in range(200)]
        assert [e["i"] for e in seen if e] == list(range(5, 205))
        seqs = [e["seq"] for e in seen if e]
        assert seqs == sorted(set(seqs)) and seqs[0] > first["seq"]
    pub.close(linger=0)


async def test_async_client_requests_and_subscribes(cluster: Cluster) -> None:
    import asyncio

    from distill.shared.bus.aclient import AsyncClient
    from distill.shared.bus.jobs import JobsClient

    cluster.start_broker()
    cluster.start_worker("echo")
    async with AsyncClient(cluster.endpoint) as ac:
        assert await ac.request_raw("echo", [b"a", b"b"]) == [b"a", b"b"]
        assert await ac.mmi_service("echo") is True
        with pytest.raises(UnknownService):
            await ac.request("nobody.here", {"x": 1}, timeout_s=0.3)
        with cluster.client() as c:
            job = JobsClient(c).submit("distill.sleep", {})  # queued: announces a status event
        events = ac.subscribe([f"job.{job['id']}"])
        first = await asyncio.wait_for(events.__anext__(), 5)
        assert first["type"] == "status" and first["status"] == "queued"
        with cluster.client() as c:
            JobsClient(c).cancel(job["id"])
        second = await asyncio.wait_for(events.__anext__(), 5)
        assert second["status"] == "cancelled" and second["seq"] > first["seq"]
        await events.aclose()


async def test_async_client_fails_the_request_on_its_way_when_told_it_is_lost(
    cluster: Cluster,
) -> None:
    """The UI tells its clients when the broker stops answering: the request on its way fails
    then, not at the end of its timeout (minutes for an encode), and the next one works."""
    import asyncio

    from distill.shared.bus.aclient import AsyncClient

    cluster.start_broker()
    cluster.start_worker("sleep")
    cluster.start_worker("echo")
    async with AsyncClient(cluster.endpoint) as ac:
        slow = asyncio.ensure_future(ac.request("distill.sleep", {"seconds": 30.0}, timeout_s=120))
        await asyncio.sleep(0.5)
        ac.abort_pending("the broker went away")
        with pytest.raises(RequestTimeout, match="distill.sleep: the broker went away"):
            await asyncio.wait_for(slow, 10)  # not the 30 s of the request
        assert await ac.request_raw("echo", [b"again"], timeout_s=10) == [b"again"]
        ac.abort_pending("nothing on its way")  # affects no later request
        assert await ac.request_raw("echo", [b"later"], timeout_s=10) == [b"later"]


def test_one_client_shared_by_threads_answers_each_its_own(cluster: Cluster) -> None:
    """Before: threads sharing one Client (a thread pool in a script) failed almost every
    call with "Socket operation on non-socket": one thread closed the socket another was
    polling. Each thread now asks on its own socket."""
    import threading

    cluster.start_broker()
    cluster.start_worker("echo")
    got: dict[int, list[bytes]] = {}
    errors: list[BaseException] = []
    with Client(cluster.endpoint, timeout_s=20) as c:
        barrier = threading.Barrier(8)

        def ask(k: int) -> None:
            barrier.wait()
            try:
                got[k] = [c.request_raw("echo", [b"%d-%d" % (k, i)])[0] for i in range(10)]
                got[k].append(b"workers" if c.workers()["workers"] else b"none")
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)

        threads = [threading.Thread(target=ask, args=(k,)) for k in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors, errors
        assert got == {k: [b"%d-%d" % (k, i) for i in range(10)] + [b"workers"] for k in range(8)}
        import gc

        gc.collect()
        assert len(c._conns) == 0  # one per thread, closed as its thread ended
        c.request_raw("echo", [b"main"])
        assert len(c._conns) == 1
    assert not c._conns  # closed with the client
    with Client(cluster.endpoint, timeout_s=20) as c:  # a client closed, then used again
        c.close()
        assert c.request_raw("echo", [b"again"]) == [b"again"]
