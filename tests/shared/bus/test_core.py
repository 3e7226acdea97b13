"""The client core: reply matching after a failed pipeline, error codes, socket hygiene."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from distill.broker.loop import BrokerConfig
from distill.broker.main import build_broker
from distill.shared.bus.artifacts import ArtifactClient
from distill.shared.bus.cache import ArtifactCache
from distill.shared.bus.client import Client
from distill.shared.bus.codec import pack
from distill.shared.bus.core import ReplyLedger, broker_endpoint, decode_reply
from distill.shared.errors import ARTIFACT, CANCELLED, ConfigError, RequestError
from tests.conftest import free_port_block

pytestmark = pytest.mark.integration

SERVICE = "distill.artifacts"
CHUNK = 1000


@pytest.fixture
def endpoint(tmp_path: Path) -> Iterator[str]:
    """A broker (jobs and artifacts attached) looping in a thread of this process."""
    port = free_port_block()
    broker = build_broker(BrokerConfig(port=port, data_dir=tmp_path / "broker"))
    broker.bind()
    stop = threading.Event()
    thread = threading.Thread(target=broker.run, args=(stop,), daemon=True)
    thread.start()
    yield f"tcp://127.0.0.1:{port}"
    stop.set()
    thread.join(5)


def _put(client: Client, tmp_path: Path, data: bytes) -> str:
    store = ArtifactClient(client, ArtifactCache(tmp_path / "cache"), chunk_bytes=CHUNK)
    return store.put_bytes(data, kind="file", name="data")


def test_failed_pipeline_leaves_no_stale_reply_for_the_next_request(endpoint: str, tmp_path: Path) -> None:
    data = bytes(range(256)) * 40  # 10 chunks of 1000 bytes (the last one short)
    with Client(endpoint, timeout_s=5) as client:
        sha = _put(client, tmp_path, data)
        bodies = [{"op": "get", "sha256": sha, "offset": off, "length": CHUNK}
                  for off in range(0, len(data), CHUNK)]
        bodies[1] = {"op": "get", "sha256": "f" * 64, "offset": 0, "length": CHUNK}  # unknown
        results = client.pipeline(SERVICE, bodies, window=4)
        assert next(results)["offset"] == 0
        with pytest.raises(RequestError) as failed:  # chunks 2, 3 and 4 are still in flight
            next(results)
        assert failed.value.code == ARTIFACT
        # The next request gets its own reply, not chunk 2's.
        stat = client.request(SERVICE, {"op": "stat", "sha256": sha})
        assert stat["sha256"] == sha and stat["size"] == len(data)
        again = list(client.pipeline(SERVICE, [{"op": "get", "sha256": sha, "offset": 5 * CHUNK,
                                                "length": CHUNK}]))
        assert again == [{"offset": 5 * CHUNK, "data": data[5 * CHUNK : 6 * CHUNK]}]


def test_abandoned_pipeline_leaves_no_stale_reply(endpoint: str, tmp_path: Path) -> None:
    data = b"x" * (8 * CHUNK)
    with Client(endpoint, timeout_s=5) as client:
        sha = _put(client, tmp_path, data)
        bodies = ({"op": "get", "sha256": sha, "offset": off, "length": CHUNK}
                  for off in range(0, len(data), CHUNK))
        for result in client.pipeline(SERVICE, bodies, window=4):
            assert result["offset"] == 0
            break  # the consumer stops with three replies owed
        assert client.request(SERVICE, {"op": "stat", "sha256": sha})["size"] == len(data)


def test_get_file_still_streams_after_a_failed_get(endpoint: str, tmp_path: Path) -> None:
    data = bytes(range(256)) * 30
    with Client(endpoint, timeout_s=5) as client:
        store = ArtifactClient(client, ArtifactCache(tmp_path / "cache"), chunk_bytes=CHUNK)
        sha = store.put_bytes(data, kind="file", name="data")
        with pytest.raises(RequestError):
            list(store.iter_chunks("e" * 64, len(data)))
        assert store.get_bytes(sha) == data
        assert hashlib.sha256(store.get_bytes(sha)).hexdigest() == sha


def test_decode_reply_carries_the_wire_code() -> None:
    assert decode_reply([pack({"ok": True, "result": {"a": 1}})], "s") == {"a": 1}
    with pytest.raises(RequestError, match="s: gone") as e:
        decode_reply([pack({"ok": False, "error": {"code": ARTIFACT, "message": "gone"}})], "s")
    assert e.value.code == ARTIFACT
    with pytest.raises(RequestError) as e:
        decode_reply([pack({"ok": False, "cancelled": True, "error": {"code": "job",
                                                                      "message": "stop"}})], "s")
    assert e.value.code == CANCELLED
    # a raw service's reply (echo sends the request back): said, not "unknown error"
    with pytest.raises(RequestError, match="echo: the reply is not a Distill reply") as e:
        decode_reply([pack({"hi": 1})], "echo")
    assert e.value.code == "bad_reply"


def test_a_reply_that_is_not_a_distill_reply_is_bad_reply() -> None:
    """A broken or third-party worker's answer: always a RequestError with ``bad_reply``
    (``{ok: false, error: "text"}`` raised a bare AttributeError out of Client.request)."""
    for frames in ([pack({"ok": False, "error": "str"})], [pack({"ok": "yes"})],
                   [pack({"ok": False})], [b"\xc1 not msgpack"], [pack([1, 2])], []):
        with pytest.raises(RequestError) as e:
            decode_reply(frames, "fz")
        assert e.value.code == "bad_reply", frames


def test_a_body_that_cannot_travel_is_a_request_error_before_it_is_packed() -> None:
    """An 8-GB array was packed for 15 s, then failed on msgpack's 4-GiB bound (a ValueError);
    an integer of 2**64 raised a TypeError out of Client.request."""
    import numpy as np

    from distill.shared.bus.core import encode_body

    huge = np.broadcast_to(np.float32(0), (2 * 10**9,))  # 8 GB by its nbytes, no memory
    with pytest.raises(RequestError, match="carries 7629.4 MiB of arrays") as e:
        encode_body({"audio": huge, "nested": [{"x": 1}]}, "distill.infer")
    assert e.value.code == "bad_request"
    with pytest.raises(RequestError, match="cannot be encoded: cannot encode the integer") as e:
        encode_body({"seed": 2**64}, "distill.infer")
    assert e.value.code == "bad_request"
    assert encode_body({"a": np.zeros(3, np.float32)}, "s") == pack({"a": np.zeros(3, np.float32)})


def test_reply_ledger_counts_owed_replies() -> None:
    ledger = ReplyLedger()
    assert ledger.clean
    ledger.sent()
    ledger.sent()
    ledger.received()
    assert not ledger.clean
    ledger.reset()
    assert ledger.clean


@pytest.mark.parametrize(("given", "endpoint"), [
    (None, "tcp://127.0.0.1:5555"), ("gpu-box", "tcp://gpu-box:5555"),
    ("gpu-box:6000", "tcp://gpu-box:6000"), ("tcp://10.0.0.7:5555", "tcp://10.0.0.7:5555"),
    ("[::1]", "tcp://[::1]:5555"), ("[::1]:6000", "tcp://[::1]:6000"),
    ("tcp://[fe80::1%eth0]:5555", "tcp://[fe80::1%eth0]:5555"),
])
def test_a_broker_address_is_read_as_tcp_host_port(given: str | None, endpoint: str) -> None:
    assert broker_endpoint(given) == endpoint


@pytest.mark.parametrize(("given", "why"), [
    ("http://127.0.0.1:18750", "http:// is not ZeroMQ's tcp://"),
    ("not a url", "'not a url' is not a host name or address"),
    ("tcp://gpu-box", "no port after the host"),
    ("gpu-box:99999", "port '99999' is not a number from 1 to 65535"),
    ("tcp://:5555", "no host"),
])
def test_a_malformed_broker_address_is_refused_naming_it(given: str, why: str) -> None:
    """Before: taken as it was, and ZeroMQ refused it in the first request with a ZMQError
    (a traceback out of every command and the UI)."""
    with pytest.raises(ConfigError) as refused:
        broker_endpoint(given)
    assert str(refused.value) == (f"broker address {given!r} is not tcp://HOST:PORT (nor HOST:PORT, "
                                  f"nor HOST): {why}")  # fmt: skip
    with pytest.raises(ConfigError):
        Client(given)  # where a client is made from --broker or $DISTILL_BROKER
