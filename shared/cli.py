"""The ``distill`` command line: processes (broker, worker, up) and clients (workers, ping,
jobs, artifacts, dataset, train). Every client command takes ``--broker`` (or
``$DISTILL_BROKER``), so the same commands work against a broker on another machine."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import typer

from distill.shared import protocol as P
from distill.shared.errors import DistillError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Distill: train generative audio models on your own sounds.")

BrokerOpt = typer.Option(None, "--broker", "-b", envvar="DISTILL_BROKER",
                         help="Broker endpoint: tcp://HOST:PORT, HOST:PORT or HOST.")


def data_home() -> Path:
    return Path(os.environ.get("DISTILL_HOME", Path.home() / ".local/share/distill"))


def fail(message: str, code: int = 1) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def human_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def print_table(headers: list[str], rows: list[list[Any]]) -> None:
    cells = [[str(c) if c is not None else "-" for c in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    typer.echo("  ".join(h.upper().ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip())
    for row in cells:
        typer.echo("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


# --- processes --------------------------------------------------------------------------------
@app.command()
def broker(
    host: str = typer.Option(P.DEFAULT_HOST, help="Interface to bind (0.0.0.0 for all: other machines)."),
    port: int = typer.Option(P.PORT_MDP, help="MDP port; events use port+1 (out) and port+2 (in)."),
    data_dir: Path = typer.Option(None, help="Job table and artifact store (default: $DISTILL_HOME/broker)."),
    heartbeat_s: float = typer.Option(P.HEARTBEAT_INTERVAL_S, help="Heartbeat interval."),
    liveness: int = typer.Option(P.HEARTBEAT_LIVENESS, help="Missed heartbeats before a peer is dead."),
    request_timeout_s: float = typer.Option(P.REQUEST_TIMEOUT_S, help="How long a request waits for a worker."),
) -> None:
    """Run the broker: routes requests, owns the job table and the artifact store."""
    from distill.broker.broker import BrokerConfig
    from distill.broker.main import run_broker

    config = BrokerConfig(host=host, port=port, heartbeat_interval_s=heartbeat_s, heartbeat_liveness=liveness,
                          request_timeout_s=request_timeout_s,
                          data_dir=data_dir or data_home() / "broker")
    run_broker(config)


@app.command()
def worker(
    service: str = typer.Argument(..., help="echo, preprocess, vqvae"),
    broker: str = BrokerOpt,
    device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:N or mps."),
    threads: int = typer.Option(None, help="torch threads (default: all cores)."),
    heartbeat_s: float = typer.Option(P.HEARTBEAT_INTERVAL_S, help="Heartbeat interval."),
    liveness: int = typer.Option(P.HEARTBEAT_LIVENESS, help="Missed heartbeats before the broker is dead."),
) -> None:
    """Run one worker process for SERVICE, pinned to one device."""
    from distill.workers.main import run_worker

    try:
        run_worker(service, broker=broker, device=device, threads=threads,
                   heartbeat_interval_s=heartbeat_s, liveness=liveness)
    except DistillError as e:
        fail(str(e))


@app.command()
def up(
    host: str = typer.Option(P.DEFAULT_HOST, help="Interface the broker binds."),
    port: int = typer.Option(P.PORT_MDP, help="MDP port (events on port+1, port+2)."),
    data_dir: Path = typer.Option(None, help="Broker data (default: $DISTILL_HOME/broker)."),
    services: str = typer.Option(None, help="Comma-separated worker services (default: all)."),
    device: str = typer.Option(None, help="Device for the model workers (default: auto)."),
    check: bool = typer.Option(False, "--check", help="Start, do a round trip, shut down."),
) -> None:
    """A broker and one worker of each service on this machine. Ctrl-C stops them all."""
    from distill.shared.supervisor import Supervisor

    try:
        sup = Supervisor(host=host, port=port, data_dir=data_dir or data_home() / "broker",
                         services=services.split(",") if services else None, device=device)
        sys.exit(sup.run(check=check))
    except DistillError as e:
        fail(str(e))


# --- clients ----------------------------------------------------------------------------------
@app.command()
def workers(broker: str = BrokerOpt) -> None:
    """List the workers registered with the broker."""
    from distill.shared.client import Client

    try:
        with Client(broker, timeout_s=5) as client:
            info = client.workers()
    except DistillError as e:
        fail(str(e))
    rows = [[w["service"], w["host"], w["pid"], w["device"], w["state"], w["current_job"] or "-",
             f"{w['last_heartbeat_age_s']:.1f}s"] for w in info["workers"]]
    print_table(["service", "host", "pid", "device", "state", "job", "heartbeat"], rows)
    queued = {k: v for k, v in info["queued"].items() if v}
    if queued:
        typer.echo("queued requests: " + ", ".join(f"{k}={v}" for k, v in queued.items()))


@app.command()
def ping(broker: str = BrokerOpt, count: int = typer.Option(3, help="Round trips."),
         timeout_s: float = typer.Option(5.0, help="Per round trip.")) -> None:
    """Round trips through the broker to an echo worker."""
    from distill.shared.client import Client

    try:
        with Client(broker) as client:
            for i in range(count):
                rtt = client.ping(timeout_s=timeout_s)
                typer.echo(f"echo reply from {client.endpoint}: seq={i + 1} time={rtt * 1000:.2f} ms")
    except DistillError as e:
        fail(str(e))


def _register_subcommands() -> None:
    from distill.shared import cli_data, cli_jobs

    cli_jobs.register(app, BrokerOpt, fail, print_table, human_bytes)
    cli_data.register(app, BrokerOpt, fail, print_table)


_register_subcommands()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
