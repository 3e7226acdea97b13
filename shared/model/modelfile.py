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

Loading parses the container by hand, so that each way a file can be wrong gets its own error
class (and ``reason`` code): missing or empty, not safetensors at all, safetensors without a
Distill header, truncated, corrupt, a newer format, missing keys or tensors, and tampering (a
checksum mismatch naming the tensor or the header). Nothing executes on load: no pickle, no
``torch.load``.

The file is read in the order that costs least before a refusal, as a file may come from anyone
(and a checksum proves nothing then: anyone can recompute one): the 8-byte header length and the
JSON header first; the tensor table (dtypes, shapes, offsets that tile the data exactly) and the
file's size against it; the Distill header; with ``check_configs`` (what :func:`load_model` and
``distill model show`` use) the configs, checked against each other and, through the modules
built on torch's ``meta`` device (no memory), against every stored tensor's name, shape and
dtype; only then the tensor bytes, each read into its own tensor, checked against its checksum
and refused if it holds NaN or an infinity. Every refusal is one :class:`ModelFileError` naming
the file, with what the file said shown escaped (a control character from a file never reaches a
terminal).

Two layers: :func:`write_model_file` / :func:`read_model_file` move a header and named tensors
and know no model class; :func:`save_model` / :func:`load_model` turn a :class:`DistillModel`
(MelConfig, RVQ-VAE, optional prior) into that and back. :func:`describe_model` gives the rows
``distill model show`` prints.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import stat
import struct
from dataclasses import dataclass
from functools import lru_cache
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch

from distill.shared.audio.mel import MelConfig, mel_inverts
from distill.shared.configs import is_int, nested
from distill.shared.errors import ConfigError, ModelFormatError, UnknownSettings
from distill.shared.ids import escaped
from distill.shared.model.formats import layout_differences, state_layout
from distill.shared.model.prior import Prior, PriorConfig
from distill.shared.model.vqvae import VQVAE, VQVAEConfig

FORMAT_NAME = "distill-model"
FORMAT_VERSION = 1
METADATA_KEY = "distill"
SUFFIX = ".distill"
MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own cap on its JSON header
MAX_HEADER_DEPTH = 64  # JSON nesting a header may have (Distill writes 4: header, summary, 2)
# safetensors' dtype names and the torch dtypes they are read as (those torch has)
DTYPES: dict[str, torch.dtype] = {name: dtype for name, dtype in (
    ("F64", torch.float64), ("F32", torch.float32), ("F16", torch.float16),
    ("BF16", torch.bfloat16), ("I64", torch.int64), ("I32", torch.int32), ("I16", torch.int16),
    ("I8", torch.int8), ("U8", torch.uint8), ("BOOL", torch.bool),
    ("U16", getattr(torch, "uint16", None)), ("U32", getattr(torch, "uint32", None)),
    ("U64", getattr(torch, "uint64", None)),
) if isinstance(dtype, torch.dtype)}  # fmt: skip
REQUIRED_KEYS = ("format", "format_version", "kind", "configs", "summary", "versions", "tensors",
                 "header_sha256")  # fmt: skip
WRITER_KEYS = ("format", "format_version", "versions", "tensors", "header_sha256")
LIBRARIES = ("distill", "torch", "vector-quantize-pytorch", "safetensors")


# --- errors: one class and one reason code per way a file can be wrong ---------------------------


class ModelFileError(ModelFormatError):
    """A ``.distill`` file cannot be used; ``reason`` says how, the message says which file."""

    reason = "invalid"

    def __init__(self, path: str | Path, problem: str) -> None:
        # the name and the problem may quote the file: shown escaped, never acted on
        super().__init__(escaped(f"{Path(path).name}: {problem}"))
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


