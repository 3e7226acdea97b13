"""Exported audio: WAV or FLAC through soundfile, never clipped, with what regenerates it.

:func:`export_audio` writes a file whose format follows its suffix (``.wav`` or ``.flac``). If
the peak is above full scale less :data:`HEADROOM_DB`, the whole signal is scaled down and the
gain is reported: integer formats would otherwise wrap or clip, and float files clip in every
player that converts them. Non-finite samples are refused, naming the file.

Metadata travels in the file's own tags: ``title``, ``software`` (``distill <version>``) and
``comment``, a compact JSON object that holds what regenerates the file::

    {"distill_export": 1, "kind": "generate", "model": "<model id>", "data": {...}}

``data`` is the kind's own plain dict (sampling parameters with their seed for ``generate``, an
edit session for ``edit``); this module only carries it.

Tag limits (libsndfile 1.2.2, measured): a WAV (RIFF ``LIST/INFO``) comment of up to 2045 bytes
round-trips; a longer one is silently dropped, and one of ~60 kB makes a file that libsndfile
cannot open again. FLAC (Vorbis comment) kept 1 MB intact. So a comment is stored in the first
form that fits: plain JSON; ``distill-z1:`` + base64 of the zlib-compressed JSON; and, in WAV
only, a short JSON stub ``{"distill_export": 1, ..., "chunk": "dstl"}`` with the full JSON in
a ``dstl`` RIFF chunk after the audio (readers skip chunks they do not know). libsndfile also
appends `` (libsndfile-x.y.z)`` to the software tag; it is kept as read.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import math
import os
import re
import struct
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any, BinaryIO, Literal

import numpy as np
import soundfile as sf
import torch

from distill.shared.errors import AudioError

EXPORT_FORMAT_VERSION = 1  # the version of the comment's JSON layout this module writes and reads
HEADROOM_DB = 0.1  # peaks are kept this far under full scale: inter-sample overs stay rare
MAX_CHANNELS = 8  # more than this is almost surely a (samples, channels) array passed by mistake
WAV_COMMENT_LIMIT = 2045  # bytes; measured with libsndfile 1.2.2, longer comments vanish
FLAC_COMMENT_LIMIT = 1_000_000  # bytes; measured intact, and far above any edit history
COMPRESSED_PREFIX = "distill-z1:"
CHUNK_ID = b"dstl"  # the RIFF chunk holding a comment too long for the WAV INFO tag
MARKER = "distill_export"
# Bounds on the metadata read from a file (it may come from anyone). The largest real recipe is
# an edit of a 60-s grid with a long history: measured, a 12-level 60-s grid of 1024 codes and
# 4096 edits (512 of them 2-s, 12-level replacements) is 5.0 MB of JSON, and 60 replacements of
# the whole grid (resampling all of it 60 times) 16.1 MB. 32 MiB is twice that; parsing a
# hostile 32 MiB costs a few hundred MB at most. A compressed recipe is inflated no further
# (a 1.4-MB WAV held one that inflated to 1 GiB: 2.7 GB to read).
MAX_RECIPE_BYTES = 32 << 20
MAX_RECIPE_DEPTH = 32  # real recipes nest 7 deep (an edit's codes in a session in data)
# lists and maps: a real recipe holds a grid's rows and each edit's (4096 done and undone
# replacements of 64 levels: 540 000); 64 MiB of "{}," parsed into 1.5 GB
MAX_RECIPE_CONTAINERS = 1 << 20
MAX_RIFF_CHUNKS = 1 << 16  # chunks walked looking for the recipe's (an export has five)

Subtype = Literal["PCM_16", "PCM_24", "FLOAT"]
CommentStorage = Literal["plain", "compressed", "chunk"]
SUBTYPES: tuple[str, ...] = ("PCM_16", "PCM_24", "FLOAT")
FORMATS = {".wav": "WAV", ".flac": "FLAC"}


class ExportError(AudioError):
    """Audio could not be exported, or an exported file's metadata could not be read.

    ``reason`` is a short machine-readable code: ``bad_audio``, ``bad_format``, ``write_failed``,
    ``unreadable``, ``no_metadata``, ``malformed``, ``too_new``, ``too_large`` (metadata
    over :data:`MAX_RECIPE_BYTES`).
    """

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class ExportMetadata:
    """What regenerates an exported file.

    ``kind`` names the recipe (``generate``, ``edit``, ...), ``model_id`` the model file's hash,
    ``data`` the recipe's plain JSON-able dict. ``software`` is filled in on reading only.
    """

    kind: str
    model_id: str
    data: Mapping[str, Any] = field(default_factory=dict)
    title: str = ""
    software: str = ""

    def comment_dict(self) -> dict[str, Any]:
        return {
            MARKER: EXPORT_FORMAT_VERSION,
            "kind": self.kind,
            "model": self.model_id,
            "data": dict(self.data),
        }


@dataclass(frozen=True)
class ExportReport:
    """What :func:`export_audio` wrote; ``gain_db`` is 0.0 unless the audio was scaled down."""

    path: Path
    format: str  # "WAV" or "FLAC"
    subtype: str
    sample_rate: int
    channels: int
    frames: int
    peak: float  # of the input, before any gain
    gain_db: float  # <= 0.0
    comment_storage: CommentStorage


def distill_version() -> str:
    try:
        return importlib_metadata.version("distill")
    except importlib_metadata.PackageNotFoundError:
        return "unknown"  # running from a source tree that was never installed


# --- writing -------------------------------------------------------------------------------------


def export_format(path: Path) -> str:
    """The soundfile format ``path``'s suffix asks for; ExportError if it names none we write."""
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        what = f"'{path.suffix}' files" if path.suffix else "a name with no suffix"
        raise ExportError(f"{path}: cannot export to {what}; the format comes from the suffix: "
                          "use .wav or .flac", "bad_format")  # fmt: skip
    return fmt


