"""Client requests queued for a service with no worker are capped per service: the request
past the cap is refused at once, naming the service and the cap."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import zmq

from distill.broker.loop import Broker, BrokerConfig, queued_cap_from_env
from distill.broker.registry import MAX_QUEUED_WITHOUT_WORKER, ClientOrigin, JobOrigin, Registry
from distill.shared.bus import protocol as P
from distill.shared.bus.codec import pack, unpack
from distill.shared.errors import ConfigError
from tests.conftest import free_port_block, wait_until


def _queue(registry: Registry, service: bytes, origin: ClientOrigin | JobOrigin) -> None:
    registry.enqueue(registry.new_request(service, [b"x"], origin, 0.0, 60.0))


def test_the_cap_counts_client_requests_of_a_service_with_no_worker() -> None:
    registry = Registry(liveness_s=1.0, max_queued_without_worker=2)
    for _ in range(5):  # jobs wait for workers under their own cap
        _queue(registry, b"ghost", JobOrigin("j"))
    assert registry.refusal(b"ghost") is None
    _queue(registry, b"ghost", ClientOrigin(b"c"))
    _queue(registry, b"ghost", ClientOrigin(b"c"))
    refusal = registry.refusal(b"ghost")
    assert refusal is not None and "'ghost'" in refusal and "cap is 2" in refusal
    assert registry.refusal(b"other") is None  # per service

    registry.register(b"w1", b"ghost", {}, 0.0)  # a worker drains the queue: no cap
    assert registry.refusal(b"ghost") is None
    registry.dispatch(b"ghost", 0.0)  # the worker takes the oldest (a job's request)
    registry.remove(b"w1")
    assert registry.services[b"ghost"].client_queued == 2 and registry.refusal(b"ghost")
    registry.register(b"w2", b"ghost", {}, 0.0)
    for _ in range(5):
        registry.dispatch(b"ghost", 0.0)
        registry.complete(b"w2")
    assert registry.services[b"ghost"].client_queued == 1  # four jobs and a client's taken
    registry.remove(b"w2")
    assert registry.refusal(b"ghost") is None
    _queue(registry, b"ghost", ClientOrigin(b"c"))
    assert registry.refusal(b"ghost") is not None
    registry.cancel_queued(lambda r: isinstance(r.origin, ClientOrigin))
    assert registry.refusal(b"ghost") is None and registry.services[b"ghost"].client_queued == 0


def test_the_cap_comes_from_the_environment() -> None:
    assert queued_cap_from_env({}) == MAX_QUEUED_WITHOUT_WORKER == 1000
    assert queued_cap_from_env({"DISTILL_MAX_QUEUED_WITHOUT_WORKER": "7"}) == 7
    with pytest.raises(ConfigError, match="DISTILL_MAX_QUEUED_WITHOUT_WORKER"):
        queued_cap_from_env({"DISTILL_MAX_QUEUED_WITHOUT_WORKER": "0"})


@pytest.mark.integration
def test_the_request_past_the_cap_is_refused_at_once(tmp_path: Path) -> None:
    """Before: every request was queued until its deadline, however many there were."""
    port = free_port_block()
    broker = Broker(
        BrokerConfig(
            port=port, request_timeout_s=600, data_dir=tmp_path, max_queued_without_worker=5
        )
    )
    broker.bind()
    stop = threading.Event()
    thread = threading.Thread(target=broker.run, args=(stop,), daemon=True)
    thread.start()
    sock: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(f"tcp://127.0.0.1:{port}")
    try:
        for i in range(5):
            sock.send_multipart([b"", P.MDPC, b"nobody", pack({"i": i})])
        wait_until(lambda: broker.registry.queued_count() == 5, 20, what="five queued requests")
        sock.send_multipart([b"", P.MDPC, b"nobody", pack({"i": 5})])
        assert sock.poll(30_000), "no reply to the request past the cap"
        frames = sock.recv_multipart()
        assert frames[:3] == [b"", P.MDPC, b"nobody"]
        reply = unpack(frames[3])
        assert reply["ok"] is False and reply["error"]["code"] == "error"
        assert "'nobody'" in reply["error"]["message"] and "cap is 5" in reply["error"]["message"]
        assert broker.registry.queued_count() == 5 and len(broker._owners) == 5
    finally:
        sock.close(linger=0)
        stop.set()
        thread.join(5)
