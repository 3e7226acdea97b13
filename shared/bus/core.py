"""The client core that the blocking and the asyncio clients share: endpoints, socket setup and
options, frame building, reply matching and error mapping. No I/O happens here: each face
sends and receives in its own way and asks the core what the frames mean.

Reply matching. MDP/0.1 replies carry no request id, and a DEALER socket delivers replies in
the order the broker sends them, so a reply is matched to its request by service name and
order. That is only sound while no earlier reply is still owed on the socket: a call that
ends before all its replies came back (a timeout, an error reply in the middle of a pipeline,
a consumer that stops iterating) would leave them to be read by the next call. The core
therefore counts the replies owed (:class:`ReplyLedger`) and a face opens a fresh socket for
any call that finds the count above zero, so a stale reply is never taken for a new one.
"""

from __future__ import annotations

import re
import uuid
from typing import Any

import zmq

from distill.shared.bus import protocol as P
from distill.shared.bus.codec import pack, unpack_map
from distill.shared.bus.contact import curve_advice
from distill.shared.bus.security import ClientSecurity, apply_client
from distill.shared.errors import (
    BAD_REPLY,
    BAD_REQUEST,
    CANCELLED,
    EXPIRED,
    ConfigError,
    DecodeError,
    RequestError,
    RequestTimeout,
    UnknownService,
)


def broker_endpoint(host_or_endpoint: str | None = None, port: int = P.PORT_MDP) -> str:
    """Accept ``tcp://host:port``, ``host:port`` or ``host``; ConfigError, naming the value,
    for anything else (what ``--broker`` or ``$DISTILL_BROKER`` said): ZeroMQ refused
    ``http://…`` or ``not a url`` with a ZMQError from deep in the first request, a traceback
    out of every command and the UI."""
    if not host_or_endpoint:
        return f"tcp://{P.DEFAULT_HOST}:{port}"
    if "://" in host_or_endpoint:
        endpoint = host_or_endpoint
    elif ":" not in host_or_endpoint or host_or_endpoint.endswith("]"):  # a host alone ([::1] too)
        endpoint = f"tcp://{host_or_endpoint}:{port}"
    else:
        endpoint = f"tcp://{host_or_endpoint}"
    why = _endpoint_problem(endpoint)
    if why is not None:
        raise ConfigError(f"broker address {host_or_endpoint!r} is not tcp://HOST:PORT (nor "
                          f"HOST:PORT, nor HOST): {why}")  # fmt: skip
    return endpoint


# a host name or IPv4 address, or an IPv6 address in brackets (as ZeroMQ reads them)
_HOST = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9._-]*[A-Za-z0-9_])?|\[[0-9A-Fa-f:.]+(%[A-Za-z0-9]+)?\]")


def _endpoint_problem(endpoint: str) -> str | None:
    """Why ``endpoint`` is not ``tcp://HOST:PORT``, or None."""
    scheme, _, rest = endpoint.partition("://")
    if scheme != "tcp":
        return f"{scheme}:// is not ZeroMQ's tcp://"
    host, colon, number = rest.rpartition(":")
    if not colon or not number:
        return "no port after the host"
    if not number.isdigit() or not 0 < int(number) < 65536:
        return f"port {number!r} is not a number from 1 to 65535"
    if not _HOST.fullmatch(host):
        return f"{host!r} is not a host name or address" if host else "no host"
    return None


def events_endpoint(mdp_endpoint: str, direction: str = "out") -> str:
    """The broker's event port beside an MDP endpoint: by convention MDP port + 1 for events
    out (XPUB, what subscribers read) and + 2 for events in (XSUB, where workers publish)."""
    base, port = mdp_endpoint.rsplit(":", 1)
    offset = {"out": P.PORT_EVENTS_OUT - P.PORT_MDP, "in": P.PORT_EVENTS_IN - P.PORT_MDP}[direction]
    return f"{base}:{int(port) + offset}"


def configure_dealer(sock: zmq.Socket, security: ClientSecurity | None = None) -> None:
    """Options every client DEALER gets, set before it connects (they apply to later connects);
    CURVE when ``security`` is given."""
    apply_client(sock, security)
    sock.setsockopt(zmq.LINGER, 0)  # a closed client never blocks its process on exit
    sock.setsockopt(zmq.MAXMSGSIZE, P.MAX_MESSAGE_BYTES)  # a peer cannot make us buffer more
    sock.setsockopt(zmq.SNDHWM, P.SOCKET_HWM)
    sock.setsockopt(zmq.RCVHWM, P.SOCKET_HWM)


