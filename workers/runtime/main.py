"""Start a worker process for one service: resolve the device once, configure threads and
logging, register with the broker, serve until stopped (SIGINT/SIGTERM)."""

from __future__ import annotations

import importlib
import os
import signal
import threading
from pathlib import Path
from types import ModuleType
from typing import Any

from distill.shared.bus import protocol as P
from distill.shared.bus.core import broker_endpoint, events_endpoint
from distill.shared.bus.security import client_security
from distill.shared.devices import describe_device, resolve_device
from distill.shared.errors import ConfigError
from distill.shared.logs import configure, get_logger
from distill.shared.services import worker_service
from distill.shared.version import distill_version
from distill.workers.runtime.mdp import WorkerRuntime
from distill.workers.runtime.service import module_handler


def load_service(name: str) -> ModuleType:
    """The worker module of a CLI service name (see ``distill.shared.services``)."""
    spec = worker_service(name)
    module = importlib.import_module(spec.module)
    if spec.service != module.SERVICE:
        raise ConfigError(f"{spec.module} serves {module.SERVICE!r}, but the service registry "
                          f"says {spec.cli_name!r} is {spec.service!r}")
    return module


def versions() -> dict[str, Any]:
    import zmq

    out: dict[str, Any] = {"pyzmq": zmq.pyzmq_version(), "libzmq": zmq.zmq_version()}
    if (mine := distill_version()) is not None:
        out["distill"] = mine
    return out


def check_cache_folder() -> None:
    """ConfigError unless this worker can write artifacts into its cache folder: a worker that
    cannot would register and then fail every job it is given (and use up the attempts of
    jobs that other workers would have run)."""
    import tempfile

    from distill.shared.bus.cache import default_cache_root

    root = default_cache_root()
    try:
        (root / "tmp").mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=root / "tmp"):
            pass
    except OSError as e:
        raise ConfigError(f"the worker's artifact cache {root} cannot be written "
                          f"({e.strerror or e}): set DISTILL_CACHE to a folder it can write") from None


def run_worker(name: str, *, broker: str | None = None, device: str = "cpu", threads: int | None = None,
               heartbeat_interval_s: float = P.HEARTBEAT_INTERVAL_S,
               liveness: int = P.HEARTBEAT_LIVENESS, stop: threading.Event | None = None,
               broker_key: Path | None = None, key: Path | None = None) -> None:
    """Serve ``name`` until stopped. ``broker_key``/``key``: CURVE keys (else from the
    environment or the keys config file; none: a plain connection)."""
    security = client_security(broker_key, key, endpoint=broker_endpoint(broker))
    module = load_service(name)
    configure("worker", f"{name}-{os.getpid()}")
    log = get_logger("worker")
    resolved = resolve_device(device)
    check_cache_folder()
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
        inline=list if getattr(module, "RAW", False) else None, security=security)
    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
    log.info("worker_starting", service=module.SERVICE, device=resolved, curve=security is not None)
    runtime.run(stop)
    log.info("worker_stopped", service=module.SERVICE)
