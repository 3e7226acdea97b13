"""The CLI end to end: `distill up` in one terminal, `distill ping` in another, Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from tests.conftest import free_port_block, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def distill(*args: str, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "distill.shared.cli", *args], capture_output=True,
                          text=True, timeout=60, **kw)  # type: ignore[call-overload]


def test_help_lists_the_commands() -> None:
    out = distill("--help").stdout
    for command in ("broker", "worker", "up", "workers", "ping"):
        assert command in out


def test_up_ping_ctrl_c_leaves_no_process(tmp_path: Path) -> None:
    port = free_port_block()
    env = {**os.environ, "DISTILL_HOME": str(tmp_path), "DISTILL_LOG_JSON": "1"}
    up = subprocess.Popen([sys.executable, "-m", "distill.shared.cli", "up", "--port", str(port),
                           "--services", "echo,sleep"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, env=env, start_new_session=True)
    try:
        assert up.stdout is not None
        line = up.stdout.readline()
        assert "distill up: broker" in line, line
        children = psutil.Process(up.pid).children(recursive=True)
        assert len(children) == 3  # broker + echo + sleep
        ping = distill("ping", "--broker", f"127.0.0.1:{port}", "--count", "2", env=env)
        assert ping.returncode == 0 and ping.stdout.count("echo reply") == 2, ping.stderr
        listed = distill("workers", "--broker", f"127.0.0.1:{port}", env=env).stdout
        assert "distill.sleep" in listed and "echo" in listed
        os.killpg(up.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the whole group
        assert up.wait(30) == 0
        wait_until(lambda: not any(c.is_running() and c.status() != psutil.STATUS_ZOMBIE for c in children),
                   15, what="children to exit")
    finally:
        if up.poll() is None:
            os.killpg(up.pid, signal.SIGKILL)
    # every line on stderr is a JSON log record tagged with its process role and id
    assert up.stderr is not None
    records = [json.loads(line) for line in up.stderr.read().splitlines() if line.startswith("{")]
    roles = {r["role"] for r in records}
    assert {"broker", "worker"} <= roles and all("id" in r and "event" in r for r in records)


def test_worker_with_unknown_device_fails_clearly() -> None:
    out = distill("worker", "echo", "--device", "tpu")
    assert out.returncode != 0 and "device 'tpu' is not one of" in out.stderr