def _format_for(path: Path, subtype: str) -> str:
    fmt = export_format(path)
    if subtype not in SUBTYPES:
        raise ExportError(
            f"{path.name}: unknown subtype {subtype!r}; use one of {SUBTYPES}", "bad_format"
        )
    if fmt == "FLAC" and subtype == "FLOAT":
        raise ExportError(
            f"{path.name}: FLAC holds integer samples only; use PCM_16 or PCM_24, "
            "or a .wav file for FLOAT",
            "bad_format",
        )
    return fmt


def _as_frames(audio: np.ndarray | torch.Tensor, name: str) -> np.ndarray:
    """(samples,) or (channels, samples) -> float64 (samples, channels), checked."""
    if isinstance(audio, torch.Tensor):
        audio = audio.detach().cpu().numpy()
    array = np.asarray(audio)
    if not np.issubdtype(array.dtype, np.floating):
        raise ExportError(f"{name}: audio must be floating point, got {array.dtype}", "bad_audio")
    if array.ndim == 1:
        array = array[None, :]  # (1, samples)
    if array.ndim != 2 or array.shape[1] == 0:
        raise ExportError(
            f"{name}: audio must be (samples,) or (channels, samples) with at least "
            f"one sample, got shape {tuple(np.asarray(audio).shape)}",
            "bad_audio",
        )
    if array.shape[0] > MAX_CHANNELS:
        raise ExportError(
            f"{name}: {array.shape[0]} channels (shape {array.shape}); pass "
            "(channels, samples), not (samples, channels)",
            "bad_audio",
        )
    if not np.isfinite(array).all():
        bad = int((~np.isfinite(array)).sum())
        raise ExportError(
            f"{name}: audio holds {bad} non-finite samples (NaN or inf); nothing was written",
            "bad_audio",
        )
    return array.T.astype(np.float64)  # (samples, channels)


