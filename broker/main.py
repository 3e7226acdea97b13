"""Start the broker process: build the socket loop, attach the services it hosts, loop until
stopped. This module is where the loop and the services meet; neither imports the other's
assembly."""

from __future__ import annotations

import os
import signal
import sqlite3
import threading
from collections.abc import Container, Sequence
from pathlib import Path
from typing import IO, Any

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

from distill.broker.access import Limits
from distill.broker.loop import Broker, BrokerConfig
from distill.broker.services.artifacts import ArtifactService
from distill.broker.services.events import EventsService
from distill.broker.services.jobs import JobService
from distill.broker.services.quota import ArtifactQuota
from distill.broker.services.retention import Retention
from distill.broker.services.workers import WorkersService
from distill.broker.store.artifacts import ArtifactRecord, ArtifactStore
from distill.broker.store.journal import JobStore
from distill.broker.store.settings import StorageSettings
from distill.shared.bus import protocol as P
from distill.shared.bus.security import ENV_INSECURE, broker_security
from distill.shared.errors import DistillError
from distill.shared.logs import configure, get_logger

UPLOAD_EXPIRY_S = 60.0  # how often idle uploads are looked for (they expire after an hour)
VERIFY_STEP_S = 0.2  # re-hash resumed uploads in steps of VERIFY_STEP_BYTES this often
LOCK_NAME = "broker.lock"  # in the data folder: which broker process holds it (its pid)
DAY_S = 86_400.0
ANONYMOUS = "anonymous"  # the one quota account of every peer when the broker runs without CURVE


def build_broker(config: BrokerConfig, storage: StorageSettings | None = None) -> Broker:
    """A broker with every service it hosts attached: jobs, artifacts, workers, events.

    ``storage``: the artifact store's limits and retention (default: from the environment).
    """
    storage = storage or StorageSettings.from_env()
    broker = Broker(config)
    data_dir = Path(config.data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    journal = JobStore(data_dir / "jobs.sqlite3")
    store = ArtifactStore(data_dir / "artifacts", max_bytes=storage.max_bytes,
                          min_free_bytes=storage.min_free_bytes,
                          upload_idle_s=storage.upload_idle_s)
    quota = ArtifactQuota(data_dir / "quota.json", config.limits.artifact_quota_bytes)

    def release(shas: Sequence[str], in_use: Container[str]) -> list[ArtifactRecord]:
        # retention's deletions free the quota as a user's would
        removed = store.delete_many(shas, in_use=in_use)
        for record in removed:
            quota.forget(record.sha256)
        return removed

    retention = Retention(journal, store, release, keep_preview_epochs=storage.keep_preview_epochs)
    jobs = JobService(broker, journal, retention=retention,
                      keep_finished_s=storage.keep_finished_jobs_days * DAY_S)
    jobs.periodic.add("upload_expiry", min(UPLOAD_EXPIRY_S, storage.upload_idle_s / 2),
                      lambda now: _expire_uploads(store, quota))
    jobs.periodic.add("verify_resumed_uploads", VERIFY_STEP_S, lambda now: store.verify_step())
    def uploaders(sha: str) -> set[str]:
        """The keys an artifact is charged to (a store once run without CURVE: not its
        shared account, which is no key's)."""
        return quota.charged_to(sha) - {ANONYMOUS}

    artifacts = ArtifactService(
        store, in_use=jobs.store.in_use,
        quota=quota,
        # Without CURVE there are no keys: every peer shares one "anonymous" account.
        owner_of=(lambda: broker.current_owner.decode(errors="replace")) if config.security
        else (lambda: ANONYMOUS),
        describe_owner=broker.keyring.describe if broker.keyring is not None else str,
        peer_of=lambda: broker.current_owner, known_jobs=jobs.store.known,
        refuse_delete=lambda sha: jobs.deletion_refusal(sha, store.stat(sha).job, uploaders(sha)),
        refuse_store=jobs.storing_refusal,
        name_owners=lambda items: jobs.name_artifact_owners(items, uploaders))
    broker.jobs = jobs
    broker.event_listeners.append(jobs.on_event)
    broker.internal[P.SERVICE_JOBS] = jobs.serve
    broker.internal[P.SERVICE_ARTIFACTS] = artifacts.serve
    broker.internal[P.SERVICE_WORKERS] = WorkersService(broker.registry).serve
    broker.internal[P.SERVICE_EVENTS] = EventsService(broker.hub).serve
    return broker


def _expire_uploads(store: ArtifactStore, quota: ArtifactQuota) -> None:
    log = get_logger("broker")
    for sha in store.expire_uploads():
        quota.forget(sha)  # the space it declared is free again, for its key too
        log.info("upload_expired", artifact=sha, idle_s=store.upload_idle_s)


def lock_data_dir(data_dir: Path) -> IO[str]:
    """Hold ``data_dir`` for this broker process: an exclusive lock on ``broker.lock`` in it
    (released when the process exits, however it exits). A second broker on the same folder
    would re-queue the first one's running jobs as its own restart's and dispatch them twice;
    it is refused, naming the folder and the process that holds it. Returns the open lock file:
    keep it open as long as the broker runs."""
    lock = (data_dir / LOCK_NAME).open("a+")  # noqa: SIM115 - held for the process's life
    if fcntl is None:  # no flock (Windows): one broker per folder is the user's to keep
        return lock
    try:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock.seek(0)
        holder = lock.read().strip() or "unknown"
        lock.close()
        raise DistillError(
            f"the broker data folder {data_dir} is in use by another broker (pid {holder}): two "
            "brokers on one job table would run each other's jobs twice; stop that one (is a "
            "`distill up` already running?) or give this one another --data-dir") from None
    lock.seek(0)
    lock.truncate()
    lock.write(f"{os.getpid()}\n")
    lock.flush()
    return lock


def run_broker(config: BrokerConfig, stop: threading.Event | None = None) -> None:
    configure("broker", f"broker-{os.getpid()}")
    log = get_logger("broker")
    data_dir = Path(config.data_dir)
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        lock = lock_data_dir(data_dir)  # before the job table is opened (and its jobs re-queued)
    except OSError as e:
        raise DistillError(f"the broker data folder {data_dir} cannot be used: "
                           f"{e.strerror or e}") from None
    try:
        try:
            broker = build_broker(config)
        except (OSError, sqlite3.OperationalError) as e:  # a read-only or full disk, say
            raise DistillError(f"the broker data folder {data_dir} cannot be used: {e}") from None
        stop = stop or threading.Event()
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, lambda *_: stop.set())
        broker.bind()
        log.info("broker_started", data_dir=str(config.data_dir))
        broker.run(stop)
        log.info("broker_stopped")
    finally:
        lock.close()


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
