"""The worker-service registry matches the worker modules it names."""

from __future__ import annotations

import importlib

import pytest

from distill.shared.errors import ConfigError
from distill.shared.services import WORKER_SERVICES, threads_for, up_services, worker_service


@pytest.mark.parametrize("name", sorted(WORKER_SERVICES))
def test_registry_matches_the_module(name: str) -> None:
    spec = WORKER_SERVICES[name]
    module = importlib.import_module(spec.module)
    assert spec.service == module.SERVICE
    assert spec.threads in ("none", "one", "rest")
    assert (spec.threads == "none") == (not getattr(module, "USES_TORCH", True))


def test_up_and_threads() -> None:
    assert up_services() == ["echo", "preprocess", "vqvae", "prior", "infer"]
    assert threads_for(worker_service("echo"), 8) is None
    assert threads_for(worker_service("preprocess"), 8) == 1
    assert threads_for(worker_service("vqvae"), 8) == 7
    assert threads_for(worker_service("vqvae"), 1) == 1
    with pytest.raises(ConfigError, match="unknown worker service 'nope'"):
        worker_service("nope")