def _quoted(value: object, limit: int = 60) -> str:
    """``repr(value)`` cut to about ``limit`` characters, for an error line."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _names(names: list[str], limit: int = 8) -> str:
    """A list of tensor names for an error line: all of a few, the first ``limit`` of many."""
    if len(names) <= limit:
        return str(names)
    return f"{names[:limit]} and {len(names) - limit} more"


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


@dataclass(frozen=True)
class _Entry:
    """One tensor as the safetensors table lists it (offsets from the start of the data)."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e400: read as inf, which no header holds
        raise ValueError(f"{text[:20]} is out of range")
    return value


def _json_depth(value: Any) -> int:
    """How deeply ``value`` nests (a scalar 0, ``{}`` 1); stops counting past MAX_HEADER_DEPTH."""
    deepest = 0
    for item, depth in nested(value):
        if isinstance(item, (dict, list)):
            deepest = max(deepest, depth)
            if deepest > MAX_HEADER_DEPTH:
                break
    return deepest


def _parse_json(path: Path, text: object, what: str) -> Any:
    """``text`` parsed as JSON: no NaN or infinity (no JSON holds them), nesting bounded."""
    try:
        value = json.loads(text, parse_constant=_no_constant, parse_float=_finite_float)  # type: ignore[arg-type]
    except RecursionError:
        raise ModelFileCorrupt(path, f"corrupt: {what} is nested too deeply") from None
    except (TypeError, ValueError) as e:  # JSONDecodeError, UnicodeDecodeError, NaN, 1e400
        raise ModelFileCorrupt(path, f"corrupt: {what} is not JSON ({e})") from e
    depth = _json_depth(value)
    if depth > MAX_HEADER_DEPTH:
        raise ModelFileCorrupt(path, f"corrupt: {what} nests deeper than {MAX_HEADER_DEPTH} "
                               "levels")  # fmt: skip
    return value


def _open(path: Path) -> tuple[io.BufferedReader, int]:
    """The open file and its size in bytes."""
    if not path.exists():
        raise ModelFileMissing(path, "no such file")
    if not path.is_file():
        why = "a folder, not a model file" if path.is_dir() else "not a regular file"
        raise ModelFileMissing(path, why)
    # non-blocking: a FIFO swapped in since the check above must not hang the open
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_size == 0:
        os.close(fd)
        if info.st_size == 0 and stat.S_ISREG(info.st_mode):
            raise ModelFileEmpty(path, "the file is empty (0 bytes)")
        raise ModelFileMissing(path, "not a regular file")
    return os.fdopen(fd, "rb"), info.st_size


def _container_header(path: Path, f: io.BufferedReader,
                      file_bytes: int) -> tuple[dict[str, Any], int]:  # fmt: skip
    """The safetensors JSON header and its length, read without reading the tensors."""
    start = f.read(12)
    if len(start) < 9 or start[8:9] != b"{":
        raise NotSafetensors(path, "not a safetensors file, so not a Distill model "
                             f"(it starts with {start!r})")  # fmt: skip
    (size,) = struct.unpack("<Q", start[:8])
    if size > MAX_HEADER_BYTES:
        raise NotSafetensors(path, f"not a safetensors file (header length {size} is absurd)")
    if 8 + size > file_bytes:
        raise ModelFileTruncated(path, f"truncated: the header needs {8 + size} bytes, the file "
                                 f"has {file_bytes}")  # fmt: skip
    f.seek(8)
    text = f.read(size)
    if len(text) < size:  # the file shrank while it was read
        raise ModelFileTruncated(path, f"truncated: the header needs {8 + size} bytes, the file "
                                 f"has {8 + len(text)}")  # fmt: skip
    container = _parse_json(path, text, "the safetensors header")
    if not isinstance(container, dict):
        raise ModelFileCorrupt(path, "corrupt: the safetensors header is not a JSON object")
    return container, size


