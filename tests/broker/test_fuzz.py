"""Garbage on the wire never stops the broker or leaves state behind."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from distill.broker.loop import Broker, BrokerConfig
from distill.shared.bus import protocol as P
from distill.shared.bus.codec import pack
from tests.conftest import free_port_block, wait_until

pytestmark = pytest.mark.integration

HEADERS = [b"", P.MDPC, P.MDPW, b"MDPC02", b"\x00" * 6]
COMMANDS = [b"\x01", b"\x02", b"\x03", b"\x04", b"\x05", b"\x06", b"", b"\x01\x01"]

msgpack_garbage = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=20)
    | st.binary(max_size=40),
    lambda kids: (
        st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4)
    ),
    max_leaves=10,
).map(pack)

frame = st.one_of(
    st.sampled_from(
        HEADERS
        + COMMANDS
        + [
            b"echo",
            b"mmi.service",
            b"distill.jobs",
            b"distill.workers",
            b"distill.events",
            b"distill.artifacts",
        ]
    ),
    st.binary(max_size=64),
    msgpack_garbage,
)
message = st.one_of(
    st.lists(frame, min_size=0, max_size=8),
    st.tuples(st.sampled_from([P.MDPC, P.MDPW]), st.lists(frame, max_size=6)).map(
        lambda t: [b"", t[0], *t[1]]
    ),
    st.tuples(st.sampled_from(COMMANDS), st.lists(frame, max_size=4)).map(
        lambda t: [b"", P.MDPW, t[0], *t[1]]
    ),
)


@pytest.fixture(scope="module")
def live_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Broker, str]]:
    port = free_port_block()
    config = BrokerConfig(
        port=port,
        heartbeat_interval_s=0.1,
        heartbeat_liveness=3,
        request_timeout_s=0.5,
        max_message_bytes=64 * 1024,
        data_dir=tmp_path_factory.mktemp("fuzz-broker"),
    )
    from distill.broker.main import build_broker

    broker = build_broker(config)
    broker.bind()
    stop = threading.Event()
    thread = threading.Thread(target=broker.run, args=(stop,), daemon=True)
    thread.start()
    yield broker, f"tcp://127.0.0.1:{port}"
    stop.set()
    thread.join(5)


# 1000 examples: up to 5000 messages of every frame shape (about 4 s: in the slow half); the
# hostile-bus tests aim at each field on purpose
@pytest.mark.slow
@settings(max_examples=1000, deadline=None, suppress_health_check=list(HealthCheck))
@given(messages=st.lists(message, min_size=1, max_size=5), oversize=st.booleans())
def test_random_multipart_messages(
    live_broker: tuple[Broker, str], messages: list[list[bytes]], oversize: bool
) -> None:
    broker, endpoint = live_broker
    sock = _socket(endpoint)
    for frames in messages:
        if oversize:
            frames = [*frames, b"x" * (broker.config.max_message_bytes + 1)]
        if frames:
            sock.send_multipart(frames)


_sockets: list[zmq.Socket] = []


def _socket(endpoint: str) -> zmq.Socket:
    # A handful of peers (identities) rather than one per example: fewer TCP connections.
    if len(_sockets) < 8:
        s = zmq.Context.instance().socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.SNDHWM, 100_000)
        s.connect(endpoint)
        _sockets.append(s)
        return s
    _sockets.append(_sockets.pop(0))
    return _sockets[-1]


@pytest.mark.slow  # reads what test_random_multipart_messages left
def test_broker_survives_and_forgets_the_garbage(live_broker: tuple[Broker, str]) -> None:
    broker, endpoint = live_broker
    time.sleep(0.5)
    for s in _sockets:
        s.close(linger=0)
    _sockets.clear()
    # Garbage that happened to be a valid READY or request is forgotten once it expires
    # (no heartbeats follow; deadlines pass).
    wait_until(
        lambda: not broker.registry.workers and not broker.registry.services,
        10,
        what="registry to empty",
    )
    from distill.shared.bus.client import Client

    with Client(endpoint, timeout_s=5) as client:
        assert client.mmi_service("echo") is False
        assert client.mmi_service("distill.workers") is True
        assert client.workers()["workers"] == []
    assert broker.dropped > 0  # it did see (and refuse) garbage
