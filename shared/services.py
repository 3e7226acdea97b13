"""The registry of worker services: CLI name -> MDP service name, worker module, and how
``distill up`` runs it (device, torch threads).

Plain data, no torch import: the supervisor and the CLI read service names here without
loading a model. The worker runtime imports the module path to run a service; a test checks
that each module's ``SERVICE`` matches its entry.
"""

from __future__ import annotations

from dataclasses import dataclass

from distill.shared.bus import protocol as P
from distill.shared.errors import ConfigError


@dataclass(frozen=True)
class WorkerService:
    cli_name: str  # what `distill worker NAME` and `distill up --services` take
    service: str  # the MDP service name workers register under
    module: str  # "distill.workers.X": defines SERVICE and run_job and/or handle_request
    up_device: str | None  # the device `distill up` gives it; None: `up` starts none by default
    # torch threads under `distill up`: "none" (no torch: leave it), "one", or "rest" (all
    # cores but one). Oversubscribed cores make torch several times slower, so the light
    # preprocess worker gets one thread and the model workers share the rest.
    threads: str


WORKER_SERVICES: dict[str, WorkerService] = {
    s.cli_name: s
    for s in (
        WorkerService("echo", P.SERVICE_ECHO.decode(), "distill.workers.echo", "cpu", "none"),
        WorkerService("sleep", "distill.sleep", "distill.workers.sleep", None, "none"),
        WorkerService("preprocess", P.SERVICE_PREPROCESS.decode(), "distill.workers.preprocess",
                      "cpu", "one"),
        WorkerService("vqvae", P.SERVICE_VQVAE.decode(), "distill.workers.train_vqvae", "auto",
                      "rest"),
        # the prior trains after the RVQ-VAE in a pipeline, so the two never share the cores
        WorkerService("prior", P.SERVICE_PRIOR.decode(), "distill.workers.train_prior", "auto",
                      "rest"),
        WorkerService("infer", "distill.infer", "distill.workers.infer", "auto", "rest"),
    )
}


def worker_service(name: str) -> WorkerService:
    """The entry for a CLI service name, or ConfigError naming the known ones."""
    spec = WORKER_SERVICES.get(name)
    if spec is None:
        raise ConfigError(f"unknown worker service {name!r} (known: {', '.join(WORKER_SERVICES)})")
    return spec


def up_services() -> list[str]:
    """The services `distill up` starts when not told which."""
    return [name for name, spec in WORKER_SERVICES.items() if spec.up_device is not None]


def threads_for(spec: WorkerService, cores: int) -> int | None:
    """torch threads for a worker sharing a machine of ``cores`` cores (None: leave it)."""
    if spec.threads == "none":
        return None
    if spec.threads == "one":
        return 1
    return max(1, cores - 1)