def _offsets(path: Path, container: dict[str, Any]) -> list[tuple[str, int, int]]:
    """Each tensor's (name, begin, end), sorted: byte offsets into the data that tile it exactly
    (no overlap, no gap), as safetensors requires."""
    spans = []
    for name, entry in container.items():
        if name == "__metadata__":
            continue
        if not isinstance(entry, dict):
            raise ModelFileCorrupt(path, f"corrupt: the entry of tensor {_quoted(name)} is not "
                                   "an object")  # fmt: skip
        offsets = entry.get("data_offsets")
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(is_int(o) and o >= 0 for o in offsets) or offsets[0] > offsets[1]):  # fmt: skip
            raise ModelFileCorrupt(path, f"corrupt: tensor {_quoted(name)} has data_offsets "
                                   f"{_quoted(offsets)}, not two byte offsets (start <= end)")  # fmt: skip
        spans.append((name, offsets[0], offsets[1]))
    spans.sort(key=lambda span: (span[1], span[2]))
    at, previous = 0, None
    for name, begin, end in spans:
        if begin < at:
            raise ModelFileCorrupt(path, f"corrupt: tensors {_quoted(previous)} and "
                                   f"{_quoted(name)} overlap")  # fmt: skip
        if begin > at:
            raise ModelFileCorrupt(path, f"corrupt: {begin - at} bytes before tensor "
                                   f"{_quoted(name)} belong to no tensor")  # fmt: skip
        at, previous = end, name
    return spans


def _entries(path: Path, container: dict[str, Any],
             spans: list[tuple[str, int, int]]) -> list[_Entry]:  # fmt: skip
    """The tensor table checked: known dtypes, shapes of counts, sizes that fit the offsets."""
    entries = []
    for name, begin, end in spans:
        entry = container[name]
        dtype_name, shape = entry.get("dtype"), entry.get("shape")
        dtype = DTYPES.get(dtype_name) if isinstance(dtype_name, str) else None
        if dtype is None:
            raise ModelFileCorrupt(path, f"corrupt: tensor {_quoted(name)} has dtype "
                                   f"{_quoted(dtype_name)}, which Distill does not read")  # fmt: skip
        # counts whose strides fit torch's int64 even where a 0 leaves the tensor empty
        if (not isinstance(shape, list) or not all(is_int(n) and n >= 0 for n in shape)
                or math.prod(max(n, 1) for n in shape) >= 2**62):  # fmt: skip
            raise ModelFileCorrupt(path, f"corrupt: tensor {_quoted(name)} has shape "
                                   f"{_quoted(shape)}")  # fmt: skip
        size = math.prod(shape) * dtype.itemsize
        if size != end - begin:
            raise ModelFileCorrupt(path, f"corrupt: tensor {_quoted(name)} ({_dtype_name(dtype)} "
                                   f"{shape}) needs {size} bytes, its offsets hold "
                                   f"{end - begin}")  # fmt: skip
        entries.append(_Entry(name, dtype, tuple(shape), begin, end))
    return entries


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _distill_header(path: Path, container: dict[str, Any]) -> dict[str, Any]:
    meta = container.get("__metadata__")
    if not isinstance(meta, dict) or METADATA_KEY not in meta:
        raise NotADistillModel(path, "a safetensors file without a Distill header (another "
                               "program's model?)")  # fmt: skip
    header = _parse_json(path, meta[METADATA_KEY], "the Distill header")
    if not isinstance(header, dict) or header.get("format") != FORMAT_NAME:
        raise NotADistillModel(path, f"the header's format is not '{FORMAT_NAME}'")
    version = header.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ModelFileCorrupt(path, f"corrupt: format_version {_quoted(version)}")
    if version > FORMAT_VERSION:
        versions = header.get("versions")
        writer = versions.get("distill") if isinstance(versions, dict) else None
        if not isinstance(writer, str):
            writer = "a newer version"
        elif len(writer) > 40:
            writer = writer[:37] + "..."
        raise ModelFileTooNew(path, f"format_version {version} was written by Distill {writer}; "
                              f"this Distill reads up to {FORMAT_VERSION}: upgrade Distill")  # fmt: skip
    missing = [k for k in REQUIRED_KEYS if k not in header]
    if missing:
        raise ModelFileIncomplete(path, f"the header lacks {missing}")
    try:
        intact = header_sha256(header) == header["header_sha256"]
    except (ValueError, TypeError, RecursionError) as e:  # parsed JSON always serialises again
        raise ModelFileCorrupt(path, f"corrupt: the Distill header cannot be checked ({e})") from e
    if not intact:
        raise ModelFileTampered(path, "the header's checksum does not match: it was changed "
                                "after the file was written")  # fmt: skip
    for key, kind, what in (("kind", str, "a string"), ("configs", dict, "an object"),
                            ("summary", dict, "an object")):  # fmt: skip
        if not isinstance(header[key], kind):
            raise ModelFileCorrupt(path, f"corrupt: the header's '{key}' is not {what}")
    return header


