"""Two hosts, for real: network namespaces joined by a veth pair, CURVE on.

Host A (namespace ``…-a``, 10.231.0.1) runs the broker and a preprocess and a training
worker; host B (``…-b``, 10.231.0.2) runs the client. Each has its own folder for keys, data
and artifact cache; nothing is shared but the wire. The client uploads sound files, a
preprocess job and a short training job run on A, and the model comes back to B with the
hash the worker gave it.

Needs root and ``ip netns`` (skipped with the reason otherwise). The addresses exist only
inside the two namespaces the test creates; no traffic leaves them.

Run as ``python tests/test_multihost.py client ...`` it is the client on host B.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

HOST_A, HOST_B = "10.231.0.1", "10.231.0.2"  # private, assigned inside the test's namespaces only
PORT = 5555  # each namespace has its own ports: the default cannot collide with anything
FILES = [
    "bd_808.flac",
    "bd_haus.flac",
    "sn_dub.flac",
    "hat_bdu.flac",
    "drum_cymbal_open.flac",
    "tabla_na.flac",
    "elec_blip.flac",
    "perc_bell.flac",
]
TINY_MODEL = {"channels": 32, "latent_dim": 16, "blocks": 1, "codebook_size": 16, "levels": 2}
TINY_TRAIN = {
    "batch_size": 8,
    "preview_every": 0,
    "patience": 0,
    "warmup_steps": 4,
    "checkpoint_every_s": 0,
    "epochs": 2,
}
KEY_ENV_NAMES = (
    "DISTILL_BROKER_KEY",
    "DISTILL_KEY",
    "DISTILL_BROKER_SECRET_KEY",
    "DISTILL_ALLOWED_KEYS",
    "DISTILL_INSECURE",
    "DISTILL_BROKER",
)


def _ip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)


@pytest.fixture
def two_hosts() -> Iterator[tuple[str, str]]:
    """Two namespaces joined by a veth pair; skipped where the machine does not allow it."""
    if shutil.which("ip") is None:
        pytest.skip("the `ip` tool (iproute2) is not installed")
    tag = uuid.uuid4().hex[:6]
    ns_a, ns_b = f"distill-{tag}-a", f"distill-{tag}-b"
    made = _ip("netns", "add", ns_a)
    if made.returncode != 0:
        pytest.skip(
            f"cannot create network namespaces here (`ip netns add` said: "
            f"{made.stderr.strip()}); needs root"
        )
    try:
        steps = [
            ("netns", "add", ns_b),
            (
                "link",
                "add",
                f"va{tag}",
                "netns",
                ns_a,
                "type",
                "veth",
                "peer",
                "name",
                f"vb{tag}",
                "netns",
                ns_b,
            ),
            ("-n", ns_a, "addr", "add", f"{HOST_A}/30", "dev", f"va{tag}"),
            ("-n", ns_b, "addr", "add", f"{HOST_B}/30", "dev", f"vb{tag}"),
            ("-n", ns_a, "link", "set", f"va{tag}", "up"),
            ("-n", ns_b, "link", "set", f"vb{tag}", "up"),
            ("-n", ns_a, "link", "set", "lo", "up"),
            ("-n", ns_b, "link", "set", "lo", "up"),
        ]
        for step in steps:
            done = _ip(*step)
            if done.returncode != 0:
                pytest.skip(
                    f"cannot set up the veth pair (`ip {' '.join(step)}`: {done.stderr.strip()})"
                )
        yield ns_a, ns_b
    finally:
        for ns in (ns_a, ns_b):
            _ip("netns", "del", ns)  # takes the veth pair with it


class NsProc:
    """A process in a namespace, in its own session; stopped with SIGTERM, then SIGKILL."""

    def __init__(self, ns: str, argv: list[str], log: Path, env: dict[str, str]) -> None:
        base = {k: v for k, v in os.environ.items() if k not in KEY_ENV_NAMES}
        self.log = log
        self.popen = subprocess.Popen(
            ["ip", "netns", "exec", ns, *argv],
            stdout=open(log, "ab"),  # noqa: SIM115
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**base, "DISTILL_LOG_JSON": "1", **env},
        )

    def stop(self) -> None:
        if self.popen.poll() is None:
            os.killpg(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait()


def _host_dir(root: Path, name: str, keys: Path, files: list[str]) -> Path:
    """One host's own folder, holding only the key files that host may have."""
    home = root / name
    (home / "keys").mkdir(parents=True)
    for f in files:
        shutil.copy2(keys / f, home / "keys" / f)
    if (keys / "allowed").is_dir() and name == "host-a":
        shutil.copytree(keys / "allowed", home / "keys" / "allowed")
    return home


