"""CURVE keys: making them, loading them, and where a process finds its own.

Keys are pyzmq ``zmq.auth`` certificates: ``NAME.key`` holds a public key (safe to copy to
any machine), ``NAME.key_secret`` holds the public and the secret key (mode 0600, never
copied off the machine it belongs to). ``distill keys generate DIR`` lays out::

    DIR/broker.key, broker.key_secret        the broker's pair; broker.key goes to every peer
    DIR/client.key, client.key_secret        a client pair (the UI, the CLI, scripts)
    DIR/worker.key, worker.key_secret        a worker pair
    DIR/allowed/clients/client.key           public keys the broker lets in as clients
    DIR/allowed/workers/worker.key           public keys the broker lets in as workers
    DIR/allowed/admins/NAME.key              client keys that may also manage every job
                                             (``--admin NAME``; none by default)

A process that connects to the broker finds its keys, first match wins, in: explicit
arguments (the ``--broker-key``/``--key`` flags), the environment (``DISTILL_BROKER_KEY``,
``DISTILL_KEY``), then the config file ``$XDG_CONFIG_HOME/distill/keys.json`` (default
``~/.config/distill/keys.json``)::

    {"broker_key": "~/keys/broker.key", "key": "~/keys/client.key_secret",
     "brokers": {"gpu-box": {"broker_key": "~/keys/gpu-box.key", "key": "~/keys/me.key_secret"},
                 "127.0.0.1": {}},
     "broker": {"secret_key": "~/keys/broker.key_secret", "allowed": "~/keys/allowed"}}

``brokers`` entries (by host, or host:port) take the place of the top level for that broker;
an empty entry means a plain connection, e.g. to a local ``distill up`` without keys. With no
keys found a client connects without CURVE (what a loopback broker expects).
"""

from __future__ import annotations

import enum
import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq
import zmq.auth

from distill.shared.errors import ConfigError
from distill.shared.logs import get_logger

ENV_BROKER_KEY = "DISTILL_BROKER_KEY"  # a client's or worker's copy of broker.key
ENV_KEY = "DISTILL_KEY"  # this process's own NAME.key_secret
ENV_BROKER_SECRET_KEY = "DISTILL_BROKER_SECRET_KEY"  # the broker's broker.key_secret
ENV_ALLOWED_KEYS = "DISTILL_ALLOWED_KEYS"  # the broker's allowed folder (clients/, workers/)
ENV_INSECURE = "DISTILL_INSECURE"  # "1": the broker may bind a public address without CURVE
ENV_CONFIG = "DISTILL_KEYS_CONFIG"  # another keys.json than the one in the config folder

ROLE_CLIENT = "client"
ROLE_WORKER = "worker"
# A client key that may also cancel, retry and remove other keys' jobs (it has the client role
# too: a key in admins/ need not be in clients/).
ROLE_ADMIN = "admin"
ROLE_DIRS = {ROLE_CLIENT: "clients", ROLE_WORKER: "workers", ROLE_ADMIN: "admins"}  # role -> allowed/ sub-folder


@dataclass(frozen=True)
class ClientSecurity:
    """What a connecting socket (client, worker, subscriber, publisher) needs for CURVE."""

    server_key: bytes  # the broker's public key, z85
    public_key: bytes  # this process's public key, z85
    secret_key: bytes  # this process's secret key, z85

    def apply(self, sock: zmq.Socket) -> None:
        """Make ``sock`` a CURVE client. Call before connect: options apply to later connects."""
        sock.curve_serverkey = self.server_key
        sock.curve_publickey = self.public_key
        sock.curve_secretkey = self.secret_key


@dataclass(frozen=True)
class BrokerSecurity:
    """The broker's pair and its allowed folder: what CURVE on the three sockets needs."""

    public_key: bytes
    secret_key: bytes
    allowed_dir: Path  # holds clients/, workers/ and admins/, each of NAME.key public keys


def apply_client(sock: zmq.Socket, security: ClientSecurity | None) -> None:
    """CURVE on ``sock`` when ``security`` is given; plain otherwise."""
    if security is not None:
        security.apply(sock)


LOOPBACK_HOSTS = ("127.", "::1", "localhost")


def is_loopback(host: str) -> bool:
    return host.startswith(LOOPBACK_HOSTS) or host == "[::1]"


