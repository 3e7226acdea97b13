"""A stand-in accelerator for machines without one: ``with fake_accelerator(): ...`` makes
``cuda`` (and ``mps``) a device whose tensors compute on the CPU but, as on a GPU, cannot be mixed with CPU
tensors (other than 0-dim ones), turned into numpy arrays without ``.cpu()``, or drawn with a
CPU generator; ``no_float64=True`` also refuses float64 on it, as MPS does.

What it finds is where the code puts its tensors, the bugs that only a GPU run showed (an
RVQ-VAE job on CUDA failed at its first step: a CPU matrix times the device's mean). It does
not run CUDA kernels: speed, memory and numerics are the real device's to show.

How: tensors on the device are wrapper subclasses reporting the ``meta`` device (a device
that needs no driver) around a CPU tensor; a dispatch mode checks and runs every op on the
CPU tensors, and a function mode turns ``cuda`` in a call's arguments into that device. The
torch globals a CUDA check reads (``torch.cuda.is_available``, ``torch.Generator``, ...) are
patched for the ``with`` block, for the whole process (the modes are this thread's: another
thread started inside the block sees CUDA "available" without them, so tests start none).
What it does not see: code that branches on ``device.type == "cuda"`` (its tensors report
``meta``), and results that differ between kernels (a GPU's atomics, cuDNN).
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

FAKE = torch.device("meta")
CPU = torch.device("cpu")

# ops that take tensors on two devices on a GPU too: copies, and CPU index tensors
MAY_MIX = frozenset({
    "aten._to_copy.default", "aten.copy_.default", "aten.lift_fresh.default",
    "aten.set_.source_Tensor", "aten._has_compatible_shallow_copy_type.default",
    "aten.detach.default", "aten.alias.default",
})  # fmt: skip
INDEXING = frozenset({"aten.index.Tensor", "aten.index_put_.default", "aten.index_put.default",
                      "aten._index_put_impl_.default"})  # fmt: skip


class DeviceMisuse(RuntimeError):
    """What a GPU would have refused."""


class OnDevice(torch.Tensor):
    """A tensor on the stand-in device: a CPU tensor (``elem``) behind it."""

    elem: torch.Tensor

    @staticmethod
    def __new__(cls, elem: torch.Tensor) -> OnDevice:
        r = torch.Tensor._make_wrapper_subclass(
            cls, elem.size(), strides=elem.stride(), storage_offset=elem.storage_offset(),
            dtype=elem.dtype, layout=elem.layout, device=FAKE, requires_grad=elem.requires_grad)
        r.elem = elem
        return r

    is_meta = property(lambda self: False)  # load_state_dict skips copies into meta tensors

    def __repr__(self, **kwargs: Any) -> str:  # type: ignore[override]
        return f"OnDevice({self.elem!r})"

    def __reduce_ex__(self, protocol: Any) -> Any:
        return self.elem.__reduce_ex__(protocol)  # torch.save: as the CPU tensor

    __torch_function__ = torch._C._disabled_torch_function_impl  # type: ignore[assignment]

    @classmethod
    def __torch_dispatch__(cls, func: Any, types: Any, args: Any = (),  # type: ignore[override]
                           kwargs: Any = None) -> Any:  # fmt: skip
        return _run(func, args, kwargs or {})


ACCELERATORS = ("cuda", "mps")  # what the stand-in answers for


def _on_device(d: object) -> bool:
    if isinstance(d, str):
        d = torch.device(d)
    return isinstance(d, torch.device) and d.type in (*ACCELERATORS, "meta")


def _cpu(t: Any) -> Any:
    return t.elem if isinstance(t, OnDevice) else t


class _State:
    no_float64 = False


def _check_placement(func: Any, name: str, args: Any, kwargs: dict[str, Any]) -> list[Any]:
    """The device tensors among the op's arguments, or DeviceMisuse where a GPU would refuse:
    CPU tensors beside them (a 0-dim one only in an element-wise op), a CPU tensor indexed
    with device indices or given device values, and a tensor on the real ``meta`` device (made
    by a path the modes do not see: it would be a false alarm or a miss)."""
    tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
    if any(t.device.type == "meta" and not isinstance(t, OnDevice) for t in tensors):
        raise DeviceMisuse(f"{name}: a tensor on the real meta device slipped past the stand-in")
    on = [t for t in tensors if isinstance(t, OnDevice)]
    pointwise = torch.Tag.pointwise in getattr(func, "tags", ())
    off = [t for t in tensors if not isinstance(t, OnDevice) and (t.dim() > 0 or not pointwise)]
    if name in INDEXING and on:
        if not isinstance(args[0], OnDevice):
            raise DeviceMisuse(f"{name}: a CPU tensor indexed with device indices")
        values = args[2] if len(args) > 2 else kwargs.get("values")
        if isinstance(values, torch.Tensor) and not isinstance(values, OnDevice) and values.dim():
            raise DeviceMisuse(f"{name}: CPU values written into a device tensor")
    elif on and off and name not in MAY_MIX:
        raise DeviceMisuse(f"{name} mixes device tensors {[tuple(t.shape) for t in on]} with "
                           f"CPU tensors {[tuple(t.shape) for t in off]}")  # fmt: skip
    return on


def _run(func: Any, args: Any, kwargs: dict[str, Any]) -> Any:
    name = str(func)
    on = _check_placement(func, name, args, kwargs)
    to_device = _on_device(kwargs.get("device"))
    if _State.no_float64 and (any(t.dtype == torch.float64 for t in on) or (
            kwargs.get("dtype") == torch.float64 and (on or to_device))):  # fmt: skip
        raise DeviceMisuse(f"{name} in float64 on the device (MPS has no float64)")
    wrap = bool(on)
    if "device" in kwargs:
        wrap, kwargs = to_device, {**kwargs, "device": CPU}
    if name == "aten.copy_.default":
        _cpu(args[0]).copy_(_cpu(args[1]))
        return args[0]
    out = func(*tree_map(_cpu, args), **tree_map(_cpu, kwargs))
    if name == "aten._local_scalar_dense.default":
        return out
    if func._schema.is_mutable and on and isinstance(args[0], OnDevice):
        return args[0]  # in place: the same tensor
    return tree_map(lambda t: OnDevice(t) if wrap and type(t) is torch.Tensor else t, out)


class _Dispatch(TorchDispatchMode):
    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        return _run(func, args, kwargs or {})


def _to_fake(v: Any) -> Any:
    if isinstance(v, str) and v.startswith(ACCELERATORS):
        return FAKE
    if isinstance(v, torch.device) and v.type in ACCELERATORS:
        return FAKE
    return v


class _Functions(TorchFunctionMode):
    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None
                           ) -> Any:  # fmt: skip
        kwargs = kwargs or {}
        if func is torch.device:  # torch's own device lookups stay as they are
            return func(*args, **kwargs)
        args = tuple(_to_fake(a) for a in args)
        kwargs = {k: v if k == "device_type" else _to_fake(v) for k, v in kwargs.items()}
        flat = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        gen = kwargs.get("generator")
        if gen is not None:
            for_device = any(isinstance(t, OnDevice) for t in flat) or _on_device(
                kwargs.get("device"))  # fmt: skip
            if for_device != getattr(gen, "on_device", False):
                raise DeviceMisuse(f"{getattr(func, '__name__', func)}: a "
                                   f"{'CPU' if for_device else 'device'} generator for a "
                                   f"{'device' if for_device else 'CPU'} draw")  # fmt: skip
        made_on_device = func in (torch.asarray, torch.as_tensor, torch.tensor) and _on_device(
            kwargs.get("device"))  # fmt: skip
        if func is torch.Tensor.new_tensor and isinstance(args[0], OnDevice) and (
                "device" not in kwargs or _on_device(kwargs["device"])):  # fmt: skip
            kwargs = {**kwargs, "dtype": kwargs.get("dtype") or args[0].dtype}
            func, args, made_on_device = torch.tensor, args[1:], True
        if made_on_device:
            out = func(*tree_map(_cpu, args), **{**kwargs, "device": CPU})
            if _State.no_float64 and out.dtype == torch.float64:
                raise DeviceMisuse(f"{func.__name__}: float64 made on the device (MPS has none)")
            return OnDevice(out)
        if func in (torch.stft, torch.istft, torch.Tensor.stft, torch.Tensor.istft) and any(
                isinstance(t, OnDevice) for t in flat):  # fmt: skip
            if not all(isinstance(t, OnDevice) for t in flat):
                raise DeviceMisuse(f"{func.__name__} mixes device and CPU tensors")
            return OnDevice(func(*tree_map(_cpu, args), **tree_map(_cpu, kwargs)).clone())
        if func is torch.Tensor.tolist and isinstance(args[0], OnDevice):
            return args[0].elem.tolist()
        if func is torch.Tensor.numpy and isinstance(args[0], OnDevice):
            raise DeviceMisuse("numpy() of a device tensor: .cpu() it first")
        return func(*args, **kwargs)


def _generator_class() -> type:
    real = torch.Generator

    class Generator(real):  # type: ignore[misc, valid-type]
        """A CPU generator that counts as the device's when made for it."""

        def __new__(cls, device: Any = "cpu") -> Any:
            g = real.__new__(cls, device="cpu")  # type: ignore[call-arg]
            g.on_device = _on_device(device)
            return g

        def __init__(self, device: Any = "cpu") -> None:
            pass

        def manual_seed(self, seed: int) -> Any:
            real.manual_seed(self, seed)
            return self

    return Generator


