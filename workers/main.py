"""Start a worker process for one service: resolve the device once, configure threads and
logging, register with the broker, serve until stopped (SIGINT/SIGTERM)."""

from __future__ import annotations

import importlib
import os
import signal
import threading
from types import ModuleType
from typing import Any

from distill.shared import protocol as P
from distill.shared.client import broker_endpoint, events_endpoint
from distill.shared.devices import describe_device, resolve_device
from distill.shared.errors import ConfigError
from distill.shared.logs import configure, get_logger
from distill.workers.runtime import WorkerRuntime
from distill.workers.service import module_handler

# CLI name -> module. Each module defines SERVICE and run_job and/or handle_request.
SERVICES: dict[str, str] = {
    "echo": "distill.workers.echo",
    "sleep": "distill.workers.sleep",
    "preprocess": "distill.workers.preprocess",
    "vqvae": "distill.workers.vqvae",
}
# Services `distill up` starts, with the device each gets by default.
UP_SERVICES: dict[str, str] = {"echo": "cpu", "preprocess": "cpu", "vqvae": "auto"}


def load_service(name: str) -> ModuleType:
    if name not in SERVICES:
        raise ConfigError(f"unknown worker service {name!r} (known: {', '.join(SERVICES)})")
    return importlib.import_module(SERVICES[name])


def versions() -> dict[str, Any]:
    import zmq

    out: dict[str, Any] = {"pyzmq": zmq.pyzmq_version(), "libzmq": zmq.zmq_version()}
    try:
        from importlib.metadata import version

        out["distill"] = version("distill")
    except Exception:
        pass
    return out


def run_worker(name: str, *, broker: str | None = None, device: str = "cpu", threads: int | None = None,
               heartbeat_interval_s: float = P.HEARTBEAT_INTERVAL_S,
               liveness: int = P.HEARTBEAT_LIVENESS, stop: threading.Event | None = None) -> None:
    module = load_service(name)
    configure("worker", f"{name}-{os.getpid()}")
    log = get_logger("worker")
    resolved = resolve_device(device)
    meta: dict[str, Any] = {**describe_device(resolved), "versions": versions()}
    if getattr(module, "USES_TORCH", True):
        import torch

        # Deliberate: a worker owns the cores it is given; several workers on one box split them.
        torch.set_num_threads(threads or max(1, os.cpu_count() or 1))
        meta["versions"]["torch"] = torch.__version__
        meta["threads"] = torch.get_num_threads()
    endpoint = broker_endpoint(broker)
    runtime = WorkerRuntime(
        module.SERVICE, module_handler(module, resolved), broker=endpoint,
        events_in=events_endpoint(endpoint, "in"), events_out=events_endpoint(endpoint, "out"),
        device=resolved,
        heartbeat_interval_s=heartbeat_interval_s, liveness=liveness, meta=meta,
        inline=list if getattr(module, "RAW", False) else None)
    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
    log.info("worker_starting", service=module.SERVICE, device=resolved)
    runtime.run(stop)
    log.info("worker_stopped", service=module.SERVICE)
