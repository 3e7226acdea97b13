"""Round trips per second through the Distill broker to an echo worker, beside a plain
DEALER -> ROUTER echo on the same machine in the same run, one in flight and 100 in flight;
then the same through a second broker with CURVE on (client, broker and worker all encrypt),
with 100-byte and 1 MiB bodies. Then pruning: how long removing 10 000 finished jobs holds
the broker's socket loop at a time.

    python bench/broker.py [--seconds 2] [--only rtt|prune] [--prune-jobs 10000]

The ratios are the figures to watch: absolute numbers move with the machine's load. Through
the broker a request crosses two hops (client -> broker -> worker and back), so ~0.5 of the
plain echo is the ideal; "CURVE / plain broker" is the cost of encryption and authentication.

Pruning: a journal of N finished jobs (70% generate jobs naming 8 sounds each, 20% RVQ-VAE
runs of 200 metric rows with a preview, 10% failed runs with a checkpoint and a preview) is
pruned as the broker's upkeep does it, one bounded step per loop turn; the longest step is the
longest the loop waits. The baseline, on a copy of the same data in the same run: removing
them all in one call, as one request without steps would. Then a broker process prunes the
same journal (DISTILL_STORE_KEEP_FINISHED_JOBS_DAYS) while a client times echo round trips
through it, beside the same client's round trips once the pruning is over.

Referenced artifacts: what the store may not delete (every artifact a queued or running job's
params name, their checkpoints, their dependencies' results), asked of a journal of N queued
jobs naming 20 files each, as retention asks it each time a checkpoint is superseded and
`artifacts rm` asks it: from the journal's artifact index, all of them and one artifact at a
time (what a deletion asks), beside the baseline of decoding every queued job's params (how it
was read before the index), in the same run.

    python bench/broker.py --only referenced [--referenced-jobs 5000]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
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
    parser.add_argument("--only", choices=["rtt", "prune", "referenced"], default=None)
    parser.add_argument("--prune-jobs", type=int, default=10_000)
    parser.add_argument("--referenced-jobs", type=int, default=5_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="distill-bench-") as folder:  # its keys go with it
        if args.only in (None, "rtt"):
            run(args, Path(folder))
        if args.only in (None, "prune"):
            run_prune(args.prune_jobs, Path(folder))
        if args.only in (None, "referenced"):
            run_referenced(args.referenced_jobs, Path(folder))


def run_referenced(jobs: int, tmp: Path) -> None:
    import hashlib

    from distill.broker.store.journal import JobStore, _collect_sha256, _unpack

    journal = JobStore(tmp / "referenced.sqlite3")
    with journal.batch():
        for i in range(jobs):
            files = [hashlib.sha256(f"{i}-{k}".encode()).hexdigest() for k in range(20)]
            journal.submit("distill.preprocess", {"files": [{"name": f"{k}.wav", "sha256": f}
                                                            for k, f in enumerate(files)]})  # fmt: skip

    def decoded() -> set[str]:  # the baseline: every queued job's params decoded and walked
        found: set[str] = set()
        rows = journal._db.execute(
            "SELECT params, checkpoint FROM jobs WHERE status IN ('queued', 'running')"
        ).fetchall()
        for params, checkpoint in rows:
            _collect_sha256(_unpack(params), found)
            if checkpoint is not None:
                found.add(checkpoint)
        return found

    def seconds(fn: Callable[[], set[str]]) -> float:  # the least disturbed of 5 runs
        times = []
        for _ in range(5):
            started = time.perf_counter()
            fn()
            times.append(time.perf_counter() - started)
        return min(times)

    assert decoded() == journal.referenced_artifacts()  # the same answer
    base, indexed = seconds(decoded), seconds(journal.referenced_artifacts)
    probes = [hashlib.sha256(f"{i}-0".encode()).hexdigest() for i in (0, jobs // 2, jobs - 1)]
    probes.append("0" * 64)  # needed by none

    def ask_each() -> set[str]:  # what a deletion asks: is this one in use?
        in_use = journal.in_use()
        return {sha for sha in probes if sha in in_use}

    assert ask_each() == set(probes[:3])
    one = seconds(ask_each) / len(probes)
    journal.close()
    print(f"\nreferenced artifacts of {jobs} queued jobs naming 20 files each (best of 5): "
          f"decoding their params (baseline) {base * 1e3:.0f} ms; all of them from the index "
          f"{indexed * 1e3:.0f} ms = {indexed / base:.2f}x; whether one is in use (what a "
          f"deletion asks) {one * 1e3:.2f} ms = {one / base:.4f}x")  # fmt: skip


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


def fill_journal(data_dir: Path, jobs: int, finished_at: float) -> int:
    """A broker data folder holding ``jobs`` finished jobs (see the module doc) that ended at
    ``finished_at``; returns the artifacts stored for them."""
    import hashlib

    from distill.broker.store.artifacts import ArtifactStore
    from distill.broker.store.journal import JobStore

    def sha(text: str) -> str:
        return hashlib.sha256(text.encode()).hexdigest()

    data_dir.mkdir(parents=True)
    journal = JobStore(data_dir / "jobs.sqlite3", clock=lambda: finished_at)
    store = ArtifactStore(data_dir / "artifacts", min_free_bytes=0)
    stored = 0
    with journal.batch():
        for i in range(jobs):
            kind = "generate" if i % 10 < 7 else "train" if i % 10 < 9 else "failed"
            params = ({"op": "generate", "model": sha("model"), "count": 8, "seed": i}
                      if kind == "generate" else {"dataset": sha("dataset"), "train": {"epochs": 200}})
            job = journal.submit("distill.infer" if kind == "generate" else "distill.train.vqvae",
                                 params)  # fmt: skip
            journal.mark_running(job.id, "w")
            journal.record_progress(job.id, {"fraction": 1.0, "epoch": 200})
            for epoch in range({"generate": 0, "train": 200, "failed": 20}[kind]):
                journal.append_metrics(job.id, {"epoch": epoch, "loss": 1.0 / (epoch + 1),
                                                "val_loss": 1.1, "util": [0.9] * 12})  # fmt: skip
            if kind == "failed":
                for name in ("ckpt", "epoch0020-a.wav"):
                    store.put_bytes(f"{name} {i}".encode() * 200, "checkpoint" if name == "ckpt"
                                    else "preview", name, job=job.id)  # fmt: skip
                    stored += 1
                journal.fail_attempt(job.id, "nan loss", final=True)
                continue
            if kind == "train":
                store.put_bytes(f"preview {i}".encode() * 200, "preview", "epoch0200-a.wav", job=job.id)
                stored += 1
            result = ({"audio": [sha(f"{i}-{k}") for k in range(8)], "count": 8}
                      if kind == "generate" else {"model": sha(f"weights {i}"), "epochs": 200})
            journal.mark_succeeded(job.id, result)
    journal.close()
    store.close()
    return stored


def prune_in_steps(data_dir: Path, older_than_s: float) -> tuple[list[float], int, int]:
    """Each step's seconds, as the broker's upkeep takes them, and the jobs and artifacts gone."""
    from distill.broker.services.removal import JobRemoval, PruneRule
    from distill.broker.services.retention import Retention
    from distill.broker.store.artifacts import ArtifactStore
    from distill.broker.store.journal import JobStore

    journal = JobStore(data_dir / "jobs.sqlite3")
    store = ArtifactStore(data_dir / "artifacts", min_free_bytes=0)
    retention = Retention(journal, store, lambda shas, in_use: store.delete_many(shas, in_use=in_use),
                          keep_preview_epochs=3)  # fmt: skip
    remover, rule = JobRemoval(journal, retention), PruneRule(older_than_s=older_than_s)
    steps, cursor, jobs, artifacts = [], None, 0, 0
    while True:
        start = time.perf_counter()
        tally, cursor = remover.prune_step(rule, cursor)
        steps.append(time.perf_counter() - start)
        jobs, artifacts = jobs + len(tally.jobs), artifacts + len(tally.released)
        if cursor is None:
            return steps, jobs, artifacts


def prune_at_once(data_dir: Path, older_than_s: float) -> tuple[float, int]:
    """The baseline: every due job removed in one call (one transaction)."""
    from distill.broker.services.removal import JobRemoval
    from distill.broker.services.retention import Retention
    from distill.broker.store.artifacts import ArtifactStore
    from distill.broker.store.journal import JobStore

    journal = JobStore(data_dir / "jobs.sqlite3")
    store = ArtifactStore(data_dir / "artifacts", min_free_bytes=0)
    retention = Retention(journal, store, lambda shas, in_use: store.delete_many(shas, in_use=in_use),
                          keep_preview_epochs=3)  # fmt: skip
    ids, cursor = [], None
    while True:
        page = journal.prunable(older_than_s=older_than_s, after=cursor, limit=1000)
        ids += [job.id for job in page.jobs]
        if (cursor := page.cursor) is None:
            break
    start = time.perf_counter()
    JobRemoval(journal, retention).remove(ids, results=False, dry_run=False)
    return time.perf_counter() - start, len(ids)


def echo_latencies(c: Client, until: Callable[[], bool], at_least: int = 200) -> list[float]:
    """Seconds per echo round trip (one in flight) until ``until()`` (asked every 50)."""
    times: list[float] = []
    while len(times) < at_least or not (len(times) % 50 == 0 and until()):
        start = time.perf_counter()
        c.request_raw("echo", [PAYLOAD])
        times.append(time.perf_counter() - start)
    return times


def run_prune(jobs: int, tmp: Path) -> None:
    import shutil

    day = 86_400.0
    data = tmp / "prune-broker"
    build = time.perf_counter()
    stored = fill_journal(data, jobs, time.time() - 40 * day)
    print(f"\npruning {jobs} finished jobs ({stored} checkpoints and previews; journal built in "
          f"{time.perf_counter() - build:.0f} s)")  # fmt: skip
    for copy in ("at-once", "process"):
        shutil.copytree(data, tmp / f"prune-{copy}")
    steps, removed, released = prune_in_steps(data, 30 * day)
    at_once, baseline_jobs = prune_at_once(tmp / "prune-at-once", 30 * day)
    assert removed == baseline_jobs == jobs, (removed, baseline_jobs)
    longest = max(steps)
    print(f"{'':40}{'ms':>10}")
    print(f"{'longest step (the loop held)':40}{longest * 1000:10.1f}")
    print(f"{'median step':40}{statistics.median(steps) * 1000:10.1f}")
    print(f"{f'all {len(steps)} steps':40}{sum(steps) * 1000:10.1f}")
    print(f"{'baseline: all in one call':40}{at_once * 1000:10.1f}")
    print(f"longest step / all in one call: {longest / at_once:.3f}; "
          f"{released} artifacts released")  # fmt: skip

    port = free_port_block()
    endpoint = f"tcp://127.0.0.1:{port}"
    # the worker first (it waits for its broker): the client gets through while the prune runs
    worker = spawn(["worker", "echo", "--broker", endpoint, "--device", "cpu"], tmp / "prune-worker.log")
    time.sleep(3)
    os.environ["DISTILL_STORE_KEEP_FINISHED_JOBS_DAYS"] = "30"
    try:
        broker = spawn(["broker", "--port", str(port), "--data-dir", str(tmp / "prune-process")],
                       tmp / "prune-broker.log")  # fmt: skip
    finally:
        del os.environ["DISTILL_STORE_KEEP_FINISHED_JOBS_DAYS"]
    try:
        with Client(endpoint, timeout_s=5, security=None) as c:
            wait_for(lambda: _ready(c))
            left = c.request("distill.jobs", {"op": "counts"})
            during = echo_latencies(c, lambda: sum(c.request("distill.jobs", {"op": "counts"}).values()) == 0)
            after = echo_latencies(c, lambda: True, at_least=len(during))
    finally:
        stop(worker)
        stop(broker)
    finished = sum(left[s] for s in ("succeeded", "failed", "cancelled"))
    print(f"\necho round trips through a broker process pruning them ({finished} of {jobs} "
          "left when the client got through; ms):")  # fmt: skip
    print(f"{'':24}{'median':>10}{'p99':>10}{'max':>10}")
    for label, times in (("while pruning", during), ("baseline: after", after)):
        q = sorted(times)
        print(f"{label:24}{statistics.median(q) * 1000:10.2f}{q[int(0.99 * (len(q) - 1))] * 1000:10.2f}"
              f"{q[-1] * 1000:10.2f}")  # fmt: skip
    print(f"max while pruning / max after: {max(during) / max(after):.1f}")


def _ready(c: Client) -> bool:
    try:
        return c.mmi_service("echo")
    except Exception:
        c.close()
        return False


if __name__ == "__main__":
    main()