def _check_listing(path: Path, header: dict[str, Any], names: list[str]) -> dict[str, str]:
    """The checksum of each tensor the file holds, from the header's tensor list, which must name
    exactly the tensors the file holds."""
    listed = header["tensors"]
    if not isinstance(listed, dict):
        raise ModelFileCorrupt(path, "corrupt: the header's tensor list is not an object")
    missing = sorted(set(listed) - set(names))
    extra = sorted(set(names) - set(listed))
    if missing:
        raise ModelFileIncomplete(path, f"tensors missing: {_names(missing)}")
    if extra:
        raise ModelFileTampered(path, f"tensors not in the header's checksums: {_names(extra)}")
    sums = {}
    for name in names:
        entry = listed[name]
        if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str):
            raise ModelFileCorrupt(path, f"corrupt: the header's entry for tensor {_quoted(name)} "
                                   "has no checksum")  # fmt: skip
        sums[name] = entry["sha256"]
    return sums


def _read_tensor(path: Path, f: io.BufferedReader, entry: _Entry, sha256: str) -> torch.Tensor:
    """The next tensor of the file (``f`` at its first byte), checked against its checksum and
    for NaN and infinities. Read into a tensor of its own: the file is never held twice (the
    format is safetensors', written by its library; read here rather than through its
    ``safe_open``, whose mmap turns a file that shrinks while it is read into a SIGBUS)."""
    tensor = torch.empty(entry.shape, dtype=entry.dtype)
    raw = tensor.reshape(-1).view(torch.uint8).numpy().data  # (numel * itemsize,) its memory
    got = f.readinto(raw) if raw.nbytes else 0
    if got != raw.nbytes:  # the file shrank while it was read
        raise ModelFileTruncated(path, f"truncated: tensor {_quoted(entry.name)} ends early")
    digest = hashlib.sha256(f"{entry.dtype}|{list(entry.shape)}|".encode())
    digest.update(raw)  # as tensor_sha256: the bytes as stored (little-endian)
    if digest.hexdigest() != sha256:
        raise ModelFileTampered(path, f"tensor '{entry.name}' does not match its checksum: the "
                                "file is corrupt or was changed")  # fmt: skip
    # aminmax propagates NaN and shows an infinity: 16x faster than isfinite().all()
    if (tensor.is_floating_point() and tensor.numel()
            and not all(math.isfinite(float(v)) for v in torch.aminmax(tensor))):  # fmt: skip
        nan = int(torch.isnan(tensor).sum())
        inf = int(torch.isinf(tensor).sum())
        what = " and ".join(w for n, w in ((nan, f"{nan} NaN"), (inf, f"{inf} infinite")) if n)
        raise ModelFileCorrupt(path, f"tensor '{entry.name}' holds {what} values (of "
                               f"{tensor.numel()}): a model with them cannot make sound")  # fmt: skip
    return tensor


