"""The ``.distill`` model file: one safetensors file, tensors plus a checked JSON header.

Layout. A safetensors file (8-byte little-endian header length, the safetensors JSON header,
then raw tensor bytes) whose tensors carry prefixed names (``vqvae.*``, ``prior.*``) and whose
``__metadata__`` holds one entry, ``"distill"``, a JSON object::

    format          "distill-model"
    format_version  1 (a newer number means a newer Distill wrote it)
    kind            what the file holds, e.g. "vqvae+prior" or "vqvae"
    configs         {"mel": MelConfig, "vqvae": VQVAEConfig, "prior": PriorConfig or null}
    summary         training summary: dataset id and manifest hash, file names, epochs,
                    final metrics, baselines (a plain dict; shown by ``distill model show``)
    versions        distill, torch, vector-quantize-pytorch, safetensors at write time
    tensors         {name: {"dtype", "shape", "sha256"}}; sha256 over dtype, shape and bytes
    header_sha256   sha256 of this object serialised without this field (sorted keys, compact)

The **model id** (the "model hash" that exported audio refers to) is ``header_sha256``. It
covers every tensor (through their checksums), the configs, the summary and the versions, is
known without hashing the file a second time, and does not depend on how safetensors lays out
bytes. Saving the same model with the same library versions gives the same id and the same file.

Loading parses the container by hand before safetensors sees it, so that each way a file can be
wrong gets its own error class (and ``reason`` code): missing or empty, not safetensors at all,
safetensors without a Distill header, truncated, corrupt, a newer format, missing keys or
tensors, and tampering (a checksum mismatch naming the tensor or the header). Nothing executes
on load: no pickle, no ``torch.load``.

Two layers: :func:`write_model_file` / :func:`read_model_file` move a header and named tensors
and know no model class; :func:`save_model` / :func:`load_model` turn a :class:`DistillModel`
(MelConfig, RVQ-VAE, optional prior) into that and back. :func:`describe_model` gives the rows
``distill model show`` prints.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import struct
from dataclasses import dataclass
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch
from safetensors.torch import load as tensors_from_bytes  # raw tensors: never a pickle

from distill.shared.audio.mel import MelConfig
from distill.shared.errors import ConfigError, ModelFormatError, UnknownSettings
from distill.shared.model.prior import Prior, PriorConfig
from distill.shared.model.vqvae import VQVAE, VQVAEConfig

FORMAT_NAME = "distill-model"
FORMAT_VERSION = 1
METADATA_KEY = "distill"
SUFFIX = ".distill"
MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own cap on its JSON header
REQUIRED_KEYS = ("format", "format_version", "kind", "configs", "summary", "versions", "tensors",
                 "header_sha256")  # fmt: skip
WRITER_KEYS = ("format", "format_version", "versions", "tensors", "header_sha256")
LIBRARIES = ("distill", "torch", "vector-quantize-pytorch", "safetensors")


# --- errors: one class and one reason code per way a file can be wrong ---------------------------


class ModelFileError(ModelFormatError):
    """A ``.distill`` file cannot be used; ``reason`` says how, the message says which file."""

    reason = "invalid"

    def __init__(self, path: str | Path, problem: str) -> None:
        super().__init__(f"{Path(path).name}: {problem}")
        self.path = Path(path)


class ModelFileMissing(ModelFileError):
    reason = "missing"


class ModelFileEmpty(ModelFileError):
    reason = "empty"


class NotSafetensors(ModelFileError):
    reason = "not_safetensors"


class NotADistillModel(ModelFileError):
    reason = "foreign"


class ModelFileTruncated(ModelFileError):
    reason = "truncated"


class ModelFileCorrupt(ModelFileError):
    reason = "corrupt"


class ModelFileTooNew(ModelFileError):
    reason = "too_new"


class ModelFileIncomplete(ModelFileError):
    reason = "incomplete"


class ModelFileTampered(ModelFileError):
    reason = "tampered"


# --- checksums and versions ----------------------------------------------------------------------


def tensor_sha256(tensor: torch.Tensor) -> str:
    """sha256 over ``dtype|shape|`` and the tensor's bytes (C order, little-endian)."""
    t = tensor.detach().cpu().contiguous()
    digest = hashlib.sha256(f"{t.dtype}|{list(t.shape)}|".encode())
    digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())  # (numel * itemsize,)
    return digest.hexdigest()


def header_sha256(header: dict[str, Any]) -> str:
    body = {k: v for k, v in header.items() if k != "header_sha256"}
    return hashlib.sha256(_canonical_json(body).encode()).hexdigest()


def _canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False)  # fmt: skip


def library_versions() -> dict[str, str]:
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = importlib_metadata.version(name)
        except importlib_metadata.PackageNotFoundError:
            versions[name] = "unknown"
    return versions