class _Device:
    name = "stand-in accelerator (tests/fakedevice.py)"
    total_memory = 16 * 2**30


@functools.cache
def _available() -> bool:  # cached, as torch's own (torch._dynamo reads its __wrapped__)
    return True


def _patches() -> list[tuple[Any, str, Any]]:
    return [
        (torch.cuda, "is_available", lambda: True),
        (torch.cuda, "device_count", lambda: 1),
        (torch.cuda, "get_device_properties", lambda device=None: _Device()),
        (torch.cuda, "get_rng_state", lambda device=None: torch.get_rng_state()),
        (torch.cuda, "set_rng_state", lambda state, device=None: None),
        (torch.backends.mps, "is_available", _available),
        *([(torch.accelerator, "current_accelerator", lambda *a, **k: None)]
          if hasattr(torch, "accelerator") else []),  # torch 2.6 on: optimizers ask it
        (torch, "Generator", _generator_class()),
        (torch, "inference_mode", lambda mode=True: torch.no_grad()),  # subclasses can't
    ]


@contextlib.contextmanager
def fake_accelerator(*, no_float64: bool = False) -> Iterator[None]:
    """``cuda`` on this CPU for the block (this thread): see the module's doc."""
    patches = _patches()
    saved = [(obj, attr, getattr(obj, attr)) for obj, attr, _ in patches]
    before = _State.no_float64
    _State.no_float64 = no_float64
    try:
        for obj, attr, value in patches:
            setattr(obj, attr, value)
        with _Functions(), _Dispatch():
            yield
    finally:
        for obj, attr, value in saved:
            setattr(obj, attr, value)
        _State.no_float64 = before