def read_model_file(path: str | Path, *, check_configs: bool = False) -> RawModel:
    """Reads and verifies a ``.distill`` file; a :class:`ModelFileError` subclass otherwise.

    With ``check_configs``, the configs are checked too (against each other, and against every
    stored tensor's name, shape and dtype) before any tensor is read, as :func:`build_model`
    checks them: a file whose configs do not fit is refused before it costs memory.
    """
    path = Path(path)
    f, file_bytes = _open(path)
    with f:
        container, size = _container_header(path, f, file_bytes)
        spans = _offsets(path, container)
        needed = 8 + size + max((end for _, _, end in spans), default=0)
        if needed > file_bytes:
            raise ModelFileTruncated(path, f"truncated: the tensors need {needed} bytes, the "
                                     f"file has {file_bytes}")  # fmt: skip
        header = _distill_header(path, container)
        if needed < file_bytes:
            raise ModelFileCorrupt(path, f"corrupt: {file_bytes - needed} bytes after the "
                                   "tensors belong to none")  # fmt: skip
        entries = _entries(path, container, spans)
        sums = _check_listing(path, header, [e.name for e in entries])
        if check_configs:
            _check_fit(path, _model_configs(path, header),
                       {e.name: (e.dtype, e.shape) for e in entries})  # fmt: skip
        f.seek(8 + size)
        read = {e.name: _read_tensor(path, f, e, sums[e.name]) for e in entries}
    order = [name for name in container if name != "__metadata__"]  # the file's own order
    return RawModel(header=header, tensors={name: read[name] for name in order},
                    model_id=header["header_sha256"], file_bytes=file_bytes)  # fmt: skip


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


@dataclass(frozen=True)
class _Configs:
    mel: MelConfig
    vqvae: VQVAEConfig
    prior: PriorConfig | None


def _model_configs(path: Path, header: dict[str, Any]) -> _Configs:
    """The file's configs, each valid, and together a model that can run: the prior draws codes
    the RVQ-VAE has, the RVQ-VAE reads the mel the front end makes, the mel turns back into
    sound, and the kind says what the configs hold."""
    mel = _config(path, header, "mel", MelConfig)
    vqvae = _config(path, header, "vqvae", VQVAEConfig)
    unset = [name for name in ("codebook_size", "levels") if getattr(vqvae, name) is None]
    if unset:  # only a trainer leaves them to be chosen; a written model has both
        raise ModelFileCorrupt(path, f"malformed: the 'vqvae' config leaves {' and '.join(unset)} "
                               "unset (null)")  # fmt: skip
    prior = None
    if header["configs"].get("prior") is not None:
        prior = _config(path, header, "prior", PriorConfig)
    kind = "vqvae+prior" if prior is not None else "vqvae"
    if header["kind"] != kind:
        holds = "a 'prior' config" if prior is not None else "no 'prior' config"
        raise ModelFileCorrupt(path, f"the header's kind {_quoted(header['kind'])} does not "
                               f"match its configs ({holds}: '{kind}')")  # fmt: skip
    if mel.n_mels != vqvae.n_mels:
        raise ModelFileCorrupt(path, f"the configs disagree: the 'mel' config makes {mel.n_mels} "
                               f"mel bands (n_mels), the 'vqvae' config reads {vqvae.n_mels}")  # fmt: skip
    if prior is not None and prior.codebook_size != vqvae.codebook_size:
        raise ModelFileCorrupt(path, f"the configs disagree: the 'prior' config draws from "
                               f"{prior.codebook_size} codes (codebook_size), the 'vqvae' "
                               f"codebooks hold {vqvae.codebook_size}")  # fmt: skip
    if prior is not None and vqvae.levels is not None and prior.levels > vqvae.levels:
        raise ModelFileCorrupt(path, f"the configs disagree: the 'prior' config draws "
                               f"{prior.levels} levels, the 'vqvae' config has "
                               f"{vqvae.levels}")  # fmt: skip
    if not mel_inverts(mel):
        raise ModelFileCorrupt(path, f"the 'mel' config cannot turn mel back into sound: at "
                               f"{mel.sample_rate} Hz, n_fft {mel.n_fft} gives {mel.n_freqs} "
                               f"frequency bins, too few to tell its {mel.n_mels} mel bands apart "
                               "(the inverse filterbank has no solution)")  # fmt: skip
    return _Configs(mel, vqvae, prior)


