"""Round trips per second through the Distill broker to an echo worker, beside a plain
DEALER -> ROUTER echo on the same machine in the same run, one in flight and 100 in flight.

    python bench/broker.py [--seconds 2]

The ratio (broker / plain) is the figure to watch: absolute numbers move with the machine's load.
Through the broker a request crosses two hops (client -> broker -> worker and back), so ~0.5 is
the ideal.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import sys
import tempfile
import time
from pathlib import Path

import zmq

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import best_of, free_port_block, spawn, stop, wait_for  # noqa: E402

from distill.shared.bus import protocol as P  # noqa: E402
from distill.shared.bus.client import Client  # noqa: E402

PAYLOAD = b"x" * 100


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
        sock.recv_multipart()
        done += 1
        sock.send_multipart(frames)
    elapsed = time.perf_counter() - start
    for _ in range(in_flight):
        sock.recv_multipart()
    return done / elapsed


def measure(endpoint: str, frames: list[bytes], seconds: float) -> tuple[float, float]:
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    rate(sock, frames, 1, 0.2)  # warm up
    one = best_of(3, lambda: rate(sock, frames, 1, seconds))
    hundred = best_of(3, lambda: rate(sock, frames, 100, seconds))
    sock.close()
    return one, hundred


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=2.0)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="distill-bench-"))
    port = free_port_block()
    endpoint = f"tcp://127.0.0.1:{port}"
    broker = spawn(["broker", "--port", str(port), "--data-dir", str(tmp / "broker")], tmp / "broker.log")
    worker = spawn(["worker", "echo", "--broker", endpoint, "--device", "cpu"], tmp / "worker.log")
    plain_port = free_port_block()
    plain = mp.Process(target=plain_echo_server, args=(f"tcp://127.0.0.1:{plain_port}",), daemon=True)
    plain.start()
    try:
        with Client(endpoint, timeout_s=1) as c:
            wait_for(lambda: _ready(c))
        b1, b100 = measure(endpoint, [b"", P.MDPC, b"echo", PAYLOAD], args.seconds)
        p1, p100 = measure(f"tcp://127.0.0.1:{plain_port}", [b"", PAYLOAD], args.seconds)
    finally:
        stop(worker)
        stop(broker)
        plain.terminate()
    print(f"{'':24}{'broker (req/s)':>16}{'plain DEALER->ROUTER':>22}{'ratio':>8}")
    print(f"{'1 in flight':24}{b1:16.0f}{p1:22.0f}{b1 / p1:8.2f}")
    print(f"{'100 in flight':24}{b100:16.0f}{p100:22.0f}{b100 / p100:8.2f}")


def _ready(c: Client) -> bool:
    try:
        return c.mmi_service("echo")
    except Exception:
        c.close()
        return False


if __name__ == "__main__":
    main()
