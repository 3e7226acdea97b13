"""Artifact throughput (MiB/s) through the broker, put and get, beside a plain file copy on
the same disk in the same run.

    python bench/artifacts.py [--mib 256]

The ratio (artifact / copy) is the figure to watch. A put hashes on the client, sends 1 MiB
chunks with credit-based flow control, hashes again on the broker and renames into place; a get
streams chunks with N requests in flight into the worker cache and verifies the hash.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import free_port_block, spawn, stop, wait_for  # noqa: E402

from distill.shared.bus.artifacts import ArtifactClient  # noqa: E402
from distill.shared.bus.cache import ArtifactCache  # noqa: E402
from distill.shared.bus.client import Client  # noqa: E402

MiB = 1024 * 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mib", type=int, default=256)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="distill-bench-"))
    src = tmp / "src.bin"
    with open(src, "wb") as f:
        for _ in range(args.mib):
            f.write(os.urandom(MiB))
    port = free_port_block()
    endpoint = f"tcp://127.0.0.1:{port}"
    broker = spawn(["broker", "--port", str(port), "--data-dir", str(tmp / "broker")], tmp / "broker.log")
    try:
        with Client(endpoint, timeout_s=60) as c:
            wait_for(lambda: _ready(c))
            ac = ArtifactClient(c, cache=ArtifactCache(tmp / "cache"))
            t0 = time.perf_counter()
            sha = ac.put_file(src, kind="bench", name="src.bin")
            t_put = time.perf_counter() - t0
            t0 = time.perf_counter()
            ac.get_file(sha)
            t_get = time.perf_counter() - t0
        t0 = time.perf_counter()
        shutil.copyfile(src, tmp / "copy.bin")
        os.sync()
        t_copy = time.perf_counter() - t0
    finally:
        stop(broker)
        shutil.rmtree(tmp, ignore_errors=True)
    copy_rate = args.mib / t_copy
    print(f"{args.mib} MiB; plain file copy {copy_rate:.0f} MiB/s")
    for name, t in (("put", t_put), ("get", t_get)):
        print(f"artifact {name:<4}{args.mib / t:8.0f} MiB/s   ratio to copy {args.mib / t / copy_rate:.2f}")


def _ready(c: Client) -> bool:
    try:
        return c.mmi_service("distill.artifacts")
    except Exception:
        c.close()
        return False


if __name__ == "__main__":
    main()
