"""Job params of the Distill job services are checked at submit, by a real broker (in a thread,
on loopback), which stays torch-free. Before, the broker took any params: a script's pipeline
preprocess -> train.vqvae -> train.prior whose prior had lr NaN was accepted whole, and the
prior failed only once the RVQ-VAE had trained (8 minutes on a CPU by default); a misspelt
"trian" was accepted and trained with the defaults."""

from __future__ import annotations

import math
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from distill.broker.loop import BrokerConfig
from distill.broker.main import build_broker
from distill.broker.services.jobs import FINAL_ERROR_CODES
from distill.broker.store.settings import StorageSettings
from distill.shared.bus.artifacts import ArtifactClient
from distill.shared.bus.cache import ArtifactCache
from distill.shared.bus.client import Client
from distill.shared.bus.jobs import JobsClient
from distill.shared.errors import CONFIG, RequestError
from tests.conftest import free_port_block

pytestmark = pytest.mark.integration


@pytest.fixture
def endpoint(tmp_path: Path) -> Iterator[str]:
    port = free_port_block()
    broker = build_broker(BrokerConfig(port=port, data_dir=tmp_path / "broker"),
                          StorageSettings(min_free_bytes=0))  # fmt: skip
    broker.bind()
    stop = threading.Event()
    thread = threading.Thread(target=broker.run, args=(stop,), daemon=True)
    thread.start()
    yield f"tcp://127.0.0.1:{port}"
    stop.set()
    thread.join(5)


def files(c: Client, tmp_path: Path) -> list[dict[str, str]]:
    """Two uploaded sounds as a preprocess job names them (the broker checks that it holds
    each artifact a job's params name)."""
    store = ArtifactClient(c, ArtifactCache(tmp_path / "cache"))
    return [{"name": name, "sha256": store.put_bytes(name.encode() * 64, kind="audio", name=name)}
            for name in ("kick.wav", "hat.wav")]  # fmt: skip


def refused_submit(jobs: JobsClient, service: str, params: dict, **kw: object) -> RequestError:
    with pytest.raises(RequestError) as e:
        jobs.submit(service, params, **kw)  # type: ignore[arg-type]
    assert e.value.code == CONFIG and CONFIG in FINAL_ERROR_CODES, e.value
    return e.value


def test_a_pipelines_bad_last_stage_is_refused_at_submit_naming_the_field(
    endpoint: str, tmp_path: Path,
) -> None:
    with Client(endpoint, timeout_s=10) as c:
        jobs = JobsClient(c)
        prep = jobs.submit("distill.preprocess", {"files": files(c, tmp_path)})
        train = jobs.submit("distill.train.vqvae", {"model": {}, "train": {"minutes": 0.3}},
                            depends_on=[prep["id"]])  # fmt: skip
        err = refused_submit(jobs, "distill.train.prior",
                             {"train": {"minutes": 0.1, "lr": math.nan}},
                             depends_on=[train["id"]])  # fmt: skip
        assert ("distill.train.prior: params.train: PriorTrainConfig: lr must be a positive "
                "number") in str(err), err
        assert [j["service"] for j in jobs.list()] == ["distill.train.vqvae", "distill.preprocess"]
        # the same stage with a good setting is taken: it was the setting that was refused
        prior = jobs.submit("distill.train.prior", {"train": {"minutes": 0.1, "lr": 5e-3}},
                            depends_on=[train["id"]])  # fmt: skip
        assert prior["status"] == "queued"


def test_a_misspelt_top_level_key_is_refused_naming_the_keys_the_service_reads(
    endpoint: str, tmp_path: Path,
) -> None:
    with Client(endpoint, timeout_s=10) as c:
        jobs = JobsClient(c)
        prep = jobs.submit("distill.preprocess", {"files": files(c, tmp_path)})
        err = refused_submit(jobs, "distill.train.vqvae", {"trian": {"epochs": 5}},
                             depends_on=[prep["id"]])  # fmt: skip
        assert ("distill.train.vqvae: params: unknown keys ['trian']; it reads ['dataset', "
                "'model', 'train']") in str(err), err
        err = refused_submit(jobs, "distill.preprocess",
                             {"files": files(c, tmp_path), "val_fracton": 0.5})
        assert "unknown keys ['val_fracton']" in str(err) and "'val_fraction'" in str(err)
        assert len(jobs.list()) == 1


def test_preprocess_numbers_are_refused_at_submit_and_other_services_are_not_checked(
    endpoint: str, tmp_path: Path,
) -> None:
    with Client(endpoint, timeout_s=10) as c:
        jobs = JobsClient(c)
        sounds = files(c, tmp_path)
        for params, message in (
            ({"seed": "abc"}, "params.seed must be a non-negative integer, got 'abc'"),
            ({"seed": 1.7}, "params.seed must be a non-negative integer, got 1.7"),
            ({"silence_threshold_db": math.nan}, "params.silence_threshold_db must be a finite"),
            ({"mel_config": {"sample_rate": 0}}, "params.mel_config: mel_config.sample_rate"),
        ):
            err = refused_submit(jobs, "distill.preprocess", {"files": sounds, **params})
            assert message in str(err), err
        err = refused_submit(jobs, "distill.preprocess", {"files": []})
        assert "params.files must be a non-empty list" in str(err)
        # a service the checker does not know keeps whatever params it is given
        job = jobs.submit("distill.sleep", {"trian": {"lr": math.nan}})
        assert job["status"] == "queued"


def test_the_broker_checks_job_params_without_loading_torch() -> None:
    """The broker process only moves messages: it must not import torch (seconds and hundreds
    of MB) to check a job's settings. It loads the checker and the settings modules, and they
    run without it."""
    code = ("import sys\n"
            "import distill.broker.main\n"
            "from distill.broker.services.jobs import check_job_params\n"
            "try:\n"
            "    check_job_params('distill.train.prior', {'train': {'lr': float('nan')}})\n"
            "except Exception as e:\n"
            "    print(type(e).__name__)\n"
            "print('distill.shared.train.jobparams' in sys.modules, 'torch' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["ConfigError", "True", "False"], out.stdout
