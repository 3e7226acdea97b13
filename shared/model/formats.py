"""Model-file formats: training checkpoints and trained RVQ-VAE weights, as bytes.

Both are ``torch.save`` maps of tensors, numbers, strings, lists and dicts, read back with
``torch.load(weights_only=True)`` (never a pickle of arbitrary objects). Each carries a
``format_version`` and a ``kind``; an unknown kind, a newer version, a truncated or corrupt
file raises :class:`ModelFormatError`.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

import torch

from distill.shared.audio.mel import MelConfig
from distill.shared.errors import ConfigError, ModelFormatError, UnknownSettings
from distill.shared.model.vqvae import VQVAE, VQVAEConfig

FORMAT_VERSION = 1  # checkpoints and weights written by this Distill
CHECKPOINT_KIND = "vqvae-checkpoint"
WEIGHTS_KIND = "vqvae"


Layout = dict[str, tuple[torch.dtype, tuple[int, ...]]]  # tensor name -> (dtype, shape)


def state_layout(build: Callable[[], torch.nn.Module]) -> Layout:
    """The tensors ``build()``'s ``state_dict`` holds, name by name, learnt without allocating
    them: the module is built on torch's meta device (no memory, no random numbers drawn), so
    stored weights can be compared with what a config makes before the config costs memory."""
    with torch.device("meta"):
        module = build()
    return {name: (t.dtype, tuple(t.shape)) for name, t in module.state_dict().items()}


def layout_differences(expected: Layout, stored: Layout) -> list[str]:
    """How the tensors both layouts name differ in shape or dtype, one line each (the
    expected layout's order); empty when they agree."""
    lines = []
    for name, (dtype, shape) in expected.items():
        if name not in stored:
            continue
        got_dtype, got_shape = stored[name]
        if got_shape != shape:
            lines.append(f"tensor '{name}' is {list(got_shape)} in the file, the configs make "
                         f"it {list(shape)}")  # fmt: skip
        elif got_dtype != dtype:
            lines.append(f"tensor '{name}' holds {str(got_dtype).removeprefix('torch.')} values, "
                         f"the model {str(dtype).removeprefix('torch.')}")  # fmt: skip
    return lines


def checkpoint_to_bytes(payload: dict[str, Any]) -> bytes:
    """A training checkpoint (the trainer's state map) as bytes, stamped with version and kind."""
    buf = io.BytesIO()
    torch.save({**payload, "format_version": FORMAT_VERSION, "kind": CHECKPOINT_KIND}, buf)
    return buf.getvalue()


def _load(data: bytes, what: str) -> dict[str, Any]:
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for corrupt or truncated files
        raise ModelFormatError(f"{what} is corrupt or truncated: {type(e).__name__}: {e}") from e
    if not isinstance(obj, dict) or not isinstance(obj.get("format_version"), int):
        raise ModelFormatError(f"{what} has no format_version: not a Distill file")
    version = obj["format_version"]
    if version > FORMAT_VERSION or version < 1:
        raise ModelFormatError(
            f"{what} has format_version {version}; this Distill reads 1..{FORMAT_VERSION} "
            "(a newer version needs a newer Distill)"
        )
    return obj


def read_checkpoint(data: bytes) -> dict[str, Any]:
    """A training checkpoint's contents; ModelFormatError when corrupt, foreign or newer."""
    ckpt = _load(data, "checkpoint")
    missing = {"model_config", "train_config", "state_dict", "optimizer", "rng", "epoch"} - set(
        ckpt
    )
    if ckpt.get("kind") != CHECKPOINT_KIND or missing:
        raise ModelFormatError(f"not a VQ-VAE checkpoint (kind {ckpt.get('kind')!r}, "
                               f"missing {sorted(missing)})")  # fmt: skip
    return ckpt


def weights_to_bytes(
    model: VQVAE, mel_config: MelConfig, summary: dict[str, Any] | None = None
) -> bytes:
    """The trained model as an artifact (kind "vqvae"): configs, weights, codebooks, summary."""
    payload = {
        "format_version": FORMAT_VERSION,
        "kind": WEIGHTS_KIND,
        "model_config": model.config.to_dict(),
        "mel_config": mel_config.to_dict(),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "summary": summary or {},
    }
    buf = io.BytesIO()
    torch.save(payload, buf)
    return buf.getvalue()


def weights_from_bytes(data: bytes) -> tuple[VQVAE, MelConfig, dict[str, Any]]:
    """Load what :func:`weights_to_bytes` wrote; the model comes back in eval mode on the CPU."""
    obj = _load(data, "VQ-VAE weights")
    if obj.get("kind") != WEIGHTS_KIND:
        raise ModelFormatError(f"not VQ-VAE weights (kind {obj.get('kind')!r})")
    try:
        config = VQVAEConfig.from_dict(obj["model_config"])
        state = obj["state_dict"]
        if not isinstance(state, dict) or not all(isinstance(t, torch.Tensor)
                                                  for t in state.values()):  # fmt: skip
            raise ModelFormatError("VQ-VAE weights: state_dict is not a map of tensors")
        # the shapes first: a config within its bounds can still ask for many GB
        expected = state_layout(lambda: VQVAE(config))
        stored = {name: (t.dtype, tuple(t.shape)) for name, t in state.items()}
        differences = layout_differences(expected, stored)
        if differences:
            raise ModelFormatError(f"VQ-VAE weights do not match their config: {differences[0]}")
        model = VQVAE(config)
        model.load_state_dict(state)
        mel_config = MelConfig.from_dict(obj["mel_config"])
    except UnknownSettings as e:
        raise ModelFormatError(e.newer("the VQ-VAE weights' config")) from e
    except (KeyError, RuntimeError, ConfigError) as e:
        raise ModelFormatError(f"VQ-VAE weights do not match their config: {e}") from e
    return model.eval(), mel_config, dict(obj.get("summary", {}))
