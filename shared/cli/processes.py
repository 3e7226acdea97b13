"""``distill broker``, ``distill worker``, ``distill up``, and the two commands that look at
the running processes: ``distill workers`` and ``distill ping``.

The broker and the workers depend on ``shared/``, never the other way: their code is reached
through :data:`ENTRY_POINTS`, module paths imported only when the command runs.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer

from distill.shared.bus import protocol as P
from distill.shared.cli.common import EXIT_UNUSABLE, BrokerOpt, client, data_home, fail, print_table
from distill.shared.errors import ConfigError, DeviceError, DistillError

# "module:function" of each process's entry point (keyword arguments as the commands pass them).
ENTRY_POINTS: dict[str, str] = {
    "broker": "distill.broker.main:main",
    "worker": "distill.workers.runtime.main:run_worker",
}


def entry_point(name: str) -> Callable[..., Any]:
    module, _, function = ENTRY_POINTS[name].partition(":")
    entry: Callable[..., Any] = getattr(importlib.import_module(module), function)
    return entry


BrokerKeyOpt = typer.Option(None, "--broker-key", envvar="DISTILL_BROKER_KEY",
                            help="The broker's public key file (broker.key) for CURVE.")
KeyOpt = typer.Option(None, "--key", envvar="DISTILL_KEY",
                      help="This process's key pair (NAME.key_secret) for CURVE.")


def parse_bytes(text: str | None) -> int | None:
    """``500M``, ``20G``, ``1.5T`` or a plain number of bytes; None stays None."""
    if not text:
        return None
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    scale = units.get(text[-1].upper(), 1)
    try:
        value = float(text[:-1] if scale > 1 else text) * scale
    except ValueError:
        fail(f"not a size: {text!r} (examples: 500M, 20G)")
    return int(value)


def register(app: typer.Typer) -> None:
    from distill.shared.cli import keys

    # `distill keys` lives beside the process commands that use the keys.
    app.add_typer(keys.app, name="keys")
    app.command()(broker)
    app.command()(worker)
    app.command()(up)
    app.command()(workers)
    app.command()(ping)


def broker(
    host: str = typer.Option(P.DEFAULT_HOST, help="Interface to bind (0.0.0.0 for all: other machines)."),
    port: int = typer.Option(P.PORT_MDP, help="MDP port; events use port+1 (out) and port+2 (in)."),
    data_dir: Path = typer.Option(None, help="Job table and artifact store (default: $DISTILL_HOME/broker)."),
    heartbeat_s: float = typer.Option(P.HEARTBEAT_INTERVAL_S, help="Heartbeat interval."),
    liveness: int = typer.Option(P.HEARTBEAT_LIVENESS, help="Missed heartbeats before a peer is dead."),
    request_timeout_s: float = typer.Option(P.REQUEST_TIMEOUT_S, help="How long a request waits for a worker."),
    secret_key: Path = typer.Option(None, envvar="DISTILL_BROKER_SECRET_KEY",
                                    help="The broker's key pair (broker.key_secret): CURVE on."),
    allowed: Path = typer.Option(None, envvar="DISTILL_ALLOWED_KEYS",
                                 help="Allowed public keys: clients/, workers/ and admins/ subfolders of NAME.key files."),
    insecure: bool = typer.Option(False, "--insecure", envvar="DISTILL_INSECURE",
                                  help="Allow a non-loopback --host without CURVE (warned)."),
    max_outstanding: int = typer.Option(
        None, help="Requests one client may have on workers (default 1024)."),
    artifact_quota: str = typer.Option(
        None, help="Artifact bytes per key, e.g. 20G (default: none)."),
) -> None:
    """Run the broker: routes requests, owns the job table and the artifact store."""
    try:
        entry_point("broker")(host=host, port=port, data_dir=data_dir or data_home() / "broker",
                              heartbeat_interval_s=heartbeat_s, heartbeat_liveness=liveness,
                              request_timeout_s=request_timeout_s, secret_key=secret_key,
                              allowed=allowed, insecure=insecure, max_outstanding=max_outstanding,
                              artifact_quota_bytes=parse_bytes(artifact_quota))
    except DistillError as e:  # its folder or port taken, keys or settings wrong: not transient
        fail(str(e), code=EXIT_UNUSABLE)


def worker(
    service: str = typer.Argument(..., help="echo, sleep, preprocess, vqvae, prior, infer"),
    broker: str = BrokerOpt,
    device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:N or mps."),
    threads: int = typer.Option(None, help="torch threads (default: all cores)."),
    heartbeat_s: float = typer.Option(P.HEARTBEAT_INTERVAL_S, help="Heartbeat interval."),
    liveness: int = typer.Option(P.HEARTBEAT_LIVENESS, help="Missed heartbeats before the broker is dead."),
    broker_key: Path = BrokerKeyOpt,
    key: Path = KeyOpt,
) -> None:
    """Run one worker process for SERVICE, pinned to one device."""
    try:
        entry_point("worker")(service, broker=broker, device=device, threads=threads,
                              heartbeat_interval_s=heartbeat_s, liveness=liveness,
                              broker_key=broker_key, key=key)
    except (ConfigError, DeviceError) as e:  # a restart would fail the same way
        fail(str(e), code=EXIT_UNUSABLE)
    except DistillError as e:
        fail(str(e))


def up(
    host: str = typer.Option(P.DEFAULT_HOST, help="Interface the broker binds."),
    port: int = typer.Option(P.PORT_MDP, help="MDP port (events on port+1, port+2)."),
    data_dir: Path = typer.Option(None, help="Broker data (default: $DISTILL_HOME/broker)."),
    services: str = typer.Option(None, help="Comma-separated worker services (default: all)."),
    device: str = typer.Option(None, help="Device for the model workers (default: auto)."),
    check: bool = typer.Option(False, "--check", help="Start, do a round trip, shut down."),
    keys: Path = typer.Option(None, help="A `distill keys generate` folder: CURVE for all (the "
                                         "workers and this command use its worker key)."),
    insecure: bool = typer.Option(False, "--insecure",
                                  help="Allow a non-loopback --host without CURVE."),
) -> None:
    """A broker and one worker of each service on this machine. Ctrl-C stops them all."""
    import os

    from distill.shared.bus import security as S
    from distill.shared.cli.supervisor import Supervisor
    from distill.shared.devices import check_device_spec

    # The children inherit the environment: that is how the keys reach them.
    if keys is not None:
        k = keys.expanduser()
        needed = ("broker.key_secret", "broker.key", "worker.key_secret", "allowed")
        missing = [name for name in needed if not (k / name).exists()]
        if missing:
            fail(f"--keys {keys}: no {', '.join(missing)} there; `distill up --keys` runs its "
                 "workers and its own requests as the key named worker: make the folder with "
                 "`distill keys generate DIR` (or add `--worker worker`)", code=EXIT_UNUSABLE)
        os.environ.update({S.ENV_BROKER_SECRET_KEY: str(k / "broker.key_secret"),
                           S.ENV_ALLOWED_KEYS: str(k / "allowed"),
                           S.ENV_BROKER_KEY: str(k / "broker.key"),
                           S.ENV_KEY: str(k / "worker.key_secret")})
    if insecure:
        os.environ[S.ENV_INSECURE] = "1"
    try:  # refuse here what the children would refuse, before anything starts
        S.check_exposure(host, secure=S.broker_security() is not None, insecure=insecure)
        if device is not None:
            check_device_spec(device)
        if not 1 <= port <= 65533:  # the events ports are port + 1 and port + 2
            raise ConfigError(f"--port {port}: must be in 1..65533 (events use the next two)")
    except DistillError as e:
        fail(str(e))

    try:
        sup = Supervisor(host=host, port=port, data_dir=data_dir or data_home() / "broker",
                         services=services.split(",") if services else None, device=device)
        sys.exit(sup.run(check=check))
    except DistillError as e:
        fail(str(e))


def workers(broker: str = BrokerOpt) -> None:
    """List the workers registered with the broker."""
    try:
        with client(broker, timeout_s=5) as c:
            info = c.workers()
    except DistillError as e:
        fail(str(e))
    rows = [[w["service"], w["host"], w["pid"], w["device"], w["state"], w["current_job"] or "-",
             f"{w['last_heartbeat_age_s']:.1f}s", _version(w)] for w in info["workers"]]
    print_table(["service", "host", "pid", "device", "state", "job", "heartbeat", "version"], rows)
    broker_version = info.get("broker_version")
    others = sorted({_version(w) for w in info["workers"]} - {broker_version, "-"})
    if broker_version and others:
        typer.echo(f"the broker runs Distill {broker_version}; workers of {', '.join(others)} "
                   "may fail what a newer one wrote (upgrade them) or ignore what they do not know")
    queued = {k: v for k, v in info["queued"].items() if v}
    if queued:
        typer.echo("queued requests: " + ", ".join(f"{k}={v}" for k, v in queued.items()))


def _version(worker: dict[str, Any]) -> str:
    versions = (worker.get("meta") or {}).get("versions")
    return str(versions.get("distill") or "-") if isinstance(versions, dict) else "-"


def ping(broker: str = BrokerOpt, count: int = typer.Option(3, help="Round trips."),
         timeout_s: float = typer.Option(5.0, help="Per round trip.")) -> None:
    """Round trips through the broker to an echo worker."""
    try:
        with client(broker) as c:
            for i in range(count):
                rtt = c.ping(timeout_s=timeout_s)
                typer.echo(f"echo reply from {c.endpoint}: seq={i + 1} time={rtt * 1000:.2f} ms")
    except DistillError as e:
        fail(str(e))