def service_bytes(service: str | bytes) -> bytes:
    return service.encode() if isinstance(service, str) else service


def service_text(service: str | bytes) -> str:
    return service.decode(errors="replace") if isinstance(service, bytes) else service


# What a body may hold so that its message, with the frames the broker adds on its way (the
# peers' addresses, the protocol headers), stays within MAX_MESSAGE_BYTES.
MAX_BODY_BYTES = P.MAX_MESSAGE_BYTES - 4096


def check_body_size(body: list[bytes], what: str) -> None:
    """RequestError (bad_request) for a body too large to travel: a peer that receives more
    than MAX_MESSAGE_BYTES drops the connection, and the sender only ever sees a timeout or a
    lost worker."""
    size = sum(len(frame) for frame in body)
    if size > MAX_BODY_BYTES:
        raise RequestError(f"{what} is {size / 2**20:.1f} MiB, over the "
                           f"{MAX_BODY_BYTES / 2**20:.1f} MiB one message may carry: send less "
                           "at a time (shorter or fewer sounds, fewer levels), or submit a job, "
                           "whose results travel as artifacts", code=BAD_REQUEST)  # fmt: skip


def encode_body(body: Any, service: str) -> bytes:
    """A request body packed, or RequestError (bad_request) naming why not: arrays too large to
    travel are refused before they are copied (a 6.9-GB array was packed for 15 s, then failed
    on msgpack's 4-GiB bound), and what msgpack cannot hold (an integer of 2**64, an object)
    is said as a request error, not a TypeError out of the client."""
    arrays = 0
    stack, seen = [body], 0
    while stack and seen < 100_000:  # the containers of a body: a few, a grid's rows at most
        value = stack.pop()
        seen += 1
        if isinstance(value, dict):
            stack.extend(value.values())
        elif isinstance(value, (list, tuple)):
            stack.extend(value)
        elif hasattr(value, "nbytes") and hasattr(value, "dtype"):  # numpy or torch
            arrays += int(value.nbytes)
    if arrays > MAX_BODY_BYTES:
        raise RequestError(f"the request to {service!r} carries {arrays / 2**20:.1f} MiB of "
                           f"arrays, over the {MAX_BODY_BYTES / 2**20:.1f} MiB one message may "
                           "carry: send less at a time (a shorter sound), or submit a job",
                           code=BAD_REQUEST)  # fmt: skip
    try:
        return pack(body)
    except (TypeError, ValueError, OverflowError) as e:
        raise RequestError(f"the request to {service!r} cannot be encoded: {e}",
                           code=BAD_REQUEST) from e


def request_frames(service: bytes, body: list[bytes]) -> list[bytes]:
    """An MDP/0.1 client request as a DEALER sends it (the empty delimiter first); a body too
    large to travel is refused here (:func:`check_body_size`)."""
    check_body_size(body, f"the request to {service.decode(errors='replace')!r}")
    return [b"", P.MDPC, service, *body]


def reply_body(msg: list[bytes], service: bytes) -> list[bytes] | None:
    """The body of a reply from ``service``, or None for anything else (to be skipped)."""
    if len(msg) >= 3 and msg[0] == b"" and msg[1] == P.MDPC and msg[2] == service:
        return list(msg[3:])
    return None


def decode_reply(frames: list[bytes], service: str) -> Any:
    """Unpack a Distill service reply; raise RequestError (with its wire code) for errors, and
    with ``bad_reply`` for anything that is not a Distill reply (a third-party or broken
    worker's answer): never an AttributeError out of a malformed one."""
    if not frames:
        raise RequestError(f"{service}: empty reply", code=BAD_REPLY)
    try:
        reply = unpack_map(frames[0], f"reply from {service!r}")
    except DecodeError as e:
        raise RequestError(f"{service}: the reply is not a Distill reply: {e}",
                           code=BAD_REPLY) from e
    ok = reply.get("ok")
    if ok is True:
        return reply.get("result")
    err = reply.get("error")
    if ok is not False or not isinstance(err, dict):
        raise RequestError(f"{service}: the reply is not a Distill reply ({{ok, result}} or "
                           "{ok, error: {code, message}}): a raw service such as echo answers "
                           "with the request's own frames (use request_raw)",
                           code=BAD_REPLY)  # fmt: skip
    code = str(err.get("code", "error"))
    message = str(err.get("message", "unknown error"))
    if reply.get("cancelled"):
        code = CANCELLED
    raise RequestError(f"{service}: {message}", code=code)


