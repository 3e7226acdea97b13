"""The socket loop's own timers (worker and request expiry, heartbeats, the key-ring check, the
job manager's tick) are guarded: one that raises is logged and counted, the loop goes on, and
a request the failing timer was handling still gets an error reply."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq

from distill.broker.loop import Broker, BrokerConfig
from distill.shared.bus import protocol as P
from distill.shared.bus.client import Client
from distill.shared.errors import INTERNAL, RequestError
from tests.conftest import free_port_block, wait_until

pytestmark = pytest.mark.integration

LOOP_TASKS = {"keyring_check", "worker_expiry", "request_expiry", "jobs_tick", "heartbeats"}


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    # Short heartbeats and deadlines so that expiry happens within the test; every wait below
    # is a generous poll, never a fixed sleep.
    config = BrokerConfig(
        port=free_port_block(),
        heartbeat_interval_s=0.1,
        heartbeat_liveness=3,
        request_timeout_s=0.3,
        data_dir=tmp_path / "broker",
    )
    yield Broker(config)


def _run(broker: Broker) -> tuple[threading.Thread, threading.Event]:
    broker.bind()
    stop = threading.Event()
    thread = threading.Thread(target=broker.run, args=(stop,), daemon=True)
    thread.start()
    return thread, stop


def _endpoint(broker: Broker) -> str:
    return f"tcp://127.0.0.1:{broker.config.port}"


def _injected(name: str) -> Any:
    def run(*args: Any, **kwargs: Any) -> None:
        raise OSError(28, f"No space left on device (injected into {name})")

    return run


def test_the_loop_answers_while_every_one_of_its_timers_fails(broker: Broker) -> None:
    """Before: an exception in ``Broker._timers`` escaped ``step`` and ended ``run``."""
    assert {task.name for task in broker.timers._tasks} == LOOP_TASKS
    for task in broker.timers._tasks:
        task.run, task.interval_s = _injected(task.name), 0.0
    thread, stop = _run(broker)
    try:
        wait_until(
            lambda: all(broker.timers.failures(n) >= 3 for n in LOOP_TASKS),
            30,
            what="every loop timer to have failed a few times",
        )
        with Client(_endpoint(broker), timeout_s=10) as client:
            assert client.mmi_service("ghost") is False
            assert client.mmi_service("ghost") is False  # and again, a few turns later
        assert thread.is_alive()
    finally:
        stop.set()
        thread.join(5)


def test_an_expiring_request_gets_an_error_reply_when_its_expiry_fails(
    broker: Broker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The request is already off its queue when the failure strikes: without a reply its
    client would wait out its own timeout."""
    monkeypatch.setattr(broker, "_expiry_message", _injected("request expiry"))
    thread, stop = _run(broker)
    try:
        with Client(_endpoint(broker), timeout_s=20) as client:
            with pytest.raises(RequestError, match="injected into request expiry") as err:
                client.request("ghost", {"op": "anything"})
            assert err.value.code == INTERNAL and "'ghost'" in str(err.value)
            assert client.mmi_service("ghost") is False
        assert broker.timers.failures("request_expiry") == 0  # handled per request
        assert thread.is_alive() and not broker._owners  # its outstanding slot freed
    finally:
        stop.set()
        thread.join(5)


def test_a_lost_workers_request_gets_an_error_reply_when_removing_it_fails(
    broker: Broker, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(broker, "_remove_worker", _injected("worker expiry"))
    thread, stop = _run(broker)
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
    worker = ctx.socket(zmq.DEALER)
    worker.setsockopt(zmq.LINGER, 0)
    worker.connect(_endpoint(broker))
    try:
        worker.send_multipart([b"", P.MDPW, P.W_READY, b"silent"])  # then never heartbeats
        wait_until(
            lambda: broker.registry.has_workers(b"silent"), 20, what="the worker to register"
        )
        with Client(_endpoint(broker), timeout_s=30) as client:
            with pytest.raises(RequestError, match="injected into worker expiry") as err:
                client.request("silent", {"op": "anything"})
            assert err.value.code == INTERNAL
            assert not broker.registry.has_workers(b"silent")  # forgotten all the same
            assert client.mmi_service("silent") is False
        assert thread.is_alive()
    finally:
        worker.close(linger=0)
        stop.set()
        thread.join(5)