def headroom_gain(peak: float) -> float:
    """The gain that brings ``peak`` (linear) down to full scale less :data:`HEADROOM_DB` when it
    is above that, else 1.0: what export, playback and training previews scale a sound by
    instead of clipping it (a drawn or decoded sound may peak above full scale: the default
    pipeline's percussion draws at a median +1.7 dBFS, up to +14)."""
    ceiling = 10.0 ** (-HEADROOM_DB / 20.0)
    return ceiling / peak if peak > ceiling else 1.0


def within_full_scale(audio: np.ndarray | torch.Tensor) -> np.ndarray:
    """``audio`` as float32, scaled by :func:`headroom_gain` of its peak: what the UI plays and
    the training previews hold, so that what you hear is what an export holds."""
    x = audio.detach().cpu().numpy() if isinstance(audio, torch.Tensor) else np.asarray(audio)
    x = x.astype(np.float32, copy=False)
    return x * np.float32(headroom_gain(float(np.abs(x).max()))) if x.size else x


def _encode_comment(
    meta: ExportMetadata, fmt: str, name: str
) -> tuple[str, bytes | None, CommentStorage]:
    """(comment tag, RIFF chunk payload or None, storage) for the first form that fits."""
    try:
        text = json.dumps(
            meta.comment_dict(),
            separators=(",", ":"),
            sort_keys=True,
            ensure_ascii=True,
            allow_nan=False,
        )
    except (TypeError, ValueError) as e:
        raise ExportError(f"{name}: metadata is not plain JSON data: {e}", "bad_format") from e
    limit = WAV_COMMENT_LIMIT if fmt == "WAV" else FLAC_COMMENT_LIMIT
    if len(text) <= limit:
        return text, None, "plain"
    packed = COMPRESSED_PREFIX + base64.b64encode(zlib.compress(text.encode(), 9)).decode()
    if len(packed) <= limit:
        return packed, None, "compressed"
    if fmt == "WAV":
        stub = {
            MARKER: EXPORT_FORMAT_VERSION,
            "kind": meta.kind,
            "model": meta.model_id,
            "chunk": CHUNK_ID.decode(),
        }
        return json.dumps(stub, separators=(",", ":"), sort_keys=True), text.encode(), "chunk"
    raise ExportError(
        f"{name}: metadata is {len(text)} bytes, over the {limit}-byte limit even compressed",
        "bad_format",
    )


def _append_riff_chunk(path: Path, chunk_id: bytes, payload: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(0, os.SEEK_END)
        f.write(chunk_id + struct.pack("<I", len(payload)) + payload)
        if len(payload) % 2:
            f.write(b"\0")  # RIFF chunks are word-aligned
        end = f.tell()
        if end - 8 > 0xFFFFFFFF:
            raise ExportError(f"{path.name}: file too large for RIFF", "write_failed")
        f.seek(4)
        f.write(struct.pack("<I", end - 8))  # the RIFF size covers everything after it


def export_audio(
    path: str | Path,
    audio: np.ndarray | torch.Tensor,
    sample_rate: int,
    *,
    subtype: Subtype = "PCM_24",
    metadata: ExportMetadata,
    scale: bool = True,
) -> ExportReport:
    """Write ``audio`` ((samples,) or (channels, samples), float) to a WAV or FLAC file.

    Written to a temporary file beside ``path`` and renamed, so a failure leaves no half file.
    ``scale=False`` writes samples an export already scaled (read back from one) as they are:
    its peak may be a rounding step over the headroom's ceiling, and scaling it again would
    change the last bit of every sample.
    """
    path = Path(path)
    fmt = _format_for(path, subtype)
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, int) or sample_rate <= 0:
        raise ExportError(
            f"{path.name}: sample rate must be a positive integer, got {sample_rate!r}", "bad_audio"
        )
    frames = _as_frames(audio, path.name)  # (samples, channels)
    peak = float(np.abs(frames).max())
    gain = headroom_gain(peak) if scale else 1.0
    written = _as_written(frames, gain, subtype)
    comment, chunk, storage = _encode_comment(metadata, fmt, path.name)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with sf.SoundFile(tmp, "w", sample_rate, frames.shape[1], subtype=subtype, format=fmt) as f:
            if metadata.title:  # libsndfile refuses an empty string ("bad string")
                f.title = metadata.title
            f.software = f"distill {distill_version()}"
            f.comment = comment
            f.write(written)
        if fmt == "WAV":
            _clear_peak_time(tmp)
        if chunk is not None:
            _append_riff_chunk(tmp, CHUNK_ID, chunk)
        os.replace(tmp, path)
    except (OSError, sf.LibsndfileError) as e:
        tmp.unlink(missing_ok=True)
        raise ExportError(f"{path.name}: could not write: {e}", "write_failed") from e
    return ExportReport(
        path=path,
        format=fmt,
        subtype=subtype,
        sample_rate=sample_rate,
        channels=frames.shape[1],
        frames=frames.shape[0],
        peak=peak,
        gain_db=20.0 * math.log10(gain),
        comment_storage=storage,
    )


