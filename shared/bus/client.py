"""Blocking MDP/0.1 client, and the event subscription (snapshot, then stream).

``Client.request`` sends one request and waits for its reply, retrying with a fresh socket on
timeout (the Lazy Pirate pattern); ``Client.pipeline`` keeps several in flight. Socket setup,
reply matching and error mapping are the shared core's (:mod:`distill.shared.bus.core`). Replies from Distill services are msgpack maps
``{"ok": true, "result": ...}`` or ``{"ok": false, "error": {"code", "message"}}``; the latter
raise :class:`RequestError`. ``request_raw`` moves frames untouched (for echo and MMI).

``security`` (both classes): CURVE keys for a broker on another machine. The default, AUTO,
finds them in ``$DISTILL_BROKER_KEY``/``$DISTILL_KEY`` or the keys config file
(:mod:`distill.shared.bus.security`); None forces a plain connection.
"""

from __future__ import annotations

import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import zmq

from distill.shared.bus import contact
from distill.shared.bus import protocol as P
from distill.shared.bus.codec import unpack
from distill.shared.bus.core import (
    DROPPED,
    ReplyLedger,
    after_drop,
    broker_endpoint,
    configure_dealer,
    decode_reply,
    drop_monitor_address,
    encode_body,
    events_endpoint,
    is_expiry,
    needs_service_check,
    reply_body,
    request_frames,
    service_bytes,
    service_text,
    timeout_error,
    unknown_service,
)
from distill.shared.bus.security import AUTO, SecurityArg, apply_client, resolve
from distill.shared.errors import BAD_REPLY, DecodeError, RequestError, RequestTimeout

__all__ = ["Client", "Subscription", "broker_endpoint", "events_endpoint"]

INTERRUPT_POLL_S = 0.25  # how often a client with ``interrupted`` asks it while it waits


class _Conn:
    """One thread's socket, the replies owed on it, and its monitor while it has not reached
    the broker (:mod:`distill.shared.bus.contact`). Held only by that thread's slot of the
    client's ``threading.local``, so it goes when the thread ends, and closes its socket as it
    goes (a thread pool's finished threads leave no socket open)."""

    def __init__(self, sock: zmq.Socket, watch: contact.Contact | None) -> None:
        self.socket = sock
        self.ledger = ReplyLedger()
        self.contact = watch
        self.closer = weakref.finalize(self, _close, sock, watch)

    def reached(self) -> None:
        """The broker answered on this socket: no more monitoring."""
        if self.contact is not None:
            self.contact.close()
            self.contact = None


def _close(sock: zmq.Socket, watch: contact.Contact | None) -> None:
    if watch is not None:
        watch.close()
    sock.close(0)


