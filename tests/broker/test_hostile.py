"""Well-formed messages with hostile contents: each is refused at once with its reason, or
bounded, and the broker serves everyone else as before (the cases a hostile-input audit
found: each failed on the code before)."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterator
from typing import Any

import msgpack
import pytest
import zmq

from distill.broker.loop import MAX_WORKER_META_BYTES, Broker, BrokerConfig
from distill.shared.bus import protocol as P
from distill.shared.bus.client import Client
from distill.shared.bus.codec import pack
from distill.shared.errors import RequestError
from tests.conftest import free_port_block, wait_until

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Broker, str]]:
    port = free_port_block()
    config = BrokerConfig(port=port, heartbeat_interval_s=0.2, heartbeat_liveness=5,
                          request_timeout_s=2.0, data_dir=tmp_path_factory.mktemp("hostile"))
    from distill.broker.main import build_broker

    broker = build_broker(config)
    broker.bind()
    stop = threading.Event()
    thread = threading.Thread(target=broker.run, args=(stop,), daemon=True)
    thread.start()
    yield broker, f"tcp://127.0.0.1:{port}"
    stop.set()
    thread.join(5)


def refused(client: Client, service: str, body: dict[str, Any]) -> RequestError:
    with pytest.raises(RequestError) as e:
        client.request(service, body)
    return e.value


def test_a_snapshot_with_many_prefixes_is_refused(live: tuple[Broker, str]) -> None:
    _, endpoint = live
    with Client(endpoint, timeout_s=5) as client:
        err = refused(client, "distill.events", {"op": "snapshot", "prefixes": ["\x00"] * 100_000})
        assert err.code == "bad_request" and "100000 entries" in str(err)
        err = refused(client, "distill.events", {"op": "snapshot", "prefixes": ["x" * 300]})
        assert "longer than a topic" in str(err)
        assert client.request("distill.events", {"op": "snapshot", "prefixes": ["job."]})["events"] == []


def test_job_params_that_nest_too_deep_or_hold_odd_types_are_refused(
    live: tuple[Broker, str],
) -> None:
    _, endpoint = live
    deep: Any = 1
    for _ in range(900):  # stored before (and `jobs show` then crashed); 1020 was a traceback
        deep = {"k": deep}
    with Client(endpoint, timeout_s=5) as client:
        err = refused(client, "distill.jobs", {"op": "submit", "service": "s", "params": deep})
        assert err.code == "job" and "nest deeper than 32" in str(err)
        # msgpack's own timestamp type decodes without our ext hook: refused as a value
        stamp = msgpack.Timestamp(1, 0)
        err = refused(client, "distill.jobs", {"op": "submit", "service": "s",
                                               "params": {"e": stamp}})
        assert "Timestamp" in str(err)
        ok = client.request("distill.jobs", {"op": "submit", "service": "s",
                                             "params": {"a": {"b": [1, {"c": 2}]}}})
        assert ok["status"] == "queued"


def test_a_wait_with_a_timeout_that_is_no_time_is_answered(live: tuple[Broker, str]) -> None:
    _, endpoint = live
    with Client(endpoint, timeout_s=5) as client:
        job = client.request("distill.jobs", {"op": "submit", "service": "nobody.waits"})["id"]
        err = refused(client, "distill.jobs", {"op": "wait", "id": job, "timeout_s": math.nan})
        assert err.code == "bad_request" and "timeout_s" in str(err)  # was never answered
        refused(client, "distill.jobs", {"op": "wait", "id": job, "timeout_s": -1})
        start = time.monotonic()
        now = client.request("distill.jobs", {"op": "wait", "id": job, "timeout_s": 0})
        assert now["wait_timed_out"] and time.monotonic() - start < 2  # was 30 s


def test_paging_arguments_are_checked(live: tuple[Broker, str]) -> None:
    _, endpoint = live
    with Client(endpoint, timeout_s=5) as client:
        for service in ("distill.jobs", "distill.artifacts"):
            for bad in ({"limit": -1}, {"limit": 0}, {"start": -1}, {"limit": True}):
                err = refused(client, service, {"op": "list", **bad})
                assert err.code == "bad_request", (service, bad, err)


def test_names_with_control_or_format_characters_are_refused(live: tuple[Broker, str]) -> None:
    _, endpoint = live
    with Client(endpoint, timeout_s=5) as client:
        for service in ("a\x00b", "x\x1b]0;TITLE\x07", "evil\u202egpj"):
            err = refused(client, "distill.jobs", {"op": "submit", "service": service})
            assert "control or format character" in str(err)
        err = refused(client, "distill.artifacts", {"op": "put_begin", "sha256": "a" * 64,
                                                    "size": 1, "kind": "audio",
                                                    "name": "evil\u202egpj.wav"})
        assert "U+202E" in str(err)


def _raw_worker(endpoint: str, service: bytes, meta: dict[str, Any] | None) -> zmq.Socket:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    frames = [b"", P.MDPW, P.W_READY, service]
    if meta is not None:
        frames.append(pack(meta))
    sock.send_multipart(frames)
    return sock


def test_a_worker_with_huge_metadata_is_listed_without_it(live: tuple[Broker, str]) -> None:
    broker, endpoint = live
    big = _raw_worker(endpoint, b"fz.big", {"host": "h", "junk": "x" * (MAX_WORKER_META_BYTES * 4)})
    try:
        wait_until(lambda: broker.registry.has_workers(b"fz.big"), 5, what="registration")
        with Client(endpoint, timeout_s=5) as client:
            listed = [w for w in client.workers()["workers"] if w["service"] == "fz.big"]
            assert listed and "junk" not in listed[0]["meta"]
    finally:
        big.close(linger=0)


def test_a_worker_whose_service_name_holds_escapes_is_turned_away(live: tuple[Broker, str]) -> None:
    broker, endpoint = live
    sock = _raw_worker(endpoint, b"x\x1b[2Jy", None)
    try:
        assert sock.poll(3000), "no DISCONNECT came"
        assert sock.recv_multipart()[2] == P.W_DISCONNECT
        assert not broker.registry.has_workers(b"x\x1b[2Jy")
    finally:
        sock.close(linger=0)


def test_only_the_running_attempt_writes_checkpoints_and_rows(live: tuple[Broker, str]) -> None:
    broker, endpoint = live
    with Client(endpoint, timeout_s=5) as client:
        job = client.request("distill.jobs", {"op": "submit", "service": "nobody.runs"})["id"]
        # without `attempt` (as workers before it sent) a queued job was given any checkpoint
        err = refused(client, "distill.jobs", {"op": "checkpoint", "id": job, "sha256": "b" * 64})
        assert "queued, not running" in str(err)
        refused(client, "distill.jobs", {"op": "metrics", "id": job, "row": {"loss": 1}})
        # a row published as an event on a job that is not running is not stored either
        pub = zmq.Context.instance().socket(zmq.PUB)
        pub.setsockopt(zmq.LINGER, 0)
        pub.connect(f"tcp://127.0.0.1:{broker.config.port + 2}")
        try:
            deadline = time.monotonic() + 1.5
            while time.monotonic() < deadline:  # PUB/SUB join: send for a while
                pub.send_multipart([f"job.{job}".encode(),
                                    pack({"type": "metrics", "row": {"loss": 123}})])
                time.sleep(0.05)
            time.sleep(0.3)
        finally:
            pub.close(linger=0)
        record = client.request("distill.jobs", {"op": "get", "id": job})
        assert record["metric_count"] == 0


@pytest.mark.slow  # fills the broker's bound on held requests (seconds)
def test_requests_held_for_workers_are_bounded_in_bytes(
    live: tuple[Broker, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """30 requests of 10 MB to a service with no worker held 300 MB until they expired."""
    import distill.broker.loop as L

    broker, endpoint = live
    monkeypatch.setattr(L, "MAX_HELD_BYTES_PER_CLIENT", 7 * 512 * 1024)  # 3 of 1 MiB fit
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    try:
        body = pack({"blob": b"x" * (1024 * 1024)})
        for _ in range(4):
            sock.send_multipart([b"", P.MDPC, b"fz.nobody", body])
        assert sock.poll(3000), "the fourth was not refused at once"
        reply = sock.recv_multipart()
        assert b"too much in flight" in reply[-1]
        assert broker.held_bytes >= 3 * 1024 * 1024
        wait_until(lambda: broker.held_bytes == 0, 10, what="expired requests to release their bytes")
    finally:
        sock.close(linger=0)


def test_depends_on_given_as_one_string_is_refused_naming_it(live: tuple[Broker, str]) -> None:
    """``depends_on="j-…"`` went as its characters: "cannot depend on job j: no such job"."""
    from distill.shared.bus.jobs import JobsClient

    _, endpoint = live
    with Client(endpoint, timeout_s=5) as client:
        job = client.request("distill.jobs", {"op": "submit", "service": "nobody.depends"})["id"]
        with pytest.raises(RequestError, match=rf"write depends_on=\['{job}'\]"):
            JobsClient(client).submit("nobody.depends", {}, depends_on=job)  # type: ignore[arg-type]
        assert JobsClient(client).submit("nobody.depends", {}, depends_on=[job])["status"] == "queued"


def test_a_job_for_a_service_nobody_serves_is_said(live: tuple[Broker, str]) -> None:
    """A typo of a Distill service, or a service with no worker, was queued for ever without
    a word."""
    _, endpoint = live
    with Client(endpoint, timeout_s=5) as client:
        err = refused(client, "distill.jobs", {"op": "submit", "service": "distill.preproces",
                                               "params": {}})
        assert "did you mean 'distill.preprocess'?" in str(err)
        ok = client.request("distill.jobs", {"op": "submit", "service": "lab.reverb"})
        assert ok["status"] == "queued" and "no worker serves lab.reverb now" in ok["note"]


def test_one_client_cannot_hold_every_upload(live: tuple[Broker, str],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """2000 made-up uploads from one client (5 s) filled the store's bound and stopped every
    other upload for the hour an idle upload is kept."""
    import hashlib

    import distill.broker.services.artifacts as A

    _, endpoint = live
    monkeypatch.setattr(A, "MAX_UPLOADS_PER_CLIENT", 3)
    def begin(client: Client, i: int) -> Any:
        sha = hashlib.sha256(f"made-up {i}".encode()).hexdigest()
        return client.request("distill.artifacts", {"op": "put_begin", "sha256": sha, "size": 9,
                                                    "kind": "audio", "name": f"{i}.wav"})
    with Client(endpoint, timeout_s=5) as greedy, Client(endpoint, timeout_s=5) as other:
        for i in range(3):
            begin(greedy, i)
        with pytest.raises(RequestError, match="this client has 3 uploads begun and not finished"):
            begin(greedy, 3)
        assert begin(other, 4)["offset"] == 0  # another client is not held up


def test_the_workers_reply_fits_a_message_however_many_workers_say_much(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """1200 fake workers with 16 KiB of metadata each made `distill.workers` too big for any
    client (`distill workers` and `distill up` timed out)."""
    import distill.broker.services.workers as W
    from distill.broker.registry import Registry
    from distill.shared.bus.codec import unpack_map

    monkeypatch.setattr(W, "MAX_REPLY_BYTES", 64 * 1024)
    registry = Registry(10.0)
    for i in range(40):
        registry.register(f"w{i}".encode(), b"fz.meta", {"host": "h", "junk": "x" * 16_000}, 0.0)
    reply = unpack_map(W.WorkersService(registry).serve(b"c", [b""])[0])["result"]
    assert len(pack(reply)) < 64 * 1024 + 4096 and len(reply["workers"]) == 40
    assert reply["workers"][0]["meta"] == {} and not reply["truncated"]
    for i in range(40, 4000):
        registry.register(f"w{i}".encode(), b"fz.meta", {"host": "h"}, 0.0)
    reply = unpack_map(W.WorkersService(registry).serve(b"c", [b""])[0])["result"]
    assert reply["truncated"] and 0 < len(reply["workers"]) < 4000
    assert len(pack(reply)) < 64 * 1024 + 4096