def _as_written(frames: np.ndarray, gain: float, subtype: str) -> np.ndarray:
    """(samples, channels) as handed to libsndfile, which converts them to ``subtype``."""
    return (frames * gain).astype(np.float32 if subtype == "FLOAT" else np.float64)


def exported_samples(audio: np.ndarray | torch.Tensor, sample_rate: int, fmt: str,
                     subtype: Subtype) -> np.ndarray:  # fmt: skip
    """The samples an export of ``audio`` as ``fmt`` ("WAV" or "FLAC") ``subtype`` holds, read
    back: float64 (samples, channels), scaled and converted as :func:`export_audio` does, in
    memory. libsndfile rounds floats to integers differently for WAV and FLAC (one step of
    the last bit now and then), so a sound is only ever compared as one format holds it."""
    frames = _as_frames(audio, "audio")
    buffer = io.BytesIO()
    with sf.SoundFile(buffer, "w", sample_rate, frames.shape[1], subtype=subtype,
                      format=fmt) as f:  # fmt: skip
        f.write(_as_written(frames, headroom_gain(float(np.abs(frames).max())), subtype))
    buffer.seek(0)
    return sf.read(buffer, dtype="float64", always_2d=True)[0]


# --- reading -------------------------------------------------------------------------------------


def _read_riff_chunk(path: Path, chunk_id: bytes) -> bytes | None:
    """The payload of ``path``'s first ``chunk_id`` chunk, or None (not a RIFF/WAVE file, no
    such chunk, or one cut short). The chunks are walked by seeking, not by reading the file
    (the audio before it may be hundreds of MB); a chunk over :data:`MAX_RECIPE_BYTES` is
    refused before it is read."""
    with open(path, "rb") as f:
        found = _find_riff_chunk(f, chunk_id)
        if found is None:
            return None
        pos, size = found
        if size > MAX_RECIPE_BYTES:
            raise ExportError(
                f"{path.name}: its '{chunk_id.decode()}' chunk is {size} bytes; Distill "
                f"metadata is at most {MAX_RECIPE_BYTES} ({_mib(MAX_RECIPE_BYTES)})",
                "too_large",
            )
        payload = f.read(size) if pos + size <= os.fstat(f.fileno()).st_size else b""
        return payload if len(payload) == size else None


def _find_riff_chunk(f: BinaryIO, chunk_id: bytes) -> tuple[int, int] | None:
    """Where the payload of the open RIFF/WAVE file's first ``chunk_id`` chunk starts, and its
    declared size, with ``f`` positioned there; None when it is not a RIFF/WAVE file or has no
    such chunk. Walked by seeking: the audio before a chunk may be hundreds of MB."""
    f.seek(0)
    head = f.read(12)
    if head[:4] != b"RIFF" or head[8:12] != b"WAVE":
        return None
    end = os.fstat(f.fileno()).st_size
    pos = 12
    for _ in range(MAX_RIFF_CHUNKS):
        if pos + 8 > end:
            return None
        f.seek(pos)
        header = f.read(8)
        cid, size = header[:4], struct.unpack("<I", header[4:8])[0]
        if cid == chunk_id:
            return pos + 8, size
        pos += 8 + size + (size & 1)
    return None