@lru_cache(maxsize=16)
def _expected_tensors(vqvae: VQVAEConfig,
                      prior: PriorConfig | None) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:  # fmt: skip
    """What the modules the configs make hold, tensor by tensor (prefixed names): learnt from
    the modules built on the meta device, which allocates nothing (a config within every bound
    can still ask for tens of GB)."""
    expected = {f"vqvae.{k}": v for k, v in state_layout(lambda: VQVAE(vqvae)).items()}
    if prior is not None:
        expected |= {f"prior.{k}": v for k, v in state_layout(lambda: Prior(prior)).items()}
    return expected


def _check_fit(path: Path, configs: _Configs,
               stored: dict[str, tuple[torch.dtype, tuple[int, ...]]]) -> None:  # fmt: skip
    """Every stored tensor (name -> dtype, shape) is one the configs' modules hold, with their
    shape and dtype, and none is missing; refused naming the tensor otherwise."""
    try:
        expected = _expected_tensors(configs.vqvae, configs.prior)
    except (RuntimeError, ValueError, TypeError, ConfigError) as e:
        raise ModelFileCorrupt(path, f"the configs make no model: {e}") from e
    prefixes = ("vqvae", "prior") if configs.prior is not None else ("vqvae",)
    stray = sorted(name for name in stored if name.split(".", 1)[0] not in prefixes)
    if stray and configs.prior is None and any(n.startswith("prior.") for n in stray):
        raise ModelFileCorrupt(path, "the file holds prior weights but its header has no "
                               "'prior' config")  # fmt: skip
    if stray:
        raise ModelFileCorrupt(path, f"the file holds tensors no Distill model has: "
                               f"{_names(stray)}")  # fmt: skip
    for prefix in prefixes:
        start = prefix + "."
        mine = [name for name in expected if name.startswith(start)]
        missing = [name[len(start) :] for name in mine if name not in stored]
        if missing:
            raise ModelFileIncomplete(path, f"{prefix} weights missing: {_names(missing)}")
        unknown = sorted(n[len(start) :] for n in stored
                         if n.startswith(start) and n not in expected)  # fmt: skip
        if unknown:
            raise ModelFileCorrupt(path, f"{prefix} holds unknown weights: {_names(unknown)}")
    differences = layout_differences(expected, stored)
    if differences:
        more = f" (and {len(differences) - 1} more)" if len(differences) > 1 else ""
        raise ModelFileCorrupt(path, f"weights do not fit the configs: {differences[0]}{more}")


def _load_module(path: Path, raw: RawModel, prefix: str, module: torch.nn.Module) -> None:
    state = raw.tensors_with_prefix(prefix)
    result = module.load_state_dict(state, strict=False)
    if result.missing_keys:
        raise ModelFileIncomplete(path, f"{prefix} weights missing: {result.missing_keys}")
    if result.unexpected_keys:
        raise ModelFileCorrupt(path, f"{prefix} holds unknown weights: {result.unexpected_keys}")


def load_model(path: str | Path, device: str | torch.device = "cpu") -> DistillModel:
    """Reads, verifies and builds a model (modules in eval mode on ``device``); the configs are
    checked against the stored tensors before the tensors are read or the modules built."""
    return build_model(read_model_file(path, check_configs=True), path, device)


