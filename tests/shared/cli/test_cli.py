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


def test_a_second_up_refuses_and_leaves_the_first_clusters_jobs_alone(tmp_path: Path) -> None:
    """A second `distill up` on the same port, or on the same data folder with another port,
    stops with one line naming the reason; it starts no worker on the first cluster and never
    touches the first broker's job table (a running job stays running, not re-queued)."""
    from distill.shared.bus.client import Client
    from distill.shared.bus.jobs import JobsClient

    port, other = free_port_block(), free_port_block()
    env = {**os.environ, "DISTILL_HOME": str(tmp_path)}
    up = subprocess.Popen([sys.executable, "-m", "distill.shared.cli", "up", "--port", str(port),
                           "--services", "sleep"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                          text=True, env=env, start_new_session=True)
    try:
        assert up.stdout is not None and "distill up: broker" in up.stdout.readline()
        with Client(f"tcp://127.0.0.1:{port}", timeout_s=10) as c:
            jobs = JobsClient(c)
            job = jobs.submit("distill.sleep", {"sleep_s": 60, "steps": 600})["id"]
            wait_until(lambda: jobs.get(job, metrics=False)["status"] == "running", 20,
                       what="the job to run")
            same_port = distill("up", "--port", str(port), "--services", "sleep", env=env)
            assert same_port.returncode != 0
            broker_pid = (tmp_path / "broker" / "broker.lock").read_text().strip()
            assert f"another broker (pid {broker_pid}) already answers at" in same_port.stderr, \
                same_port.stderr
            same_dir = distill("up", "--port", str(other), "--services", "sleep", env=env)
            assert same_dir.returncode != 0
            assert "is in use by another broker" in same_dir.stderr, same_dir.stderr
            assert "--data-dir" in same_dir.stderr and "Traceback" not in same_dir.stderr
            workers = c.workers()["workers"]
            assert [w["service"] for w in workers] == ["distill.sleep"]  # none joined from the 2nd
            record = jobs.get(job, metrics=False)
            assert record["status"] == "running" and record["attempts"] == 1, record
            jobs.cancel(job)
    finally:
        os.killpg(up.pid, signal.SIGINT)
        try:
            up.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(up.pid, signal.SIGKILL)


def test_broker_on_a_busy_port_or_folder_fails_in_one_line(tmp_path: Path) -> None:
    port = free_port_block()
    env = {**os.environ, "DISTILL_HOME": str(tmp_path)}
    first = subprocess.Popen([sys.executable, "-m", "distill.shared.cli", "broker", "--port", str(port)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        wait_until(lambda: (tmp_path / "broker" / "broker.lock").exists()
                   and (tmp_path / "broker" / "broker.lock").read_text().strip() == str(first.pid),
                   30, what="the broker to hold its folder")
        busy = distill("broker", "--port", str(port), "--data-dir", str(tmp_path / "other"), env=env)
        assert busy.returncode == 78, busy.stderr  # EXIT_UNUSABLE: `distill up` won't restart it
        assert f"cannot bind its MDP port tcp://127.0.0.1:{port}" in busy.stderr
        assert "Traceback" not in busy.stderr
        taken = distill("broker", "--port", str(free_port_block()), env=env)
        assert taken.returncode == 78 and f"in use by another broker (pid {first.pid})" in taken.stderr
    finally:
        first.terminate()
        first.wait(30)
    # released when the broker exits: the next one starts on the same folder
    again = subprocess.Popen([sys.executable, "-m", "distill.shared.cli", "broker", "--port",
                              str(free_port_block())], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, env=env)
    try:
        wait_until(lambda: (tmp_path / "broker" / "broker.lock").read_text().strip() == str(again.pid),
                   30, what="the next broker to hold the folder")
    finally:
        again.terminate()
        again.wait(30)


def test_up_refuses_a_bad_device_or_port_before_starting_anything(tmp_path: Path) -> None:
    env = {**os.environ, "DISTILL_HOME": str(tmp_path)}
    bad = distill("up", "--port", str(free_port_block()), "--device", "bogus", env=env)
    assert bad.returncode == 1 and "device 'bogus' is not one of" in bad.stderr
    assert not (tmp_path / "broker").exists()  # nothing started
    port = distill("up", "--port", "70000", env=env)
    assert port.returncode == 1 and "--port 70000: must be in 1..65533" in port.stderr


def test_a_broker_or_worker_that_cannot_write_its_folder_fails_in_one_line(tmp_path: Path) -> None:
    """A read-only or wrong data folder (a file in its place, here: root writes anywhere) is
    one line and EXIT_UNUSABLE, not a traceback; a worker whose artifact cache cannot be written
    is refused at start, not after registering to fail every job it is given."""
    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    held = tmp_path / "held"
    held.mkdir()
    (held / "artifacts").write_text("a file where the store's folder goes")
    for data_dir in (afile / "broker", held):
        got = distill("broker", "--port", str(free_port_block()), "--data-dir", str(data_dir))
        assert got.returncode == 78, got.stderr
        assert f"the broker data folder {data_dir} cannot be used" in got.stderr, got.stderr
        assert "Traceback" not in got.stderr
    env = {**os.environ, "DISTILL_CACHE": str(afile / "cache")}
    got = distill("worker", "echo", "--broker", "tcp://127.0.0.1:9", env=env)
    assert got.returncode == 78, got.stderr
    assert f"the worker's artifact cache {afile / 'cache'} cannot be written" in got.stderr
    assert "Traceback" not in got.stderr


def test_dataset_add_says_when_no_preprocess_worker_is_registered(tmp_path: Path) -> None:
    """It sat at "queued" with no word (following the cross-machine steps, which started only
    an RVQ-VAE worker)."""
    from tests.conftest import Cluster

    cluster = Cluster(tmp_path)
    try:
        cluster.start_broker()
        sounds = tmp_path / "sounds"
        sounds.mkdir()
        (sounds / "a.wav").write_bytes(b"RIFF")
        proc = subprocess.Popen([sys.executable, "-m", "distill.shared.cli", "dataset", "add",
                                 str(sounds), "--broker", cluster.endpoint],
                                stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)  # fmt: skip
        import threading

        watchdog = threading.Timer(60, proc.kill)  # a note that never comes fails, not hangs
        watchdog.start()
        try:
            assert proc.stderr is not None
            told = ""
            while "note:" not in told:
                line = proc.stderr.readline()
                assert line, told
                told += line
            assert "no distill.preprocess worker is registered" in told
            assert "distill worker preprocess" in told
        finally:
            watchdog.cancel()
            proc.kill()
            proc.wait()
    finally:
        cluster.stop()


def test_up_with_a_key_folder_without_a_worker_key_says_which(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    assert distill("keys", "generate", str(keys), "--client", "laptop", "--worker", "gpu").returncode == 0
    got = distill("up", "--keys", str(keys), "--check", "--port", str(free_port_block()))
    assert got.returncode == 78 and "no worker.key_secret there" in got.stderr, got.stderr
    assert "--worker worker" in got.stderr


def test_a_folder_too_big_for_one_job_or_with_deep_paths(tmp_path: Path) -> None:
    """Too many files for a preprocess job's params is refused before anything is uploaded
    (it failed after uploading 2500 files); a path past an artifact name's 255 characters is
    uploaded under its end (it was refused, naming no file)."""
    from distill.shared.bus.artifacts import ArtifactClient
    from distill.shared.bus.cache import ArtifactCache
    from distill.shared.cli.data import upload_folder
    from distill.shared.errors import DistillError
    from tests.conftest import Cluster

    many = tmp_path / "many"
    many.mkdir()
    for i in range(3000):
        (many / f"hit_{i:04d}_with_a_rather_descriptive_name.wav").write_bytes(b"RIFF")
    deep = tmp_path / "deep" / ("Vendor Sample Pack Collection Volume Two " * 4) / ("kit " * 40)
    deep.mkdir(parents=True)
    (deep / "kick.wav").write_bytes(b"RIFF")
    cluster = Cluster(tmp_path)
    try:
        cluster.start_broker()
        with cluster.client() as c:
            ac = ArtifactClient(c, cache=ArtifactCache(tmp_path / "cache"))
            with pytest.raises(DistillError, match="3000 files are too many for one dataset"):
                upload_folder(ac, many, quiet=True)
            assert ac.list() == []  # nothing uploaded
            files = upload_folder(ac, tmp_path / "deep", quiet=True)
            assert len(files[0]["name"]) > 255 and files[0]["name"].endswith("kick.wav")
            stored = ac.list()[0]["name"]
            assert len(stored) == 255
            assert stored.endswith("/kick.wav") and stored.startswith("…")
    finally:
        cluster.stop()


def test_ctrl_c_on_jobs_watch_says_the_job_goes_on(tmp_path: Path) -> None:
    from distill.shared.bus.jobs import JobsClient
    from tests.conftest import Cluster

    cluster = Cluster(tmp_path)
    try:
        cluster.start_broker()
        with cluster.client() as c:
            job = JobsClient(c).submit("distill.sleep", {"value": 1})["id"]  # no worker: queued
        proc = subprocess.Popen([sys.executable, "-m", "distill.shared.cli", "jobs", "watch", job,
                                 "--broker", cluster.endpoint], stderr=subprocess.PIPE,
                                stdout=subprocess.DEVNULL, text=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip
        assert proc.stderr is not None
        import threading

        watchdog = threading.Timer(60, proc.kill)  # a line that never comes fails, not hangs
        watchdog.start()
        try:
            assert f"{job}: queued" in proc.stderr.read(len(f"\n{job}: queued"))  # following
        finally:
            watchdog.cancel()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 130
        told = proc.stderr.read()
        assert f"stopped watching; job {job} goes on" in told and "Traceback" not in told
    finally:
        cluster.stop()


def test_jobs_show_abridges_long_lists() -> None:
    """A 500-file job's params and result printed 185 kB on two lines; --full gives the JSON."""
    from distill.shared.cli.jobs import abridged

    params = {"files": [{"name": f"f{i}.wav", "sha256": "0" * 64} for i in range(500)], "seed": 0}
    shown = abridged(params)
    assert len(shown["files"]) == 7 and shown["files"][-1] == "... 494 more"
    assert shown["seed"] == 0 and shown["files"][0] == params["files"][0]
    assert abridged([1, 2, 3]) == [1, 2, 3]


def test_tables_line_up_with_wide_characters(capsys: pytest.CaptureFixture[str]) -> None:
    """Names under 名前 フォルダ/ or with 🥁 shifted the columns after them (padded by code
    points, where a terminal gives such a character two cells)."""
    from rich.cells import cell_len

    from distill.shared.cli.common import print_table

    print_table(["file", "status"], [["名前/kick.wav", "ok"], ["🥁 snare.wav", "ok"], ["hat.wav", "ok"]])
    lines = capsys.readouterr().out.splitlines()
    assert len({cell_len(line[: line.rindex("ok")]) for line in lines[1:]}) == 1


def test_tables_show_control_characters_escaped(capsys: pytest.CaptureFixture[str]) -> None:
    """A worker's host or an old journal's service name with ESC, BEL, NUL or U+202E reached
    the terminal as it was (an OSC sequence retitled the window even through a pipe)."""
    from distill.shared.cli.common import print_table

    print_table(["service", "host"], [["x\x1b]0;TITLE\x07", "a\x00b\u202e"]])
    out = capsys.readouterr().out
    assert not any(c in out for c in "\x1b\x07\x00\u202e")
    assert "x\\x1b]0;TITLE\\x07" in out and "a\\x00b\\u202e" in out


def test_a_live_line_off_a_terminal_is_a_line_every_so_often() -> None:
    """To a file or a pipe (an overnight run's log) each update was a `\\r` on one ever longer
    line (193 kB for one upload): now a line of its own at most every few seconds, the latest
    kept for the end; on a terminal it rewrites itself as before."""
    import io

    from distill.shared.cli.common import LiveLine

    log = io.StringIO()
    live = LiveLine(every_s=3600, stream=log)
    for i in range(1, 501):
        live.update(f"uploading {i}/500   ")
    live.end()
    assert log.getvalue() == "uploading 1/500\nuploading 500/500\n"

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    term = Terminal()
    live = LiveLine(stream=term)
    live.update("epoch 1", width=10)
    live.update("epoch 2", width=10)
    live.end()
    assert term.getvalue() == "\repoch 1   \repoch 2   \n"


def test_a_status_or_note_between_updates_is_a_line_of_its_own() -> None:
    """Before: `jobs watch` and `distill train` wrote a job's status with no newline after it,
    and the next update ran into it ("j-1: runningrecorded=True step=6", "j-1:
    succeededepoch 22/22 ..." in a log); a metrics row also showed the broker's own flag."""
    import io

    from distill.shared.cli.common import LiveLine
    from distill.shared.cli.jobs import progress_line

    log = io.StringIO()
    live = LiveLine(every_s=3600, stream=log)
    live.say("j-1: running")
    live.update("epoch 1")
    live.update("epoch 2")  # held back
    live.say("j-1: a note")  # the latest state first
    live.update("epoch 3")
    live.say("j-1: succeeded")
    live.end()
    assert log.getvalue() == ("j-1: running\nepoch 1\nepoch 2\nj-1: a note\nepoch 3\n"
                              "j-1: succeeded\n")  # fmt: skip

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    term = Terminal()
    live = LiveLine(stream=term)
    live.say("j-1: running")
    live.update("epoch 1")
    live.say("j-1: succeeded")
    live.end()
    assert term.getvalue() == "j-1: running\n\repoch 1\nj-1: succeeded\n"
    row = {"type": "metrics", "row": {"step": 6}, "recorded": True}
    assert progress_line(row) == "step=6"


@pytest.mark.parametrize("given, want", [(None, "1"), ("0", "0")])
def test_mps_operations_it_lacks_fall_back_to_the_cpu(given: str | None, want: str) -> None:
    """Every `distill` process (workers too) sets PYTORCH_ENABLE_MPS_FALLBACK before torch
    loads, which is when torch reads it; a value the user set is kept."""
    env = {k: v for k, v in os.environ.items() if k != "PYTORCH_ENABLE_MPS_FALLBACK"}
    if given is not None:
        env["PYTORCH_ENABLE_MPS_FALLBACK"] = given
    code = ("import os, sys, runpy; sys.argv = ['distill', '--help']\n"
            "try:\n    runpy.run_module('distill.shared.cli', run_name='__main__')\n"
            "except SystemExit:\n    pass\n"
            "print(os.environ.get('PYTORCH_ENABLE_MPS_FALLBACK'), 'torch' in sys.modules)")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=60)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[-1] == f"{want} False"
