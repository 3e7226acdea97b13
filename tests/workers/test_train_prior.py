"""The prior training worker through a real broker: an RVQ-VAE job, then a prior job that takes
the model and dataset from it, is killed with -9 mid-run, resumes from its checkpoint on a new
worker (reusing the cached codes) and ends with a .distill model that loads."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from distill.shared.bus.artifacts import ArtifactClient
from distill.shared.bus.cache import ArtifactCache
from distill.shared.bus.client import Subscription
from distill.shared.bus.jobs import JobsClient
from distill.shared.model import inference
from distill.shared.model.modelfile import load_model
from tests.conftest import Cluster, wait_until
from tests.workers.test_train_vqvae import (
    QUICK_CHECKS,
    TINY_MODEL,
    TINY_TRAIN,
    epochs_of,
    put_dataset,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PRIOR_TRAIN = {"epochs": 30, "patience": 0, "warmup_steps": 4, "checkpoint_every_s": 0,
               "batch_size": 4, "window": 64}  # fmt: skip
PRIOR = {"hidden": 32, "embed_dim": 16}


def test_prior_job_resumes_after_kill_9_and_writes_a_model(cluster: Cluster, percussion: Path,
                                                           tmp_path: Path) -> None:  # fmt: skip
    cluster.start_broker()
    cluster.start_worker("vqvae")
    first = cluster.start_worker("prior")
    with cluster.client(timeout_s=30) as c:
        jobs = JobsClient(c)
        ac = ArtifactClient(c, cache=ArtifactCache(tmp_path / "cache"))
        dataset = put_dataset(c, percussion, tmp_path)
        # eight levels at the CPU's downsample 1 (94 code steps a second): the prior draws four
        vqvae = jobs.submit("distill.train.vqvae", {"dataset": dataset,
                                                    "model": {**TINY_MODEL, "levels": 8},
                                                    "train": {**TINY_TRAIN, **QUICK_CHECKS, "epochs": 3}})  # fmt: skip
        prior = jobs.submit("distill.train.prior", {"prior": PRIOR, "train": PRIOR_TRAIN,
                                                    "name": "kit"},
                            depends_on=[vqvae["id"]], max_attempts=3)  # fmt: skip
        with Subscription(c.endpoint, [f"job.{prior['id']}"]) as sub:
            deadline, checkpoints = time.monotonic() + 180, 0
            while checkpoints < 4 and time.monotonic() < deadline:
                event = sub.next(timeout_s=1)
                if event and event["type"] == "checkpoint":
                    checkpoints += 1
        assert checkpoints == 4, "no prior checkpoints within 180 s"
        first.kill9()
        cluster.start_worker("prior")
        record = jobs.wait(prior["id"], timeout_s=300)
        assert record["status"] == "succeeded", record["error"]
        record = wait_until(lambda: (r := jobs.get(prior["id"])) and len(r["metrics"]) >= 30 and r,
                            10, what="metric history")  # fmt: skip
        model_path = ac.download(record["result"]["model"], tmp_path / "kit.distill")
        kind = ac.stat(record["result"]["model"])["kind"]
        vqvae_result = jobs.get(vqvae["id"])["result"]
    assert record["attempts"] == 2 and "worker lost" in record["attempt_errors"][0]
    epochs = epochs_of(record)
    assert epochs.count(1) == 1 and sorted(set(epochs)) == list(range(1, 31)), epochs
    assert len(epochs) <= 32
    result = record["result"]
    assert (result["vqvae"], result["dataset"]) == (vqvae_result["model"], dataset)
    assert result["encoding"]["cached"]  # the first attempt encoded, the retry reused it
    assert result["epochs"] == 30 and result["stopped"] == "epochs"
    assert result["budget"]["source"] == "default" and result["budget"]["minutes"] == 3.0
    assert result["chosen"]["overridden"] == ["embed_dim", "hidden"]
    chosen = result["chosen"]
    assert chosen["prior"]["levels"] == 4 and "first 4 of 8 levels" in chosen["why"]
    rows = record["metrics"]
    assert rows[-1]["val_bits"] < rows[0]["val_bits"]
    assert rows[-1]["unigram_bits"] == result["baselines"]["unigram_bits"]
    assert kind == "model"
    model = load_model(model_path)
    assert model.model_id == result["model_id"] and model.prior is not None
    assert model.prior.config.hidden == 32 and model.summary["name"] == "kit"
    assert model.summary["dataset"] == dataset and model.summary["files"]
    assert model.summary["baselines"]["bigram_bits"] == result["baselines"]["bigram_bits"]
    # the change temperature chosen by drawing sounds at each setting: what generate draws at
    sampling = model.summary["sampling"]
    assert sampling == result["sampling"] and sampling["files"] == len(model.summary["files"])
    assert sampling["change_temperature"] in inference.CHANGE_TEMPERATURE_CHOICES
    assert set(sampling["distances"]) == {"1", "0.5"}
    assert inference.sampling_params({}, model).change_temperature == sampling["change_temperature"]
