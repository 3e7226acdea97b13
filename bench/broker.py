"""Round trips per second through the Distill broker to an echo worker, beside a plain
DEALER -> ROUTER echo on the same machine in the same run, one in flight and 100 in flight;
then the same through a second broker with CURVE on (client, broker and worker all encrypt),
with 100-byte and 1 MiB bodies.

    python bench/broker.py [--seconds 2]

The ratios are the figures to watch: absolute numbers move with the machine's load. Through
the broker a request crosses two hops (client -> broker -> worker and back), so ~0.5 of the
plain echo is the ideal; "CURVE / plain broker" is the cost of encryption and authentication.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import zmq

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import best_of, free_port_block, spawn, stop, wait_for  # noqa: E402

from distill.shared.bus import protocol as P  # noqa: E402
from distill.shared.bus.client import Client  # noqa: E402
from distill.shared.bus.security import (  # noqa: E402
    ClientSecurity,
    apply_client,
    generate_keys,
    load_key_pair,
    load_public_key,
)

PAYLOAD = b"x" * 100
BIG_PAYLOAD = b"x" * (1 << 20)  # an artifact chunk's order of size: where encryption costs most


def plain_echo_server(endpoint: str) -> None:
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.bind(endpoint)
    while True:
        router.send_multipart(router.recv_multipart())


def rate(sock: zmq.Socket, frames: list[bytes], in_flight: int, seconds: float) -> float:
    """Requests answered per second with ``in_flight`` outstanding."""
    for _ in range(in_flight):
        sock.send_multipart(frames)
    done = 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        reply = sock.recv_multipart()
        if reply[-1] != frames[-1]:  # an error reply (a limit, an expiry) is not a round trip
            raise RuntimeError(f"not an echo: {reply[-1][:200]!r}")
        done += 1
        sock.send_multipart(frames)
    elapsed = time.perf_counter() - start
    for _ in range(in_flight):
        sock.recv_multipart()
    return done / elapsed


def measure(endpoint: str, frames: list[bytes], seconds: float, security: ClientSecurity | None = None,
            in_flight: tuple[int, int] = (1, 100)) -> tuple[float, float]:
    ctx: zmq.Context = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    apply_client(sock, security)
    sock.connect(endpoint)
    rate(sock, frames, 1, 0.2)  # warm up
    low = best_of(3, lambda: rate(sock, frames, in_flight[0], seconds))
    high = best_of(3, lambda: rate(sock, frames, in_flight[1], seconds))
    sock.close()
    return low, high


def start_curve_cluster(tmp: Path) -> tuple[str, ClientSecurity, list[subprocess.Popen[bytes]]]:
    keys = tmp / "keys"
    generate_keys(keys, ["bench"], ["echo"])
    port = free_port_block()
    endpoint = f"tcp://127.0.0.1:{port}"
    broker = spawn(["broker", "--port", str(port), "--data-dir", str(tmp / "curve-broker"),
                    "--secret-key", str(keys / "broker.key_secret"), "--allowed", str(keys / "allowed")],
                   tmp / "curve-broker.log")
    worker = spawn(["worker", "echo", "--broker", endpoint, "--device", "cpu",
                    "--broker-key", str(keys / "broker.key"), "--key", str(keys / "echo.key_secret")],
                   tmp / "curve-worker.log")
    public, secret = load_key_pair(keys / "bench.key_secret")
    return endpoint, ClientSecurity(load_public_key(keys / "broker.key"), public, secret), [worker, broker]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=2.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="distill-bench-") as folder:  # its keys go with it
        run(args, Path(folder))


def run(args: argparse.Namespace, tmp: Path) -> None:
    port = free_port_block()
    endpoint = f"tcp://127.0.0.1:{port}"
    broker = spawn(["broker", "--port", str(port), "--data-dir", str(tmp / "broker")], tmp / "broker.log")
    worker = spawn(["worker", "echo", "--broker", endpoint, "--device", "cpu"], tmp / "worker.log")
    plain_port = free_port_block()
    plain = mp.Process(target=plain_echo_server, args=(f"tcp://127.0.0.1:{plain_port}",), daemon=True)
    plain.start()
    curve_endpoint, security, curve_procs = start_curve_cluster(tmp)
    small, big = [b"", P.MDPC, b"echo", PAYLOAD], [b"", P.MDPC, b"echo", BIG_PAYLOAD]
    try:
        with Client(endpoint, timeout_s=1, security=None) as c:
            wait_for(lambda: _ready(c))
        with Client(curve_endpoint, timeout_s=1, security=security) as c:
            wait_for(lambda: _ready(c))
        b1, b100 = measure(endpoint, small, args.seconds)
        p1, p100 = measure(f"tcp://127.0.0.1:{plain_port}", [b"", PAYLOAD], args.seconds)
        c1, c100 = measure(curve_endpoint, small, args.seconds, security)
        bb1, bb4 = measure(endpoint, big, args.seconds, in_flight=(1, 4))
        cb1, cb4 = measure(curve_endpoint, big, args.seconds, security, in_flight=(1, 4))
    finally:
        for proc in (worker, broker, *curve_procs):
            stop(proc)
        plain.terminate()
    print(f"{'':24}{'broker (req/s)':>16}{'plain DEALER->ROUTER':>22}{'ratio':>8}")
    print(f"{'1 in flight':24}{b1:16.0f}{p1:22.0f}{b1 / p1:8.2f}")
    print(f"{'100 in flight':24}{b100:16.0f}{p100:22.0f}{b100 / p100:8.2f}")
    print()
    print(f"{'':24}{'CURVE broker':>16}{'plain broker':>22}{'CURVE / plain':>15}")
    rows = [("100 B, 1 in flight", c1, b1), ("100 B, 100 in flight", c100, b100),
            ("1 MiB, 1 in flight", cb1, bb1), ("1 MiB, 4 in flight", cb4, bb4)]
    for label, curve, base in rows:
        print(f"{label:24}{curve:16.0f}{base:22.0f}{curve / base:15.2f}")
    mib = len(BIG_PAYLOAD) / (1 << 20)
    print(f"{'1 MiB, 4 in flight MiB/s':24}{cb4 * mib:16.1f}{bb4 * mib:22.1f}")


def _ready(c: Client) -> bool:
    try:
        return c.mmi_service("echo")
    except Exception:
        c.close()
        return False


if __name__ == "__main__":
    main()
