"""Benchmark: a first run on an accelerator, for what a machine without one cannot check.

    python bench/device.py --device cuda --minutes 3
    python bench/device.py --device mps --minutes 3

Starts `distill up` on loopback with its RVQ-VAE, prior and inference workers on DEVICE (the
preprocess worker on the CPU), trains a model with `distill train` on DATA (default: the
demo's ten bundled one-shots) in MINUTES (its stages print their own figures: decoded audio
against the Griffin-Lim floor, bits per code), then prints:

- **replays** on the device (README: "the same samples on the same device"): the same seed
  drawn twice, a continuation twice, a region resampled twice, and `distill regenerate` of a
  file `distill generate --device DEVICE` wrote, each "identical" or how far apart;
- **sampling speed**: generated seconds of codes per wall second at batch 1 and 16 with the
  prior on the device, against the same prior on the CPU (the baseline, this run, ``--threads``
  torch threads): whether one-at-a-time draws belong on the CPU on this machine;
- **a generate job** on the inference worker (16 sounds of 2 s): its wall time.

The tests run the same paths on a stand-in device (``tests/fakedevice.py``), which checks
where tensors live but not a real card's kernels, speed or determinism: this script is for a
machine with one. (It runs under the stand-in too, from a test's environment, which is how it
was checked; its speed figures then mean nothing.) Logs and files go to ``--out`` (default: a temporary folder, kept).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import free_port_block, spawn, stop, wait_for  # noqa: E402

from distill.shared.audio.io import load_audio, scan_folder  # noqa: E402
from distill.shared.bus.artifacts import ArtifactClient  # noqa: E402
from distill.shared.bus.client import Client  # noqa: E402
from distill.shared.bus.jobs import JobsClient  # noqa: E402
from distill.shared.model import inference as inf  # noqa: E402
from distill.shared.model.modelfile import DistillModel, load_model  # noqa: E402
from distill.shared.model.sampling import SamplingParams, sample  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DATA = REPO / "shared" / "assets" / "demo"
SERVICES = ("distill.preprocess", "distill.train.vqvae", "distill.train.prior", "distill.infer")


def distill(args: list[str], endpoint: str, cwd: Path, capture: bool = False
            ) -> subprocess.CompletedProcess[str]:  # fmt: skip
    env = {**os.environ, "DISTILL_BROKER": endpoint}
    return subprocess.run([sys.executable, "-m", "distill.shared.cli", *args], env=env, cwd=cwd,
                          text=True, capture_output=capture, timeout=3600)  # fmt: skip


def start_cluster(device: str, out: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port_block()
    endpoint = f"tcp://127.0.0.1:{port}"
    up = spawn(["up", "--device", device, "--port", str(port), "--data-dir", str(out / "broker"),
                "--services", "preprocess,vqvae,prior,infer"], out / "cluster.log")  # fmt: skip

    def ready() -> bool:
        try:
            with Client(endpoint, timeout_s=1) as c:
                return {w["service"] for w in c.workers()["workers"]} >= set(SERVICES)
        except Exception:
            return False

    wait_for(ready, timeout_s=180)
    return up, endpoint


def compare(name: str, a: np.ndarray, b: np.ndarray) -> None:
    if a.shape != b.shape:
        print(f"  {name:<28} DIFFERENT shapes {a.shape} / {b.shape}")
    elif np.array_equal(a, b):
        print(f"  {name:<28} identical")
    else:
        print(f"  {name:<28} DIFFERENT: max |a - b| {float(np.abs(a - b).max()):.3g}, "
              f"{float((a != b).mean()):.1%} of values")  # fmt: skip


def replays(model: DistillModel, sound: torch.Tensor, path: Path, device: str, endpoint: str,
            out: Path) -> None:  # fmt: skip
    print(f"replays on {device}:")
    params = SamplingParams(seed=3)

    def drawn(**kw: Any) -> np.ndarray:
        return inf.generate(model, count=4, seconds=1.5, params=params, quality="fast", **kw).audio

    compare("4 sounds, the same seed", drawn(), drawn())
    grid = inf.encode(model, sound)
    prime = grid[:, : min(60, grid.shape[1] - 1)]
    compare("a continuation", drawn(prime=prime), drawn(prime=prime))
    again = [inf.resample_variants(model, grid, 5, min(40, grid.shape[1]), params, "fast",
                                   count=2).audio for _ in range(2)]  # fmt: skip
    compare("a region resampled", again[0], again[1])
    made = distill(["generate", str(path), "-n", "2", "--seconds", "1", "--seed", "4",
                    "--device", device, "-o", str(out / "generated")], endpoint, out, True)  # fmt: skip
    first = sorted((out / "generated").glob("*.wav"))[:1]
    if made.returncode or not first:
        print(f"  distill generate failed: {made.stderr[-500:]}")
        return
    again_cli = distill(["regenerate", str(first[0]), "--model", str(path), "--device", device,
                         "-o", str(out / "regenerated.wav"), "--force"], endpoint, out, True)  # fmt: skip
    said = (again_cli.stdout + again_cli.stderr).strip().splitlines()
    print(f"  {'distill regenerate':<28} {said[-1] if said else again_cli.returncode}")


def speed(model: DistillModel, path: Path, device: str, threads: int, seconds: float) -> None:
    prior = model.prior
    assert prior is not None
    cpu = load_model(path, "cpu").prior
    assert cpu is not None
    steps = inf.steps_for(model, seconds)
    print(f"sampling speed ({seconds:g} s of codes, generated seconds per wall second):")
    torch.set_num_threads(threads)
    for batch in (1, 16):
        rates = {}
        for where, p in ((device, prior), ("cpu", cpu)):
            sample(p, batch=batch, steps=steps // 4, params=SamplingParams(seed=0)).cpu()  # warm
            start = time.perf_counter()
            sample(p, batch=batch, steps=steps, params=SamplingParams(seed=0)).cpu()  # a sync
            rates[where] = batch * seconds / (time.perf_counter() - start)
        print(f"  batch {batch:>2}: {device} {rates[device]:7.1f}x real time, cpu (baseline, "
              f"{threads} threads) {rates['cpu']:7.1f}x: ratio {rates[device] / rates['cpu']:.2f}")  # fmt: skip


def generate_job(endpoint: str, model_sha: str) -> None:
    with Client(endpoint, timeout_s=60) as c:
        jobs = JobsClient(c)
        start = time.perf_counter()
        job = jobs.submit("distill.infer", {"op": "generate", "model": model_sha, "count": 16,
                                            "seconds": 2.0, "seed": 1, "quality": "best"})  # fmt: skip
        record = jobs.follow(job["id"], lambda event: None)
        print(f"generate job (16 x 2 s, best quality): {record['status']} in "
              f"{time.perf_counter() - start:.1f} s {record.get('error') or ''}")  # fmt: skip


def model_artifact(endpoint: str, path: Path) -> str:
    with Client(endpoint, timeout_s=60) as c:
        return ArtifactClient(c).put_file(path, kind="model", name=path.name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N or mps")
    parser.add_argument("--minutes", type=float, default=3.0, help="the training budget")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="a folder of sounds")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the CPU baseline")
    parser.add_argument("--seconds", type=float, default=10.0, help="seconds drawn per speed run")
    parser.add_argument("--out", type=Path, default=None, help="logs and files (kept)")
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="distill-device-"))
    out.mkdir(parents=True, exist_ok=True)
    print(f"files and logs: {out}")
    up, endpoint = start_cluster(args.device, out)
    try:
        start = time.perf_counter()
        trained = distill(["train", str(args.data), "--minutes", str(args.minutes),
                           "-o", str(out / "model.distill"), "--force"], endpoint, out)  # fmt: skip
        print(f"distill train: rc {trained.returncode} in {time.perf_counter() - start:.0f} s")
        if trained.returncode:
            sys.exit(f"training failed: see above and {out / 'cluster.log'}")
        path = out / "model.distill"
        model = load_model(path, args.device)
        first = next(p for p in scan_folder(args.data) if p.suffix.lower() in (".flac", ".wav"))
        rate = model.mel_config.sample_rate
        sound = inf.model_audio(model, load_audio(first, rate).numpy(), rate)  # (samples,)
        replays(model, sound, path, args.device, endpoint, out)
        speed(model, path, args.device, args.threads, args.seconds)
        generate_job(endpoint, model_artifact(endpoint, path))
    finally:
        stop(up)


if __name__ == "__main__":
    main()
