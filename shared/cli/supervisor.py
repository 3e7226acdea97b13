"""``distill up``: one broker and one worker per service on this machine, as child processes.

Children die with the supervisor (PR_SET_PDEATHSIG on Linux, plus SIGTERM then SIGKILL on the
way out), a child that crashes is restarted with backoff, and Ctrl-C leaves no process behind.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from distill.shared.bus.client import Client, broker_endpoint
from distill.shared.cli.common import EXIT_UNUSABLE
from distill.shared.errors import DistillError, RequestTimeout
from distill.shared.logs import configure, get_logger
from distill.shared.services import threads_for, up_services, worker_service

log = get_logger("up")
SHUTDOWN_GRACE_S = 10.0
RESTART_BACKOFF_S = (1.0, 2.0, 5.0, 10.0)


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass  # not Linux: the supervisor's own shutdown still stops the children


@dataclass
class Child:
    name: str
    argv: list[str]
    proc: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    next_start: float = 0.0
    started: list[float] = field(default_factory=list)
    log_file: Path | None = None  # None: the child writes to this terminal

    def start(self) -> None:
        out = None if self.log_file is None else self.log_file.open("ab")  # noqa: SIM115
        try:
            self.proc = subprocess.Popen(self.argv, stdout=out, stderr=out,
                                         preexec_fn=_die_with_parent if sys.platform == "linux" else None)  # fmt: skip
        finally:
            if out is not None:
                out.close()  # the child holds its own descriptor
        self.started.append(time.monotonic())


class Supervisor:
    def __init__(self, *, host: str, port: int, data_dir: Path, services: list[str] | None,
                 device: str | None, log_file: Path | None = None,
                 announce: bool = True) -> None:  # fmt: skip
        self.endpoint = broker_endpoint(f"{host if host != '0.0.0.0' else '127.0.0.1'}:{port}")
        py = [sys.executable, "-m", "distill.shared.cli"]
        self.children = [Child("broker", py + ["broker", "--host", host, "--port", str(port),
                                               "--data-dir", str(data_dir)])]
        self.services = [worker_service(name) for name in services or up_services()]
        for spec in self.services:
            default = spec.up_device or "cpu"
            # --device moves the model workers; echo and preprocess stay on the CPU.
            dev = default if device is None or default == "cpu" else device
            argv = py + ["worker", spec.cli_name, "--broker", self.endpoint, "--device", dev]
            threads = threads_for(spec, os.cpu_count() or 1)
            if threads:
                argv += ["--threads", str(threads)]
            self.children.append(Child(spec.cli_name, argv))
        for child in self.children:
            child.log_file = log_file
        self._stopping = False
        self.announce = announce  # the "distill up: broker ..., workers: ..." line on stdout

    def run(self, *, check: bool = False) -> int:
        configure("up")
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, self._on_signal)
        try:
            if not self.start(ready_timeout_s=120.0):
                return 0  # stopped while starting
            if check:
                return self._check()
            while not self._stopping:
                self._watch()
                time.sleep(0.2)
            return 0
        finally:
            self.shutdown()

    def _on_signal(self, signum: int, frame: object) -> None:
        self._stopping = True

    def start(self, ready_timeout_s: float) -> bool:
        """Start the broker, and the workers once it answers (they would register with any
        broker already at the endpoint, and make a cluster that never started look up); wait
        for every worker to register. False if stopped meanwhile; DistillError as
        :meth:`wait_broker` and :meth:`wait_ready` say. The caller shuts down."""
        self.children[0].start()
        if not self.wait_broker(timeout_s=60.0):
            return False
        for child in self.children[1:]:
            child.start()
        self.wait_ready(timeout_s=ready_timeout_s)
        return not self._stopping

    def wait_broker(self, timeout_s: float) -> bool:
        """Until this supervisor's own broker answers at the endpoint (True), or it is stopped
        (False). DistillError when another broker answers there (this one cannot bind), when the
        broker exits unable to run (EXIT_UNUSABLE), or after timeout_s."""
        deadline = time.monotonic() + timeout_s
        with Client(self.endpoint, timeout_s=0.5) as client:
            while not self._stopping and time.monotonic() < deadline:
                try:
                    reply = client.workers()
                except RequestTimeout:
                    reply = None  # not bound yet
                proc = self.children[0].proc
                if reply is not None:
                    pid = reply.get("broker_pid")  # None: a broker of an older version
                    if proc is not None and pid == proc.pid:
                        return True
                    raise DistillError(
                        f"another broker (pid {pid or '?'}) already answers at {self.endpoint}: "
                        "is a `distill up` or `distill broker` already running? Stop it, or "
                        "choose another --port")
                self._watch()  # raises if the broker cannot run; restarts one that crashed
                time.sleep(0.1)
        if self._stopping:
            return False
        raise DistillError(f"the broker did not answer at {self.endpoint} within {timeout_s:g} s")

    def wait_ready(self, timeout_s: float) -> None:
        """Until every worker service has registered with the broker; DistillError after timeout_s."""
        wanted = {spec.service for spec in self.services}
        deadline = time.monotonic() + timeout_s
        with Client(self.endpoint, timeout_s=1.0) as client:
            while not self._stopping and time.monotonic() < deadline:
                try:
                    registered = {w["service"] for w in client.workers()["workers"]}
                except RequestTimeout:
                    registered = set()
                if wanted <= registered:
                    if self.announce:
                        print(f"distill up: broker {self.endpoint}, workers: {', '.join(sorted(wanted))}",
                              flush=True)
                    return
                self._watch()
                time.sleep(0.2)
        if not self._stopping:
            raise DistillError(f"workers did not all register with {self.endpoint} within {timeout_s:g} s")

    def _check(self) -> int:
        with Client(self.endpoint, timeout_s=5.0) as client:
            rtt = client.ping()
            print(f"distill up --check: echo round trip {rtt * 1000:.2f} ms through {self.endpoint}",
                  flush=True)
            for w in client.workers()["workers"]:
                print(f"  {w['service']:<22} {w['device']:<8} pid {w['pid']}", flush=True)
        return 0

    def _watch(self) -> None:
        """Restart children that exited, with backoff; DistillError for one that exited unable
        to run (EXIT_UNUSABLE: a restart would fail the same way)."""
        now = time.monotonic()
        for child in self.children:
            if child.proc is None or child.proc.poll() is None or self._stopping:
                continue
            if child.proc.returncode == EXIT_UNUSABLE:
                where = f"in {child.log_file}" if child.log_file is not None else "above"
                raise DistillError(f"the {child.name} process cannot run (its error is {where}); "
                                   "stopping the cluster")
            if child.next_start == 0.0:
                delay = RESTART_BACKOFF_S[min(child.restarts, len(RESTART_BACKOFF_S) - 1)]
                child.next_start = now + delay
                log.warning("child_exited", child=child.name, code=child.proc.returncode, restart_in_s=delay)
            elif now >= child.next_start:
                child.restarts += 1
                child.next_start = 0.0
                child.start()

    def shutdown(self) -> None:
        self._stopping = True
        live = [c.proc for c in self.children if c.proc is not None and c.proc.poll() is None]
        for proc in reversed(live):  # workers first, broker last
            proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + SHUTDOWN_GRACE_S
        for proc in live:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