def check_exposure(host: str, *, secure: bool, insecure: bool) -> None:
    """Refuse to serve a non-loopback address without CURVE unless told ``insecure``."""
    if secure or is_loopback(host):
        return
    if not insecure:
        raise ConfigError(
            f"refusing to bind {host} without CURVE: anyone who reaches the port could read "
            "every artifact and cancel any job. Make keys with `distill keys generate "
            "~/distill-keys`, then start the broker with --secret-key ~/distill-keys/"
            "broker.key_secret --allowed ~/distill-keys/allowed (distill up: --keys "
            "~/distill-keys), or pass --insecure on a network you trust"
        )
    get_logger("broker").warning(
        "broker_insecure",
        host=host,
        reason="bound to a non-loopback address without CURVE (--insecure): anyone who "
        "reaches the port can read artifacts, cancel jobs and register workers",
    )


# --- key files ---------------------------------------------------------------------------------
def load_public_key(path: Path) -> bytes:
    """The public key in a ``NAME.key`` (or ``NAME.key_secret``) certificate file."""
    public, _ = _load(path)
    return public


def load_key_pair(path: Path) -> tuple[bytes, bytes]:
    """(public, secret) from a ``NAME.key_secret`` file; refuse one that others can read."""
    public, secret = _load(path)
    if secret is None:
        raise ConfigError(
            f"{path} holds no secret key: give the NAME.key_secret file, not the public NAME.key"
        )
    if os.name == "posix" and path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(f"secret key {path} is readable by other users: chmod 600 {path}")
    return public, secret


def _load(path: Path) -> tuple[bytes, bytes | None]:
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(
            f"key file {path} does not exist (make keys with `distill keys generate DIR`)"
        )
    try:
        public, secret = zmq.auth.load_certificate(path)
    except (ValueError, OSError) as e:
        raise ConfigError(f"key file {path} is not a ZeroMQ certificate: {e}") from e
    if public is None:
        raise ConfigError(f"key file {path} holds no public key")
    return public, secret


def generate_keys(
    directory: Path, clients: list[str], workers: list[str], admins: list[str] | None = None
) -> list[Path]:
    """Write the broker pair, one pair per client, worker and admin name, and the allowed
    folder (an admin's public key goes in ``admins/`` only: that role includes the client's).

    Refuses to overwrite: replacing a key pair silently would lock out every peer that holds
    the old one. Returns the files written."""
    directory = Path(directory).expanduser()
    admins = list(admins or [])
    names = ["broker", *clients, *workers, *admins]
    for name in names[1:]:
        _check_key_name(name)
    if len(set(names)) != len(names):
        raise ConfigError(f"key names must be distinct (and not 'broker'): {names}")
    existing = [
        directory / f"{n}.key_secret" for n in names if (directory / f"{n}.key_secret").exists()
    ]
    if existing:
        raise ConfigError(f"{existing[0]} already exists: choose another folder (`distill keys "
                          "add DIR NAME` adds one more pair to a key folder)")
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o700)
    written: list[Path] = []
    for name in names:
        written += _write_pair(directory, name)
    for role, group in ((ROLE_CLIENT, clients), (ROLE_WORKER, workers), (ROLE_ADMIN, admins)):
        folder = directory / "allowed" / ROLE_DIRS[role]
        folder.mkdir(parents=True, exist_ok=True)
        for name in group:
            target = folder / f"{name}.key"
            target.write_bytes((directory / f"{name}.key").read_bytes())
            written.append(target)
    return written


def add_key(directory: Path, name: str, role: str) -> list[Path]:
    """One more pair in a folder ``generate_keys`` made, its public key in the allowed folder
    under ``role`` (client, worker or admin): a broker reading that folder lets it in at its
    next handshake, without a restart. Refuses to overwrite a pair. Returns the files written."""
    directory = Path(directory).expanduser()
    _check_key_name(name)
    if role not in ROLE_DIRS:
        raise ConfigError(f"unknown role {role!r}: one of {', '.join(ROLE_DIRS)}")
    if not (directory / "allowed").is_dir():
        raise ConfigError(f"{directory} has no allowed/ folder: it is not a key folder that "
                          "`distill keys generate` made (make one with it first)")
    if (directory / f"{name}.key_secret").exists():
        raise ConfigError(f"{directory / f'{name}.key_secret'} already exists: choose another "
                          "name (a new pair under the same name would lock out the machine "
                          "that holds the old one)")
    written = _write_pair(directory, name)
    folder = directory / "allowed" / ROLE_DIRS[role]
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{name}.key"
    target.write_bytes((directory / f"{name}.key").read_bytes())
    return [*written, target]


