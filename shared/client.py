"""Blocking MDP/0.1 client, and the event subscription (snapshot, then stream).

``Client.request`` sends one request and waits for its reply, retrying with a fresh socket on
timeout (the Lazy Pirate pattern). Replies from Distill services are msgpack maps
``{"ok": true, "result": ...}`` or ``{"ok": false, "error": {"code", "message"}}``; the latter
raise :class:`RequestError`. ``request_raw`` moves frames untouched (for echo and MMI).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable, Iterator
from typing import Any

import zmq

from distill.shared import protocol as P
from distill.shared.codec import pack, unpack, unpack_map
from distill.shared.errors import DecodeError, RequestError, RequestTimeout, UnknownService


def broker_endpoint(host_or_endpoint: str | None = None, port: int = P.PORT_MDP) -> str:
    """Accept ``tcp://host:port``, ``host:port`` or ``host``."""
    if not host_or_endpoint:
        return f"tcp://{P.DEFAULT_HOST}:{port}"
    if "://" in host_or_endpoint:
        return host_or_endpoint
    if ":" in host_or_endpoint:
        return f"tcp://{host_or_endpoint}"
    return f"tcp://{host_or_endpoint}:{port}"


def events_endpoint(mdp_endpoint: str, direction: str = "out") -> str:
    """The broker's event port beside an MDP endpoint: by convention MDP port + 1 for events
    out (XPUB, what subscribers read) and + 2 for events in (XSUB, where workers publish)."""
    base, port = mdp_endpoint.rsplit(":", 1)
    offset = {"out": P.PORT_EVENTS_OUT - P.PORT_MDP, "in": P.PORT_EVENTS_IN - P.PORT_MDP}[direction]
    return f"{base}:{int(port) + offset}"


def decode_reply(frames: list[bytes], service: str) -> Any:
    """Unpack a Distill service reply; raise RequestError for error replies."""
    if not frames:
        raise DecodeError(f"empty reply from {service!r}")
    reply = unpack_map(frames[0], f"reply from {service!r}")
    if reply.get("ok") is True:
        return reply.get("result")
    err = reply.get("error") or {}
    code = str(err.get("code", "error"))
    message = str(err.get("message", "unknown error"))
    if reply.get("cancelled"):
        code = "cancelled"
    raise RequestError(f"{service}: {message}", code=code)


class Client:
    def __init__(self, endpoint: str | None = None, *, timeout_s: float = 10.0, retries: int = 0,
                 context: zmq.Context | None = None) -> None:
        self.endpoint = broker_endpoint(endpoint)
        self.timeout_s = timeout_s
        self.retries = retries
        self.ctx = context or zmq.Context.instance()
        self._socket: zmq.Socket | None = None

    # --- socket ------------------------------------------------------------------------------
    @property
    def socket(self) -> zmq.Socket:
        if self._socket is None:
            sock = self.ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.MAXMSGSIZE, P.MAX_MESSAGE_BYTES)
            sock.connect(self.endpoint)
            self._socket = sock
        return self._socket

    def _reset(self) -> None:
        if self._socket is not None:
            self._socket.close(linger=0)
            self._socket = None

    def close(self) -> None:
        self._reset()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- requests ----------------------------------------------------------------------------
    def send(self, service: str | bytes, frames: list[bytes]) -> None:
        name = service.encode() if isinstance(service, str) else service
        self.socket.send_multipart([b"", P.MDPC, name, *frames])

    def recv(self, service: str | bytes, timeout_s: float) -> list[bytes]:
        """Receive one reply for ``service`` within ``timeout_s``, or raise RequestTimeout."""
        name = service.encode() if isinstance(service, str) else service
        deadline = time.monotonic() + timeout_s
        while True:
            remaining_ms = int((deadline - time.monotonic()) * 1000)
            if remaining_ms <= 0 or not self.socket.poll(remaining_ms, zmq.POLLIN):
                raise RequestTimeout(f"no reply from {name.decode(errors='replace')!r} at "
                                     f"{self.endpoint} within {timeout_s:g} s")
            msg = self.socket.recv_multipart()
            if len(msg) >= 3 and msg[0] == b"" and msg[1] == P.MDPC and msg[2] == name:
                return msg[3:]
            # anything else is a stale reply to an earlier request on this socket: skip it

    def request_raw(self, service: str | bytes, frames: list[bytes], *, timeout_s: float | None = None,
                    retries: int | None = None) -> list[bytes]:
        timeout = self.timeout_s if timeout_s is None else timeout_s
        attempts = 1 + (self.retries if retries is None else retries)
        for attempt in range(attempts):
            self.send(service, frames)
            try:
                return self.recv(service, timeout)
            except RequestTimeout:
                self._reset()  # Lazy Pirate: a fresh socket drops any late reply
                if attempt == attempts - 1:
                    self._raise_timeout(service, timeout, attempts)
        raise AssertionError("unreachable")

    def _raise_timeout(self, service: str | bytes, timeout: float, attempts: int) -> None:
        name = service.decode() if isinstance(service, bytes) else service
        if not name.startswith("mmi."):
            try:
                known = self.mmi_service(name, timeout_s=min(timeout, 2.0))
            except RequestTimeout:
                raise RequestTimeout(f"no broker answered at {self.endpoint} "
                                     f"(request to {name!r}, {attempts} attempt(s))") from None
            if not known:
                raise UnknownService(f"no worker for service {name!r} is registered with the "
                                     f"broker at {self.endpoint}")
        raise RequestTimeout(f"no reply from {name!r} within {timeout:g} s "
                             f"({attempts} attempt(s), broker {self.endpoint})")

    def request(self, service: str | bytes, body: dict[str, Any], *, timeout_s: float | None = None,
                retries: int | None = None) -> Any:
        name = service.decode() if isinstance(service, bytes) else service
        frames = self.request_raw(service, [pack(body)], timeout_s=timeout_s, retries=retries)
        try:
            return decode_reply(frames, name)
        except RequestError as e:
            if e.code in ("expired",) and not self.mmi_service(name):
                raise UnknownService(str(e)) from None
            raise

    def pipeline(self, service: str, bodies: Iterable[dict[str, Any]], *, window: int = P.ARTIFACT_CREDIT,
                 timeout_s: float | None = None) -> Iterator[Any]:
        """Send requests with up to ``window`` in flight (credit-based flow control); yield
        results in order. Only for services that answer in order (the broker's own)."""
        timeout = self.timeout_s if timeout_s is None else timeout_s
        pending = 0
        source = iter(bodies)
        exhausted = False
        while True:
            while not exhausted and pending < window:
                try:
                    body = next(source)
                except StopIteration:
                    exhausted = True
                    break
                self.send(service, [pack(body)])
                pending += 1
            if pending == 0:
                return
            try:
                frames = self.recv(service, timeout)
            except RequestTimeout:
                self._reset()
                raise
            pending -= 1
            yield decode_reply(frames, service)

    # --- conveniences ------------------------------------------------------------------------
    def mmi_service(self, name: str, *, timeout_s: float | None = None) -> bool:
        reply = self.request_raw(P.MMI_SERVICE, [name.encode()], timeout_s=timeout_s, retries=0)
        return reply == [P.MMI_FOUND]

    def workers(self) -> dict[str, Any]:
        result: dict[str, Any] = self.request(P.SERVICE_WORKERS, {"op": "list"})
        return result

    def ping(self, *, timeout_s: float = 5.0) -> float:
        """Round trip to the echo service; returns seconds."""
        start = time.perf_counter()
        token = uuid.uuid4().bytes
        reply = self.request_raw(P.SERVICE_ECHO, [token], timeout_s=timeout_s)
        if reply != [token]:
            raise RequestError(f"echo returned {reply!r}, expected {[token]!r}", code="bad_reply")
        return time.perf_counter() - start


