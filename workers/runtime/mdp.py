"""The worker runtime: register a service with the broker (MDP/0.1 worker side), run each
request's handler in a thread while this loop keeps heartbeating, reconnect with backoff when
the broker goes away, honour DISCONNECT, publish events, and turn a handler exception into an
error reply without dying.

Threads: the socket loop (``WorkerRuntime.run``) owns the MDP DEALER and the control SUB. One
executor thread runs handlers one at a time and owns its own PUB socket (events) and client
socket (artifacts, checkpoints); it hands replies back over an inproc PAIR.
"""

from __future__ import annotations

import os
import platform
import queue
import socket as pysocket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import zmq
from zmq.utils.monitor import recv_monitor_message

from distill.shared.bus import protocol as P
from distill.shared.bus.codec import pack, unpack_map
from distill.shared.bus.messages import Reply
from distill.shared.bus.security import ClientSecurity, apply_client
from distill.shared.errors import DecodeError, JobCancelled, code_of
from distill.shared.logs import Repeats, get_logger

log = get_logger("worker")

JOB_ADDRESS_PREFIX = b"distill.job:"
# How long a worker whose request was abandoned waits for its handler to return before it
# registers again anyway (a handler that checks its cancel, or waits on the broker, returns
# within a step; one that does neither holds the worker that long, unregistered).
ABANDONED_WAIT_S = 60.0
HANDSHAKE_FAILURES = (zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                      | zmq.EVENT_HANDSHAKE_FAILED_AUTH)


@dataclass
class Delivery:
    """One request handed to the executor."""

    token: int
    reply_address: bytes
    body: list[bytes]
    cancel: threading.Event

    @property
    def job_id(self) -> str | None:
        if self.reply_address.startswith(JOB_ADDRESS_PREFIX):
            return self.reply_address[len(JOB_ADDRESS_PREFIX):].decode(errors="replace")
        return None


class Executor:
    """Given to handlers: the means to publish events and talk to the broker as a client."""

    def __init__(self, runtime: WorkerRuntime) -> None:
        self.runtime = runtime
        self.pub: zmq.Socket | None = None
        self._client: Any = None
        self.current: Delivery | None = None  # the request its handler is running

    def _interrupted(self) -> BaseException | None:
        """Ends the handler's wait for a broker reply once its request is cancelled or
        abandoned (the broker that sent it is gone, say): else an abandoned handler waits out
        the client's timeouts while the worker cannot take the request given again."""
        current = self.current
        if current is not None and current.cancel.is_set():
            return JobCancelled("the request was cancelled or abandoned")
        return None

    def publish(self, topic: str, event: dict[str, Any]) -> None:
        if self.pub is None:
            return
        event.setdefault("ts", time.time())
        event.setdefault("worker", self.runtime.worker_name)
        try:
            self.pub.send_multipart([topic.encode(), pack(event)], zmq.NOBLOCK)
        except zmq.Again:
            pass  # events are best effort; state that matters goes through requests

    @property
    def client(self) -> Any:
        if self._client is None:
            from distill.shared.bus.client import Client

            # first_contact_s None: the broker handed this worker its work, so a refusal now
            # is a broker restarting, to be waited out (60 s, three times)
            self._client = Client(self.runtime.broker, timeout_s=60.0, retries=2,
                                  context=self.runtime.ctx, security=self.runtime.security,
                                  interrupted=self._interrupted, first_contact_s=None)
        return self._client


Handler = Callable[[Delivery, Executor], list[bytes]]


