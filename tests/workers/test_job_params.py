"""The three job workers check their params first, as the broker does at submit: a job that got
past an older broker fails on its first attempt with a final ``config`` error, before the
dataset is downloaded or any code is encoded. Before, "trian" trained with the defaults,
preprocess's seed "abc" failed three attempts with a Python error, train.vqvae downloaded and
parsed the whole dataset before it read its settings, and bad params raised as JobError (code
``job``) were retried max_attempts times."""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from distill.broker.loop import BrokerConfig
from distill.broker.main import build_broker
from distill.broker.services.jobs import JobService
from distill.broker.store.settings import StorageSettings
from distill.shared.bus import protocol as P
from distill.shared.bus.client import Client
from distill.shared.bus.jobs import JobsClient
from distill.shared.errors import CONFIG, ConfigError, code_of
from distill.shared.train import jobparams
from distill.workers import preprocess, train_prior, train_vqvae
from distill.workers.runtime.context import JobInfo
from tests.conftest import HEARTBEAT_S, LIVENESS, Proc, free_port_block, wait_until

SHA = "ab" * 32


class Artifacts:
    """The store as a handler sees it; every use is recorded (none is expected here)."""

    def __init__(self) -> None:
        self.used: list[str] = []

    def __getattr__(self, name: str) -> Any:
        def use(*args: Any, **kwargs: Any) -> Any:
            self.used.append(name)
            raise AssertionError(f"the job used the artifact store ({name}) before its params "
                                 "were checked")  # fmt: skip
        return use


class Context:
    def __init__(self, service: str, params: dict[str, Any],
                 deps: dict[str, dict[str, Any]] | None = None) -> None:  # fmt: skip
        self.info = JobInfo(job_id="j-1", service=service, params=params, deps=deps or {})
        self.device = "cpu"
        self.artifacts = Artifacts()
        self.progressed: list[dict[str, Any]] = []

    def check_cancel(self) -> None:
        pass

    def progress(self, fraction: float | None = None, **fields: Any) -> None:
        self.progressed.append(fields)


def test_each_worker_serves_the_service_the_checker_knows() -> None:
    assert preprocess.SERVICE == jobparams.PREPROCESS == P.SERVICE_PREPROCESS.decode()
    assert train_vqvae.SERVICE == jobparams.TRAIN_VQVAE == P.SERVICE_VQVAE.decode()
    assert train_prior.SERVICE == jobparams.TRAIN_PRIOR == P.SERVICE_PRIOR.decode()


@pytest.mark.parametrize("module, params, message", [
    (train_vqvae, {"dataset": SHA, "trian": {"epochs": 5}}, "unknown keys ['trian']"),
    (train_vqvae, {"dataset": SHA, "train": {"lr": math.nan}}, "params.train: TrainConfig: lr"),
    (train_vqvae, {"dataset": SHA, "train": 5}, "params.train must be a map of TrainConfig"),
    (train_vqvae, {"dataset": SHA, "model": {"levels": 1000}}, "params.model: VQVAEConfig"),
    (train_prior, {"vqvae": SHA, "dataset": SHA, "train": {"lr": math.nan}},
     "params.train: PriorTrainConfig: lr must be a positive number"),
    (train_prior, {"vqvae": SHA, "dataset": SHA, "prior": {"hidden": -1}}, "params.prior"),
    (train_prior, {"vqvae": SHA, "dataset": SHA, "name": "../x"}, "params.name"),
    (train_prior, {"vqvae": SHA, "dataset": SHA, "epochs": 3}, "unknown keys ['epochs']"),
    (preprocess, {"files": [{"name": "a.wav", "sha256": SHA}], "seed": "abc"}, "params.seed"),
    (preprocess, {"files": [{"name": "a.wav", "sha256": SHA}], "seed": 1.7}, "params.seed"),
    (preprocess, {"files": [{"name": "a.wav", "sha256": SHA}], "silence_threshold_db": math.nan},
     "params.silence_threshold_db"),
    (preprocess, {"files": [{"name": "a.wav", "sha256": SHA}], "val_fracton": 0.5},
     "unknown keys ['val_fracton']"),
    (preprocess, {"files": []}, "params.files must be a non-empty list"),
    # a filterbank that cannot be inverted: a model trained on it could never make a sound
    (preprocess, {"files": [{"name": "a.wav", "sha256": SHA}], "mel_config": {"n_fft": 512}},
     "its filterbank cannot be inverted"),
])  # fmt: skip
def test_bad_params_fail_the_job_at_once_before_any_input_is_fetched(
    module: Any, params: dict[str, Any], message: str,
) -> None:
    ctx = Context(module.SERVICE, params)
    with pytest.raises(ConfigError) as e:
        module.run_job(ctx)
    assert code_of(e.value) == CONFIG and message in str(e.value), e.value
    assert ctx.artifacts.used == [] and ctx.progressed == []


