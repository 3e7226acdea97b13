"""The assembled broker (broker/main.py): its periodic tasks are guarded and its storage
settings reach the store."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

from distill.broker.loop import BrokerConfig
from distill.broker.main import build_broker
from distill.broker.services.jobs import JobService
from distill.broker.store.settings import StorageSettings
from distill.shared.bus.client import Client
from distill.shared.errors import ConfigError
from tests.conftest import free_port_block, wait_until

pytestmark = pytest.mark.integration


def test_the_broker_answers_while_every_periodic_task_fails(tmp_path: Path) -> None:
    """Before: an exception in a timer (a full disk in the journal flush, say) escaped
    ``Broker.step`` and ended the loop: no request was answered after it."""
    port = free_port_block()
    broker = build_broker(
        BrokerConfig(port=port, data_dir=tmp_path / "broker"),
        StorageSettings(max_bytes=10**6, min_free_bytes=0, keep_finished_jobs_days=30),
    )
    jobs = broker.jobs
    assert isinstance(jobs, JobService)
    names = [task.name for task in jobs.periodic._tasks]
    assert {
        "flush_events",
        "dispatch_scan",
        "upload_expiry",
        "retention_sweep",
        "verify_resumed_uploads",
        "prune_finished_jobs",
    } <= set(names)

    def fail(name: str) -> Any:
        def run(now: float) -> None:
            raise OSError(28, f"No space left on device (injected into {name})")

        return run

    for task in jobs.periodic._tasks:
        task.run, task.interval_s = fail(task.name), 0.0
    broker.bind()
    stop = threading.Event()
    thread = threading.Thread(target=broker.run, args=(stop,), daemon=True)
    thread.start()
    try:
        wait_until(
            lambda: all(jobs.periodic.failures(n) >= 3 for n in names),
            30,
            what="every task to have failed a few times",
        )
        with Client(f"tcp://127.0.0.1:{port}", timeout_s=10) as client:
            counts = client.request("distill.jobs", {"op": "counts"})
            submitted = client.request(
                "distill.jobs", {"op": "submit", "service": "s", "params": {}}
            )
        assert counts["queued"] == 0 and submitted["status"] == "queued"
        assert thread.is_alive()
    finally:
        stop.set()
        thread.join(5)


def test_storage_settings_come_from_the_environment() -> None:
    settings = StorageSettings.from_env(
        {"DISTILL_STORE_MAX_BYTES": "1000", "DISTILL_STORE_UPLOAD_IDLE_S": "90"}
    )
    assert settings.max_bytes == 1000 and settings.upload_idle_s == 90.0
    assert settings.keep_preview_epochs == StorageSettings().keep_preview_epochs
    with pytest.raises(ConfigError, match="DISTILL_STORE_MIN_FREE_BYTES"):
        StorageSettings.from_env({"DISTILL_STORE_MIN_FREE_BYTES": "lots"})
    assert StorageSettings().keep_finished_jobs_days == 0  # finished jobs kept for ever
    keep = StorageSettings.from_env({"DISTILL_STORE_KEEP_FINISHED_JOBS_DAYS": "0.5"})
    assert keep.keep_finished_jobs_days == 0.5
    for bad in ("-1", "nan", "a month"):
        with pytest.raises(ConfigError, match="keep_finished_jobs_days|KEEP_FINISHED_JOBS_DAYS"):
            StorageSettings.from_env({"DISTILL_STORE_KEEP_FINISHED_JOBS_DAYS": bad})