# --- the raw layer: header + tensors, no model classes --------------------------------------------


@dataclass(frozen=True)
class RawModel:
    """A model file as read: the Distill header, the tensors by name, and the model id."""

    header: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    model_id: str
    file_bytes: int

    def tensors_with_prefix(self, prefix: str) -> dict[str, torch.Tensor]:
        """The tensors named ``prefix.*``, with the prefix removed."""
        start = prefix + "."
        return {k[len(start) :]: v for k, v in self.tensors.items() if k.startswith(start)}


def _complete_header(header: dict[str, Any], tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    for key, kind in (("kind", str), ("configs", dict), ("summary", dict)):
        if not isinstance(header.get(key), kind):
            raise ModelFormatError(f"model header needs '{key}' ({kind.__name__}), "
                                   f"got {header.get(key)!r}")  # fmt: skip
    clash = sorted(set(header) & set(WRITER_KEYS))
    if clash:
        raise ModelFormatError(f"model header keys {clash} are written by write_model_file")
    full = {**header, "format": FORMAT_NAME, "format_version": FORMAT_VERSION,
            "versions": library_versions(),
            "tensors": {name: {"dtype": str(t.dtype).removeprefix("torch."),
                               "shape": list(t.shape), "sha256": tensor_sha256(t)}
                        for name, t in tensors.items()}}  # fmt: skip
    full["header_sha256"] = header_sha256(full)
    return full


def write_model_file(path: str | Path, header: dict[str, Any],
                     tensors: dict[str, torch.Tensor]) -> str:  # fmt: skip
    """Writes a ``.distill`` file atomically; returns its model id.

    ``header`` holds ``kind``, ``configs`` and ``summary`` (plain JSON data); the format name,
    version, library versions and checksums are added here. Tensors are copied to the CPU,
    made contiguous and unshared (safetensors refuses tensors that share memory).
    """
    path = Path(path)
    for name in tensors:
        if not isinstance(name, str) or "." not in name.strip("."):
            raise ModelFormatError(f"tensor name {name!r} needs a prefix such as 'vqvae.'")
    owned = {name: t.detach().to("cpu", copy=True).contiguous() for name, t in tensors.items()}
    try:
        full = _complete_header(header, owned)
        blob = safetensors.torch.save(owned, metadata={METADATA_KEY: _canonical_json(full)})
    except (TypeError, ValueError) as e:
        raise ModelFormatError(f"{path.name}: header is not plain JSON data: {e}") from e
    _write_atomically(path, blob)
    return str(full["header_sha256"])


def _write_atomically(path: Path, blob: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(blob)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    with contextlib.suppress(OSError):  # the rename is durable once the directory is synced
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def _read_bytes(path: Path) -> bytes:
    if not path.exists():
        raise ModelFileMissing(path, "no such file")
    if not path.is_file():
        why = "a folder, not a model file" if path.is_dir() else "not a regular file"
        raise ModelFileMissing(path, why)
    data = path.read_bytes()
    if not data:
        raise ModelFileEmpty(path, "the file is empty (0 bytes)")
    return data


def _container_header(path: Path, data: bytes) -> dict[str, Any]:
    """The safetensors JSON header, after checking that the file holds what it announces."""
    looks_like_json = len(data) > 8 and data[8:9] == b"{"
    if len(data) < 8 or not looks_like_json:
        raise NotSafetensors(path, "not a safetensors file, so not a Distill model "
                             f"(it starts with {data[:12]!r})")  # fmt: skip
    (size,) = struct.unpack("<Q", data[:8])
    if size > MAX_HEADER_BYTES:
        raise NotSafetensors(path, f"not a safetensors file (header length {size} is absurd)")
    if 8 + size > len(data):
        raise ModelFileTruncated(path, f"truncated: the header needs {8 + size} bytes, the file "
                                 f"has {len(data)}")  # fmt: skip
    try:
        container = json.loads(data[8 : 8 + size])
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelFileCorrupt(path, f"corrupt: the safetensors header is not JSON ({e})") from e
    if not isinstance(container, dict):
        raise ModelFileCorrupt(path, "corrupt: the safetensors header is not a JSON object")
    ends = [entry["data_offsets"][1] for name, entry in container.items()
            if name != "__metadata__" and isinstance(entry, dict)
            and isinstance(entry.get("data_offsets"), list) and len(entry["data_offsets"]) == 2]  # fmt: skip
    needed = 8 + size + max((int(e) for e in ends), default=0)
    if needed > len(data):
        raise ModelFileTruncated(path, f"truncated: the tensors need {needed} bytes, the file has "
                                 f"{len(data)}")  # fmt: skip
    return container


def _distill_header(path: Path, container: dict[str, Any]) -> dict[str, Any]:
    meta = container.get("__metadata__")
    if not isinstance(meta, dict) or METADATA_KEY not in meta:
        raise NotADistillModel(path, "a safetensors file without a Distill header (another "
                               "program's model?)")  # fmt: skip
    try:
        header = json.loads(meta[METADATA_KEY])
    except (TypeError, json.JSONDecodeError) as e:
        raise ModelFileCorrupt(path, f"corrupt: the Distill header is not JSON ({e})") from e
    if not isinstance(header, dict) or header.get("format") != FORMAT_NAME:
        raise NotADistillModel(path, f"the header's format is not '{FORMAT_NAME}'")
    version = header.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ModelFileCorrupt(path, f"corrupt: format_version {version!r}")
    if version > FORMAT_VERSION:
        writer = header.get("versions", {}).get("distill", "a newer version")
        raise ModelFileTooNew(path, f"format_version {version} was written by Distill {writer}; "
                              f"this Distill reads up to {FORMAT_VERSION}: upgrade Distill")  # fmt: skip
    missing = [k for k in REQUIRED_KEYS if k not in header]
    if missing:
        raise ModelFileIncomplete(path, f"the header lacks {missing}")
    if header_sha256(header) != header["header_sha256"]:
        raise ModelFileTampered(path, "the header's checksum does not match: it was changed "
                                "after the file was written")  # fmt: skip
    return header


def _check_tensors(path: Path, header: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    listed = header["tensors"]
    if not isinstance(listed, dict):
        raise ModelFileCorrupt(path, "corrupt: the header's tensor list is not an object")
    missing, extra = sorted(set(listed) - set(tensors)), sorted(set(tensors) - set(listed))
    if missing:
        raise ModelFileIncomplete(path, f"tensors missing: {missing}")
    if extra:
        raise ModelFileTampered(path, f"tensors not in the header's checksums: {extra}")
    for name, tensor in tensors.items():
        if tensor_sha256(tensor) != listed[name].get("sha256"):
            raise ModelFileTampered(path, f"tensor '{name}' does not match its checksum: the "
                                    "file is corrupt or was changed")  # fmt: skip


def read_model_file(path: str | Path) -> RawModel:
    """Reads and verifies a ``.distill`` file; a :class:`ModelFileError` subclass otherwise."""
    path = Path(path)
    data = _read_bytes(path)
    container = _container_header(path, data)
    header = _distill_header(path, container)
    try:
        tensors = tensors_from_bytes(data)
    except Exception as e:  # SafetensorError and friends: offsets, dtypes, overlaps
        raise ModelFileCorrupt(path, f"corrupt: safetensors cannot read it ({e})") from e
    _check_tensors(path, header, tensors)
    return RawModel(header=header, tensors=tensors, model_id=header["header_sha256"],
                    file_bytes=len(data))  # fmt: skip


# --- the typed layer: configs and modules ---------------------------------------------------------


@dataclass(frozen=True)
class DistillModel:
    """A trained model: what decodes codes to mel (``vqvae``), what samples codes (``prior``).

    ``model_id`` is the id of the file it was loaded from ("" until it is saved or loaded).
    """

    mel_config: MelConfig
    vqvae: VQVAE
    prior: Prior | None
    summary: dict[str, Any]
    model_id: str = ""

    @property
    def kind(self) -> str:
        return "vqvae+prior" if self.prior is not None else "vqvae"


def _model_header(model: DistillModel) -> dict[str, Any]:
    prior = model.prior.config.to_dict() if model.prior is not None else None
    return {"kind": model.kind, "summary": dict(model.summary),
            "configs": {"mel": model.mel_config.to_dict(),
                        "vqvae": model.vqvae.config.to_dict(), "prior": prior}}  # fmt: skip


def _model_tensors(model: DistillModel) -> dict[str, torch.Tensor]:
    tensors = {f"vqvae.{k}": v for k, v in model.vqvae.state_dict().items()}
    if model.prior is not None:
        tensors |= {f"prior.{k}": v for k, v in model.prior.state_dict().items()}
    return tensors


def save_model(path: str | Path, model: DistillModel) -> str:
    """Writes ``model`` as a ``.distill`` file; returns its model id."""
    return write_model_file(path, _model_header(model), _model_tensors(model))


def _config(path: Path, header: dict[str, Any], name: str, cls: Any) -> Any:
    configs = header["configs"]
    if not isinstance(configs, dict) or not isinstance(configs.get(name), dict):
        raise ModelFileIncomplete(path, f"the header has no '{name}' config")
    try:
        return cls.from_dict(configs[name])
    except UnknownSettings as e:
        raise ModelFileTooNew(path, e.newer(f"its '{name}' config")) from e
    except ConfigError as e:
        raise ModelFileCorrupt(path, f"the '{name}' config is invalid: {e}") from e


def _load_module(path: Path, raw: RawModel, prefix: str, module: torch.nn.Module) -> None:
    state = raw.tensors_with_prefix(prefix)
    result = module.load_state_dict(state, strict=False)
    if result.missing_keys:
        raise ModelFileIncomplete(path, f"{prefix} weights missing: {result.missing_keys}")
    if result.unexpected_keys:
        raise ModelFileCorrupt(path, f"{prefix} holds unknown weights: {result.unexpected_keys}")


def load_model(path: str | Path, device: str | torch.device = "cpu") -> DistillModel:
    """Reads, verifies and builds a model (modules in eval mode on ``device``)."""
    return build_model(read_model_file(path), path, device)


def build_model(raw: RawModel, path: str | Path,
                device: str | torch.device = "cpu") -> DistillModel:  # fmt: skip
    """The model a verified file holds (``path``: for errors): its configs checked, its
    modules built and their weights loaded; an error names what does not fit."""
    path = Path(path)
    header = raw.header
    mel = _config(path, header, "mel", MelConfig)
    vqvae = VQVAE(_config(path, header, "vqvae", VQVAEConfig))
    try:
        _load_module(path, raw, "vqvae", vqvae)
        prior = None
        if header["configs"].get("prior") is not None:
            prior = Prior(_config(path, header, "prior", PriorConfig))
            _load_module(path, raw, "prior", prior)
    except RuntimeError as e:  # shape mismatches between the config and the weights
        # torch lists each mismatch on a line of its own: the first, and how many more
        lines = [line.strip() for line in str(e).splitlines()[1:] if line.strip()] or [str(e)]
        more = f" (and {len(lines) - 1} more)" if len(lines) > 1 else ""
        raise ModelFileCorrupt(path, f"weights do not fit the configs: {lines[0]}{more}") from e
    summary = header["summary"] if isinstance(header["summary"], dict) else {}
    return DistillModel(mel_config=mel, vqvae=vqvae.to(device).eval(),
                        prior=None if prior is None else prior.to(device).eval(),
                        summary=summary, model_id=raw.model_id)  # fmt: skip


# --- `distill model show` -------------------------------------------------------------------------


def _values(tensors: dict[str, tuple[int, ...]], prefix: str) -> int:
    return sum(math.prod(shape) for name, shape in tensors.items() if name.startswith(prefix))


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return ", ".join(f"{k} {_fmt(v)}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        shown = ", ".join(_fmt(v) for v in value[:5])
        return f"{len(value)}: {shown}" + (", ..." if len(value) > 5 else "")
    return str(value)


def _prior_levels_text(prior_levels: object, vqvae_levels: object) -> str:
    if prior_levels == vqvae_levels:
        return f"all {prior_levels} levels"
    return f"the first {prior_levels} of {vqvae_levels} levels (drawn steps leave the rest empty)"


def describe_model(model: RawModel | DistillModel) -> list[tuple[str, str]]:
    """The rows ``distill model show`` prints: (key, value), both plain strings."""
    if isinstance(model, RawModel):
        header, size = model.header, f"{model.file_bytes / 1e6:.2f} MB"
        shapes = {name: tuple(t.shape) for name, t in model.tensors.items()}
        fmt = f"{header.get('format')} v{header.get('format_version')}"
    else:
        header, size, fmt = _model_header(model), "(not saved)", f"{FORMAT_NAME} (in memory)"
        shapes = {name: tuple(t.shape) for name, t in _model_tensors(model).items()}
    configs = header.get("configs", {})
    mel, vq, prior = (configs.get(k) or {} for k in ("mel", "vqvae", "prior"))
    rows = [("model id", model.model_id or "(not saved)"), ("format", fmt), ("size", size),
            ("kind", str(header.get("kind"))),
            ("mel", f"{mel.get('sample_rate')} Hz, {mel.get('n_mels')} mels, n_fft "
                    f"{mel.get('n_fft')}, hop {mel.get('hop_length')}"),
            ("rvq-vae", f"{vq.get('levels')} levels x {vq.get('codebook_size')} codes, "
                        f"{vq.get('channels')} channels, {_values(shapes, 'vqvae.'):,} "
                        "values"),
            ("prior", f"LSTM {prior.get('layers')} x {prior.get('hidden')} over "
                      f"{_prior_levels_text(prior.get('levels'), vq.get('levels'))}, "
                      f"{_values(shapes, 'prior.'):,} values" if prior else "none")]  # fmt: skip
    rows += [(str(k), _fmt(v)) for k, v in header.get("summary", {}).items()]
    versions = header.get("versions")
    if isinstance(versions, dict):
        rows.append(("written with", ", ".join(f"{k} {v}" for k, v in versions.items())))
    return rows