# A process started with this variable set (and ``tests/fakedevice_site`` on PYTHONPATH) has
# the stand-in in every thread for its whole life: "1", or "mps" for the float64 rule too.
PROCESS_VARIABLE = "DISTILL_TEST_STAND_IN_ACCELERATOR"
SITE = Path(__file__).parent / "fakedevice_site"


def process_env(no_float64: bool = False) -> dict[str, str]:
    """The environment for a subprocess (a worker, the CLI) with the stand-in installed."""
    path = os.pathsep.join(p for p in (str(SITE), os.environ.get("PYTHONPATH", "")) if p)
    return {PROCESS_VARIABLE: "mps" if no_float64 else "1", "PYTHONPATH": path}


def install_in_process() -> None:
    """For ``fakedevice_site/sitecustomize.py``: the stand-in for the rest of this process,
    in this thread and every thread started from now on."""
    import threading

    _State.no_float64 = os.environ.get(PROCESS_VARIABLE) == "mps"
    for obj, attr, value in _patches():
        setattr(obj, attr, value)
    _Functions().__enter__()
    _Dispatch().__enter__()
    run = threading.Thread.run

    def run_with_the_stand_in(self: threading.Thread) -> None:
        with _Functions(), _Dispatch():
            run(self)

    threading.Thread.run = run_with_the_stand_in  # type: ignore[method-assign]