def _clear_peak_time(path: Path) -> None:
    """Zero the write time libsndfile stamps into a float WAV's PEAK chunk (its second field,
    seconds since 1970), so that the same sound exported twice is the same bytes: the artifact
    store keeps one copy, and a file made again from its recipe has the original's checksum."""
    with open(path, "r+b") as f:
        found = _find_riff_chunk(f, b"PEAK")
        if found is not None and found[1] >= 8:
            f.seek(found[0] + 4)  # after the chunk's version
            f.write(b"\0\0\0\0")


def _mib(n: int) -> str:
    return f"{n / (1 << 20):g} MiB"


def _inflated(name: str, text: str) -> str:
    """``text``, or the JSON a ``distill-z1:`` text holds: inflated at most to
    :data:`MAX_RECIPE_BYTES` (a 1.4-MB WAV inflated a 1-GiB recipe), corrupt data refused."""
    if not text.startswith(COMPRESSED_PREFIX):
        return text
    try:
        packed = base64.b64decode(text[len(COMPRESSED_PREFIX) :], validate=True)
        inflater = zlib.decompressobj()
        data = inflater.decompress(packed, MAX_RECIPE_BYTES + 1)
        if len(data) > MAX_RECIPE_BYTES:
            raise ExportError(
                f"{name}: its Distill metadata inflates to over {MAX_RECIPE_BYTES} bytes "
                f"({_mib(MAX_RECIPE_BYTES)}, far above any real recipe); it was not read further",
                "too_large",
            )
        if not inflater.eof:
            raise zlib.error("incomplete or truncated stream")
        return data.decode()
    except (binascii.Error, zlib.error, UnicodeDecodeError) as e:
        raise ExportError(f"{name}: Distill metadata is corrupt: {e}", "malformed") from e


# A JSON string once its escapes are gone: what the structure check below skips over
_JSON_STRING = re.compile(r'"[^"]*"')


def _structure_problem(text: str) -> str | None:
    """Why ``text`` cannot be a recipe before it is parsed, or None: over
    :data:`MAX_RECIPE_BYTES`, nesting deeper than :data:`MAX_RECIPE_DEPTH` (100 000 ``[``
    ended in a RecursionError), or more than :data:`MAX_RECIPE_CONTAINERS` lists and maps
    (64 MiB of ``{},`` parsed into 1.5 GB). The brackets are counted outside strings, with
    numpy: a real 5-MB recipe is checked in milliseconds."""
    if len(text) > MAX_RECIPE_BYTES:
        return f"it is {len(text)} bytes; at most {MAX_RECIPE_BYTES} ({_mib(MAX_RECIPE_BYTES)})"
    # what strings hold does not count: their escapes go first (an escaped quote ends none),
    # then each string; all linear (a pattern that skipped escapes itself was tried again from
    # each quote of an unterminated string: quadratic)
    outside = _JSON_STRING.sub("", text.replace("\\\\", "").replace('\\"', ""))
    raw = np.frombuffer(outside.encode("utf-8", "replace"), np.uint8)
    opens = (raw == ord("[")) | (raw == ord("{"))
    closes = (raw == ord("]")) | (raw == ord("}"))
    n_open, n_close = int(opens.sum()), int(closes.sum())
    if max(n_open, n_close) > MAX_RECIPE_CONTAINERS:
        return f"it holds over {MAX_RECIPE_CONTAINERS} lists and maps"
    marks = np.flatnonzero(opens | closes)
    depth = np.cumsum(np.where(opens[marks], 1, -1)) if len(marks) else np.zeros(1, np.int64)
    if int(depth.max()) > MAX_RECIPE_DEPTH:
        return f"it nests lists and maps over {MAX_RECIPE_DEPTH} deep"
    return None


