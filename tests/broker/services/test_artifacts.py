"""Artifacts end to end: 200 MiB through a real broker, bounded memory, resumable put."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from distill.shared.bus.artifacts import ArtifactClient
from distill.shared.bus.cache import ArtifactCache
from distill.shared.bus.jobs import JobsClient
from distill.shared.errors import ArtifactError, RequestError
from tests.conftest import Cluster

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MiB = 1024 * 1024


def make_file(path: Path, size: int) -> str:
    digest = hashlib.sha256()
    block = os.urandom(MiB)
    with open(path, "wb") as f:
        for i in range(size // MiB):
            chunk = block[:8] + i.to_bytes(8, "little") + block[16:]  # distinct chunks
            f.write(chunk)
            digest.update(chunk)
    return digest.hexdigest()


class CutOff(Exception):
    pass


def test_200_mib_round_trip_with_bounded_broker_memory(cluster: Cluster, tmp_path: Path) -> None:
    cluster.start_broker()
    assert cluster.broker is not None
    broker_proc = psutil.Process(cluster.broker.pid)
    src = tmp_path / "big.bin"
    sha = make_file(src, 200 * MiB)
    rss_before = broker_proc.memory_info().rss
    peak = rss_before

    def watch(done: int, total: int) -> None:
        nonlocal peak
        peak = max(peak, broker_proc.memory_info().rss)

    with cluster.client(timeout_s=60) as c:
        ac = ArtifactClient(c, cache=ArtifactCache(tmp_path / "cache"))
        assert ac.put_file(src, kind="file", name="big.bin", progress=watch) == sha
        path = ac.get_file(sha, progress=watch)
        assert hashlib.sha256(path.read_bytes()).hexdigest() == sha
        assert ac.stat(sha)["size"] == 200 * MiB
    growth = peak - rss_before
    print(f"broker RSS growth {growth / MiB:.1f} MiB")
    assert growth < 64 * MiB, f"broker RSS grew by {growth / MiB:.1f} MiB"


def test_interrupted_put_resumes_where_it_stopped(cluster: Cluster, tmp_path: Path) -> None:
    cluster.start_broker()
    src = tmp_path / "data.bin"
    sha = make_file(src, 12 * MiB)
    offsets: list[int] = []

    def cut_at_half(done: int, total: int) -> None:
        if done >= total // 2:
            raise CutOff()

    with cluster.client(timeout_s=30) as c:
        ac = ArtifactClient(c, cache=ArtifactCache(tmp_path / "cache"), credit=2)
        with pytest.raises(CutOff):
            ac.put_file(src, kind="file", name="data.bin", progress=cut_at_half)
    with cluster.client(timeout_s=30) as c:  # a new connection, as after a crash
        ac = ArtifactClient(c, cache=ArtifactCache(tmp_path / "cache2"))
        ac.put_file(src, kind="file", name="data.bin", progress=lambda d, t: offsets.append(d))
        assert offsets[0] >= 6 * MiB  # the first progress report is where the broker resumed
        assert ac.get_bytes(sha) == src.read_bytes()


def test_a_broker_restart_mid_transfer_resumes_it(cluster: Cluster, tmp_path: Path) -> None:
    """A broker killed and back a few seconds later lost the chunks in flight: the client
    waited out its timeout and gave up (an overnight `distill train` ended in its upload);
    now the transfer goes on where the broker's copy stops, up and down."""
    cluster.start_broker()
    src = tmp_path / "data.bin"
    sha = make_file(src, 16 * MiB)
    restarted: list[int] = []

    def restart_at_half(done: int, total: int) -> None:
        if done >= total // 2 and not restarted:
            restarted.append(done)
            assert cluster.broker is not None
            cluster.broker.kill9()
            cluster.start_broker()

    with cluster.client(timeout_s=3) as c:
        ac = ArtifactClient(c, cache=ArtifactCache(tmp_path / "cache"), chunk_bytes=MiB, credit=2)
        assert ac.put_file(src, kind="file", name="data.bin", progress=restart_at_half) == sha
        assert restarted
        restarted.clear()
        assert ac.get_file(sha, progress=restart_at_half).read_bytes() == src.read_bytes()
        assert restarted