class Client:
    """A blocking client (see :mod:`distill.shared.bus.core` for how replies are matched and
    why a socket is replaced). Safe to share between threads: each thread asks on its own
    DEALER socket, so their requests run side by side (ZeroMQ sockets are not thread-safe: a
    pool of threads sharing one socket failed almost every call with "Socket operation on
    non-socket"); :meth:`close` closes them all."""

    def __init__(self, endpoint: str | None = None, *, timeout_s: float = 10.0, retries: int = 0,
                 context: zmq.Context | None = None, security: SecurityArg = AUTO,
                 interrupted: Callable[[], BaseException | None] | None = None,
                 first_contact_s: float | None = contact.GRACE_S) -> None:
        """``interrupted``: polled while a reply is awaited (every INTERRUPT_POLL_S); the error
        it returns ends the wait (a worker's handler whose request was abandoned, say).
        ``first_contact_s``: until the client has reached the broker, refused connections are
        an error (:class:`~distill.shared.bus.contact.BrokerUnreachable`, saying why) once they
        have gone on this long, and a refused handshake at once, instead of a timeout; None:
        no such check (the client waits out its timeout, as one that has reached it does)."""
        self.interrupted = interrupted
        self.first_contact_s = first_contact_s
        self._reached = first_contact_s is None  # a reply came (or no check is wanted)
        self._trying_since: float | None = None  # the first request sent before that
        self.endpoint = broker_endpoint(endpoint)
        self.timeout_s = timeout_s
        self.retries = retries
        self.ctx = context or zmq.Context.instance()
        self.security = resolve(security, self.endpoint)
        self._local = threading.local()  # .conn: the calling thread's _Conn, if any
        self._conns: weakref.WeakSet[_Conn] = weakref.WeakSet()  # every live thread's
        self._conns_lock = threading.Lock()

    # --- socket ------------------------------------------------------------------------------
    @property
    def _conn(self) -> _Conn | None:
        conn: _Conn | None = getattr(self._local, "conn", None)
        return conn if conn is not None and not conn.socket.closed else None

    def _connection(self) -> _Conn:
        """The calling thread's connection (made on its first call, or after a close)."""
        conn = self._conn
        if conn is None:
            sock = self.ctx.socket(zmq.DEALER)
            configure_dealer(sock, self.security)
            watch = None if self._reached else contact.Contact(
                sock, self.endpoint, curve=self.security is not None)  # fmt: skip
            sock.connect(self.endpoint)
            conn = self._local.conn = _Conn(sock, watch)
            with self._conns_lock:
                self._conns.add(conn)
        return conn

    @property
    def socket(self) -> zmq.Socket:
        """The calling thread's socket."""
        return self._connection().socket

    def _owes_replies(self) -> bool:
        """Whether the calling thread's socket has replies owed from an earlier call."""
        conn = self._conn
        return conn is not None and not conn.ledger.clean

    def _reset(self) -> None:
        """The calling thread's socket closed (a fresh one drops replies still owed on it)."""
        conn: _Conn | None = getattr(self._local, "conn", None)
        if conn is not None:
            self._local.conn = None
            conn.closer()  # closes the socket (once)

    def _begin_call(self) -> None:
        """A call starts: drop a socket on which an earlier call left replies owed."""
        if self._owes_replies():
            self._reset()

    def close(self) -> None:
        """Close every thread's socket (call it once the threads are done with the client)."""
        self._reset()
        with self._conns_lock:
            conns, self._conns = list(self._conns), weakref.WeakSet()
        for conn in conns:
            conn.closer()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- requests ----------------------------------------------------------------------------
    def _send(self, service: bytes, frames: list[bytes]) -> None:
        conn = self._connection()
        conn.socket.send_multipart(request_frames(service, frames))
        conn.ledger.sent()
        if self._trying_since is None and not self._reached:
            self._trying_since = time.monotonic()

    def _recv(self, service: bytes, timeout_s: float) -> list[bytes]:
        """Receive the next reply for ``service`` within ``timeout_s``, or raise RequestTimeout
        (BrokerUnreachable, sooner, when the broker was never reached and the monitor says why)."""
        deadline = time.monotonic() + timeout_s
        conn = self._connection()  # the one the request went out on, throughout
        while True:
            remaining_ms = int((deadline - time.monotonic()) * 1000)
            if remaining_ms <= 0:
                raise RequestTimeout(f"no reply from {service_text(service)!r} at "
                                     f"{self.endpoint} within {timeout_s:g} s")
            slice_ms = remaining_ms
            if self.interrupted is not None:
                slice_ms = min(slice_ms, int(INTERRUPT_POLL_S * 1000))
            if conn.contact is not None:
                slice_ms = min(slice_ms, contact.POLL_MS)
            if not conn.socket.poll(slice_ms, zmq.POLLIN):
                if self.interrupted is not None and (error := self.interrupted()) is not None:
                    raise error
                self._check_contact(conn)
                continue
            body = reply_body(conn.socket.recv_multipart(), service)
            if body is not None:
                conn.ledger.received()
                self._reached = True
                conn.reached()
                return body
            # a malformed message or one for another service: not a reply to this request

    def _check_contact(self, conn: _Conn) -> None:
        """Raise BrokerUnreachable when this client never reached the broker and the socket's
        monitor says why; stop monitoring once it (or another thread's socket) has."""
        watch = conn.contact
        if watch is None:
            return
        watch.read()
        if watch.reached or self._reached:
            self._reached = True
            conn.reached()
            return
        waited = time.monotonic() - (self._trying_since or time.monotonic())
        assert self.first_contact_s is not None  # a socket is monitored only with the check on
        why = watch.verdict(waited, self.first_contact_s)
        if why is not None:
            raise contact.unreachable(self.endpoint, why)

    def request_raw(self, service: str | bytes, frames: list[bytes], *, timeout_s: float | None = None,
                    retries: int | None = None) -> list[bytes]:
        """Send frames untouched and return the reply's frames (for echo and MMI)."""
        name = service_bytes(service)
        timeout = self.timeout_s if timeout_s is None else timeout_s
        attempts = 1 + (self.retries if retries is None else retries)
        for _ in range(attempts):
            self._begin_call()
            self._send(name, frames)
            try:
                return self._recv(name, timeout)
            except contact.BrokerUnreachable:
                self._reset()
                raise  # the monitor said why: another attempt would meet the same
            except RequestTimeout:
                self._reset()  # Lazy Pirate: a fresh socket drops any late reply
            except BaseException:
                self._reset()
                raise
        raise self._timeout_error(service_text(name), timeout, attempts)

    def _timeout_error(self, name: str, timeout: float, attempts: int) -> RequestError:
        known: bool | None = True
        if needs_service_check(name):
            try:
                known = self.mmi_service(name, timeout_s=min(timeout, 2.0))
            except RequestTimeout:
                known = None
        return timeout_error(name, self.endpoint, timeout, attempts, known,
                             curve=self.security is not None)

    def request(self, service: str | bytes, body: dict[str, Any], *, timeout_s: float | None = None,
                retries: int | None = None) -> Any:
        """Send one msgpack body; return the reply's result or raise its error."""
        name = service_text(service)
        frames = self.request_raw(service, [encode_body(body, name)], timeout_s=timeout_s,
                                  retries=retries)
        try:
            return decode_reply(frames, name)
        except RequestError as e:
            if is_expiry(e) and needs_service_check(name) and not self.mmi_service(name):
                raise unknown_service(name, self.endpoint) from None
            raise

    def pipeline(self, service: str, bodies: Iterable[dict[str, Any]], *, window: int = P.ARTIFACT_CREDIT,
                 timeout_s: float | None = None) -> Iterator[Any]:
        """Send requests with up to ``window`` in flight (credit-based flow control); yield
        results in order. Only for services that answer in order (the broker's own).

        An error reply, a timeout, or a consumer that stops early ends the pipeline with
        replies still owed; the next call then starts on a fresh socket."""
        name = service_bytes(service)
        timeout = self.timeout_s if timeout_s is None else timeout_s
        self._begin_call()
        pending = 0
        source = iter(bodies)
        exhausted = False
        try:
            while True:
                while not exhausted and pending < window:
                    try:
                        body = next(source)
                    except StopIteration:
                        exhausted = True
                        break
                    self._send(name, [encode_body(body, service)])
                    pending += 1
                if pending == 0:
                    return
                frames = self._recv(name, timeout)
                pending -= 1
                yield decode_reply(frames, service)
        finally:
            if self._owes_replies():
                self._reset()

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
            raise RequestError(f"echo returned {reply!r}, expected {[token]!r}", code=BAD_REPLY)
        return time.perf_counter() - start