def _parsed(name: str, text: str) -> Any:
    """``text`` parsed, bounded (:func:`_structure_problem`); text that is not JSON is None (a
    comment that is not Distill's)."""
    problem = _structure_problem(text)
    if problem:
        raise ExportError(f"{name}: Distill metadata is malformed: {problem}", "malformed")
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return None
    except (ValueError, RecursionError) as e:  # an int of 5000 digits (Python's str limit)
        raise ExportError(f"{name}: Distill metadata is malformed: {e}", "malformed") from e


def _decode_comment(path: Path, comment: str) -> dict[str, Any]:
    name = path.name
    parsed = _parsed(name, _inflated(name, comment))
    if not isinstance(parsed, dict) or MARKER not in parsed:
        raise ExportError(
            f"{name}: has no Distill metadata (its comment tag is not Distill's)", "no_metadata"
        )
    if "chunk" not in parsed:
        return parsed
    # followed from the comment tag only: a chunk that points to a chunk again (itself) was
    # followed until Python's recursion limit
    chunk = CHUNK_ID.decode()
    payload = _read_riff_chunk(path, CHUNK_ID)
    if payload is None:
        raise ExportError(
            f"{name}: Distill metadata points to a '{chunk}' chunk "
            "that is missing or cut short (was the file re-saved?)",
            "malformed",
        )
    parsed = _parsed(name, _inflated(name, payload.decode("ascii", errors="replace")))
    if not isinstance(parsed, dict) or MARKER not in parsed:
        raise ExportError(f"{name}: its '{chunk}' chunk holds no Distill metadata", "malformed")
    if "chunk" in parsed:
        raise ExportError(
            f"{name}: Distill metadata is malformed: its '{chunk}' chunk points to a chunk "
            "again", "malformed",
        )  # fmt: skip
    return parsed


def _check_comment(name: str, parsed: dict[str, Any]) -> None:
    version = parsed[MARKER]
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ExportError(f"{name}: Distill metadata has a bad version {version!r}", "malformed")
    if version > EXPORT_FORMAT_VERSION:
        raise ExportError(
            f"{name}: Distill metadata version {version} is newer than this "
            f"Distill reads ({EXPORT_FORMAT_VERSION}); upgrade Distill",
            "too_new",
        )
    for key, kind in (("kind", str), ("model", str), ("data", dict)):
        if not isinstance(parsed.get(key), kind):
            raise ExportError(
                f"{name}: Distill metadata field '{key}' is missing or not a {kind.__name__}",
                "malformed",
            )


def read_export_metadata(path: str | Path) -> ExportMetadata:
    """The metadata :func:`export_audio` wrote into ``path``; :class:`ExportError` otherwise."""
    path = Path(path)
    try:
        with sf.SoundFile(path) as f:
            comment, title, software = f.comment or "", f.title or "", f.software or ""
    except (OSError, sf.LibsndfileError, RuntimeError) as e:
        raise ExportError(f"{path.name}: not a readable audio file: {e}", "unreadable") from e
    parsed = _decode_comment(path, comment)
    _check_comment(path.name, parsed)
    return ExportMetadata(
        kind=parsed["kind"],
        model_id=parsed["model"],
        data=parsed["data"],
        title=title,
        software=software,
    )


def free_path(path: Path) -> Path:
    """``path``, or the first of ``NAME-2.EXT``, ``NAME-3.EXT``, ... that is free: exports
    never replace a file already there (a name that holds only what made the sound, the model,
    the seed, the index, comes again with other settings)."""
    free, n = path, 2
    while free.exists() or free.is_symlink():
        free, n = path.with_name(f"{path.stem}-{n}{path.suffix}"), n + 1
    return free
