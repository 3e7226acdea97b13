"""Shared fixtures: real brokers and workers as processes on loopback, with short heartbeats."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
PERCUSSION = (REPO / ".." / "shared" / "data" / "percussion").resolve()
HEARTBEAT_S = 0.2  # tests use short heartbeats so that death is noticed in under a second
LIVENESS = 3
MAX_TEST_PROCESSES = 4


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """How many test processes ``-n auto`` (pyproject's addopts) starts: one per CPU this
    process may run on, at most MAX_TEST_PROCESSES. Most tests wait on processes they start
    (brokers, workers, each on one torch thread) and the ones that train hold one thread, so
    on 2 cores two test processes ran the whole suite in 440 s where one took 905, with every
    test passing. Each test process may have a broker and a few workers of its own (a few
    hundred MB each), hence the cap."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(MAX_TEST_PROCESSES, cpus or 1))


@pytest.fixture(autouse=True)
def _no_user_keys(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    """A developer's own CURVE keys (env vars or keys.json) must not turn the loopback tests'
    plain brokers into CURVE ones: tests that want keys set them explicitly."""
    monkeypatch.delenv("DISTILL_BROKER_KEY", raising=False)
    monkeypatch.delenv("DISTILL_KEY", raising=False)
    missing = tmp_path_factory.getbasetemp() / "no-keys.json"
    monkeypatch.setenv("DISTILL_KEYS_CONFIG", str(missing))


def wait_until(predicate: Callable[[], Any], timeout_s: float = 10.0, interval_s: float = 0.05,
               what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}")


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def _test_ports() -> range:
    """The ports this test process hands out: a share, by its pytest-xdist number, of those
    below the kernel's ephemeral range. A port from ``bind(0)`` came from that range, where
    the kernel hands the same port, once freed, to another test process or to an outgoing
    connection: a test that stopped its broker and started it again 3 s later found its
    events port taken (.ci/run at cee1778)."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768  # Linux's default; macOS's range starts at 49152
    start, end = 10_000, min(low, 32_768)
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    index = int(worker[2:]) if worker[2:].isdigit() else 0
    span = (end - start) // max(1, count)
    return range(start + index * span, start + (index + 1) * span - 2, 3)


_next_block = 0  # round the share: a block freed by one test is the last one handed out again


def free_port_block() -> int:
    """A base port P with P, P+1, P+2 free (MDP, events out, events in), from this test
    process's own share of the ports outside the kernel's ephemeral range (``_test_ports``);
    from ``bind(0)`` where that share is too small."""
    global _next_block
    blocks = _test_ports()
    if len(blocks) >= 100:
        for _ in range(len(blocks)):
            base = blocks[_next_block % len(blocks)]
            _next_block += 1
            if all(_port_free(base + i) for i in range(3)):
                return base
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + 2 < 65535 and all(_port_free(base + i) for i in range(3)):
            return base
    raise RuntimeError("no free block of three ports")


class Proc:
    """A distill CLI subprocess in its own process group; stopped and reaped at teardown."""

    def __init__(self, args: list[str], log_path: Path, env: dict[str, str] | None = None) -> None:
        self.args = args
        self.log_path = log_path
        self._log = open(log_path, "ab")  # noqa: SIM115  (open for the process lifetime)
        full_env = {**os.environ, "DISTILL_LOG_JSON": "1", **(env or {})}
        self.popen = subprocess.Popen([sys.executable, "-m", "distill.shared.cli", *args],
                                      stdout=self._log, stderr=subprocess.STDOUT, env=full_env,
                                      start_new_session=True)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def kill9(self) -> None:
        self.popen.send_signal(signal.SIGKILL)
        self.popen.wait()

    def stop(self, timeout_s: float = 10.0) -> int:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        self._log.close()
        return self.popen.returncode

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


class Cluster:
    """A broker and workers as real processes, on a free block of loopback ports."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.port = free_port_block()
        self.endpoint = f"tcp://127.0.0.1:{self.port}"
        self.data_dir = tmp / "broker"
        self.cache_dir = tmp / "cache"
        self.broker: Proc | None = None
        self.workers: list[Proc] = []
        self._n = 0

    def start_broker(self, request_timeout_s: float = 10.0,
                     env: dict[str, str] | None = None, liveness: int = LIVENESS) -> Proc:  # fmt: skip
        """A broker on this cluster's port and folder; one still running (a module's cluster
        shared by its tests) is stopped first: a second would be refused the folder and the
        port, and the first, no longer referenced, outlive the tests."""
        if self.broker is not None and self.broker.alive():
            self.broker.stop()
        self.broker = Proc(["broker", "--port", str(self.port), "--data-dir", str(self.data_dir),
                            "--heartbeat-s", str(HEARTBEAT_S), "--liveness", str(liveness),
                            "--request-timeout-s", str(request_timeout_s)],
                           self.tmp / f"broker-{self._next()}.log", env=env)
        from distill.shared.bus.client import Client

        with Client(self.endpoint, timeout_s=0.5) as c:
            wait_until(lambda: _answers(c), 20, what="broker to answer")
        return self.broker

    def start_worker(self, service: str, *, wait: bool = True, device: str = "cpu",
                     env: dict[str, str] | None = None) -> Proc:
        n = self._next()
        proc = Proc(["worker", service, "--broker", self.endpoint, "--device", device, "--threads", "1",
                     "--heartbeat-s", str(HEARTBEAT_S), "--liveness", str(LIVENESS)],
                    self.tmp / f"worker-{service}-{n}.log",
                    env={"DISTILL_CACHE": str(self.cache_dir / f"w{n}"), **(env or {})})
        self.workers.append(proc)
        if wait:
            wait_until(lambda: any(w["pid"] == proc.pid for w in self.worker_list()), 60,
                       what=f"{service} worker to register")
        return proc

    def worker_list(self) -> list[dict[str, Any]]:
        from distill.shared.bus.client import Client
        from distill.shared.errors import RequestTimeout

        try:
            with Client(self.endpoint, timeout_s=2) as c:
                return list(c.workers()["workers"])
        except RequestTimeout:
            return []

    def client(self, timeout_s: float = 10.0) -> Any:
        from distill.shared.bus.client import Client

        return Client(self.endpoint, timeout_s=timeout_s)

    def _next(self) -> int:
        self._n += 1
        return self._n

    def stop(self) -> None:
        for w in self.workers:
            w.stop()
        if self.broker is not None:
            self.broker.stop()


def _answers(client: Any) -> bool:
    from distill.shared.errors import RequestTimeout

    try:
        client.mmi_service("echo")
        return True
    except RequestTimeout:
        client.close()
        return False


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path)
    try:
        yield c
    finally:
        c.stop()
        for p in [c.broker, *c.workers]:
            if p is not None and p.popen.returncode not in (0, -15, -9, None):
                print(f"--- {p.args[0]} log ---\n{p.log()[-4000:]}")


def percussion_dir() -> Path:
    """The shared CC0 percussion set beside the repository (``<repo>/../shared/data``).
    Missing data skips a test on a developer's machine and fails it in CI."""
    if not PERCUSSION.is_dir():
        if os.environ.get("CI"):
            pytest.fail(f"percussion data not found at {PERCUSSION}")
        pytest.skip(f"percussion data not found at {PERCUSSION}")
    return PERCUSSION


@pytest.fixture
def percussion() -> Path:
    return percussion_dir()


def held_out(dataset: Any, *names: str) -> Any:
    """``dataset`` (a Dataset) with the files ``names`` validating and the rest training: a few
    one-shots hold too little sound to validate on (MIN_VAL_CHUNKS), so a build of them has no
    validation split; tests of what validation does choose one."""
    import dataclasses

    rows = [dataclasses.replace(r, split=("val" if r.name in names else "train"))
            if r.split is not None else r for r in dataset.manifest]  # fmt: skip
    assert {r.name for r in rows if r.split == "val"} == set(names), "a name is not in the set"
    return dataclasses.replace(dataset, manifest=rows)


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Tiny models run fastest on one torch thread, and the suite shares two cores with the
    processes it starts. Modules opt in with ``pytestmark = pytest.mark.usefixtures(...)``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
