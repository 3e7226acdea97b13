"""The RVQ-VAE training worker through a real broker: it trains, reports codebook health,
and a kill -9 mid-run resumes from the last checkpoint on a new worker."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from distill.shared.audio.dataset import build_dataset
from distill.shared.audio.mel import MelConfig
from distill.shared.bus.artifacts import ArtifactClient
from distill.shared.bus.cache import ArtifactCache
from distill.shared.bus.client import Subscription
from distill.shared.bus.jobs import JobsClient
from tests.conftest import Cluster, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]

FILES = ["bd_808.flac", "bd_haus.flac", "sn_dub.flac", "hat_bdu.flac", "drum_cymbal_open.flac",
         "tabla_na.flac", "elec_blip.flac", "perc_bell.flac"]
TINY_MODEL = {"channels": 32, "latent_dim": 16, "blocks": 1, "codebook_size": 16, "levels": 2}
TINY_TRAIN = {"batch_size": 8, "preview_every": 0, "patience": 0, "warmup_steps": 4,
              "checkpoint_every_s": 0}
# The decoded-audio checks (Griffin-Lim on the epochs they run and on the returned model) and the
# refinement after training took ~2.7 s of a tiny job's 4.2 s on a CPU thread (5 epochs of
# TINY_TRAIN: 1.5 s without them). Tests of jobs rather than of sound keep them nearly out;
# test_pipeline_from_sound_files_to_model keeps them whole.
QUICK_CHECKS = {"audio_every": 0, "audio_chunks": 2, "audio_iters": 4, "refine_iters": 0}


def put_dataset(c: Any, percussion: Path, tmp_path: Path) -> str:
    files = [(name, (percussion / name).read_bytes()) for name in FILES]
    ds = build_dataset(files, MelConfig(), seed=0)
    return str(ArtifactClient(c, cache=ArtifactCache(tmp_path / "cache")).put_bytes(
        ds.to_bytes(), kind="dataset", name="tiny"))


def epochs_of(record: dict[str, Any]) -> list[int]:
    return [int(row["epoch"]) for row in record["metrics"]]


def test_training_resumes_from_checkpoint_after_kill_9(cluster: Cluster, percussion: Path,
                                                      tmp_path: Path) -> None:
    cluster.start_broker()
    first = cluster.start_worker("vqvae")
    with cluster.client(timeout_s=30) as c:
        jobs = JobsClient(c)
        sha = put_dataset(c, percussion, tmp_path)
        job = jobs.submit("distill.train.vqvae",
                          {"dataset": sha, "model": TINY_MODEL,
                           "train": {**TINY_TRAIN, **QUICK_CHECKS, "epochs": 14}},
                          max_attempts=3)
        with Subscription(c.endpoint, [f"job.{job['id']}"]) as sub:
            deadline = time.monotonic() + 120
            checkpoints = 0
            while checkpoints < 3 and time.monotonic() < deadline:
                event = sub.next(timeout_s=1)
                if event and event["type"] == "checkpoint":
                    checkpoints += 1
        assert checkpoints == 3, "no checkpoints within 120 s"
        first.kill9()
        cluster.start_worker("vqvae")
        record = jobs.wait(job["id"], timeout_s=300)
        assert record["status"] == "succeeded", record["error"]
        record = wait_until(lambda: (r := jobs.get(job["id"])) and len(r["metrics"]) >= 14 and r, 10,
                            what="metric history")
    assert record["attempts"] == 2 and "worker lost" in record["attempt_errors"][0]
    epochs = epochs_of(record)
    # the second attempt continued from the checkpoint: no epoch ran from scratch again (an
    # epoch whose checkpoint was not registered before the kill may run twice, no more)
    assert epochs.count(1) == 1 and sorted(set(epochs)) == list(range(1, 15)), epochs
    assert len(epochs) <= 16 and record["result"]["epochs"] == 14
    rows = record["metrics"]
    assert rows[-1]["train_recon"] < rows[0]["train_recon"]  # it learned
    assert all(u > 1 / 16 for u in rows[-1]["utilisation"])  # more than one code per level


def test_cli_train_with_live_progress(cluster: Cluster, percussion: Path, tmp_path: Path) -> None:
    cluster.start_broker()
    cluster.start_worker("vqvae")
    with cluster.client(timeout_s=30) as c:
        sha = put_dataset(c, percussion, tmp_path)
    env = {**os.environ, "DISTILL_BROKER": cluster.endpoint}
    args = ["train", sha[:12], "--stage", "vqvae", "--epochs", "3", "--codebook-size", "16", "--levels", "2"]
    for key, value in TINY_MODEL.items():
        if key not in ("codebook_size", "levels"):
            args += ["--model-opt", f"{key}={value}"]
    for key, value in {**TINY_TRAIN, **QUICK_CHECKS}.items():
        args += ["--train-opt", f"{key}={value}"]
    out = subprocess.run([sys.executable, "-m", "distill.shared.cli", *args], capture_output=True, text=True,
                         env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "epoch 3/3" in out.stderr and "util" in out.stderr
    assert "model " in out.stdout


def test_pipeline_from_sound_files_to_model(cluster: Cluster, percussion: Path, tmp_path: Path) -> None:
    """Upload files, preprocess, train: the training job depends on the preprocess job and
    takes the dataset from its result."""
    cluster.start_broker()
    cluster.start_worker("preprocess")
    cluster.start_worker("vqvae")
    with cluster.client(timeout_s=30) as c:
        ac = ArtifactClient(c, cache=ArtifactCache(tmp_path / "cache"))
        files = [{"name": n, "sha256": ac.put_file(percussion / n, kind="audio", name=n)} for n in FILES]
        jobs = JobsClient(c)
        # mel settings other than the defaults: the RVQ-VAE takes its mel bands from them
        prep = jobs.submit("distill.preprocess", {"files": files, "mel_config": {"n_mels": 64}})
        train = jobs.submit("distill.train.vqvae", {"model": TINY_MODEL, "train": {**TINY_TRAIN, "epochs": 2}},
                            depends_on=[prep["id"]])
        record = jobs.wait(train["id"], timeout_s=300)
        assert record["status"] == "succeeded", record["error"]
        assert record["result"]["chosen"]["codebook_size"] == 16
        assert ac.stat(record["result"]["model"])["kind"] == "vqvae"
        result = record["result"]
        assert result["dataset"] == jobs.get(prep["id"])["result"]["dataset"]
        assert result["config"]["n_mels"] == 64
        budget = result["budget"]  # no minutes in the params: the CPU default, fitted
        assert (budget["source"], budget["minutes"], budget["steps"]) == ("default", 8.0, result["metrics"]["step"])
        assert budget["planned_epochs"] == 2 and budget["stopped"] == "epochs"
        # the size left unset comes from the device, with the reason; the audio check is the
        # returned model's, beside the floor
        assert result["config"]["downsample"] == 1 and "cpu" in result["chosen"]["why_size"]
        audio = result["audio"]
        assert audio["epoch"] == result["best_epoch"] and audio["sc"] > 0 < audio["floor"]
        assert audio["ratio"] == pytest.approx(audio["sc"] / audio["floor"])
        assert audio["on"] == "audio"  # the preprocess job's dataset kept the chunks' sound
        refine = result["refine"]  # the codebooks refined after training, kept if no worse
        assert refine["iters"] == 10 and refine["latents"] > 0 and refine["decoder_steps"] >= 0
        assert refine["val_loss_after"] <= refine["val_loss_before"]  # kept, or undone (equal)
        assert refine["train_loss_after"] <= refine["train_loss_before"]
        in_use = result["codes_in_use"]  # per level, over the training chunks
        assert len(in_use) == result["chosen"]["levels"] and all(0 < u <= 1 for u in in_use)
