"""Start the broker process: build the socket loop, attach the services it hosts, loop until
stopped. This module is where the loop and the services meet; neither imports the other's
assembly."""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path
from typing import Any

from distill.broker.access import Limits
from distill.broker.loop import Broker, BrokerConfig
from distill.broker.services.artifacts import ArtifactService
from distill.broker.services.events import EventsService
from distill.broker.services.jobs import JobService
from distill.broker.services.quota import ArtifactQuota
from distill.broker.services.workers import WorkersService
from distill.broker.store.artifacts import ArtifactStore
from distill.broker.store.journal import JobStore
from distill.shared.bus import protocol as P
from distill.shared.bus.security import ENV_INSECURE, broker_security
from distill.shared.logs import configure, get_logger


def build_broker(config: BrokerConfig) -> Broker:
    """A broker with every service it hosts attached: jobs, artifacts, workers, events."""
    broker = Broker(config)
    data_dir = Path(config.data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    jobs = JobService(broker, JobStore(data_dir / "jobs.sqlite3"))
    artifacts = ArtifactService(
        ArtifactStore(data_dir / "artifacts"), in_use=jobs.store.referenced_artifacts,
        quota=ArtifactQuota(data_dir / "quota.json", config.limits.artifact_quota_bytes),
        # Without CURVE there are no keys: every peer shares one "anonymous" account.
        owner_of=(lambda: broker.current_owner.decode(errors="replace")) if config.security
        else (lambda: "anonymous"))
    broker.jobs = jobs
    broker.event_listeners.append(jobs.on_event)
    broker.internal[P.SERVICE_JOBS] = jobs.serve
    broker.internal[P.SERVICE_ARTIFACTS] = artifacts.serve
    broker.internal[P.SERVICE_WORKERS] = WorkersService(broker.registry).serve
    broker.internal[P.SERVICE_EVENTS] = EventsService(broker.hub).serve
    return broker


def run_broker(config: BrokerConfig, stop: threading.Event | None = None) -> None:
    configure("broker", f"broker-{os.getpid()}")
    log = get_logger("broker")
    Path(config.data_dir).mkdir(parents=True, exist_ok=True)
    broker = build_broker(config)
    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
    broker.bind()
    log.info("broker_started", data_dir=str(config.data_dir))
    broker.run(stop)
    log.info("broker_stopped")


def main(*, secret_key: Path | None = None, allowed: Path | None = None,
         max_outstanding: int | None = None, artifact_quota_bytes: int | None = None,
         **options: Any) -> None:
    """The ``distill broker`` entry point: ``options`` are :class:`BrokerConfig` fields; the
    keys come from the arguments, the environment or the keys config file
    (:func:`distill.shared.bus.security.broker_security`)."""
    defaults = Limits()
    limits = Limits(max_outstanding=max_outstanding or defaults.max_outstanding,
                    artifact_quota_bytes=artifact_quota_bytes)
    options.setdefault("insecure", os.environ.get(ENV_INSECURE) == "1")
    run_broker(BrokerConfig(security=broker_security(secret_key, allowed), limits=limits, **options))
