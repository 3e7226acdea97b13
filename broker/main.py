"""Start the broker process: bind, attach the job and artifact services, loop until stopped."""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

from distill.broker.broker import Broker, BrokerConfig
from distill.shared.logs import configure, get_logger


def build_broker(config: BrokerConfig) -> Broker:
    """A broker with every internal service attached (jobs and artifacts when present)."""
    broker = Broker(config)
    try:
        from distill.broker.services import attach_services
    except ImportError:  # pragma: no cover - during bring-up only
        return broker
    attach_services(broker)
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
