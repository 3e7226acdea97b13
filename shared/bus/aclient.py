"""asyncio client (zmq.asyncio): the same requests and subscriptions as the blocking client, on
the same core (:mod:`distill.shared.bus.core`), for the TUI and for scripts that already run
an event loop."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import zmq
import zmq.asyncio

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
from distill.shared.errors import DecodeError, RequestError, RequestTimeout


class AsyncClient:
    """The asyncio face of the client core: one request at a time per socket (a lock), the
    same reply matching, options, keys (``security``) and error mapping as the blocking
    :class:`Client`."""

    def __init__(self, endpoint: str | None = None, *, timeout_s: float = 10.0, retries: int = 0,
                 context: zmq.asyncio.Context | None = None, security: SecurityArg = AUTO,
                 first_contact_s: float | None = contact.GRACE_S) -> None:
        """``first_contact_s``: as the blocking client's: until this client has reached the
        broker, a request fails with BrokerUnreachable (saying why) as soon as the socket's
        monitor is sure, refusals once they have gone on this long; None: no such check."""
        self.first_contact_s = first_contact_s
        self._reached = first_contact_s is None  # a reply came (or no check is wanted)
        self._trying_since: float | None = None  # the first request sent before that
        self.endpoint = broker_endpoint(endpoint)
        self.security = resolve(security, self.endpoint)
        self.timeout_s = timeout_s
        self.retries = retries
        self.ctx = context or zmq.asyncio.Context.instance()
        self._socket: zmq.asyncio.Socket | None = None
        self._ledger = ReplyLedger()
        self._lock = asyncio.Lock()
        self._abort = asyncio.Event()  # set by abort_pending: the request on its way is lost
        self._abort_reason = ""
        # The socket's monitor until its first reply: a request that times out says why when
        # the monitor knows (refused, no such host, a refused handshake); see contact.py
        self._contact: contact.Contact | None = None
        self._why: str | None = None  # what the last timed-out socket's monitor said

    def _sock(self) -> zmq.asyncio.Socket:
        if not self._ledger.clean:  # an earlier call was cancelled with its reply owed
            self._reset()
        if self._socket is None:
            self._socket = self.ctx.socket(zmq.DEALER)
            configure_dealer(self._socket, self.security)
            self._contact = contact.Contact(self._socket, self.endpoint,
                                            curve=self.security is not None)  # fmt: skip
            self._socket.connect(self.endpoint)
        return self._socket

    def _reset(self) -> None:
        self._drop_contact()
        if self._socket is not None:
            self._socket.close(linger=0)
            self._socket = None
        self._ledger.reset()

    def _drop_contact(self) -> None:
        if self._contact is not None:
            self._contact.close()
            self._contact = None

    def _timed_out(self) -> None:
        """A request's wait ended without a reply: keep what the monitor says, new socket."""
        self._why = None
        if self._contact is not None:
            self._contact.read()
            self._why = self._contact.verdict(waited_s=contact.GRACE_S)
        self._reset()  # Lazy Pirate: a fresh socket drops any late reply

    def close(self) -> None:
        self._reset()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    async def request_raw(self, service: str | bytes, frames: list[bytes], *, timeout_s: float | None = None,
                          retries: int | None = None) -> list[bytes]:
        """Send frames untouched and return the reply's frames (for echo and MMI)."""
        name = service_bytes(service)
        timeout = self.timeout_s if timeout_s is None else timeout_s
        attempts = 1 + (self.retries if retries is None else retries)
        async with self._lock:
            for _ in range(attempts):
                sock = self._sock()
                self._abort.clear()  # an abort is for the request on its way, not a later one
                await sock.send_multipart(request_frames(name, frames))
                self._ledger.sent()
                if self._trying_since is None and not self._reached:
                    self._trying_since = time.monotonic()
                try:
                    body = await self._await_reply(sock, name, timeout)
                except asyncio.TimeoutError:
                    self._timed_out()
                    continue
                except RequestTimeout:  # aborted, or the monitor said why: no reply will come
                    self._reset()
                    raise
                self._ledger.received()
                self._reached = True
                self._drop_contact()
                self._why = None
                return body
        if self._why is not None:  # the monitor knows why: no need to ask mmi.service
            raise contact.unreachable(self.endpoint, self._why)
        raise await self._timeout_error(service_text(name), timeout, attempts)

    async def _await_reply(self, sock: zmq.asyncio.Socket, name: bytes, timeout: float) -> list[bytes]:
        """The reply, or asyncio.TimeoutError after ``timeout``; until the broker has been
        reached, the monitor is read every POLL_MS meanwhile and BrokerUnreachable raised as
        soon as it is sure, as the blocking client does (a request to a broker that is not
        there waited out its whole timeout, 30 s for the UI's, where the blocking client said
        why in 2)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        reply = asyncio.ensure_future(self._recv_or_abort(sock, name))
        try:
            while True:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise asyncio.TimeoutError
                watching = self._contact is not None and not self._reached
                done, _ = await asyncio.wait(
                    {reply}, timeout=min(remaining, contact.POLL_MS / 1000) if watching else remaining)
                if done:
                    return reply.result()
                self._check_contact()
        finally:
            if not reply.done():
                reply.cancel()
                await asyncio.wait({reply})  # its own futures cancelled before the socket goes

    def _check_contact(self) -> None:
        """Raise BrokerUnreachable when this client never reached the broker and the socket's
        monitor says why (the blocking client's ``_check_contact``)."""
        watch = self._contact
        if watch is None or self._reached or self.first_contact_s is None:
            return
        watch.read()
        if watch.reached:
            self._reached = True
            return
        waited = time.monotonic() - (self._trying_since or time.monotonic())
        why = watch.verdict(waited, self.first_contact_s)
        if why is not None:
            raise contact.unreachable(self.endpoint, why)

    def abort_pending(self, reason: str) -> None:
        """Fail the request on its way now with RequestTimeout(``reason``) instead of at its
        timeout: the caller knows its reply is lost (the broker that held it went away; a
        long request waited up to its whole timeout, minutes, for nothing)."""
        self._abort_reason = reason
        self._abort.set()

    async def _recv_or_abort(self, sock: zmq.asyncio.Socket, name: bytes) -> list[bytes]:
        recv = asyncio.ensure_future(self._recv(sock, name))
        abort = asyncio.ensure_future(self._abort.wait())
        try:
            done, _ = await asyncio.wait({recv, abort}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for future in (recv, abort):
                if not future.done():
                    future.cancel()
        if recv in done:
            return recv.result()
        raise RequestTimeout(f"{service_text(name)}: {self._abort_reason}")

    async def _recv(self, sock: zmq.asyncio.Socket, name: bytes) -> list[bytes]:
        while True:
            body = reply_body(list(await sock.recv_multipart()), name)
            if body is not None:
                return body

    async def _timeout_error(self, name: str, timeout: float, attempts: int) -> RequestError:
        known: bool | None = True
        if needs_service_check(name):
            try:
                known = await self.mmi_service(name, timeout_s=min(timeout, 2.0))
            except RequestTimeout:
                known = None
        return timeout_error(name, self.endpoint, timeout, attempts, known,
                             curve=self.security is not None)

    async def request(self, service: str | bytes, body: dict[str, Any], *, timeout_s: float | None = None,
                      retries: int | None = None) -> Any:
        """Send one msgpack body; return the reply's result or raise its error."""
        name = service_text(service)
        frames = await self.request_raw(service, [encode_body(body, service_text(service))],
                                        timeout_s=timeout_s, retries=retries)
        try:
            return decode_reply(frames, name)
        except RequestError as e:
            if is_expiry(e) and needs_service_check(name) and not await self.mmi_service(name):
                raise unknown_service(name, self.endpoint) from None
            raise

    async def mmi_service(self, name: str, *, timeout_s: float | None = None) -> bool:
        reply = await self.request_raw(P.MMI_SERVICE, [name.encode()], timeout_s=timeout_s, retries=0)
        return reply == [P.MMI_FOUND]

    async def subscribe(self, topics: list[str], *, timeout_s: float = 10.0) -> AsyncIterator[dict[str, Any]]:
        """Snapshot, then stream: every event on ``topics`` once, in sequence order; a new
        broker epoch (a restart) brings a fresh snapshot, and so does a dropped connection (see
        :func:`~distill.shared.bus.core.after_drop`)."""
        sub = self.ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.LINGER, 0)
        apply_client(sub, self.security)
        prefixes = topics or [""]
        for topic in prefixes:
            sub.setsockopt(zmq.SUBSCRIBE, topic.encode())
        hello = f"hello.{uuid.uuid4().hex}".encode()
        sub.setsockopt(zmq.SUBSCRIBE, hello)
        sub.connect(events_endpoint(self.endpoint))
        drops: zmq.asyncio.Socket | None = None
        try:
            await asyncio.wait_for(_await_topic(sub, hello), timeout_s)
            sub.setsockopt(zmq.UNSUBSCRIBE, hello)
            drops = sub.get_monitor_socket(DROPPED, addr=drop_monitor_address())
            poller = zmq.asyncio.Poller()
            poller.register(sub, zmq.POLLIN)
            poller.register(drops, zmq.POLLIN)
            snap = await self.request(P.SERVICE_EVENTS, {"op": "snapshot", "prefixes": prefixes})
            last, epoch = int(snap["seq"]), snap.get("broker_epoch")
            for event in snap["events"]:
                yield event
            resync: bytes | None = None  # the hello awaited after a drop
            held: list[dict[str, Any]] = []  # what the stream brought meanwhile
            while True:
                ready = dict(await poller.poll())
                if drops in ready:
                    await _drain(drops)
                    if resync is None:
                        resync = f"hello.{uuid.uuid4().hex}".encode()
                        sub.setsockopt(zmq.SUBSCRIBE, resync)
                if sub not in ready:
                    continue
                frames = await sub.recv_multipart()
                if len(frames) != 2:
                    continue
                if resync is not None and frames[0] == resync:
                    sub.setsockopt(zmq.UNSUBSCRIBE, resync)
                    resync, kept, held = None, held, []
                    snap = await self.request(P.SERVICE_EVENTS, {"op": "snapshot", "prefixes": prefixes})
                    events, last = after_drop(snap, kept, last, epoch)
                    epoch = snap.get("broker_epoch")
                    for event in events:
                        yield event
                    continue
                if frames[0].startswith(b"hello."):
                    continue
                try:
                    event = unpack(frames[1])
                except DecodeError:
                    continue
                if not isinstance(event, dict):
                    continue
                if resync is not None:
                    held.append(event)
                elif epoch is not None and event.get("broker_epoch", epoch) != epoch:
                    # The broker restarted (its numbers start again): a fresh snapshot holds this.
                    snap = await self.request(P.SERVICE_EVENTS, {"op": "snapshot", "prefixes": prefixes})
                    last, epoch = int(snap["seq"]), snap.get("broker_epoch")
                    for event in snap["events"]:
                        yield event
                elif event.get("seq", 0) > last:
                    last = event["seq"]
                    yield event
        except asyncio.TimeoutError:
            raise RequestTimeout(f"the broker's event port at {self.endpoint} did not answer") from None
        finally:
            if drops is not None:
                sub.disable_monitor()
                drops.close(linger=0)
            sub.close(linger=0)


async def _drain(sock: zmq.asyncio.Socket) -> None:
    """Take every message ``sock`` holds now (never waits)."""
    while True:
        try:
            await sock.recv_multipart(flags=zmq.NOBLOCK)
        except zmq.Again:
            return


async def _await_topic(sub: zmq.asyncio.Socket, topic: bytes) -> None:
    start = time.monotonic()
    while True:
        frames = await sub.recv_multipart()
        if frames and frames[0] == topic:
            return
        if time.monotonic() - start > 3600:  # pragma: no cover - wait_for bounds this
            return
