"""Soak (issue 9): 50 short trainings through a real broker while a worker is killed -9 twice.

At the end every job succeeded once, the store holds one model per job and no checkpoint of a
finished job, and what it holds (besides the one dataset every job read) is within 10% of the
models' total: nothing leaked. Sized for a minute on two busy cores: a tiny model, five epochs,
a checkpoint after every epoch (``checkpoint_every_s`` 0), so kills land mid-job (~40 s here;
with the decoded-audio checks, which QUICK_CHECKS leaves out, ~2 minutes). Before issue 9 it
failed: every checkpoint stayed in the store.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from distill.shared.bus.jobs import JobsClient
from tests.conftest import Cluster, wait_until
from tests.workers.test_train_vqvae import QUICK_CHECKS, TINY_MODEL, TINY_TRAIN, put_dataset

pytestmark = [pytest.mark.integration, pytest.mark.slow]

N_JOBS = 50


def done(jobs: JobsClient) -> int:
    return sum(1 for r in jobs.list(limit=N_JOBS + 10) if r["status"] == "succeeded")


def artifacts(c: Any, **filters: Any) -> list[dict[str, Any]]:
    return list(c.request("distill.artifacts", {"op": "list", **filters})["artifacts"])


def test_50_trainings_survive_two_worker_kills_and_leave_only_their_models(
    cluster: Cluster, percussion: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DISTILL_STORE_UPLOAD_IDLE_S", "5")  # a killed worker's upload expires
    cluster.start_broker()
    workers = [cluster.start_worker("vqvae"), cluster.start_worker("vqvae")]
    with cluster.client(timeout_s=30) as c:
        jobs = JobsClient(c)
        dataset = put_dataset(c, percussion, tmp_path)
        ids = [jobs.submit("distill.train.vqvae",
                           {"dataset": dataset, "model": TINY_MODEL,
                            "train": {**TINY_TRAIN, **QUICK_CHECKS, "epochs": 5, "seed": i}})["id"]
               for i in range(N_JOBS)]
        for target in (10, 30):  # kill -9 the same worker slot twice, mid-run
            wait_until(lambda t=target: done(jobs) >= t, 600, interval_s=1, what=f"{target} jobs")
            workers[0].kill9()
            workers[0] = cluster.start_worker("vqvae")
        wait_until(lambda: done(jobs) == N_JOBS, 900, interval_s=1, what="all 50 jobs")
        records = [jobs.get(i, metrics=False) for i in ids]
        wait_until(lambda: not c.request("distill.artifacts", {"op": "usage"})["uploads"]["count"],
                   30, what="abandoned uploads to expire")
        models = artifacts(c, kind="vqvae")
        checkpoints = artifacts(c, kind="checkpoint")
        usage = c.request("distill.artifacts", {"op": "usage"})
    assert all(r["status"] == "succeeded" for r in records)
    assert sorted(m["job"] for m in models) == sorted(ids)  # one model per job
    assert {r["result"]["model"] for r in records} == {m["sha256"] for m in models}
    assert checkpoints == []  # no checkpoint of a finished job is kept
    models_total = sum(m["size"] for m in models)
    kinds = {k["kind"]: k["bytes"] for k in usage["by_kind"]}
    held = usage["used_bytes"] - kinds.get("dataset", 0)  # the input every job shared
    assert models_total <= held <= 1.1 * models_total, (held, models_total, usage)
    # A kill costs a job at most one counted attempt (lost ones, with a checkpoint, count apart).
    assert all(r["attempts"] - r["lost_attempts"] <= 2 for r in records)