@pytest.mark.slow
@pytest.mark.integration
def test_train_across_two_hosts_with_curve(two_hosts: tuple[str, str], tmp_path: Path) -> None:
    from distill.shared.bus.security import generate_keys
    from tests.conftest import percussion_dir

    percussion = percussion_dir()
    ns_a, ns_b = two_hosts
    generate_keys(tmp_path / "made", ["laptop"], ["gpu"])
    a = _host_dir(
        tmp_path, "host-a", tmp_path / "made", ["broker.key", "broker.key_secret", "gpu.key_secret"]
    )
    b = _host_dir(tmp_path, "host-b", tmp_path / "made", ["broker.key", "laptop.key_secret"])
    py = [sys.executable, "-m", "distill.shared.cli"]
    endpoint = f"tcp://{HOST_A}:{PORT}"
    procs = [
        NsProc(
            ns_a,
            [
                *py,
                "broker",
                "--host",
                HOST_A,
                "--port",
                str(PORT),
                "--data-dir",
                str(a / "broker"),
                "--secret-key",
                str(a / "keys/broker.key_secret"),
                "--allowed",
                str(a / "keys/allowed"),
            ],
            a / "broker.log",
            {},
        )
    ]
    worker_env = {
        "DISTILL_BROKER_KEY": str(a / "keys/broker.key"),
        "DISTILL_KEY": str(a / "keys/gpu.key_secret"),
    }
    for service in ("preprocess", "vqvae"):
        procs.append(
            NsProc(
                ns_a,
                [*py, "worker", service, "--broker", endpoint, "--device", "cpu", "--threads", "1"],
                a / f"{service}.log",
                {**worker_env, "DISTILL_CACHE": str(a / f"cache-{service}")},
            )
        )
    try:
        out = subprocess.run(
            [
                "ip",
                "netns",
                "exec",
                ns_b,
                sys.executable,
                str(Path(__file__).resolve()),
                "client",
                "--broker",
                endpoint,
                "--sounds",
                str(percussion),
                "--cache",
                str(b / "cache"),
            ],
            capture_output=True,
            text=True,
            timeout=600,
            cwd=b,
            env={
                **{k: v for k, v in os.environ.items() if k not in KEY_ENV_NAMES},
                "DISTILL_BROKER_KEY": str(b / "keys/broker.key"),
                "DISTILL_KEY": str(b / "keys/laptop.key_secret"),
            },
        )
        logs = "\n".join(f"--- {p.log.name}\n{p.log.read_text()[-3000:]}" for p in procs)
        assert out.returncode == 0, f"client failed:\n{out.stderr[-4000:]}\n{logs}"
        result = json.loads(out.stdout.strip().splitlines()[-1])
    finally:
        for proc in reversed(procs):
            proc.stop()
    assert result["status"] == "succeeded"
    assert result["downloaded_sha256"] == result["model"] == result["broker_sha256"]
    assert result["workers_host_b_saw"] == ["distill.preprocess", "distill.train.vqvae"]
    assert result["plain_client_refused"]
    # The model came back into host B's own cache; host A's folders were never read by B.
    cached = b / "cache" / result["model"][:2] / result["model"][2:]
    assert hashlib.sha256(cached.read_bytes()).hexdigest() == result["model"]
    broker_log = (a / "broker.log").read_text()
    assert '"curve": true' in broker_log and HOST_A in broker_log


def client_main(argv: list[str]) -> None:
    """Host B: upload, preprocess, train, fetch the model; print one JSON line."""
    from distill.shared.bus import protocol as P
    from distill.shared.bus.artifacts import ArtifactClient
    from distill.shared.bus.cache import ArtifactCache
    from distill.shared.bus.client import Client
    from distill.shared.bus.jobs import JobsClient
    from distill.shared.errors import RequestTimeout

    parser = argparse.ArgumentParser()
    parser.add_argument("--broker", required=True)
    parser.add_argument("--sounds", type=Path, required=True)
    parser.add_argument("--cache", type=Path, required=True)
    args = parser.parse_args(argv)
    with Client(args.broker, timeout_s=2, security=None) as plain:
        try:  # without CURVE, host B gets nothing from host A's broker
            plain.request(P.SERVICE_JOBS, {"op": "counts"})
            plain_refused = False
        except RequestTimeout:
            plain_refused = True
    with Client(args.broker, timeout_s=30) as c:  # keys from $DISTILL_BROKER_KEY, $DISTILL_KEY
        deadline_workers = _wait_for_workers(c, {"distill.preprocess", "distill.train.vqvae"})
        store = ArtifactClient(c, cache=ArtifactCache(args.cache))
        files = [
            {"name": n, "sha256": store.put_file(args.sounds / n, kind="audio", name=n)}
            for n in FILES
        ]
        jobs = JobsClient(c)
        prep = jobs.submit("distill.preprocess", {"files": files})
        train = jobs.submit(
            "distill.train.vqvae",
            {"model": TINY_MODEL, "train": TINY_TRAIN},
            depends_on=[prep["id"]],
        )
        record = jobs.wait(train["id"], timeout_s=500)
        model = (record.get("result") or {}).get("model")
        path = store.get_file(model) if model else None
        print(
            json.dumps(
                {
                    "status": record["status"],
                    "error": record.get("error"),
                    "model": model,
                    "downloaded_sha256": hashlib.sha256(path.read_bytes()).hexdigest()
                    if path
                    else None,
                    "broker_sha256": store.stat(model)["sha256"] if model else None,
                    "workers_host_b_saw": deadline_workers,
                    "plain_client_refused": plain_refused,
                }
            )
        )


def _wait_for_workers(c: object, wanted: set[str]) -> list[str]:
    import time

    from distill.shared.bus.client import Client

    assert isinstance(c, Client)
    deadline = time.monotonic() + 120
    seen: set[str] = set()
    while time.monotonic() < deadline and not wanted <= seen:
        try:
            seen = {w["service"] for w in c.workers()["workers"]}
        except Exception:  # the broker may still be starting: try again
            c.close()
        time.sleep(0.5)
    return sorted(seen & wanted)


if __name__ == "__main__" and sys.argv[1:2] == ["client"]:
    client_main(sys.argv[2:])
