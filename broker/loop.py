"""The broker's socket loop: MDP/0.1 (RFC 7) on one ROUTER for clients and workers, MMI
(RFC 8), heartbeats both ways, and the event stream (XSUB in, stamped, XPUB out).

The loop only moves frames. Bookkeeping lives in :class:`~distill.broker.registry.Registry`
(workers, requests) and :class:`~distill.broker.hub.EventHub` (sequence numbers, latest
state); the services the broker hosts (``broker/services/``) are attached to
:attr:`Broker.internal` and :attr:`Broker.jobs` by ``broker/main.py``, and this loop calls
them. Nothing a peer sends can stop the loop: every malformed frame sequence is dropped or
answered with an error reply.

With :attr:`BrokerConfig.security` set, all three sockets are CURVE servers behind a ZAP
authenticator (``broker/access.py``): each message then carries its peer's public key
(``User-Id``), and the loop asks the key ring for that key's roles before acting on it.
"""

from __future__ import annotations

import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import zmq
from zmq.utils.monitor import recv_monitor_message

from distill.broker.access import (
    DOMAIN_EVENTS_IN,
    DOMAIN_EVENTS_OUT,
    DOMAIN_MDP,
    KeyRing,
    Limits,
    OutstandingCounter,
    make_curve_server,
    may_publish,
    start_authenticator,
)
from distill.broker.hub import EventHub
from distill.broker.registry import (
    MAX_QUEUED_WITHOUT_WORKER,
    MAX_REDELIVERIES,
    ClientOrigin,
    JobOrigin,
    Registry,
    Request,
    WorkerEntry,
)
from distill.broker.services.common import error_body
from distill.broker.services.periodic import Periodic
from distill.shared.bus import protocol as P
from distill.shared.bus.codec import pack, unpack_map
from distill.shared.bus.messages import WorkerMeta
from distill.shared.bus.security import (
    ROLE_ADMIN,
    ROLE_CLIENT,
    ROLE_WORKER,
    BrokerSecurity,
    check_exposure,
)
from distill.shared.errors import (
    BAD_REQUEST,
    ERROR,
    EXPIRED,
    INTERNAL,
    WORKER_LOST,
    ConfigError,
    DecodeError,
    DistillError,
    code_of,
)
from distill.shared.ids import unprintable
from distill.shared.logs import Repeats, get_logger
from distill.shared.version import distill_version

log = get_logger("broker")

InternalHandler = Callable[[bytes, list[bytes]], "list[bytes] | None"]
ENV_MAX_QUEUED = "DISTILL_MAX_QUEUED_WITHOUT_WORKER"
# Body bytes of client requests the broker holds for workers (queued or being served), per
# client and in all: a request is at most a message (16 MiB), so a client has 8 at once.
MAX_HELD_BYTES_PER_CLIENT = 128 * 1024 * 1024
MAX_HELD_BYTES = 512 * 1024 * 1024
MAX_WORKER_META_BYTES = 16 * 1024  # a worker's READY metadata (ours: well under 1 KiB)
KEYRING_CHECK_S = 1.0  # how often the loop looks for changes in the allowed keys folder
REVOKED_CLIENT = ("this client's key was removed from the broker's allowed folder: the broker "
                  "serves it no more (a new key: `distill keys add` on the broker's key folder)")
REBIND_ATTEMPTS, REBIND_WAIT_S = 40, 0.025  # up to 1 s for a closed port to be free again
HANDSHAKE_FAILURES = (zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                      | zmq.EVENT_HANDSHAKE_FAILED_AUTH)


class JobHooks(Protocol):
    """What the loop calls on the job manager (``services.jobs.JobService``)."""

    def on_dispatched(self, job_id: str, worker: WorkerEntry) -> None: ...
    def on_reply(self, job_id: str, frames: list[bytes], worker: WorkerEntry) -> None: ...
    def on_lost(self, job_id: str, reason: str) -> None: ...
    def tick(self, now: float) -> None: ...


@dataclass(frozen=True)
class BrokerConfig:
    host: str = P.DEFAULT_HOST  # loopback unless told: without CURVE anyone who reaches it may act
    port: int = P.PORT_MDP  # events go out on port + 1 (XPUB) and come in on port + 2 (XSUB)
    heartbeat_interval_s: float = P.HEARTBEAT_INTERVAL_S
    heartbeat_liveness: int = P.HEARTBEAT_LIVENESS
    request_timeout_s: float = P.REQUEST_TIMEOUT_S
    max_message_bytes: int = P.MAX_MESSAGE_BYTES
    data_dir: Path = field(default_factory=lambda: Path.home() / ".local/share/distill/broker")
    security: BrokerSecurity | None = None  # CURVE + roles on all sockets; None: plain
    insecure: bool = False  # allow a non-loopback host without CURVE (warned on every start)
    limits: Limits = Limits()
    # Client requests waiting for a service with no worker (see registry.py for the reason).
    max_queued_without_worker: int = field(default_factory=lambda: queued_cap_from_env(os.environ))

    @property
    def events_out_port(self) -> int:
        return self.port + (P.PORT_EVENTS_OUT - P.PORT_MDP)

    @property
    def events_in_port(self) -> int:
        return self.port + (P.PORT_EVENTS_IN - P.PORT_MDP)

    def endpoint(self, port: int) -> str:
        return f"tcp://{self.host}:{port}"


