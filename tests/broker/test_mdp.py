"""MDP/0.1 and MMI as RFC 7 and RFC 8 write them, checked with raw pyzmq peers."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
import zmq

from distill.shared.bus.codec import pack, unpack
from tests.conftest import Cluster, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]  # spawns broker and worker processes

MDPC, MDPW = b"MDPC01", b"MDPW01"


def raw_client(ctx: zmq.Context, endpoint: str) -> zmq.Socket:
    sock = ctx.socket(zmq.REQ)  # RFC 7: a client may use REQ; then frame 0 is implicit
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, 5000)
    sock.connect(endpoint)
    return sock


def test_raw_rfc7_client_gets_mmi_and_exact_echo_frames(cluster: Cluster) -> None:
    cluster.start_broker()
    cluster.start_worker("echo")
    ctx = zmq.Context()
    sock = raw_client(ctx, cluster.endpoint)
    try:
        sock.send_multipart([MDPC, b"mmi.service", b"echo"])
        assert sock.recv_multipart() == [MDPC, b"mmi.service", b"200"]
        sock.send_multipart([MDPC, b"mmi.service", b"no.such.service"])
        assert sock.recv_multipart() == [MDPC, b"mmi.service", b"404"]
        sock.send_multipart([MDPC, b"mmi.nope", b"x"])
        assert sock.recv_multipart() == [MDPC, b"mmi.nope", b"501"]
        sock.send_multipart([MDPC, b"echo", b"hello", b"", b"\x00\xff"])
        assert sock.recv_multipart() == [MDPC, b"echo", b"hello", b"", b"\x00\xff"]
    finally:
        sock.close()
        ctx.term()


def test_mmi_404_when_service_has_only_queued_requests(cluster: Cluster) -> None:
    cluster.start_broker(request_timeout_s=3)
    ctx = zmq.Context()
    dealer = ctx.socket(zmq.DEALER)
    dealer.connect(cluster.endpoint)
    dealer.send_multipart([b"", MDPC, b"ghost", b"body"])  # waits in the queue, no worker
    sock = raw_client(ctx, cluster.endpoint)
    try:
        sock.send_multipart([MDPC, b"mmi.service", b"ghost"])
        assert sock.recv_multipart()[-1] == b"404"
        # and the queued request expires with a clear error once its deadline passes
        dealer.setsockopt(zmq.RCVTIMEO, 10_000)
        frames = dealer.recv_multipart()
        assert frames[:3] == [b"", MDPC, b"ghost"]
        reply = unpack(frames[3])
        assert reply["ok"] is False and reply["error"]["code"] == "expired"
        assert "no worker for service 'ghost'" in reply["error"]["message"]
    finally:
        sock.close()
        dealer.close(linger=0)
        ctx.term()


def test_malformed_requests_that_can_be_answered_are_answered(cluster: Cluster) -> None:
    """A request with a service frame gets a bad_request reply naming what is wrong, at once,
    where it was dropped and its client waited out its own timeout."""
    cluster.start_broker()
    ctx = zmq.Context()
    sock = raw_client(ctx, cluster.endpoint)
    try:
        for service, body, says in (
            (b"", [b"x"], "empty service frame"),
            (b"s" * 300, [b"x"], "service name is 300 bytes (at most 255)"),
            (b"echo", [b"x"] * 65, "65 body frames (at most 64)"),
            (b"echo", [], "no body frame"),
        ):  # fmt: skip
            sock.send_multipart([MDPC, service, *body])
            frames = sock.recv_multipart()
            assert frames[:2] == [MDPC, service]
            reply = unpack(frames[2])
            assert reply["error"]["code"] == "bad_request" and says in reply["error"]["message"]
        sock.send_multipart([MDPC, b"mmi.service", b"echo"])  # and the broker goes on
        assert sock.recv_multipart() == [MDPC, b"mmi.service", b"404"]
    finally:
        sock.close()
        ctx.term()


class RawWorker(threading.Thread):
    """An MDP/0.1 worker written from RFC 7 alone."""

    def __init__(self, endpoint: str, service: bytes, meta: dict[str, Any] | None = None) -> None:
        super().__init__(daemon=True)
        self.endpoint, self.service, self.meta = endpoint, service, meta
        self.stop = threading.Event()
        self.handled = 0
        self.disconnected = False

    def run(self) -> None:
        ctx = zmq.Context()
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(self.endpoint)
        ready = [b"", MDPW, b"\x01", self.service]  # READY, with metadata if given
        sock.send_multipart(ready + ([pack(self.meta)] if self.meta is not None else []))
        next_hb = time.monotonic()
        while not self.stop.is_set():
            if sock.poll(50):
                frames = sock.recv_multipart()
                assert frames[:2] == [b"", MDPW]
                if frames[2] == b"\x02":  # REQUEST: client address, empty, body
                    client, empty, *body = frames[3:]
                    assert empty == b""
                    reply = [b.upper() for b in body]
                    sock.send_multipart([b"", MDPW, b"\x03", client, b"", *reply])
                    self.handled += 1
                elif frames[2] == b"\x05":
                    self.disconnected = True
                    break
            if time.monotonic() >= next_hb:
                sock.send_multipart([b"", MDPW, b"\x04"])
                next_hb = time.monotonic() + 0.2
        sock.send_multipart([b"", MDPW, b"\x05"])
        sock.close()
        ctx.term()


def test_raw_rfc7_worker_serves_the_project_client(cluster: Cluster) -> None:
    cluster.start_broker()
    worker = RawWorker(cluster.endpoint, b"upper")
    worker.start()
    try:
        with cluster.client() as client:
            wait_until(lambda: client.mmi_service("upper"), 5, what="raw worker to register")
            assert client.request_raw("upper", [b"abc", b"def"]) == [b"ABC", b"DEF"]
            listed = client.workers()["workers"]
            assert [w["service"] for w in listed] == ["upper"] and listed[0]["host"] is None
    finally:
        worker.stop.set()
        worker.join(5)
    assert worker.handled == 1


def test_a_worker_of_another_version_is_listed_with_it_and_logged(cluster: Cluster) -> None:
    """Before: nothing compared versions; an old worker failing what a newer one wrote was
    found only from its jobs' errors."""
    from typer.testing import CliRunner

    from distill.shared.cli.main import app
    from distill.shared.version import distill_version

    cluster.start_broker()
    worker = RawWorker(cluster.endpoint, b"upper", {"host": "old-box", "pid": 7, "device": "cpu",
                                                     "versions": {"distill": "0.0.1"}})  # fmt: skip
    worker.start()
    try:
        wait_until(lambda: any(w["host"] == "old-box" for w in cluster.worker_list()), 10,
                   what="the old worker listed")  # fmt: skip
        out = CliRunner().invoke(app, ["workers", "--broker", cluster.endpoint])
        assert out.exit_code == 0, out.output
        assert "VERSION" in out.output and "0.0.1" in out.output
        if distill_version() is not None:  # an installed tree: the broker knows its own
            assert f"the broker runs Distill {distill_version()}; workers of 0.0.1" in out.output
            assert cluster.broker is not None
            wait_until(lambda: "worker_version_differs" in cluster.broker.log(), 5,
                       what="the broker's warning")  # fmt: skip
    finally:
        worker.stop.set()
        worker.join(5)


def test_second_ready_gets_disconnect(cluster: Cluster) -> None:
    cluster.start_broker()
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.RCVTIMEO, 5000)
    sock.connect(cluster.endpoint)
    try:
        sock.send_multipart([b"", MDPW, b"\x01", b"twice", pack({"host": "h", "pid": 1})])
        with cluster.client() as client:
            wait_until(lambda: client.mmi_service("twice"), 5, what="registration")
            sock.send_multipart([b"", MDPW, b"\x01", b"twice"])
            while True:
                frames = sock.recv_multipart()
                if frames[2] != b"\x04":  # skip heartbeats
                    break
            assert frames == [b"", MDPW, b"\x05"]
            wait_until(lambda: not client.mmi_service("twice"), 5, what="deregistration")
    finally:
        sock.close(linger=0)
        ctx.term()


def test_handler_exception_is_an_error_reply_and_worker_lives(cluster: Cluster) -> None:
    cluster.start_broker()
    cluster.start_worker("sleep")
    with cluster.client() as client:
        from distill.shared.errors import RequestError

        with pytest.raises(RequestError, match="could not convert"):
            client.request("distill.sleep", {"seconds": "not a number"})
        assert client.request("distill.sleep", {"seconds": 0, "value": 7})["value"] == 7