def _check_key_name(name: str) -> None:
    """A key's name becomes its file names: letters, digits, '.', '_' and '-' only."""
    if (not name or name.startswith(".") or name == "broker" or len(name) > 100
            or not all(c.isascii() and (c.isalnum() or c in "._-") for c in name)):
        raise ConfigError(f"key name {name!r}: use letters, digits, '.', '_' and '-' (not "
                          "starting with '.', at most 100 characters, and not 'broker')")


def _write_pair(directory: Path, name: str) -> list[Path]:
    public, secret = zmq.auth.create_certificates(directory, name)
    Path(secret).chmod(0o600)
    Path(public).chmod(0o644)
    return [Path(public), Path(secret)]


# --- where a process finds its keys --------------------------------------------------------------
def config_path() -> Path:
    if os.environ.get(ENV_CONFIG):
        return Path(os.environ[ENV_CONFIG]).expanduser()
    base = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return base / "distill" / "keys.json"


def read_config() -> dict[str, Any]:
    """The keys config file as a map ({} when there is none)."""
    path = config_path()
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"keys config {path} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"keys config {path} must hold a JSON object")
    return data


def _setting(
    explicit: str | Path | None, env: str, config: dict[str, Any], key: str
) -> Path | None:
    value = explicit or os.environ.get(env) or config.get(key)
    return Path(str(value)).expanduser() if value else None


def _config_for(endpoint: str | None) -> dict[str, Any]:
    """The config file's settings for a broker: its ``brokers`` entry for the endpoint's host
    (``"gpu-box"``) or host:port (``"gpu-box:5555"``) when there is one, else the top level."""
    config = read_config()
    brokers = config.get("brokers") or {}
    if endpoint and isinstance(brokers, dict):
        address = endpoint.split("://", 1)[-1]
        for name in (address, address.rsplit(":", 1)[0]):
            if isinstance(brokers.get(name), dict):
                return dict(brokers[name])
    return config


def client_security(
    broker_key: str | Path | None = None,
    key: str | Path | None = None,
    endpoint: str | None = None,
) -> ClientSecurity | None:
    """The CURVE settings of a connecting process: arguments, then environment, then the config
    file (its entry for ``endpoint``'s broker, if any). None when no broker key is configured
    anywhere (a plain loopback broker)."""
    config = _config_for(endpoint)
    server_path = _setting(broker_key, ENV_BROKER_KEY, config, "broker_key")
    pair_path = _setting(key, ENV_KEY, config, "key")
    if server_path is None and pair_path is None:
        return None
    if server_path is None or pair_path is None:
        missing = (
            "the broker's public key (--broker-key, $DISTILL_BROKER_KEY)"
            if server_path is None
            else "this machine's key pair (--key, $DISTILL_KEY)"
        )
        raise ConfigError(f"CURVE needs both keys; {missing} is not set (see {config_path()})")
    public, secret = load_key_pair(pair_path)
    return ClientSecurity(load_public_key(server_path), public, secret)


def broker_security(
    secret_key: str | Path | None = None, allowed: str | Path | None = None
) -> BrokerSecurity | None:
    """The broker's CURVE settings from arguments, environment, or the config file's
    ``broker`` section; None when no secret key is configured."""
    config = read_config().get("broker") or {}
    pair_path = _setting(secret_key, ENV_BROKER_SECRET_KEY, config, "secret_key")
    allowed_dir = _setting(allowed, ENV_ALLOWED_KEYS, config, "allowed")
    if pair_path is None and allowed_dir is None:
        return None
    if pair_path is None or allowed_dir is None:
        missing = "--secret-key" if pair_path is None else "--allowed"
        raise ConfigError(
            f"CURVE on the broker needs a secret key and an allowed folder; {missing} is not set"
        )
    if not allowed_dir.is_dir():
        raise ConfigError(f"allowed keys folder {allowed_dir} does not exist")
    public, secret = load_key_pair(pair_path)
    return BrokerSecurity(public, secret, allowed_dir)


class Auto(enum.Enum):
    """The default of a client's ``security`` argument: find the keys with client_security()."""

    AUTO = "auto"


AUTO = Auto.AUTO
SecurityArg = ClientSecurity | Auto | None


def resolve(security: SecurityArg, endpoint: str | None = None) -> ClientSecurity | None:
    """``AUTO`` -> what :func:`client_security` finds for ``endpoint``; anything else as given."""
    return client_security(endpoint=endpoint) if isinstance(security, Auto) else security