class WorkerRuntime:
    def __init__(self, service: str, handler: Handler, *, broker: str, events_in: str,
                 inline: Callable[[list[bytes]], list[bytes]] | None = None,
                 events_out: str, device: str = "cpu", heartbeat_interval_s: float = P.HEARTBEAT_INTERVAL_S,
                 liveness: int = P.HEARTBEAT_LIVENESS, meta: dict[str, Any] | None = None,
                 context: zmq.Context | None = None,
                 security: ClientSecurity | None = None) -> None:
        self.service = service
        # CURVE keys for all four sockets (MDP, events in, control, the executor's client); the
        # broker must list this key in allowed/workers/ or the worker never registers.
        self.security = security
        self.handler = handler
        # A handler that does no compute (echo) may answer in the loop itself, saving two
        # thread hand-offs per request; everything else runs on the executor thread.
        self.inline = inline
        self.broker, self.events_in, self.events_out = broker, events_in, events_out
        self.device = device
        self.heartbeat_interval_s = heartbeat_interval_s
        self.liveness_s = heartbeat_interval_s * liveness
        self.ctx = context or zmq.Context.instance()
        self.worker_name = f"{pysocket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:4]}"
        self.meta = {"host": pysocket.gethostname(), "pid": os.getpid(), "name": self.worker_name,
                     "service": service, "python": platform.python_version(), **(meta or {})}
        self._inbox: queue.Queue[Delivery | None] = queue.Queue()
        self._pair_addr = f"inproc://executor-{uuid.uuid4().hex}"
        self._current: Delivery | None = None
        self._abandoned: Delivery | None = None  # given up on, its handler not yet returned
        self._tokens = 0
        self.registrations = 0  # how many times READY was sent (reconnects + 1)
        self.dealer: zmq.Socket | None = None
        self.monitor: zmq.Socket | None = None  # handshake failures of the dealer (CURVE only)
        self._handshake_repeats = Repeats()  # each kind of failure logged once a minute

    # --- executor thread ---------------------------------------------------------------------
    def _executor_main(self, ready: threading.Event) -> None:
        executor = Executor(self)
        executor.pub = self.ctx.socket(zmq.PUB)
        executor.pub.setsockopt(zmq.LINGER, 1000)
        executor.pub.setsockopt(zmq.SNDHWM, P.SOCKET_HWM)
        apply_client(executor.pub, self.security)
        executor.pub.connect(self.events_in)
        pair = self.ctx.socket(zmq.PAIR)
        pair.connect(self._pair_addr)
        ready.set()
        try:
            while (delivery := self._inbox.get()) is not None:
                reply = self._run_handler(delivery, executor)
                pair.send_multipart([str(delivery.token).encode(), delivery.reply_address, *reply])
        finally:
            pair.close(linger=0)
            executor.pub.close()
            if executor._client is not None:
                executor._client.close()

    def _run_handler(self, delivery: Delivery, executor: Executor) -> list[bytes]:
        executor.current = delivery
        try:
            return self.handler(delivery, executor)
        except Exception as e:  # a handler bug fails the request, never the worker
            log.exception("handler_failed", service=self.service)
            return [Reply.failure(code_of(e), str(e)).encode()]
        finally:
            executor.current = None

    # --- socket loop -------------------------------------------------------------------------
    def run(self, stop: threading.Event | None = None) -> None:
        stop = stop or threading.Event()
        pair = self.ctx.socket(zmq.PAIR)
        pair.bind(self._pair_addr)
        ready = threading.Event()
        thread = threading.Thread(target=self._executor_main, args=(ready,), daemon=True,
                                  name=f"executor-{self.service}")
        thread.start()
        ready.wait()
        control = self.ctx.socket(zmq.SUB)
        control.setsockopt(zmq.LINGER, 0)
        control.setsockopt(zmq.SUBSCRIBE, b"control.")
        apply_client(control, self.security)
        control.connect(self.events_out)
        try:
            self._loop(stop, pair, control)
        finally:
            if self._current is not None:
                self._current.cancel.set()
            if self.dealer is not None:
                self._send([P.W_DISCONNECT])
                self._close_monitor()
                self.dealer.close(linger=100)
            self._inbox.put(None)
            thread.join(timeout=5)
            pair.close(linger=0)
            control.close(linger=0)

    def _connect(self) -> None:
        if self.dealer is not None:
            self._close_monitor()
            self.dealer.close(linger=0)
        self.dealer = self.ctx.socket(zmq.DEALER)
        self.dealer.setsockopt(zmq.LINGER, 0)
        self.dealer.setsockopt(zmq.MAXMSGSIZE, P.MAX_MESSAGE_BYTES)
        apply_client(self.dealer, self.security)
        if self.security is not None:
            # A refused key looks like a silent broker; the monitor says why instead.
            self.monitor = self.dealer.get_monitor_socket(HANDSHAKE_FAILURES)
        self.dealer.connect(self.broker)
        meta = {**self.meta, "registrations": self.registrations}
        self._send([P.W_READY, self.service.encode(), pack(meta)])
        self.registrations += 1
        log.info("worker_registering", service=self.service, broker=self.broker, device=self.device)

    def _send(self, frames: list[bytes]) -> None:
        assert self.dealer is not None
        try:
            self.dealer.send_multipart([b"", P.MDPW, *frames], zmq.NOBLOCK)
        except zmq.Again:
            pass  # not connected yet; heartbeats and liveness sort it out

    def _loop(self, stop: threading.Event, pair: zmq.Socket, control: zmq.Socket) -> None:
        backoff = P.RECONNECT_INITIAL_S
        self._connect()
        broker_expiry = time.monotonic() + self.liveness_s
        next_heartbeat = time.monotonic() + self.heartbeat_interval_s
        poller = self._poller(pair, control)
        while not stop.is_set():
            assert self.dealer is not None
            wait_ms = max(0, int((min(next_heartbeat, broker_expiry) - time.monotonic()) * 1000))
            ready = dict(poller.poll(min(wait_ms, 200)))
            now = time.monotonic()
            if self.dealer in ready:
                reconnect = self._on_broker(self.dealer.recv_multipart())
                broker_expiry = now + self.liveness_s
                if reconnect:
                    self._abandon_current("broker sent DISCONNECT")
                    if backoff > P.RECONNECT_INITIAL_S:  # sent again, nothing else between
                        self._say_refused()
                    # Back off: a broker that refuses this worker (a key without the worker
                    # role) answers every READY with DISCONNECT, and must not be flooded.
                    if stop.wait(backoff):
                        return
                    backoff = min(backoff * 2, P.RECONNECT_MAX_S)
                    self._reconnect(pair, stop)
                    poller = self._poller(pair, control)
                    broker_expiry = time.monotonic() + self.liveness_s
                else:
                    backoff = P.RECONNECT_INITIAL_S
            if pair in ready:
                self._on_handler_done(pair.recv_multipart())
            if control in ready:
                self._on_control(control.recv_multipart())
            if self.monitor is not None and self.monitor in ready:
                self._on_monitor(self.monitor)
            if now >= next_heartbeat:
                self._send([P.W_HEARTBEAT])
                next_heartbeat = now + self.heartbeat_interval_s
            if now >= broker_expiry:
                log.warning("broker_lost", broker=self.broker, retry_in_s=backoff)
                self._abandon_current("broker stopped answering")
                if stop.wait(backoff):
                    return
                backoff = min(backoff * 2, P.RECONNECT_MAX_S)
                self._reconnect(pair, stop)
                poller = self._poller(pair, control)
                broker_expiry = time.monotonic() + self.liveness_s

    def _poller(self, pair: zmq.Socket, control: zmq.Socket) -> zmq.Poller:
        poller = zmq.Poller()
        assert self.dealer is not None
        for sock in (self.dealer, pair, control, self.monitor):
            if sock is not None:
                poller.register(sock, zmq.POLLIN)
        return poller

    def _close_monitor(self) -> None:
        if self.monitor is not None and self.dealer is not None:
            self.dealer.disable_monitor()
            self.monitor.close(linger=0)
        self.monitor = None

    def _on_monitor(self, monitor: zmq.Socket) -> None:
        while monitor.poll(0):
            try:
                event = recv_monitor_message(monitor)
            except (zmq.ZMQError, ValueError):
                return
            held = self._handshake_repeats.due(int(event["event"]))
            if held is None:  # ZeroMQ retries every 0.1 s: once a minute is enough to say it
                continue
            log.warning("broker_handshake_failed", broker=self.broker, held_back=held,
                        reason="the broker refused this worker's key: is its public key in the "
                               "broker's allowed/workers/ folder, and --broker-key the broker's key?"
                        if event["event"] == zmq.EVENT_HANDSHAKE_FAILED_AUTH
                        else f"CURVE handshake failed (zmq event {event['event']}): does the broker "
                             "run CURVE, and is --broker-key its public key?")

    def _say_refused(self) -> None:
        """The broker answers each READY with DISCONNECT: say why that may be (once a minute);
        the broker logs its own reason (worker_refused)."""
        if self._handshake_repeats.due("refused") is None:
            return
        why = ("with CURVE, this worker's key must be in the broker's allowed/workers/ folder: "
               "a client key is refused as a worker" if self.security is not None else
               "the broker refuses this worker's service name, or restarts")  # fmt: skip
        log.warning("broker_refuses_worker", broker=self.broker, service=self.service, reason=why)

    def _on_broker(self, frames: list[bytes]) -> bool:
        """Handle a message from the broker; True means reconnect."""
        if len(frames) < 3 or frames[0] != b"" or frames[1] != P.MDPW:
            log.warning("broker_message_malformed", frames=len(frames))
            return False
        command = frames[2]
        if command == P.W_REQUEST:
            self._on_request(frames[3:])
        elif command == P.W_DISCONNECT:
            log.info("broker_disconnect")
            return True
        return False

    def _on_request(self, rest: list[bytes]) -> None:
        if len(rest) < 3 or rest[1] != b"":
            log.warning("request_malformed", frames=len(rest))
            return
        if self.inline is not None and not rest[0].startswith(JOB_ADDRESS_PREFIX):
            self._send([P.W_REPLY, rest[0], b"", *self.inline(rest[2:])])
            return
        self._tokens += 1
        delivery = Delivery(self._tokens, rest[0], rest[2:], threading.Event())
        self._current = delivery
        self._inbox.put(delivery)

    def _on_handler_done(self, frames: list[bytes]) -> None:
        token, address, reply = int(frames[0]), frames[1], frames[2:]
        if self._abandoned is not None and self._abandoned.token == token:
            self._abandoned = None
        if self._current is None or self._current.token != token:
            log.info("reply_dropped", reason="request was abandoned")
            return
        self._current = None
        self._send([P.W_REPLY, address, b"", *reply])

    def _abandon_current(self, reason: str) -> None:
        # The broker has given (or will give) this request to another worker: stop the handler
        # cooperatively and drop whatever it returns.
        if self._current is not None:
            log.warning("request_abandoned", reason=reason, job=self._current.job_id)
            self._current.cancel.set()
            self._abandoned, self._current = self._current, None

    def _reconnect(self, pair: zmq.Socket, stop: threading.Event) -> None:
        """Register again, once the handler of an abandoned request has returned (for at most
        ABANDONED_WAIT_S): registered while it still runs, this worker would be handed the
        request again (a restarted broker re-queues it) and hold it, idle, behind the
        handler it abandoned."""
        deadline = time.monotonic() + ABANDONED_WAIT_S
        while self._abandoned is not None and not stop.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                log.warning("abandoned_handler_still_running", job=self._abandoned.job_id,
                            waited_s=ABANDONED_WAIT_S)  # fmt: skip
                break
            if pair.poll(int(min(remaining, 0.2) * 1000), zmq.POLLIN):
                self._on_handler_done(pair.recv_multipart())
        self._connect()

    def _on_control(self, frames: list[bytes]) -> None:
        if len(frames) != 2:
            return
        try:
            event = unpack_map(frames[1])
        except DecodeError:
            return
        current = self._current
        if event.get("type") == "cancel" and current is not None and event.get("job") == current.job_id:
            log.info("job_cancel_requested", job=current.job_id)
            current.cancel.set()