def test_bad_ids_and_in_use_artifacts_are_refused(cluster: Cluster, tmp_path: Path) -> None:
    cluster.start_broker()
    with cluster.client() as c:
        ac = ArtifactClient(c, cache=ArtifactCache(tmp_path / "cache"))
        with pytest.raises(ArtifactError, match="64 lowercase hex"):
            ac.get_file("../../etc/passwd")
        with pytest.raises(RequestError):
            c.request("distill.artifacts", {"op": "get", "sha256": "../" * 21 + "a", "offset": 0})
        sha = ac.put_bytes(b"dataset bytes", kind="dataset", name="d")
        job = JobsClient(c).submit("distill.sleep", {"dataset": sha})  # queued: no worker
        with pytest.raises(RequestError, match=job["id"][:0] + "in use"):
            ac.delete(sha)
        JobsClient(c).cancel(job["id"])
        ac.delete(sha)
        assert ac.list(kind="dataset") == []


def test_cli_put_ls_get_rm(cluster: Cluster, tmp_path: Path) -> None:
    cluster.start_broker()
    src = tmp_path / "hello.txt"
    src.write_bytes(b"hello distill\n" * 1000)
    env = {**os.environ, "DISTILL_BROKER": cluster.endpoint, "DISTILL_CACHE": str(tmp_path / "cache")}

    def distill(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "distill.shared.cli", *args], capture_output=True,
                              text=True, env=env, timeout=60)

    put = distill("artifacts", "put", str(src), "--kind", "note")
    assert put.returncode == 0, put.stderr
    sha = put.stdout.strip().splitlines()[-1]
    assert sha == hashlib.sha256(src.read_bytes()).hexdigest()
    listed = distill("artifacts", "ls")
    assert sha[:16] in listed.stdout and "hello.txt" in listed.stdout and "note" in listed.stdout
    out = tmp_path / "copy.txt"
    assert distill("artifacts", "get", sha[:10], str(out)).returncode == 0
    assert out.read_bytes() == src.read_bytes()
    # an existing file is not replaced unless forced (it was, silently)
    out.write_bytes(b"mine")
    again = distill("artifacts", "get", sha[:10], str(out))
    assert again.returncode == 1 and "exists: give another OUT, or --force" in again.stderr
    assert out.read_bytes() == b"mine"
    assert distill("artifacts", "get", sha[:10], str(out), "--force").returncode == 0
    assert out.read_bytes() == src.read_bytes()
    removed = distill("artifacts", "rm", sha[:10])
    assert removed.returncode == 0 and removed.stdout.strip() == f"removed {sha}"
    missing = distill("artifacts", "get", sha, str(tmp_path / "gone.txt"))
    assert missing.returncode != 0 and "error:" in missing.stderr


def test_clients_uploading_the_same_file_at_once_all_succeed(cluster: Cluster, tmp_path: Path) -> None:
    """Before: the broker refused a chunk its copy already held, so two scripts uploading one
    file at once refused each other's chunks until both gave up on `offset_mismatch` (6 of
    20 uploads of a 40-MB file failed; once none of four was stored). Small chunks here make
    many of them cross."""
    import threading

    cluster.start_broker()
    for round_ in range(3):
        path = tmp_path / f"same-{round_}.bin"
        sha = make_file(path, 3 * 2**20 + 12345)
        barrier = threading.Barrier(4)
        results: list[str] = []

        def upload(k: int, path: Path = path, barrier: threading.Barrier = barrier,
                   results: list[str] = results) -> None:  # fmt: skip
            with cluster.client(timeout_s=30) as c:
                store = ArtifactClient(c, ArtifactCache(tmp_path / f"cache-{k}"),
                                       chunk_bytes=64 * 1024)  # fmt: skip
                barrier.wait()
                try:
                    results.append(store.put_file(path, kind="audio", name=path.name))
                except RequestError as e:
                    results.append(f"{e.code}: {e}")

        threads = [threading.Thread(target=upload, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert results == [sha] * 4, results
        with cluster.client() as c:
            back = ArtifactClient(c, ArtifactCache(tmp_path / "check")).get_bytes(sha)
        assert hashlib.sha256(back).hexdigest() == sha
