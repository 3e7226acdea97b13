"""Resolve a worker's ``--device`` once: auto (CUDA, then MPS after a smoke test, then CPU),
cpu, cuda, cuda:N or mps; and describe it for the READY metadata."""

from __future__ import annotations

import re
from typing import Any

from distill.shared.errors import DeviceError

_DEVICE_RE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


def _mps_works(torch: Any) -> bool:
    # MPS can report available and still fail on first use (old macOS, some ops): try one op.
    try:
        x = torch.ones(4, device="mps")
        return bool((x * 2).sum().item() == 8.0)
    except Exception:
        return False


def check_device_spec(spec: str) -> None:
    """DeviceError unless ``spec`` is one of the forms a worker accepts (whether this machine
    has that device is :func:`resolve_device`'s to say)."""
    if not _DEVICE_RE.match(spec):
        raise DeviceError(f"device {spec!r} is not one of auto, cpu, cuda, cuda:N, mps")


def _deterministic_cudnn(torch: Any) -> None:
    # A recipe replays "the same samples on the same device": cuDNN's autotuner may pick another
    # convolution algorithm from one process to the next, and some of its algorithms (the
    # decoder's transposed convolutions among them) sum in an order that varies from run to run.
    # Deterministic algorithms cost little at Distill's sizes.
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


def resolve_device(spec: str) -> str:
    """Turn a device spec into a concrete torch device string, or raise DeviceError. A CUDA
    device also sets cuDNN to deterministic algorithms, for this process."""
    check_device_spec(spec)
    if spec == "cpu":
        return "cpu"
    import torch

    if spec == "auto":
        if torch.cuda.is_available():
            _deterministic_cudnn(torch)
            return "cuda:0"
        if torch.backends.mps.is_available() and _mps_works(torch):
            return "mps"
        return "cpu"
    if spec.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DeviceError(f"device {spec!r}: CUDA is not available on this machine")
        index = int(spec.split(":")[1]) if ":" in spec else 0
        if index >= torch.cuda.device_count():
            raise DeviceError(
                f"device {spec!r}: only {torch.cuda.device_count()} CUDA device(s) here"
            )
        _deterministic_cudnn(torch)
        return f"cuda:{index}"
    if not (torch.backends.mps.is_available() and _mps_works(torch)):
        raise DeviceError("device 'mps': Metal is not available or failed a smoke test")
    return "mps"


def describe_device(device: str) -> dict[str, Any]:
    """Name and memory of a resolved device, for the worker's READY metadata."""
    if device == "cpu":
        import os
        import platform

        return {"device": "cpu", "device_name": platform.processor() or platform.machine(),
                "device_memory": None, "cpu_count": os.cpu_count()}
    import torch

    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(torch.device(device))
        return {"device": device, "device_name": props.name, "device_memory": props.total_memory}
    return {"device": device, "device_name": "Apple MPS", "device_memory": None}