def build_model(raw: RawModel, path: str | Path,
                device: str | torch.device = "cpu") -> DistillModel:  # fmt: skip
    """The model a verified file holds (``path``: for errors): its configs checked (each, against
    each other, and against every tensor's name, shape and dtype, before anything is built),
    its modules built and their weights loaded; an error names what does not fit."""
    path = Path(path)
    header = raw.header
    configs = _model_configs(path, header)
    _check_fit(path, configs, {name: (t.dtype, tuple(t.shape)) for name, t in raw.tensors.items()})
    vqvae = VQVAE(configs.vqvae)
    try:
        _load_module(path, raw, "vqvae", vqvae)
        prior = None
        if configs.prior is not None:
            prior = Prior(configs.prior)
            _load_module(path, raw, "prior", prior)
    except RuntimeError as e:  # shape mismatches between the config and the weights
        # torch lists each mismatch on a line of its own: the first, and how many more
        lines = [line.strip() for line in str(e).splitlines()[1:] if line.strip()] or [str(e)]
        more = f" (and {len(lines) - 1} more)" if len(lines) > 1 else ""
        raise ModelFileCorrupt(path, f"weights do not fit the configs: {lines[0]}{more}") from e
    summary = header["summary"] if isinstance(header["summary"], dict) else {}
    return DistillModel(mel_config=configs.mel, vqvae=vqvae.to(device).eval(),
                        prior=None if prior is None else prior.to(device).eval(),
                        summary=summary, model_id=raw.model_id)  # fmt: skip


# --- `distill model show` -------------------------------------------------------------------------


def _values(tensors: dict[str, tuple[int, ...]], prefix: str) -> int:
    return sum(math.prod(shape) for name, shape in tensors.items() if name.startswith(prefix))


FMT_DEPTH = 4  # nesting shown in a summary value; deeper is "..." (Distill writes 2)
FMT_ITEMS = 20  # a map's entries shown in a summary value (Distill writes up to 5)


def _fmt(value: Any, depth: int = 0) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (dict, list, tuple)) and depth >= FMT_DEPTH:
        return "..."
    if isinstance(value, (list, tuple, dict)) and not value:
        return "none"  # an empty list showed as "0: " (a model whose files all trained)
    if isinstance(value, dict):
        items = list(value.items())
        shown = ", ".join(f"{k} {_fmt(v, depth + 1)}" for k, v in items[:FMT_ITEMS])
        return shown + (", ..." if len(items) > FMT_ITEMS else "")
    if isinstance(value, (list, tuple)):
        shown = ", ".join(_fmt(v, depth + 1) for v in value[:5])
        return f"{len(value)}: {shown}" + (", ..." if len(value) > 5 else "")
    return str(value)


def _prior_levels_text(prior_levels: object, vqvae_levels: object) -> str:
    if prior_levels == vqvae_levels:
        return f"all {prior_levels} levels"
    return f"the first {prior_levels} of {vqvae_levels} levels (drawn steps leave the rest empty)"


def describe_model(model: RawModel | DistillModel) -> list[tuple[str, str]]:
    """The rows ``distill model show`` prints: (key, value), both plain strings, holding the
    file's own text: whoever shows them escapes control characters (``distill model show``
    does)."""
    if isinstance(model, RawModel):
        header, size = model.header, f"{model.file_bytes / 1e6:.2f} MB"
        shapes = {name: tuple(t.shape) for name, t in model.tensors.items()}
        fmt = f"{header.get('format')} v{header.get('format_version')}"
    else:
        header, size, fmt = _model_header(model), "(not saved)", f"{FORMAT_NAME} (in memory)"
        shapes = {name: tuple(t.shape) for name, t in _model_tensors(model).items()}
    configs = header.get("configs")
    configs = configs if isinstance(configs, dict) else {}
    mel, vq, prior = (c if isinstance(c, dict) else {}
                      for c in map(configs.get, ("mel", "vqvae", "prior")))  # fmt: skip
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
    summary = header.get("summary")
    summary = summary if isinstance(summary, dict) else {}
    rows += [(str(k), _fmt(v)) for k, v in summary.items()]
    versions = header.get("versions")
    if isinstance(versions, dict):
        rows.append(("written with", ", ".join(f"{k} {v}" for k, v in versions.items())))
    return rows