# --- subscriptions: a dropped connection --------------------------------------------------------
# When the broker restarts or binds its event port afresh, ZeroMQ reconnects a SUB socket by
# itself but subscribes it again only when its owner next uses it: events published meanwhile
# never arrive, and their epoch (the same, after a rebind) cannot tell. Subscribers watch their
# socket's monitor for this event, prove the subscription live again with a new hello, and
# take a fresh snapshot (:func:`after_drop`).
DROPPED = zmq.EVENT_DISCONNECTED


def drop_monitor_address() -> str:
    """An inproc address of its own for a subscriber's monitor (pyzmq's default is named by
    the socket's fd, which the first contact's monitor held)."""
    return f"inproc://subscription-drops.{uuid.uuid4().hex}"


def after_drop(snapshot: dict[str, Any], held: list[dict[str, Any]], last_seq: int,
               epoch: str | None) -> tuple[list[dict[str, Any]], int]:
    """The events to yield once a subscription is live again after a drop: the fresh
    snapshot's and those the stream brought while its hello was awaited, newer than ``last_seq``
    (all of the new epoch's, when the broker restarted), each once, in order; and the new last
    sequence number."""
    new_epoch = snapshot.get("broker_epoch")
    floor = last_seq if new_epoch == epoch else -1
    events: dict[Any, dict[str, Any]] = {}
    for event in [*snapshot["events"], *held]:
        if event.get("broker_epoch", new_epoch) == new_epoch and event.get("seq", 0) > floor:
            events.setdefault(event.get("seq"), event)
    ordered = sorted(events.values(), key=lambda e: e.get("seq", 0))
    return ordered, max([int(snapshot["seq"]), *(e.get("seq", 0) for e in ordered)])


def unknown_service(service: str, endpoint: str) -> UnknownService:
    return UnknownService(f"no worker for service {service!r} is registered with the broker "
                          f"at {endpoint}")


def timeout_error(service: str, endpoint: str, timeout_s: float, attempts: int,
                  known: bool | None, curve: bool = False) -> RequestError:
    """What a request that got no reply raises, given what ``mmi.service`` said about its
    service afterwards (``known`` is None when the broker did not answer that either).
    ``curve``: the client used CURVE keys, so a refused key looks the same as no broker."""
    if known is None:
        hint = ("; with CURVE a refused key looks the same: is this key in the broker's "
                "allowed folder, and the broker key the right one?") if curve else (
                ": is it running there? (a broker that runs CURVE looks the same to a client "
                f"without keys: {curve_advice()}; a worker also takes --broker-key and --key)")
        return RequestTimeout(f"no broker answered at {endpoint} "
                              f"(request to {service!r}, {attempts} attempt(s)){hint}")
    if known is False:
        return unknown_service(service, endpoint)
    return RequestTimeout(f"no reply from {service!r} within {timeout_s:g} s "
                          f"({attempts} attempt(s), broker {endpoint})")


def needs_service_check(service: str) -> bool:
    """Whether a failed request to ``service`` is worth an ``mmi.service`` question."""
    return not service.startswith("mmi.")


def is_expiry(error: RequestError) -> bool:
    """The broker expired the request: maybe because no worker for the service exists."""
    return error.code == EXPIRED


class ReplyLedger:
    """Counts the replies owed on one socket; see the module docstring."""

    def __init__(self) -> None:
        self.owed = 0

    def sent(self) -> None:
        self.owed += 1

    def received(self) -> None:
        self.owed -= 1

    @property
    def clean(self) -> bool:
        """True when no reply to an earlier request can still arrive on the socket."""
        return self.owed == 0

    def reset(self) -> None:
        """The socket was closed: whatever was owed will never arrive on the next one."""
        self.owed = 0