class Subscription:
    """Snapshot-then-stream (the Clone pattern): every event on the topics, once, in order.

    Subscribes first, proves the subscription is live with a hello round trip through the
    broker's XPUB, asks for the snapshot, then yields the snapshot's events followed by stream
    events newer than the snapshot's sequence number: no gap, no duplicate.
    """

    def __init__(self, endpoint: str | None, topics: list[str], *, events: str | None = None,
                 context: zmq.Context | None = None, timeout_s: float = 10.0) -> None:
        self.ctx = context or zmq.Context.instance()
        self.client = Client(endpoint, timeout_s=timeout_s, context=self.ctx)
        self.topics = topics or [""]
        self.sub = self.ctx.socket(zmq.SUB)
        self.sub.setsockopt(zmq.LINGER, 0)
        self.sub.setsockopt(zmq.RCVHWM, P.SOCKET_HWM)
        for topic in self.topics:
            self.sub.setsockopt(zmq.SUBSCRIBE, topic.encode())
        hello = f"hello.{uuid.uuid4().hex}"
        self.sub.setsockopt(zmq.SUBSCRIBE, hello.encode())
        self.sub.connect(events or events_endpoint(self.client.endpoint))
        self._await_hello(hello, timeout_s)
        self.sub.setsockopt(zmq.UNSUBSCRIBE, hello.encode())
        snap = self.client.request(P.SERVICE_EVENTS, {"op": "snapshot", "prefixes": self.topics})
        self.snapshot_seq: int = snap["seq"]
        self.last_seq = self.snapshot_seq
        self._pending: list[dict[str, Any]] = list(snap["events"])

    def _await_hello(self, hello: str, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            remaining = int((deadline - time.monotonic()) * 1000)
            if remaining <= 0 or not self.sub.poll(remaining):
                raise RequestTimeout("the broker's event port did not answer the subscription")
            topic, _ = self.sub.recv_multipart()
            if topic == hello.encode():
                return
            # earlier stream events are covered by the snapshot that follows

    def next(self, timeout_s: float | None = None) -> dict[str, Any] | None:
        """The next event, or None if none arrives within ``timeout_s`` (None: wait forever)."""
        if self._pending:
            return self._pending.pop(0)
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            remaining = -1 if deadline is None else max(0, int((deadline - time.monotonic()) * 1000))
            if not self.sub.poll(remaining):
                return None
            frames = self.sub.recv_multipart()
            if len(frames) != 2 or frames[0].startswith(b"hello."):
                continue
            try:
                event = unpack(frames[1])
            except DecodeError:
                continue
            if not isinstance(event, dict) or event.get("seq", 0) <= self.last_seq:
                continue  # already in the snapshot, or a duplicate
            self.last_seq = event["seq"]
            return event

    def __iter__(self) -> Iterator[dict[str, Any]]:
        while True:
            event = self.next()
            if event is not None:
                yield event

    def close(self) -> None:
        self.sub.close(linger=0)
        self.client.close()

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
