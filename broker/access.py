"""Who may do what on the broker: keys and roles from the allowed folder, the ZAP
authenticator that checks them at the CURVE handshake, and per-client limits.

Roles. The allowed folder holds ``clients/``, ``workers/`` and ``admins/``, each of ``NAME.key``
public keys (``distill keys generate`` lays it out). A key in ``clients/`` may make requests and
read events; a key in ``workers/`` may register as a worker, publish worker events, and make
requests too (a worker fetches artifacts and stores checkpoints as a client of the broker);
a key in ``admins/`` is a client key that may also cancel, retry and remove jobs other keys
submitted (a job belongs to the key that submitted it); a key in several folders has each
role. Only the broker publishes ``control.*`` events.

Revocation. The folder is read again whenever it changes (checked at every handshake and once
a second by the loop), so deleting a leaked key's file locks it out without a restart: new
handshakes fail at once, the loop refuses the next message from a peer already connected
with it (a registered worker is disconnected), and the loop binds its event port afresh so
that a subscriber holding it is cut off too.

Policy only: the socket loop asks, this module answers.
"""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from distill.shared.bus.security import (
    ROLE_ADMIN,
    ROLE_CLIENT,
    ROLE_DIRS,
    ROLE_WORKER,
    BrokerSecurity,
)
from distill.shared.logs import get_logger

log = get_logger("broker")

# ZAP domains: one per broker socket, so that the handshake itself can ask for a role.
DOMAIN_MDP = "distill.mdp"  # ROUTER: clients and workers
DOMAIN_EVENTS_OUT = "distill.events.out"  # XPUB: any allowed key may read events
DOMAIN_EVENTS_IN = "distill.events.in"  # XSUB: only worker keys may publish
CONTROL_PREFIX = "control."  # topics only the broker itself publishes (cancel)
BROKER_TOPIC = "broker"  # the broker's own lifecycle events


class KeyRing:
    """The allowed folder, read again when it changes. Thread safe: the ZAP thread and the
    socket loop both ask."""

    def __init__(self, allowed_dir: Path) -> None:
        self.allowed_dir = Path(allowed_dir)
        self._lock = threading.Lock()
        self._stamp: tuple[tuple[str, float, int], ...] | None = None
        self._roles: dict[bytes, frozenset[str]] = {}
        self._files: dict[bytes, str] = {}  # key -> its file under the folder, e.g. clients/laptop.key
        self.version = 0  # bumped on every reload, whichever thread noticed the change

    def _snapshot_stamp(self) -> tuple[tuple[str, float, int], ...]:
        # A folder's mtime changes when a file is added, removed or renamed in it; the file
        # listing also catches a key overwritten in place within one mtime tick.
        stamp: list[tuple[str, float, int]] = []
        for role in ROLE_DIRS.values():
            folder = self.allowed_dir / role
            if folder.is_dir():
                stamp.append((role, folder.stat().st_mtime, 0))
                for path in sorted(folder.glob("*.key")):
                    st = path.stat()
                    stamp.append((str(path), st.st_mtime, st.st_size))
        return tuple(stamp)

    def refresh(self) -> bool:
        """Re-read the folder if it changed; True when it did."""
        with self._lock:
            try:
                stamp = self._snapshot_stamp()
            except OSError as e:  # a file vanished between listing and stat: try next time
                log.warning("allowed_keys_unreadable", folder=str(self.allowed_dir), reason=str(e))
                return False
            if stamp == self._stamp:
                return False
            roles: dict[bytes, set[str]] = {}
            files: dict[bytes, str] = {}
            for role, sub in ROLE_DIRS.items():
                for path in sorted((self.allowed_dir / sub).glob("*.key")):
                    try:
                        public, _ = zmq.auth.load_certificate(path)
                    except (ValueError, OSError) as e:
                        log.warning("allowed_key_ignored", file=str(path), reason=str(e))
                        continue
                    if public:
                        # an admin is a client that may also manage other keys' jobs
                        roles.setdefault(public, set()).update(
                            (role, ROLE_CLIENT) if role == ROLE_ADMIN else (role,))
                        files.setdefault(public, f"{sub}/{path.name}")
            self._roles = {k: frozenset(v) for k, v in roles.items()}
            self._files = files
            self._stamp = stamp
            self.version += 1
            log.info(
                "allowed_keys_loaded",
                folder=str(self.allowed_dir),
                clients=sum(ROLE_CLIENT in r for r in self._roles.values()),
                workers=sum(ROLE_WORKER in r for r in self._roles.values()),
                admins=sum(ROLE_ADMIN in r for r in self._roles.values()),
            )
            return True

    def keys(self) -> frozenset[bytes]:
        """Every allowed public key, whatever its role."""
        return frozenset(self._roles)

    def roles(self, key: bytes) -> frozenset[str]:
        """The roles of a z85 public key (empty: not allowed)."""
        return self._roles.get(key, frozenset())

    def file_of(self, key: str) -> str | None:
        """The allowed file that holds a z85 public key (``clients/laptop.key``), if any."""
        return self._files.get(key.encode(errors="replace"))

    def describe(self, key: str) -> str:
        """A z85 public key as a person knows it: the allowed file that holds it
        (``'clients/laptop.key' (z85)``), or the z85 text alone when no file does."""
        found = self._files.get(key.encode(errors="replace"))
        return f"{found!r} ({key})" if found else key