class Subscription:
    """Snapshot-then-stream (the Clone pattern): every event on the topics, once, in order.

    Subscribes first, proves the subscription is live with a hello round trip through the
    broker's XPUB, asks for the snapshot, then yields the snapshot's events followed by stream
    events newer than the snapshot's sequence number: no gap, no duplicate. An event of another
    broker ``epoch`` (the broker restarted; its numbers start again) brings a fresh snapshot.

    A dropped connection does too: when the broker restarts or binds its event port afresh (a
    key left its allowed folder), ZeroMQ reconnects by itself but subscribes again only once
    this socket is next used, and the events published meanwhile never arrive; their epoch
    (the same, after a rebind) could not tell. So the socket's monitor is watched for a
    disconnect, after which the subscription is proved live again (a new hello) and a fresh
    snapshot covers what was missed: the latest event of each topic, as for a late viewer.
    """

    def __init__(self, endpoint: str | None, topics: list[str], *, events: str | None = None,
                 context: zmq.Context | None = None, timeout_s: float = 10.0,
                 security: SecurityArg = AUTO) -> None:
        self.ctx = context or zmq.Context.instance()
        self.client = Client(endpoint, timeout_s=timeout_s, context=self.ctx, security=security)
        self.topics = topics or [""]
        self.sub = self.ctx.socket(zmq.SUB)
        self._drops: zmq.Socket | None = None
        try:  # a subscription that cannot start leaves no socket open behind it
            self._start(events, timeout_s)
        except BaseException:
            self.close()
            raise

    def _start(self, events: str | None, timeout_s: float) -> None:
        apply_client(self.sub, self.client.security)
        self.sub.setsockopt(zmq.LINGER, 0)
        self.sub.setsockopt(zmq.RCVHWM, P.SOCKET_HWM)
        for topic in self.topics:
            self.sub.setsockopt(zmq.SUBSCRIBE, topic.encode())
        hello = f"hello.{uuid.uuid4().hex}"
        self.sub.setsockopt(zmq.SUBSCRIBE, hello.encode())
        self.events = events or events_endpoint(self.client.endpoint)
        watch = contact.Contact(self.sub, self.events, curve=self.client.security is not None)
        self.sub.connect(self.events)
        try:
            self._await_hello(hello, timeout_s, watch)
        finally:
            watch.close()
        self.sub.setsockopt(zmq.UNSUBSCRIBE, hello.encode())
        self._pending: list[dict[str, Any]] = []
        # after the first hello: a disconnect from here on means events may have been missed
        self._drops = self.sub.get_monitor_socket(DROPPED, addr=drop_monitor_address())
        self._resync: bytes | None = None  # the hello awaited after a disconnect
        self._held: list[dict[str, Any]] = []  # stream events that came while it was awaited
        self._take_snapshot()

    def _take_snapshot(self) -> None:
        snap = self.client.request(P.SERVICE_EVENTS, {"op": "snapshot", "prefixes": self.topics})
        self.snapshot_seq: int = snap["seq"]
        self.last_seq = self.snapshot_seq
        self.epoch: str | None = snap.get("broker_epoch")
        self._pending.extend(snap["events"])

    def _await_hello(self, hello: str, timeout_s: float, watch: contact.Contact) -> None:
        start = time.monotonic()
        deadline = start + timeout_s
        while True:
            remaining = int((deadline - time.monotonic()) * 1000)
            if remaining <= 0:
                raise RequestTimeout(f"the broker's event port ({self.events}) did not answer "
                                     f"the subscription within {timeout_s:g} s")
            if not self.sub.poll(min(remaining, contact.POLL_MS)):
                watch.read()
                why = watch.verdict(time.monotonic() - start)
                if why is not None:
                    raise contact.unreachable(f"{self.events} (its event port)", why)
                continue
            topic, _ = self.sub.recv_multipart()
            if topic == hello.encode():
                return
            # earlier stream events are covered by the snapshot that follows

    def _dropped(self) -> bool:
        """Whether the monitor saw the connection drop since it was last asked (never blocks)."""
        dropped = False
        while self._drops is not None and self._drops.poll(0):
            self._drops.recv_multipart()
            dropped = True
        return dropped

    def _resynced(self) -> None:
        """The new hello came back: the stream flows again. A fresh snapshot covers the gap;
        the events held meanwhile join it, each once, in order."""
        assert self._resync is not None
        self.sub.setsockopt(zmq.UNSUBSCRIBE, self._resync)
        self._resync, held, self._held = None, self._held, []
        snap = self.client.request(P.SERVICE_EVENTS, {"op": "snapshot", "prefixes": self.topics})
        events, self.last_seq = after_drop(snap, held, self.last_seq, self.epoch)
        self.snapshot_seq, self.epoch = snap["seq"], snap.get("broker_epoch")
        self._pending.extend(events)

    def next(self, timeout_s: float | None = None) -> dict[str, Any] | None:
        """The next event, or None if none arrives within ``timeout_s`` (None: wait forever)."""
        if self._pending:
            return self._pending.pop(0)
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        poller = zmq.Poller()
        poller.register(self.sub, zmq.POLLIN)
        if self._drops is not None:
            poller.register(self._drops, zmq.POLLIN)
        while True:
            if self._dropped() and self._resync is None:  # (always drained: no busy loop)
                self._resync = f"hello.{uuid.uuid4().hex}".encode()
                self.sub.setsockopt(zmq.SUBSCRIBE, self._resync)  # (also makes ZeroMQ resubscribe)
            remaining = -1 if deadline is None else max(0, int((deadline - time.monotonic()) * 1000))
            ready = dict(poller.poll(remaining))
            if self.sub not in ready:
                if not ready:
                    return None
                continue  # the monitor spoke: see above
            frames = self.sub.recv_multipart()
            if len(frames) != 2:
                continue
            if self._resync is not None and frames[0] == self._resync:
                self._resynced()
                if self._pending:
                    return self._pending.pop(0)
                continue
            if frames[0].startswith(b"hello."):
                continue
            try:
                event = unpack(frames[1])
            except DecodeError:
                continue
            if not isinstance(event, dict):
                continue
            if self._resync is not None:
                self._held.append(event)
                continue
            if self.epoch is not None and event.get("broker_epoch", self.epoch) != self.epoch:
                self._take_snapshot()  # the broker restarted: its snapshot holds this event too
                if self._pending:
                    return self._pending.pop(0)
                continue
            if event.get("seq", 0) <= self.last_seq:
                continue  # already in the snapshot, or a duplicate
            self.last_seq = event["seq"]
            return event

    def __iter__(self) -> Iterator[dict[str, Any]]:
        while True:
            event = self.next()
            if event is not None:
                yield event

    def close(self) -> None:
        if self._drops is not None:
            self.sub.disable_monitor()
            self._drops.close(linger=0)
            self._drops = None
        self.sub.close(linger=0)
        self.client.close()

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