def test_params_the_dependencies_must_complete_are_final_errors_too() -> None:
    """What only the dependencies' results settle (which dataset, which RVQ-VAE) was a JobError,
    retried max_attempts times into the same answer."""
    with pytest.raises(ConfigError, match="depend on exactly one preprocess job"):
        train_vqvae.run_job(Context(train_vqvae.SERVICE, {}))
    with pytest.raises(ConfigError, match="give params.vqvae, or depend on exactly one"):
        train_prior.run_job(Context(train_prior.SERVICE, {"dataset": SHA}))
    with pytest.raises(ConfigError, match="dataset must be an artifact id"):
        train_prior.run_job(Context(train_prior.SERVICE, {}, deps={"j-0": {"model": SHA,
                                                                           "dataset": "zz"}}))


# --- through a real worker ------------------------------------------------------------------


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[tuple[str, JobService]]:
    port = free_port_block()
    b = build_broker(BrokerConfig(port=port, data_dir=tmp_path / "broker", heartbeat_interval_s=
                                  HEARTBEAT_S, heartbeat_liveness=LIVENESS),
                     StorageSettings(min_free_bytes=0))  # fmt: skip
    assert isinstance(b.jobs, JobService)
    b.bind()
    stop = threading.Event()
    thread = threading.Thread(target=b.run, args=(stop,), daemon=True)
    thread.start()
    yield f"tcp://127.0.0.1:{port}", b.jobs
    stop.set()
    thread.join(5)


@pytest.mark.integration
@pytest.mark.slow
def test_a_job_an_older_broker_let_in_fails_on_its_first_attempt(
    broker: tuple[str, JobService], tmp_path: Path,
) -> None:
    """Stored as a broker that did not check params stored it (straight into its job table):
    the worker refuses it at once, one attempt, naming the key; the dataset it names is not
    even in the store, and is never asked for."""
    endpoint, jobs = broker
    worker = Proc(["worker", "vqvae", "--broker", endpoint, "--device", "cpu", "--threads", "1",
                   "--heartbeat-s", str(HEARTBEAT_S), "--liveness", str(LIVENESS)],
                  tmp_path / "worker.log", env={"DISTILL_CACHE": str(tmp_path / "cache")})  # fmt: skip
    try:
        job = jobs.store.submit("distill.train.vqvae", {"dataset": SHA, "trian": {"epochs": 5}},
                                max_attempts=3)  # fmt: skip
        with Client(endpoint, timeout_s=10) as c:
            record = wait_until(lambda: (r := JobsClient(c).get(job.id, metrics=False))["status"]
                                in ("failed", "succeeded") and r, 120, interval_s=0.2,
                                what="the job to end")  # fmt: skip
        assert record["status"] == "failed" and record["attempts"] == 1, record
        assert "distill.train.vqvae: params: unknown keys ['trian']" in record["error"], record
    finally:
        worker.stop()
