"""What a client socket's monitor says about reaching the broker, so that a broker that is not
there is said in a second or two, with its reason, instead of after the request's timeout.

ZeroMQ hides connections: a request to a port nothing listens on waits out its whole timeout
(10 s for a CLI command, then 2 s more asking ``mmi.service``), and a client without CURVE keys
at a broker that runs CURVE sees the same silence. The socket's monitor does see why: each
connection attempt refused (``CONNECT_RETRIED`` with no ``CONNECTED``), a host name that does
not resolve, a handshake the broker refused (wrong broker key, key not allowed, one side with
CURVE and the other without). :class:`Contact` reads those events for a socket that has not yet
reached the broker and gives a verdict; the client raises it as :class:`BrokerUnreachable`.

Refusals are said only once they have gone on for ``grace_s``: a broker starting now (a
``distill up`` a moment ago, a supervised broker restarting) binds within it. A refused
handshake is said at once: ZeroMQ does not try again after a mechanism mismatch, and a key the
broker refuses stays refused. Once a socket has reached the broker its monitor is closed: a
client that has had a reply waits out its timeout as before (a broker restarting under a
running transfer must not fail it).
"""

from __future__ import annotations

import socket
from urllib.parse import urlsplit

import zmq
from zmq.utils.monitor import recv_monitor_message

from distill.shared.bus.security import config_path
from distill.shared.errors import RequestTimeout

GRACE_S = 2.0  # refused connections are said after this long (a broker starting now binds within it)
POLL_MS = 100  # how often a waiting client reads its monitor


def curve_advice() -> str:
    """Where a client's keys go: the config file named is this process's own (it follows
    $XDG_CONFIG_HOME and $DISTILL_KEYS_CONFIG)."""
    return (f"set DISTILL_BROKER_KEY and DISTILL_KEY, or write them in {config_path()} "
            "(`distill keys generate` makes them)")  # fmt: skip


EVENTS = (zmq.EVENT_CONNECT_DELAYED | zmq.EVENT_CONNECTED | zmq.EVENT_CONNECT_RETRIED
          | zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
          | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_AUTH)  # fmt: skip


class BrokerUnreachable(RequestTimeout):
    """No broker could be reached, and the socket's monitor said why (refused, no such host,
    a refused handshake): raised before the request's timeout, and not retried. ``why``: the
    reason alone, for a line that names the endpoint already."""

    def __init__(self, message: str, why: str = "") -> None:
        super().__init__(message)
        self.why = why or message


class Contact:
    """The monitor of one socket that has not reached the broker yet. ``read`` takes the
    events that came; ``verdict`` says why the broker cannot be reached, once that is sure."""

    def __init__(self, sock: zmq.Socket, endpoint: str, *, curve: bool) -> None:
        self.endpoint = endpoint
        self.curve = curve
        self._sock: zmq.Socket | None = sock
        self._owner: zmq.Socket | None = sock.get_monitor_socket(EVENTS)
        # read without blocking in both faces: an asyncio socket's monitor is read through a
        # plain shadow of it (its own recv returns a future)
        self._monitor: zmq.Socket | None = (
            self._owner if type(self._owner) is zmq.Socket else zmq.Socket.shadow(self._owner.underlying))
        self.reached = False  # a handshake succeeded
        self.connected = False  # a TCP connection was made (whatever came of it)
        self.retried = False  # an attempt failed before it connected, and ZeroMQ tries again
        self.failure: tuple[int, int] | None = None  # (event, value) of a refused handshake

    def read(self) -> None:
        """Take every event the monitor holds (never blocks)."""
        monitor = self._monitor
        while monitor is not None and monitor.poll(0):
            try:
                event = recv_monitor_message(monitor)
            except (zmq.ZMQError, ValueError):
                return
            kind = int(event["event"])
            if kind == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self.reached = True
            elif kind == zmq.EVENT_CONNECTED:
                self.connected = True
            elif kind == zmq.EVENT_CONNECT_RETRIED and not self.connected:
                self.retried = True
            elif kind in (zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL, zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL,
                          zmq.EVENT_HANDSHAKE_FAILED_AUTH):  # fmt: skip
                self.failure = (kind, int(event["value"]))

    def verdict(self, waited_s: float, grace_s: float = GRACE_S) -> str | None:
        """Why the broker cannot be reached, or None while that is not sure (or it was reached).
        ``waited_s``: how long the client has been trying."""
        if self.reached:
            return None
        if self.failure is not None:
            return self._handshake_refused(*self.failure)
        if self.retried and not self.connected and waited_s >= grace_s:
            return self._not_connected()
        return None

    def _handshake_refused(self, kind: int, value: int) -> str:
        # A mechanism mismatch (CURVE on one side only) is named as such when the event says
        # so; as often the peer hangs up first and the event holds only the socket's errno.
        protocol = kind == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
        mismatch = protocol and value == zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH
        if self.curve and not protocol:
            return ("the broker refused this client's CURVE handshake: is the broker key the "
                    "right one, and this client's key in the broker's allowed folder? (A broker "
                    "started without keys refuses every key in the same way.)")
        if self.curve and mismatch:
            return ("something answers there without CURVE, while this client has keys: a "
                    "broker started without keys, or the wrong address?")
        if self.curve:
            return ("something answers there, but the CURVE handshake failed: a broker "
                    "without CURVE, or another program on that port?")
        if mismatch:
            return f"the broker there runs CURVE and this client has no keys: {curve_advice()}"
        return ("something answers there, but the handshake failed: a broker that runs CURVE "
                f"(this client has no keys: {curve_advice()}), or another program on that port?")

    def _not_connected(self) -> str:
        host, port = _host_port(self.endpoint)
        if host is not None:
            try:
                socket.getaddrinfo(host, port)
            except (socket.gaierror, UnicodeError):
                return f"the host name {host!r} does not resolve"
            except OSError:
                pass
        return ("nothing accepts connections there (connection refused): is the "
                "broker running? Start one with `distill up` (or `distill broker`), or point "
                "--broker (or DISTILL_BROKER) at it")

    def close(self) -> None:
        """Stop monitoring (the socket stays open); safe to call more than once."""
        if self._owner is None:
            return
        if self._sock is not None and not self._sock.closed:
            try:
                self._sock.disable_monitor()
            except zmq.ZMQError:
                pass
        self._owner.close(linger=0)
        self._owner = self._monitor = self._sock = None


def _host_port(endpoint: str) -> tuple[str | None, int | None]:
    """The host and port of a ``tcp://`` endpoint (None, None for other transports)."""
    if not endpoint.startswith("tcp://"):
        return None, None
    parts = urlsplit(endpoint)
    try:
        return parts.hostname, parts.port
    except ValueError:
        return parts.hostname, None


def unreachable(endpoint: str, why: str) -> BrokerUnreachable:
    return BrokerUnreachable(f"cannot talk to a broker at {endpoint}: {why}", why)