class RoleCallback:
    """ZAP credentials provider: the handshake passes only keys with a role the socket needs."""

    def __init__(self, keyring: KeyRing) -> None:
        self.keyring = keyring
        self.rejected = 0

    def callback(self, domain: str, key: bytes) -> bool:
        self.keyring.refresh()
        roles = self.keyring.roles(key)
        allowed = ROLE_WORKER in roles if domain == DOMAIN_EVENTS_IN else bool(roles)
        if not allowed:
            self.rejected += 1
            log.warning(
                "curve_key_rejected",
                socket=domain,
                key=key.decode(errors="replace"),
                reason="not a worker key" if roles else "unknown key",
            )
        return allowed


def start_authenticator(ctx: zmq.Context, keyring: KeyRing) -> ThreadAuthenticator:
    """A ZAP handler for the broker's sockets, checking keys against the allowed folder."""
    auth = ThreadAuthenticator(ctx, log=None)
    auth.start()
    provider = RoleCallback(keyring)
    for domain in (DOMAIN_MDP, DOMAIN_EVENTS_OUT, DOMAIN_EVENTS_IN):
        auth.configure_curve_callback(domain, credentials_provider=provider)
    return auth


def make_curve_server(sock: zmq.Socket, security: BrokerSecurity, domain: str) -> None:
    """CURVE server options on a broker socket; set before bind."""
    sock.zap_domain = domain.encode()
    sock.curve_server = True
    sock.curve_publickey = security.public_key
    sock.curve_secretkey = security.secret_key


def may_publish(topic: str) -> bool:
    """Whether a worker may publish on ``topic``: never the broker's own topics."""
    return not (topic.startswith(CONTROL_PREFIX) or topic == BROKER_TOPIC)


@dataclass(frozen=True)
class Limits:
    """Per-client limits a shared broker needs."""

    # Requests a client may have queued or running on workers at once; more than this is
    # answered with an error at once. 1024 is far above what Distill's own clients keep in
    # flight (a handful; bench/broker.py 100), yet one client cannot fill the queues, whose
    # sockets buffer up to SOCKET_HWM (10 000) messages, for everyone.
    max_outstanding: int = 1024
    # Bytes of artifacts each key may store; None: no quota (a private, single-user broker).
    artifact_quota_bytes: int | None = None


class OutstandingCounter:
    """Requests each client (key, or socket identity without CURVE) has on workers now."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._counts: Counter[bytes] = Counter()

    def admit(self, owner: bytes) -> bool:
        if self._counts[owner] >= self.limit:
            return False
        self._counts[owner] += 1
        return True

    def release(self, owner: bytes) -> None:
        self._counts[owner] -= 1
        if self._counts[owner] <= 0:
            del self._counts[owner]

    def count(self, owner: bytes) -> int:
        return self._counts[owner]
