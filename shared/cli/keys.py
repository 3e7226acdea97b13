"""``distill keys generate DIR`` and ``distill keys add DIR NAME``: CURVE key pairs for the
broker, clients, workers and admins, and the broker's allowed folder (see
:mod:`distill.shared.bus.security` for the layout)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import typer

from distill.shared.cli.common import fail
from distill.shared.errors import DistillError

app = typer.Typer(no_args_is_help=True, help="CURVE keys for running across machines.")


def _written(make: Callable[[], list[Path]], directory: Path) -> Path:
    """Make the keys (a clear error, not a traceback, when it cannot), print each file
    written, and return the folder as an absolute path."""
    try:
        written = make()
    except DistillError as e:
        fail(str(e))
    for path in written:
        typer.echo(str(path))
    return directory.expanduser().resolve()


@app.command()
def generate(
    directory: Path = typer.Argument(..., help="Folder for the keys (created, mode 700)."),
    client: list[str] = typer.Option(["client"], "--client", help="Client key names (repeat)."),
    worker: list[str] = typer.Option(["worker"], "--worker", help="Worker key names (repeat)."),
    admin: list[str] = typer.Option(
        [], "--admin",
        help="Admin key names (repeat; none by default): client keys that may also cancel, "
             "retry and remove other keys' jobs."),
) -> None:
    """Write the broker's key pair, one pair per client, worker and admin, and DIR/allowed/."""
    from distill.shared.bus.security import generate_keys

    d = _written(lambda: generate_keys(directory, client, worker, admin), directory)
    typer.echo(f"""
broker machine:  distill broker --host 0.0.0.0 --secret-key {d}/broker.key_secret --allowed {d}/allowed
worker machine:  copy broker.key and {worker[0]}.key_secret, then
                 distill worker SERVICE --broker tcp://BROKER:5555 --broker-key broker.key --key {worker[0]}.key_secret
client machine:  copy broker.key and {client[0]}.key_secret, then
                 export DISTILL_BROKER_KEY=~/keys/broker.key DISTILL_KEY=~/keys/{client[0]}.key_secret
Secret keys (*.key_secret) never leave the machine that uses them; to lock a key out, delete
its file from {d}/allowed/ (the broker notices without a restart).
A job belongs to the client key that submitted it: only that key, or a key in
{d}/allowed/admins/, may cancel, retry or remove it.""")


@app.command()
def add(
    directory: Path = typer.Argument(..., help="A key folder `distill keys generate` made."),
    name: str = typer.Argument(..., help="The new key's name (its files: NAME.key, NAME.key_secret)."),
    role: str = typer.Option("client", "--role", help="client, worker or admin."),
) -> None:
    """One more key pair, let in by the broker that reads DIR/allowed/ (no restart): a new
    person's laptop, another GPU box, or a pair to replace one that leaked."""
    from distill.shared.bus.security import add_key

    d = _written(lambda: add_key(directory, name, role), directory)
    typer.echo(f"""
The broker reading {d}/allowed lets {name} in at its next handshake (no restart).
Copy broker.key and {name}.key_secret to the machine that uses them; the secret key never
leaves that machine.""")