def queued_cap_from_env(env: Mapping[str, str]) -> int:
    """``DISTILL_MAX_QUEUED_WITHOUT_WORKER``, or the default."""
    raw = env.get(ENV_MAX_QUEUED)
    if raw is None or raw == "":
        return MAX_QUEUED_WITHOUT_WORKER
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise ConfigError(f"{ENV_MAX_QUEUED}={raw!r}: expected a whole number of requests, at "
                          "least 1")
    return value


def _protocol_error_name(value: int) -> str:
    """ZeroMQ's name for a handshake's protocol error (``ZMTP_CRYPTOGRAPHIC``: a peer with
    the wrong server key), else its number."""
    for name in dir(zmq):
        if name.startswith("PROTOCOL_ERROR_") and getattr(zmq, name) == value:
            return name.removeprefix("PROTOCOL_ERROR_")
    return str(value)


class Broker:
    def __init__(self, config: BrokerConfig, context: zmq.Context | None = None) -> None:
        self.config = config
        self.ctx = context or zmq.Context.instance()
        self.registry = Registry(config.heartbeat_interval_s * config.heartbeat_liveness,
                                 config.max_queued_without_worker)
        self.hub = EventHub()
        self.internal: dict[bytes, InternalHandler] = {}  # service name -> handler
        self.jobs: JobHooks | None = None
        self.event_listeners: list[Callable[[str, dict[str, Any]], None]] = []
        self.dropped = 0  # malformed messages dropped or refused, for tests and stats
        self._keyring_version = 0
        self._known_keys: frozenset[bytes] = frozenset()  # allowed at the last folder check
        self._sockets_open = False
        self.keyring = KeyRing(config.security.allowed_dir) if config.security else None
        self.auth: Any = None
        self.outstanding = OutstandingCounter(config.limits.max_outstanding)
        self._owners: dict[int, tuple[bytes, int]] = {}  # request id -> owner, body bytes
        self._held_bytes: Counter[bytes] = Counter()  # body bytes of each owner's requests held
        self.held_bytes = 0  # of all clients' requests, queued or on workers
        self._worker_keys: dict[bytes, bytes] = {}  # worker identity -> its public key
        # The key (or, without CURVE, the socket identity) of the peer whose message is being
        # handled now: what internal services charge quotas to.
        self.current_owner = b""
        self.current_roles: frozenset[str] | None = None  # the sender's, under CURVE
        self.timers = Periodic()  # the loop's own upkeep: expiry, heartbeats, key ring, jobs
        self._drop_repeats = Repeats()  # malformed messages, by kind
        self._send_repeats = Repeats()  # replies that could not be sent, by reason
        self._handshake_repeats = Repeats()  # failed handshakes: logged once a minute each
        self._add_timers()

    # --- sockets -----------------------------------------------------------------------------
    def bind(self) -> None:
        c = self.config
        check_exposure(c.host, secure=c.security is not None, insecure=c.insecure)
        if self.keyring is not None:
            self.keyring.refresh()
            self.auth = start_authenticator(self.ctx, self.keyring)
        self.router = self.ctx.socket(zmq.ROUTER)
        self._secure(self.router, DOMAIN_MDP)
        # Options apply only to later bind/connect calls: set them first.
        self.router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.router.setsockopt(zmq.MAXMSGSIZE, c.max_message_bytes)
        self.router.setsockopt(zmq.SNDHWM, P.SOCKET_HWM)
        self.router.setsockopt(zmq.RCVHWM, P.SOCKET_HWM)
        self.router.setsockopt(zmq.LINGER, 0)
        self._bind(self.router, c.port, "its MDP port")
        self.xsub = self.ctx.socket(zmq.XSUB)
        self._secure(self.xsub, DOMAIN_EVENTS_IN)
        self.xsub.setsockopt(zmq.MAXMSGSIZE, c.max_message_bytes)
        self.xsub.setsockopt(zmq.RCVHWM, P.SOCKET_HWM)
        self.xsub.setsockopt(zmq.LINGER, 0)
        self._bind(self.xsub, c.events_in_port, "its events-in port (--port + 2)")
        self.xsub.send(b"\x01")  # subscribe to everything workers publish
        self.xpub = self._events_out_socket()
        self._bind(self.xpub, c.events_out_port, "its events-out port (--port + 1)")
        self.poller = zmq.Poller()
        for sock in (self.router, self.xsub, self.xpub):
            self.poller.register(sock, zmq.POLLIN)
        # Handshake failures (no CURVE, a wrong server key, a refused key) never reach the
        # loop as messages; the monitors make them visible in the log.
        named = ((self.router, "mdp"), (self.xsub, "events_in"), (self.xpub, "events_out"))
        self.monitors = {sock.get_monitor_socket(HANDSHAKE_FAILURES): name for sock, name in named}
        for monitor in self.monitors:
            self.poller.register(monitor, zmq.POLLIN)
        self._sockets_open = True
        log.info("broker_bound", mdp=c.endpoint(c.port), events_out=c.endpoint(c.events_out_port),
                 events_in=c.endpoint(c.events_in_port), curve=c.security is not None)

    def _bind(self, sock: zmq.Socket, port: int, what: str) -> None:
        """Bind ``sock``; a port another process holds is a DistillError naming it (the sockets
        bound so far are closed), not a ZMQError traceback."""
        endpoint = self.config.endpoint(port)
        try:
            sock.bind(endpoint)
        except zmq.ZMQError as e:
            for name in ("router", "xsub", "xpub"):  # the ones made so far
                other = getattr(self, name, None)
                if other is not None:
                    other.close(linger=0)
            if self.auth is not None:
                self.auth.stop()
                self.auth = None
            reason = ("another process listens there (is a `distill up` or `distill broker` "
                      "already running? stop it, or choose another --port)"
                      if e.errno == zmq.EADDRINUSE else str(e))
            raise DistillError(f"the broker cannot bind {what} {endpoint}: {reason}") from None

    def _events_out_socket(self) -> zmq.Socket:
        xpub = self.ctx.socket(zmq.XPUB)
        self._secure(xpub, DOMAIN_EVENTS_OUT)
        xpub.setsockopt(zmq.XPUB_VERBOSE, 1)  # see every subscribe, for hello handshakes
        xpub.setsockopt(zmq.SNDHWM, P.SOCKET_HWM)
        xpub.setsockopt(zmq.LINGER, 0)
        return xpub

    def _rebind_events_out(self) -> None:
        """Make every subscriber hand-shake again (a key was revoked).

        A bound socket cannot drop one peer, and a subscriber sends nothing after subscribing,
        so a revoked key's subscription would live as long as its TCP connection. A fresh XPUB
        on the same port closes them all; subscribers reconnect on their own (events in the gap
        are lost to them, as in any reconnect) and the revoked key fails its new handshake."""
        c = self.config
        old = self.xpub
        for monitor, name in list(self.monitors.items()):
            if name == "events_out":
                self.poller.unregister(monitor)
                old.disable_monitor()
                monitor.close(linger=0)
                del self.monitors[monitor]
        self.poller.unregister(old)
        old.close(linger=0)
        self.xpub = self._events_out_socket()
        for _ in range(REBIND_ATTEMPTS):  # the old socket's close completes asynchronously
            try:
                self.xpub.bind(c.endpoint(c.events_out_port))
                break
            except zmq.ZMQError as e:
                if e.errno != zmq.EADDRINUSE:
                    raise
                time.sleep(REBIND_WAIT_S)
        else:
            raise DistillError(f"could not bind the events port {c.events_out_port} again after "
                               "revoking a key")
        self.poller.register(self.xpub, zmq.POLLIN)
        monitor = self.xpub.get_monitor_socket(HANDSHAKE_FAILURES)
        self.monitors[monitor] = "events_out"
        self.poller.register(monitor, zmq.POLLIN)
        log.info("events_out_rebound", reason="a key was removed from the allowed folder")

    def _secure(self, sock: zmq.Socket, domain: str) -> None:
        if self.config.security is not None:
            make_curve_server(sock, self.config.security, domain)

    def close(self) -> None:
        if self._sockets_open:
            for sock in (self.router, self.xsub, self.xpub):
                sock.disable_monitor()
                sock.close(linger=0)
            for monitor in self.monitors:
                monitor.close(linger=0)
            self._sockets_open = False
        if self.auth is not None:
            self.auth.stop()
            self.auth = None

    # --- loop --------------------------------------------------------------------------------
    def run(self, stop: threading.Event | None = None) -> None:
        if not self._sockets_open:
            self.bind()
        self.publish("broker", {"type": "started", "pid": os.getpid()})
        try:
            while stop is None or not stop.is_set():
                self.step(timeout_ms=100)
        finally:
            self.close()

    def step(self, timeout_ms: int = 100) -> None:
        """One iteration: read what is ready, then run the timers."""
        events = dict(self.poller.poll(timeout_ms))
        if self.router in events:
            self._drain(self.router, self._on_router)
        if self.xsub in events:
            self._drain(self.xsub, self._on_event_in)
        if self.xpub in events:
            self._drain(self.xpub, self._on_subscription)
        for monitor, name in self.monitors.items():
            if monitor in events:
                self._on_monitor(monitor, name)
        self._timers(time.monotonic())

    def _receive(self, sock: zmq.Socket) -> tuple[list[bytes], bytes | None]:
        """One message and, with CURVE, its sender's public key (z85) from the ZAP User-Id."""
        if self.keyring is None:
            return sock.recv_multipart(zmq.NOBLOCK), None
        parts = sock.recv_multipart(zmq.NOBLOCK, copy=False)
        frames = [p.bytes for p in parts]
        if sock is self.xpub:
            return frames, None  # subscriptions need no key (and may carry no metadata)
        try:  # every frame of a message carries its session's metadata
            key = parts[-1].get("User-Id")
        except zmq.ZMQError:
            return frames, None  # no metadata: refused as a peer without a key
        return frames, str(key).encode() if key else None

    def _drain(self, sock: zmq.Socket, handle: Callable[[list[bytes], bytes | None], None],
               limit: int = 1000) -> None:
        for _ in range(limit):
            try:
                frames, key = self._receive(sock)
            except zmq.Again:
                return
            try:
                handle(frames, key)
            except Exception as e:  # the loop must survive anything a peer sends
                self.dropped += 1
                log.warning("message_dropped", reason=repr(e), frames=len(frames))

    def _on_monitor(self, monitor: zmq.Socket, name: str) -> None:
        while monitor.poll(0):
            try:
                event = recv_monitor_message(monitor)
            except (zmq.ZMQError, ValueError) as e:  # unreadable: only a log line is lost
                log.info("monitor_message_unreadable", socket=name, reason=str(e))
                return
            kind, value = int(event["event"]), int(event["value"])
            reason = "refused by ZAP" if kind == zmq.EVENT_HANDSHAKE_FAILED_AUTH else (
                f"protocol error {_protocol_error_name(value)}"
                if kind == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL else zmq.strerror(value))
            held = self._handshake_repeats.due((name, reason))
            if held is None:  # a peer retrying a refused handshake: once a minute is enough
                continue
            log.warning("handshake_failed", socket=name, reason=reason, held_back=held,
                        endpoint=bytes(event.get("endpoint") or b"").decode(errors="replace"))

    def _check_keyring(self, now: float) -> None:
        """Pick up a changed allowed folder; disconnect workers whose key lost the worker role."""
        if self.keyring is None:
            return
        self.keyring.refresh()
        if self.keyring.version == self._keyring_version:
            return
        self._keyring_version = self.keyring.version
        allowed = self.keyring.keys()
        if self._sockets_open and self._known_keys - allowed:
            self._rebind_events_out()
        self._known_keys = allowed
        for identity, key in list(self._worker_keys.items()):
            if ROLE_WORKER not in self.keyring.roles(key):
                log.warning("worker_key_revoked", key=key.decode(errors="replace"))
                self._remove_worker(identity, "its key was removed from the allowed folder",
                                    disconnect=True)

    def _add_timers(self) -> None:
        """The loop's own upkeep, each task guarded by :class:`Periodic` (logged with its
        traceback, counted, tried again next time): a bug or a full disk in one of them must
        not end the loop or stop the others."""
        # Expiry scans run a few times per heartbeat interval, not on every message: under load
        # the loop turns thousands of times a second.
        scan_s = min(0.05, self.config.heartbeat_interval_s / 4)
        self.timers.add("keyring_check", KEYRING_CHECK_S, self._check_keyring)
        self.timers.add("worker_expiry", scan_s, self._expire_workers)
        self.timers.add("request_expiry", scan_s, self._expire_requests)
        self.timers.add("jobs_tick", scan_s, self._jobs_tick)
        self.timers.add("heartbeats", self.config.heartbeat_interval_s, self._send_heartbeats)

    def _timers(self, now: float) -> None:
        self.timers.tick(now)

    def _expire_workers(self, now: float) -> None:
        for worker in self.registry.expired_workers(now):
            log.warning("worker_expired", worker=worker.worker_id,
                        service=worker.service.decode(errors="replace"))
            try:
                self._remove_worker(worker.identity, "worker stopped heartbeating",
                                    disconnect=False)
            except Exception as e:  # the worker is forgotten all the same; its request answered
                log.exception("worker_expiry_failed", worker=worker.worker_id)
                request = self.registry.remove(worker.identity) or worker.current
                if request is not None:
                    self._answer_after_failure(request, e)

    def _expire_requests(self, now: float) -> None:
        for request in self.registry.expire_requests(now):
            try:
                self._fail_request(request, EXPIRED, self._expiry_message(request))
            except Exception as e:  # already off its queue: it must still get an answer
                log.exception("request_expiry_failed", request=request.id)
                self._answer_after_failure(request, e)

    def _answer_after_failure(self, request: Request, error: Exception) -> None:
        """An ``internal`` error reply for a request a timer dropped while handling it, so that
        its client hears at once instead of waiting out its own timeout."""
        reason = f"{type(error).__name__}: {error}"
        try:
            if isinstance(request.origin, ClientOrigin):
                self._release(request)
                name = request.service.decode(errors="replace")
                self._send_client(request.origin.identity, request.service, error_body(
                    INTERNAL, f"the broker failed while handling this request to {name!r}: "
                              f"{reason}"))
            elif self.jobs is not None:
                self.jobs.on_lost(request.origin.job_id, f"broker error: {reason}")
        except Exception:  # the last resort failed too: the other requests still get theirs
            log.exception("error_reply_failed", request=request.id)

    def _jobs_tick(self, now: float) -> None:
        if self.jobs is not None:
            self.jobs.tick(now)

    def _send_heartbeats(self, now: float) -> None:
        for identity in list(self.registry.workers):
            self._send_worker(identity, [P.W_HEARTBEAT])

    def _expiry_message(self, request: Request) -> str:
        name = request.service.decode(errors="replace")
        if not self.registry.has_workers(request.service):
            return f"no worker for service {name!r} came within {self.config.request_timeout_s:g} s"
        return f"service {name!r} did not take the request within {self.config.request_timeout_s:g} s"

    # --- ROUTER ------------------------------------------------------------------------------
    def _roles(self, key: bytes | None) -> frozenset[str] | None:
        """The sender's roles with CURVE (empty: revoked since its handshake); None without."""
        if self.keyring is None:
            return None
        return self.keyring.roles(key) if key else frozenset()

    def caller_is_worker(self) -> bool:
        """Whether the message being handled came with a worker key (always, without CURVE)."""
        return self.current_roles is None or ROLE_WORKER in self.current_roles

    def caller_is_client(self) -> bool:
        """Whether the message being handled came with a client key (always, without CURVE)."""
        return self.current_roles is None or ROLE_CLIENT in self.current_roles

    def caller_key(self) -> str | None:
        """The z85 public key of the message being handled (None without CURVE): a job's
        owner."""
        if self.current_roles is None:
            return None
        return self.current_owner.decode(errors="replace")

    def caller_is_admin(self) -> bool:
        """Whether the message being handled came with an admin key (never, without CURVE:
        there no job has an owner to guard)."""
        return self.current_roles is not None and ROLE_ADMIN in self.current_roles

    def key_is_client(self, key: str) -> bool:
        """Whether the z85 public key ``key`` has the client role now (False once its file
        left the allowed folder)."""
        return self.keyring is not None and ROLE_CLIENT in self.keyring.roles(key.encode())

    def key_file(self, key: str) -> str | None:
        """The allowed file that holds the z85 public key ``key`` (``clients/laptop.key``)."""
        return self.keyring.file_of(key) if self.keyring is not None else None

    def describe_key(self, key: str) -> str:
        """A z85 public key as its errors name it: its allowed file, if any, and the key."""
        return self.keyring.describe(key) if self.keyring is not None else key

    def _on_router(self, frames: list[bytes], key: bytes | None = None) -> None:
        # the longest envelope is a worker's reply: identity, empty, MDPW, REPLY, client, empty
        if len(frames) < 3 or len(frames) > P.MAX_FRAMES + 6 or frames[1] != b"":
            self._malformed("not an MDP envelope (identity, empty frame, header, ...)", frames)
            return
        identity, header = frames[0], frames[2]
        roles = self._roles(key)
        if roles is not None and not roles:
            self.dropped += 1
            log.warning("message_refused", key=(key or b"").decode(errors="replace"),
                        reason="key no longer allowed")
            if header == P.MDPC and len(frames) > 4:  # a client is told, not left to its timeout
                self._send_client(identity, frames[3], error_body(ERROR, REVOKED_CLIENT))
            if identity in self.registry.workers:
                self._remove_worker(identity, "its key was removed from the allowed folder",
                                    disconnect=True)
            return
        self.current_owner = key or identity
        self.current_roles = roles
        if header == P.MDPC:
            self._on_client(identity, frames[3:])
        elif header == P.MDPW:
            if (roles is not None and ROLE_WORKER not in roles
                    and identity not in self.registry.workers):
                self._refuse_worker(identity, key, frames[3:])
                return
            self._on_worker(identity, frames[3:])
            if key is not None and identity in self.registry.workers:
                self._worker_keys[identity] = key  # to disconnect it if the key is revoked
        else:
            self._malformed("its header is neither MDPC01 nor MDPW01", frames)

    def _malformed(self, what: str, frames: list[bytes]) -> None:
        """Drop a message that is not MDP (no reply could reach its sender as one), said in
        the log once a minute for each kind, with how many were held back."""
        self.dropped += 1
        held = self._drop_repeats.due(what)
        if held is not None:
            log.warning("message_dropped", reason=what, held_back=held,
                        peer=frames[0].hex()[:32] if frames else None)

    def _refuse_worker(self, identity: bytes, key: bytes | None, frames: list[bytes]) -> None:
        """A client key tried to act as a worker: never registered, told to go away."""
        self.dropped += 1
        if frames[:1] == [P.W_READY]:
            log.warning("worker_refused", key=(key or b"").decode(errors="replace"),
                        service=(frames[1] if len(frames) > 1 else b"").decode(errors="replace"),
                        reason="not a worker key")
        if frames[:1] != [P.W_DISCONNECT]:
            self._send([identity, b"", P.MDPW, P.W_DISCONNECT])

    def _on_client(self, identity: bytes, frames: list[bytes]) -> None:
        if not frames:  # no service frame: a reply would not be an MDP reply
            self._malformed("an MDP request without a service frame", [identity])
            return
        service, body = frames[0], frames[1:]
        problem = (
            "MDP request has an empty service frame" if not service else
            f"MDP request's service name is {len(service)} bytes (at most "
            f"{P.MAX_SERVICE_NAME_BYTES})" if len(service) > P.MAX_SERVICE_NAME_BYTES else
            "MDP request has no body frame" if not body else
            f"MDP request has {len(body)} body frames (at most {P.MAX_FRAMES})"
            if len(body) > P.MAX_FRAMES else None
        )  # fmt: skip
        if problem is not None:  # answered at once: its client need not wait out its timeout
            self.dropped += 1
            self._send_client(identity, service, error_body(BAD_REQUEST, problem))
            return
        if service.startswith(P.MMI_PREFIX):
            self._send_client(identity, service, [self._mmi(service, body)])
        elif service in self.internal:
            self._serve_internal(identity, service, body)
        elif (refusal := self.registry.refusal(service)) is not None:
            self._send_client(identity, service, error_body(ERROR, refusal))
        else:
            owner = self.current_owner
            size = sum(len(frame) for frame in body)
            if (refusal := self._bytes_refusal(owner, size)) is not None:
                self._send_client(identity, service, error_body(ERROR, refusal))
                return
            if not self.outstanding.admit(owner):
                self._send_client(identity, service, error_body(
                    ERROR, f"too many requests in flight: this client already has "
                           f"{self.outstanding.limit} requests queued or running on workers "
                           "(wait for replies before sending more)"))
                return
            now = time.monotonic()
            request = self.registry.new_request(
                service, body, ClientOrigin(identity), now, self.config.request_timeout_s)
            self._owners[request.id] = (owner, size)
            self._held_bytes[owner] += size
            self.held_bytes += size
            self.registry.enqueue(request)
            self._dispatch(service)

    def _bytes_refusal(self, owner: bytes, size: int) -> str | None:
        """Why a request of ``size`` body bytes may not be held now, or None. The count caps
        alone let 30 requests of 10 MB to a service with no worker hold 300 MB until they
        expired, and a client without CURVE is a new owner with every socket."""
        mib = 1024 * 1024
        if self._held_bytes[owner] + size > MAX_HELD_BYTES_PER_CLIENT:
            return (f"too much in flight: this client's requests waiting or running on workers "
                    f"already hold {self._held_bytes[owner] / mib:.0f} MiB (at most "
                    f"{MAX_HELD_BYTES_PER_CLIENT // mib} MiB): wait for replies before sending more")
        if self.held_bytes + size > MAX_HELD_BYTES:
            return (f"the broker is holding {self.held_bytes / mib:.0f} MiB of requests for "
                    f"workers (at most {MAX_HELD_BYTES // mib} MiB): try again when they have "
                    "been served")  # fmt: skip
        return None

    def _release(self, request: Request) -> None:
        held = self._owners.pop(request.id, None)
        if held is not None:
            owner, size = held
            self.outstanding.release(owner)
            self._held_bytes[owner] -= size
            if self._held_bytes[owner] <= 0:
                del self._held_bytes[owner]
            self.held_bytes -= size

    def _mmi(self, service: bytes, body: list[bytes]) -> bytes:
        if service != P.MMI_SERVICE:
            return P.MMI_NOT_IMPLEMENTED
        asked = body[0]
        found = asked in self.internal or self.registry.has_workers(asked)
        return P.MMI_FOUND if found else P.MMI_NOT_FOUND

    def _serve_internal(self, identity: bytes, service: bytes, body: list[bytes]) -> None:
        try:
            reply = self.internal[service](identity, body)
        except DecodeError as e:
            self.dropped += 1
            reply = error_body(code_of(e), str(e))
        except DistillError as e:
            reply = error_body(code_of(e), str(e))
        except Exception as e:
            log.exception("internal_service_error", service=service.decode(errors="replace"))
            reply = error_body(INTERNAL, f"{type(e).__name__}: {e}")
        if reply is not None:  # None: the handler answers later (long poll)
            self._send_client(identity, service, reply)

    # --- workers -----------------------------------------------------------------------------
    def _on_worker(self, identity: bytes, frames: list[bytes]) -> None:
        if not frames or frames[0] not in P.WORKER_COMMANDS:
            self._malformed("a worker message without a known command", [identity])
            if identity in self.registry.workers:
                self._remove_worker(identity, "sent an invalid command", disconnect=True)
            return
        command, rest = frames[0], frames[1:]
        now = time.monotonic()
        registered = identity in self.registry.workers
        if command == P.W_READY:
            self._on_ready(identity, rest, registered, now)
        elif not registered:
            # RFC 7: any command other than READY from an unknown peer gets DISCONNECT.
            if command != P.W_DISCONNECT:
                self._send_worker(identity, [P.W_DISCONNECT])
        elif command == P.W_REPLY:
            self.registry.touch(identity, now)
            self._on_reply(identity, rest)
        elif command == P.W_HEARTBEAT:
            self.registry.touch(identity, now)
        elif command == P.W_DISCONNECT:
            self._remove_worker(identity, "worker disconnected", disconnect=False)
        else:  # REQUEST is broker -> worker only
            self.dropped += 1
            self._remove_worker(identity, "sent REQUEST to the broker", disconnect=True)

    def _on_ready(self, identity: bytes, rest: list[bytes], registered: bool, now: float) -> None:
        if registered:  # RFC 7: a second READY is a protocol error
            self._remove_worker(identity, "sent READY twice", disconnect=True)
            return
        service = rest[0] if rest else b""
        if (not service or len(service) > P.MAX_SERVICE_NAME_BYTES or len(rest) > 2
                or service.startswith(P.MMI_PREFIX) or service in self.internal):
            self.dropped += 1
            self._send_worker(identity, [P.W_DISCONNECT])
            return
        try:
            bad = unprintable(service.decode("utf-8"))
        except UnicodeDecodeError:
            bad = "bytes that are not UTF-8"
        if bad is not None:  # it would reach every `distill workers` table as it is
            self.dropped += 1
            log.warning("worker_refused", service=service.decode(errors="replace"),
                        reason=f"its service name holds {bad}")
            self._send_worker(identity, [P.W_DISCONNECT])
            return
        meta: dict[str, Any] = {}
        if len(rest) == 2 and len(rest[1]) > MAX_WORKER_META_BYTES:
            # it rides on every `distill.workers` reply and worker event: nine megabytes of
            # it made that reply too big for any client
            log.warning("worker_metadata_ignored", service=service.decode(errors="replace"),
                        reason=f"{len(rest[1])} bytes, over {MAX_WORKER_META_BYTES}")
        elif len(rest) == 2:
            try:
                known = WorkerMeta.decode(rest[1])  # validates the fields we read
                meta = {**unpack_map(rest[1]), **known.to_map()}
            except DecodeError as e:
                log.warning("worker_metadata_ignored", reason=str(e))
        entry = self.registry.register(identity, service, meta, now)
        log.info("worker_ready", worker=entry.worker_id, service=service.decode(errors="replace"),
                 host=meta.get("host"), device=meta.get("device"))
        versions = meta.get("versions")
        theirs = versions.get("distill") if isinstance(versions, dict) else None
        if theirs is not None and distill_version() is not None and theirs != distill_version():
            # mixed versions mostly work (unknown fields are ignored, missing ones defaulted),
            # but a worker older than what it is given fails jobs with "written by a newer
            # Distill": this line, and `distill workers`, say which worker
            log.warning("worker_version_differs", worker=entry.worker_id, host=meta.get("host"),
                        service=service.decode(errors="replace"), worker_version=theirs,
                        broker_version=distill_version())
        self.publish(f"worker.{entry.worker_id}", {"type": "ready", **entry.describe(now)})
        self._dispatch(service)

    def _on_reply(self, identity: bytes, rest: list[bytes]) -> None:
        worker = self.registry.workers[identity]
        if worker.current is None:
            self.dropped += 1  # a reply to nothing (late, or invented): drop it
            return
        if len(rest) < 3 or rest[1] != b"" or rest[0] != worker.current.reply_address:
            self.dropped += 1
            self._remove_worker(identity, "sent a malformed REPLY", disconnect=True)
            return
        request = self.registry.complete(identity)
        assert request is not None
        body = rest[2:]
        if isinstance(request.origin, ClientOrigin):
            self._release(request)
            self._send_client(request.origin.identity, request.service, body)
        else:
            if self.jobs is not None:
                self.jobs.on_reply(request.origin.job_id, body, worker)
            # Worker state events for jobs only: short direct requests would flood the stream.
            self.publish(f"worker.{worker.worker_id}", {"type": "idle", **worker.describe(time.monotonic())})
        self._dispatch(worker.service)

    def _remove_worker(self, identity: bytes, reason: str, *, disconnect: bool) -> None:
        entry = self.registry.workers.get(identity)
        self._worker_keys.pop(identity, None)
        if disconnect:
            self._send_worker(identity, [P.W_DISCONNECT])
        request = self.registry.remove(identity)
        if entry is not None:
            self.publish(f"worker.{entry.worker_id}", {"type": "gone", "reason": reason,
                                                        "service": entry.service.decode(errors="replace")})
        if request is not None:
            self._redeliver(request, reason)

    def _redeliver(self, request: Request, reason: str) -> None:
        """A worker died holding ``request``: give it to the next worker, or fail it."""
        if isinstance(request.origin, JobOrigin):
            if self.jobs is not None:
                self.jobs.on_lost(request.origin.job_id, reason)
            return
        if request.deliveries >= MAX_REDELIVERIES:
            self._fail_request(request, WORKER_LOST,
                               f"{request.deliveries} workers of {request.service.decode(errors='replace')!r} "
                               f"were lost while holding this request (last: {reason})")
            return
        request.deadline = time.monotonic() + self.config.request_timeout_s
        self.registry.enqueue(request, front=True)
        self._dispatch(request.service)

    def _fail_request(self, request: Request, code: str, message: str) -> None:
        if isinstance(request.origin, ClientOrigin):
            self._release(request)
            self._send_client(request.origin.identity, request.service, error_body(code, message))
        elif self.jobs is not None:
            self.jobs.on_lost(request.origin.job_id, message)

    # --- dispatch ----------------------------------------------------------------------------
    def submit_internal(self, service: bytes, body: list[bytes], job_id: str) -> Request:
        """Queue a request on behalf of a job (no deadline: it waits for a worker)."""
        request = self.registry.new_request(service, body, JobOrigin(job_id), time.monotonic(), None)
        self.registry.enqueue(request)
        self._dispatch(service)
        return request

    def _dispatch(self, service: bytes) -> None:
        for worker, request in self.registry.dispatch(service, time.monotonic()):
            sent = self._send_worker(worker.identity,
                                     [P.W_REQUEST, request.reply_address, b"", *request.body])
            if sent and isinstance(request.origin, JobOrigin):
                job = request.origin.job_id
                if self.jobs is not None:
                    self.jobs.on_dispatched(job, worker)
                self.publish(f"worker.{worker.worker_id}",
                             {"type": "busy", "request": request.id, "job": job,
                              "service": service.decode(errors="replace")})

    # --- sending -----------------------------------------------------------------------------
    def _send(self, frames: list[bytes]) -> bool:
        try:
            self.router.send_multipart(frames, zmq.NOBLOCK)
            return True
        except zmq.ZMQError as e:  # EHOSTUNREACH (peer gone) or EAGAIN (peer not reading)
            # a client that sends without reading would get a line per reply: once a minute
            # for each reason, with how many were held back
            held = self._send_repeats.due(e.strerror)
            if held is not None:
                log.info("send_failed", peer=frames[0].hex(), reason=e.strerror, held_back=held)
            return False

    def _send_worker(self, identity: bytes, frames: list[bytes]) -> bool:
        ok = self._send([identity, b"", P.MDPW, *frames])
        if not ok and identity in self.registry.workers and frames[0] != P.W_DISCONNECT:
            self._remove_worker(identity, "unreachable", disconnect=False)
        return ok

    def _send_client(self, identity: bytes, service: bytes, body: list[bytes]) -> bool:
        return self._send([identity, b"", P.MDPC, service, *body])

    def reply_later(self, identity: bytes, service: bytes, body: list[bytes]) -> bool:
        """For internal services that answer after returning None (long polls)."""
        return self._send_client(identity, service, body)

    # --- events ------------------------------------------------------------------------------
    def _on_event_in(self, frames: list[bytes], key: bytes | None = None) -> None:
        roles = self._roles(key)
        if roles is not None and ROLE_WORKER not in roles:
            self.dropped += 1  # the ZAP handshake passed it, but its key was removed since
            log.warning("event_refused", key=(key or b"").decode(errors="replace"),
                        reason="not a worker key")
            return
        try:
            topic, event = self.hub.parse(frames)
        except DecodeError as e:
            self._malformed(f"an event: {e}", [])
            return
        if not may_publish(topic):
            self.dropped += 1
            log.warning("event_refused", topic=topic, key=(key or b"").decode(errors="replace"),
                        reason="only the broker publishes on this topic")
            return
        self.publish(topic, event)

    def forget_events(self, topic: str) -> None:
        """Drop the events kept for ``topic``'s snapshots (a job removed from the journal)."""
        self.hub.forget(topic)

    def publish(self, topic: str, event: dict[str, Any]) -> dict[str, Any]:
        stamped, frames = self.hub.stamp(topic, event)
        for listener in self.event_listeners:
            listener(topic, stamped)
        if self._sockets_open:
            try:
                self.xpub.send_multipart(frames, zmq.NOBLOCK)
            except zmq.Again:
                pass  # a slow subscriber; it can resync from a snapshot
        return stamped

    def _on_subscription(self, frames: list[bytes], key: bytes | None = None) -> None:
        # XPUB delivers b"\x01topic" / b"\x00topic". A subscriber that subscribes to
        # "hello.<token>" is told its subscriptions are live (see client.Subscription).
        msg = frames[0] if frames else b""
        if msg[:1] == b"\x01" and msg[1:].startswith(b"hello."):
            self.xpub.send_multipart([msg[1:], pack({"type": "hello", "seq": self.hub.seq})])
