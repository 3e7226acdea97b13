"""A broker that cannot be reached is said in seconds, with why (the socket monitor's verdict,
distill.shared.bus.contact), and only while the client has never reached it.

Before: every such request waited out its timeout (a CLI command 10 s, then 2 s of mmi.service)
and said "no broker answered ... is it running there? (a broker that runs CURVE looks the same
...)", whatever the cause. The CURVE verdicts are in tests/broker/test_curve.py.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from typer.testing import CliRunner

from distill.shared.bus import protocol as P
from distill.shared.bus.client import Client, Subscription
from distill.shared.bus.contact import BrokerUnreachable
from distill.shared.cli.main import app
from tests.conftest import free_port_block
from tests.shared.bus.test_subscription import Running

pytestmark = pytest.mark.integration


@pytest.mark.slow  # waits out the client's grace before it says a refusal (seconds)
def test_a_port_nothing_listens_on_is_said_with_its_reason() -> None:
    endpoint = f"tcp://127.0.0.1:{free_port_block()}"
    with Client(endpoint, timeout_s=60, retries=3) as client, pytest.raises(
        BrokerUnreachable, match=r"cannot talk to a broker at tcp://127\.0\.0\.1:\d+: nothing accepts connections "
                                 r"there \(connection refused\): is the broker running\? Start one"):  # fmt: skip
        client.request("distill.jobs", {"op": "counts"})
    with pytest.raises(BrokerUnreachable, match=r":\d+ \(its event port\): nothing accepts"):
        Subscription(endpoint, ["job."], timeout_s=60)
    # the CLI says the same, in one line
    out = CliRunner().invoke(app, ["jobs", "ls", "--broker", endpoint])
    assert out.exit_code == 1 and "nothing accepts connections there" in out.output, out.output
    assert "Traceback" not in out.output


async def test_the_asyncio_client_says_why_when_its_request_times_out() -> None:
    """The TUI's poll (0.75 s) said "no broker answered ... is it running there?" and spent
    as long again asking mmi.service; it now shows the monitor's reason."""
    from distill.shared.bus.aclient import AsyncClient

    async with AsyncClient(f"tcp://127.0.0.1:{free_port_block()}", timeout_s=0.75) as client:
        with pytest.raises(BrokerUnreachable, match="nothing accepts connections there"):
            await client.request("distill.workers", {"op": "list"})


@pytest.mark.slow  # waits out the client's grace before it says a refusal (seconds)
async def test_the_asyncio_client_says_why_in_seconds_not_after_its_timeout() -> None:
    """Before: the UI's requests (a 30-s timeout) to a broker that is not there waited the 30 s
    out, where the blocking client said why in 2: the asyncio client read its monitor only
    once the timeout had passed."""
    import time

    from distill.shared.bus.aclient import AsyncClient

    async with AsyncClient(f"tcp://127.0.0.1:{free_port_block()}", timeout_s=30) as client:
        for _ in range(2):  # and the next request as soon (the grace is from the first)
            start = time.monotonic()
            with pytest.raises(BrokerUnreachable, match="nothing accepts connections there"):
                await client.request("distill.jobs", {"op": "counts"})
            assert time.monotonic() - start < 10


@pytest.mark.slow  # waits out the client's grace before it says a refusal (seconds)
async def test_an_asyncio_client_that_reached_the_broker_waits_out_its_restart(tmp_path: Path) -> None:
    """As the blocking client: the verdict is for first contact only (the UI's requests ride
    through a broker restarting; its link says "disconnected" meanwhile)."""
    import asyncio

    from distill.shared.bus.aclient import AsyncClient

    running = Running(free_port_block(), tmp_path / "broker")
    running.start()
    snapshot = {"op": "snapshot", "prefixes": ["none."]}
    try:
        async with AsyncClient(f"tcp://127.0.0.1:{running.port}", timeout_s=30) as client:
            first = (await client.request(P.SERVICE_EVENTS, snapshot))["broker_epoch"]
            running.halt()
            restarter = threading.Timer(3.0, running.start)  # down for longer than the grace
            restarter.start()
            second = (await client.request(P.SERVICE_EVENTS, snapshot))["broker_epoch"]
            await asyncio.to_thread(restarter.join)
    finally:
        running.halt()
    assert second != first  # answered by the broker started again


@pytest.mark.slow  # waits out the client's grace before it says a refusal (seconds)
def test_a_host_name_that_does_not_resolve_is_named() -> None:
    with Client("tcp://no-such-host.invalid:5555", timeout_s=60) as client, pytest.raises(
        BrokerUnreachable, match="the host name 'no-such-host.invalid' does not resolve"):  # fmt: skip
        client.request("distill.jobs", {"op": "counts"})


def test_a_broker_that_starts_within_the_grace_is_reached(tmp_path: Path) -> None:
    """`distill up &` then a command at once: the broker binds a moment after the request."""
    running = Running(free_port_block(), tmp_path / "broker")
    starter = threading.Timer(0.7, running.start)
    starter.start()
    try:
        with Client(f"tcp://127.0.0.1:{running.port}", timeout_s=30) as client:
            assert "queued" in client.request("distill.jobs", {"op": "counts"})
    finally:
        starter.join()
        running.halt()


@pytest.mark.slow  # waits out the client's grace before it says a refusal (seconds)
def test_a_client_that_reached_the_broker_waits_out_its_restart(tmp_path: Path) -> None:
    """The verdict is for first contact only: a script's client (or a transfer) that has had
    a reply rides through a broker down for longer than the grace, as before."""
    running = Running(free_port_block(), tmp_path / "broker")
    running.start()
    snapshot = {"op": "snapshot", "prefixes": ["none."]}
    try:
        with Client(f"tcp://127.0.0.1:{running.port}", timeout_s=30) as client:
            first = client.request(P.SERVICE_EVENTS, snapshot)["broker_epoch"]
            running.halt()
            restarter = threading.Timer(3.0, running.start)  # down for longer than the grace
            restarter.start()
            second = client.request(P.SERVICE_EVENTS, snapshot)["broker_epoch"]
            restarter.join()
    finally:
        running.halt()
    assert second != first  # answered by the broker started again
