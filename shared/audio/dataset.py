"""The dataset: log-mel chunks of a person's sounds, plus a manifest that accounts for every file.

Every input file gets one :class:`ManifestRow`, used or skipped, with the reason it was skipped:
nothing is dropped silently (RAVE's most common small-data trouble). Files shorter than one
chunk are padded with silence, never dropped. The train/validation split is by *file*, seeded,
and independent of the order the files arrive in.

The audio of a few chunks is kept beside their log-mels (``check_chunks``, ``check_audio``): the
RVQ-VAE trainer's decoded-audio check scores Griffin-Lim of its reconstructions against the
sound itself, as the bar is judged, not against a mel (see :meth:`Dataset.check_order`).

On disk (and as an artifact) a dataset is an ``.npz`` written by numpy and read with
``allow_pickle=False``; it holds ``format_version``, ``meta`` (the manifest, mel config and seed
as UTF-8 JSON in a uint8 array), ``mels``, ``chunk_file`` and, from format 2, ``check_chunks``
and ``check_audio`` (format 1 reads as a dataset without them). Nothing in it is pickled.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import zipfile
import zlib
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

from distill.shared.audio.io import (
    DecodedAudio,
    chunk_starts,
    cut_chunks,
    pad_to_length,
    prepare_audio,
    read_audio,
)
from distill.shared.audio.mel import MelConfig, log_mel_blocked
from distill.shared.errors import AudioError, ConfigError, DatasetError

FORMAT_VERSION = 2  # 2: the audio of the check chunks (1 still reads: none)
MIN_FILES_FOR_VALIDATION = 5  # below this every usable file trains: each one is precious
# A file holding more than this share of the chunks never validates: held out, it would take
# most of the sound from the codec (five one-shots and a long loop).
MAX_VAL_FILE_SHARE = 0.25
# Held-out files holding fewer chunks than this (about 4 s of sound: one-shots, up to ~30 of
# them at a tenth held out) validate nothing: every file trains. One or two one-shots unlike the
# rest left the RVQ-VAE's validation loss flat within 1-2% whatever it learnt, lowest at epoch
# 2-3; the codec kept was the one initialised from the data and early stopping ended the run.
# Spread percussion subsets, 3 minutes (bench figures, decoded audio over the Griffin-Lim floor):
# 10 files, one held out: training files 1.68x -> 1.10x, the held-out one 4.43x -> 1.27x (now
# trained on), 8 unseen files 4.58x -> 4.13x; 15 files, two held out: 1.68x -> 1.11x, 2.90x ->
# 1.07x, unseen 3.71x -> 3.90x. Keeping later epochs instead (within 2% of the lowest
# validation loss) kept epoch 7 (1.61x); a third of the learning rate left the rise. The prior
# folds such files into training too (distill.shared.train.prior, MIN_VALIDATION_STEPS).
MIN_VAL_CHUNKS = 4
_ARRAY_KEYS = frozenset({"format_version", "meta", "mels", "chunk_file"})
_CHECK_KEYS = frozenset({"check_chunks", "check_audio"})  # format 2 on
# The audio of this many chunks (at most) is kept, in the order of ``Dataset.check_order``: as
# many as the trainer's check may decode (its ``audio_chunks`` bound). int16 at 48 kHz, ~95 kB a
# chunk: 6 MB at most, 2.6 MB for 128 one-shots' 27 validation chunks (their mels are 11 MB).
MAX_CHECK_CHUNKS = 64
# While a dataset is built its split is not known yet, so the audio of each file's first chunks
# is held until it is: the check takes chunk 0 of every file, then chunk 1 of each, and so on.
CHECK_CHUNKS_PER_FILE = 4
ENV_MAX_DATASET_BYTES = "DISTILL_MAX_DATASET_BYTES"
# 4 GiB inflated: 500 files of 30 s at 128 mels are ~0.7 GB; the worker must hold it in memory.
DEFAULT_MAX_DATASET_BYTES = 4 * 1024**3
_HEADER_READERS = {
    (1, 0): np.lib.format.read_array_header_1_0,
    (2, 0): np.lib.format.read_array_header_2_0,
}

ProgressFn = Callable[[int, int, "ManifestRow"], None]


@dataclass(frozen=True)
class ManifestRow:
    """One input file, used or not. ``duration_s``/``sample_rate``/``channels`` describe the file
    as it was read (before trimming or resampling); they are 0 when it could not be decoded, and
    what its header states when it was refused for its length without decoding."""

    name: str
    sha256: str
    status: str  # "ok" | "skipped"
    reason: str | None  # why it was skipped; None when ok
    duration_s: float
    sample_rate: int
    channels: int
    chunks: int  # log-mel chunks this file contributed
    split: str | None  # "train" | "val" | None when skipped

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ManifestRow:
        names = {f.name for f in fields(cls)}
        if not isinstance(d, dict) or set(d) != names:
            raise DatasetError(f"manifest row has keys {sorted(d) if isinstance(d, dict) else d!r}")
        return cls(**d)


@dataclass
class Dataset:
    mel_config: MelConfig
    mels: np.ndarray  # (N, n_mels, chunk_frames) float32 log-mel chunks
    chunk_file: np.ndarray  # (N,) int32 index into manifest
    manifest: list[ManifestRow]
    seed: int
    # (C,) int64 chunk indices (into ``mels``) whose audio is kept, in check order, and that
    # audio: (C, chunk_samples) int16, the prepared (mono, resampled, normalised) sound the
    # chunk's log-mel was computed from. Empty for a dataset written before format 2.
    check_chunks: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    check_audio: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), dtype=np.int16))

    def __post_init__(self) -> None:
        _check_consistent(self)

    def _chunks_of_split(self, split: str) -> np.ndarray:
        in_split = np.array([row.split == split for row in self.manifest], dtype=bool)
        if len(self.chunk_file) == 0:
            return np.zeros(0, dtype=np.int64)
        return np.flatnonzero(in_split[self.chunk_file])

    def train_indices(self) -> np.ndarray:
        """Chunk indices (into ``mels``) of the files in the training split."""
        return self._chunks_of_split("train")

    def val_indices(self) -> np.ndarray:
        """Chunk indices (into ``mels``) of the files in the validation split."""
        return self._chunks_of_split("val")

    def files_in_split(self, split: str) -> list[ManifestRow]:
        return [row for row in self.manifest if row.split == split]

    def check_order(self) -> list[int]:
        """The chunks a decoded-audio check takes, first to last: those of the validation files
        (of the training files when none validate), the first chunk of every file, then the
        second of each, and so on, so that a few chunks come from as many sounds as there are."""
        indices = self.val_indices()
        if len(indices) == 0:
            indices = self.train_indices()
        rank: dict[int, int] = {}  # chunks of its file seen so far
        keyed = []
        for i in indices.tolist():
            f = int(self.chunk_file[i])
            keyed.append((rank.get(f, 0), i))
            rank[f] = rank.get(f, 0) + 1
        return [i for _, i in sorted(keyed)]

    def chunk_audio(self, indices: Sequence[int]) -> np.ndarray | None:
        """The kept audio of chunks ``indices`` as float32 (n, chunk_samples), or None unless
        every one of them has it."""
        where = {int(c): n for n, c in enumerate(self.check_chunks.tolist())}
        if not indices or any(int(i) not in where for i in indices):
            return None
        rows = self.check_audio[[where[int(i)] for i in indices]]
        return rows.astype(np.float32) / 32767.0

    def to_bytes(self) -> bytes:
        meta = {
            "mel_config": self.mel_config.to_dict(),
            "manifest": [asdict(row) for row in self.manifest],
            "seed": self.seed,
        }
        buf = io.BytesIO()
        np.savez(
            buf,
            format_version=np.array(FORMAT_VERSION, dtype=np.int64),
            meta=np.frombuffer(json.dumps(meta).encode("utf-8"), dtype=np.uint8),
            mels=np.ascontiguousarray(self.mels, dtype=np.float32),
            chunk_file=np.ascontiguousarray(self.chunk_file, dtype=np.int32),
            check_chunks=np.ascontiguousarray(self.check_chunks, dtype=np.int64),
            check_audio=np.ascontiguousarray(self.check_audio, dtype=np.int16),
        )
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, b: bytes) -> Dataset:
        """Load what :meth:`to_bytes` wrote; anything corrupt, truncated or newer is a DatasetError."""
        arrays = _read_npz(b)
        version = _read_version(arrays["format_version"])
        if version > FORMAT_VERSION:
            raise DatasetError(
                f"dataset format_version {version} is newer than this Distill reads "
                f"({FORMAT_VERSION}); upgrade Distill"
            )
        meta = _read_meta(arrays["meta"])
        try:
            cfg = MelConfig.from_dict(meta["mel_config"])
            manifest = [ManifestRow.from_dict(r) for r in meta["manifest"]]
            seed = int(meta["seed"])
        except (KeyError, TypeError, ValueError, ConfigError) as e:
            raise DatasetError(f"dataset metadata is invalid: {e}") from e
        mels, chunk_file = arrays["mels"], arrays["chunk_file"]
        if mels.dtype != np.float32 or chunk_file.dtype != np.int32:
            raise DatasetError(f"dataset arrays have dtypes {mels.dtype}, {chunk_file.dtype}")
        check: dict[str, np.ndarray] = {}
        if version >= 2:
            check = {"check_chunks": arrays["check_chunks"], "check_audio": arrays["check_audio"]}
            if check["check_chunks"].dtype != np.int64 or check["check_audio"].dtype != np.int16:
                raise DatasetError(f"dataset check arrays have dtypes "
                                   f"{check['check_chunks'].dtype}, {check['check_audio'].dtype}")  # fmt: skip
        return cls(mel_config=cfg, mels=mels, chunk_file=chunk_file, manifest=manifest, seed=seed,
                   **check)  # fmt: skip

    def save(self, path: str | Path) -> None:
        """Write atomically (temp file then rename), so a crash never leaves half a dataset."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(self.to_bytes())
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path) -> Dataset:
        try:
            data = Path(path).read_bytes()
        except OSError as e:
            raise DatasetError(f"cannot read dataset {path}: {e}") from e
        return cls.from_bytes(data)


# --- serialisation helpers -----------------------------------------------------------------------


def max_dataset_bytes() -> int:
    """The largest dataset inflated: ``$DISTILL_MAX_DATASET_BYTES``, else
    :data:`DEFAULT_MAX_DATASET_BYTES`."""
    raw = os.environ.get(ENV_MAX_DATASET_BYTES, "").strip()
    if not raw:
        return DEFAULT_MAX_DATASET_BYTES
    if not raw.isdigit():
        raise DatasetError(f"{ENV_MAX_DATASET_BYTES}={raw!r} is not a whole number of bytes")
    return int(raw)


def npy_header(f: IO[bytes]) -> tuple[tuple[int, ...], np.dtype]:
    """(shape, dtype) of the ``.npy`` array at ``f``'s position, from its header alone (nothing
    is allocated: what an archive from outside declares is checked before it is read);
    ValueError for an ``.npy`` version numpy's header readers do not know."""
    version = np.lib.format.read_magic(f)
    if version not in _HEADER_READERS:
        raise ValueError(f".npy {version}")
    shape, _, dtype = _HEADER_READERS[version](f)
    return tuple(shape), dtype


def _check_sizes(b: bytes, limit: int) -> None:
    """Refuse an archive whose arrays would inflate past ``limit`` bytes, before inflating.

    The zip directory declares each member's inflated size (zipfile never reads past it) and
    each ``.npy`` header declares its array's shape: both are checked, so neither a zip bomb
    nor a header that promises a huge array allocates anything.
    """
    try:
        with zipfile.ZipFile(io.BytesIO(b)) as archive:
            members = archive.infolist()
            total = sum(m.file_size for m in members)
            if total > limit:
                raise DatasetError(
                    f"dataset inflates to {total} bytes, over the limit of {limit} "
                    f"(setting {ENV_MAX_DATASET_BYTES})"
                )
            for member in members:
                with archive.open(member) as f:
                    try:
                        shape, dtype = npy_header(f)
                    except ValueError as e:
                        raise DatasetError(f"dataset array {member.filename}: {e}") from e
                declared = math.prod(shape) * dtype.itemsize
                if declared > member.file_size:
                    raise DatasetError(
                        f"dataset array {member.filename} declares {declared} bytes in "
                        f"{member.file_size}: corrupt"
                    )
    except zipfile.BadZipFile:
        return  # not a zip: _read_npz says what it is


def _read_npz(b: bytes) -> dict[str, np.ndarray]:
    try:
        _check_sizes(b, max_dataset_bytes())
        if not b.startswith((b"PK", b"\x93NUMPY")):  # numpy reads anything else as a pickle
            what = ("pickled objects, which are never loaded" if b[:1] == b"\x80"
                    else f"no .npz archive (it begins {b[:8]!r})")
            raise DatasetError(f"not a Distill dataset: it holds {what}")
        loaded = np.load(io.BytesIO(b), allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):  # a bare .npy array
            raise DatasetError("not a Distill dataset: a single array, not an .npz archive")
        with loaded as npz:
            keys = set(npz.files)
            if not keys >= _ARRAY_KEYS:
                raise DatasetError(f"not a Distill dataset: arrays {sorted(keys)}")
            if _CHECK_KEYS & keys and not keys >= _CHECK_KEYS:
                raise DatasetError(f"dataset arrays are incomplete: {sorted(keys)}")
            return {k: npz[k] for k in _ARRAY_KEYS | (_CHECK_KEYS & keys)}
    except DatasetError:
        raise
    except ValueError as e:
        if "pickle" in str(e):  # numpy's own advice (allow_pickle) must not reach a user
            raise DatasetError("not a Distill dataset: it holds pickled objects, which are "
                               "never loaded") from e
        raise DatasetError(f"dataset is corrupt or truncated: {type(e).__name__}: {e}") from e
    except (zipfile.BadZipFile, zlib.error, OSError, EOFError, KeyError,
            NotImplementedError, RuntimeError) as e:  # fmt: skip
        raise DatasetError(f"dataset is corrupt or truncated: {type(e).__name__}: {e}") from e


def _read_version(a: np.ndarray) -> int:
    if a.shape != () or a.dtype.kind not in "iu":
        raise DatasetError(f"dataset format_version is malformed ({a.dtype}{a.shape})")
    return int(a)


def _read_meta(a: np.ndarray) -> dict[str, Any]:
    if a.dtype != np.uint8 or a.ndim != 1:
        raise DatasetError(f"dataset metadata is malformed ({a.dtype}{a.shape})")
    try:
        meta = json.loads(a.tobytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DatasetError(f"dataset metadata is not valid JSON: {e}") from e
    if not isinstance(meta, dict):
        raise DatasetError("dataset metadata is not a JSON object")
    return meta


def _check_consistent(ds: Dataset) -> None:
    cfg = ds.mel_config
    want = (cfg.n_mels, cfg.chunk_frames)
    if ds.mels.ndim != 3 or ds.mels.shape[1:] != want:
        raise DatasetError(f"mels must be (N, {want[0]}, {want[1]}), got {ds.mels.shape}")
    if ds.chunk_file.shape != (ds.mels.shape[0],):
        raise DatasetError(f"chunk_file must be ({ds.mels.shape[0]},), got {ds.chunk_file.shape}")
    n_files = len(ds.manifest)
    if len(ds.chunk_file) and (ds.chunk_file.min() < 0 or ds.chunk_file.max() >= n_files):
        raise DatasetError(f"chunk_file indexes outside the manifest's {n_files} rows")
    counts = np.bincount(ds.chunk_file.astype(np.int64), minlength=n_files)
    for i, row in enumerate(ds.manifest):
        if row.chunks != counts[i]:
            raise DatasetError(
                f"manifest says {row.name} has {row.chunks} chunks, found {counts[i]}"
            )
    c = len(ds.check_chunks)
    if ds.check_chunks.ndim != 1 or (c and ds.check_audio.shape != (c, cfg.chunk_samples)) or (
            not c and ds.check_audio.size):  # fmt: skip
        raise DatasetError(f"check audio must be ({c}, {cfg.chunk_samples}), got "
                           f"{ds.check_audio.shape}")  # fmt: skip
    if c and (ds.check_chunks.min() < 0 or ds.check_chunks.max() >= len(ds.mels)
              or len(np.unique(ds.check_chunks)) != c):  # fmt: skip
        raise DatasetError(f"check_chunks must be distinct chunk indices below {len(ds.mels)}")


# --- building ------------------------------------------------------------------------------------


def _skipped(name: str, sha: str, reason: str, info: DecodedAudio | None = None) -> ManifestRow:
    return ManifestRow(
        name=name,
        sha256=sha,
        status="skipped",
        reason=reason,
        duration_s=info.duration_s if info else 0.0,
        sample_rate=info.sample_rate if info else 0,
        channels=info.channels if info else 0,
        chunks=0,
        split=None,
    )


def file_chunks(
    decoded: DecodedAudio, cfg: MelConfig, *, silence_threshold_db: float = -60.0
) -> np.ndarray:
    """One decoded file to its log-mel chunks ``(n, n_mels, chunk_frames)`` float32.

    Short files are padded with silence to one chunk; long files are cut into chunks that
    overlap by ``cfg.chunk_overlap``, the last one aligned to the end so no audio is lost.
    Raises AudioError when the file is unusable (silent, too short).
    """
    return _chunks_and_audio(decoded, cfg, silence_threshold_db, keep_audio=0)[0]


def _chunks_and_audio(
    decoded: DecodedAudio, cfg: MelConfig, silence_threshold_db: float, keep_audio: int
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`file_chunks`, and the prepared audio of its first ``keep_audio`` chunks as int16
    (k, chunk_samples): chunk j's log-mel is the frames from its start s, whose samples start at
    s x hop_length (centred frames), so that sound's centred STFT gives the same frames."""
    audio = prepare_audio(decoded, cfg.sample_rate, silence_threshold_db=silence_threshold_db)
    audio = pad_to_length(audio, cfg.chunk_samples)  # (samples,) with samples >= chunk_samples
    with torch.no_grad():  # in blocks: a 10-minute file's whole spectrogram was 0.7 GB more
        mel = log_mel_blocked(audio, cfg)  # (n_mels, frames), frames >= chunk_frames
    chunks = cut_chunks(mel, cfg.chunk_frames, cfg.chunk_hop_frames)  # (n, n_mels, chunk_frames)
    starts = chunk_starts(mel.shape[-1], cfg.chunk_frames, cfg.chunk_hop_frames)[:keep_audio]
    pcm = (audio.clamp(-1.0, 1.0) * 32767.0).round().to(torch.int16)  # (samples,)
    kept = [pcm[s * cfg.hop_length : s * cfg.hop_length + cfg.chunk_samples] for s in starts]
    held = (torch.stack(kept).numpy() if kept
            else np.zeros((0, cfg.chunk_samples), dtype=np.int16))  # fmt: skip
    return chunks.numpy().astype(np.float32, copy=False), held


def split_files(shas: Sequence[str], *, seed: int, val_fraction: float,
                chunks: Sequence[int] | None = None) -> list[str]:  # fmt: skip
    """Assign "train"/"val" to usable files, by file, seeded, independent of input order.

    With 5 or more files at least one (and about ``val_fraction`` of them) validates; with
    fewer, all train. At least one file always trains. A file holding more than
    MAX_VAL_FILE_SHARE of the ``chunks`` (each file's count) never validates: five kicks and
    a 15-s loop drew the loop (29 of 34 chunks), and the codec then trained on 5 chunks. Files
    drawn to validate that hold fewer than MIN_VAL_CHUNKS chunks in all train instead.
    """
    n = len(shas)
    n_val = 0 if n < MIN_FILES_FOR_VALIDATION else min(n - 1, max(1, round(n * val_fraction)))
    order = sorted(range(n), key=lambda i: shas[i])  # fixed order before the seeded shuffle
    perm = np.random.default_rng(seed).permutation(n)
    total = sum(chunks) if chunks is not None else 0
    drawn = [order[int(p)] for p in perm]
    if chunks is not None and total > 0:
        drawn = [i for i in drawn if chunks[i] <= MAX_VAL_FILE_SHARE * total]
    val = set(drawn[:n_val])
    if chunks is not None and sum(chunks[i] for i in val) < MIN_VAL_CHUNKS:
        val = set()  # a moment of a sound or two: they train
    return ["val" if i in val else "train" for i in range(n)]


def _check_build_args(seed: int, val_fraction: float) -> None:
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ConfigError(f"seed must be a non-negative integer, got {seed!r}")
    if not 0.0 < val_fraction < 1.0:
        raise ConfigError(f"val_fraction must be in (0, 1), got {val_fraction!r}")


def _reason(e: AudioError, name: str) -> str:
    """The error's reason without the file name it starts with (the row already names it)."""
    return str(e).removeprefix(f"{name}: ")


def _process_file(
    name: str, sha: str, data: bytes, cfg: MelConfig, silence_threshold_db: float
) -> tuple[ManifestRow, tuple[np.ndarray, np.ndarray] | None]:
    try:
        decoded = read_audio(data, name=name)
    except AudioError as e:  # refused from its header: what the header states still shows
        row = _skipped(name, sha, _reason(e, name))
        if e.stated is not None:
            seconds, rate, channels = e.stated
            row = replace(row, duration_s=seconds, sample_rate=rate, channels=channels)
        return row, None
    try:
        chunks, held = _chunks_and_audio(decoded, cfg, silence_threshold_db,
                                         keep_audio=CHECK_CHUNKS_PER_FILE)  # fmt: skip
    except AudioError as e:
        return _skipped(name, sha, _reason(e, name), decoded), None
    row = ManifestRow(
        name=name,
        sha256=sha,
        status="ok",
        reason=None,
        duration_s=decoded.duration_s,
        sample_rate=decoded.sample_rate,
        channels=decoded.channels,
        chunks=len(chunks),
        split=None,  # decided once every file is known
    )
    return row, (chunks, held)


def build_dataset(
    files: Sequence[tuple[str, bytes]],
    mel_config: MelConfig,
    *,
    seed: int = 0,
    val_fraction: float = 0.1,
    silence_threshold_db: float = -60.0,
    progress: ProgressFn | None = None,
) -> Dataset:
    """Decode, trim, resample, normalise and chunk every file; split by file; account for all.

    ``files`` is read once, in order, one item at a time (a lazy sequence keeps memory flat).
    ``progress(done, total, row)`` runs after each file. Raises DatasetError naming every file
    and its reason when no file is usable.
    """
    _check_build_args(seed, val_fraction)
    rows: list[ManifestRow] = []
    per_file: list[tuple[np.ndarray, np.ndarray] | None] = []  # (chunks, their first audio)
    first_by_sha: dict[str, int] = {}
    total = len(files)
    for i in range(total):
        name, data = files[i]
        sha = hashlib.sha256(data).hexdigest()
        if sha in first_by_sha:
            orig = rows[first_by_sha[sha]]
            row = replace(
                _skipped(name, sha, f"duplicate of {orig.name}"),
                duration_s=orig.duration_s,
                sample_rate=orig.sample_rate,
                channels=orig.channels,
            )
            chunks = None
        else:
            first_by_sha[sha] = i
            row, chunks = _process_file(name, sha, data, mel_config, silence_threshold_db)
        rows.append(row)
        per_file.append(chunks)
        if progress is not None:
            progress(i + 1, total, row)
    return _assemble(rows, per_file, mel_config, seed=seed, val_fraction=val_fraction)


def _assemble(
    rows: list[ManifestRow],
    per_file: list[tuple[np.ndarray, np.ndarray] | None],
    cfg: MelConfig,
    *,
    seed: int,
    val_fraction: float,
) -> Dataset:
    usable = [i for i, c in enumerate(per_file) if c is not None]
    if not usable:
        listing = "; ".join(f"{r.name}: {r.reason}" for r in rows) or "no files were given"
        raise DatasetError(f"no usable audio among {len(rows)} file(s): {listing}")
    splits = split_files([rows[i].sha256 for i in usable], seed=seed, val_fraction=val_fraction,
                         chunks=[len(per_file[i][0]) for i in usable])  # type: ignore[index]
    for i, split in zip(usable, splits, strict=True):
        rows[i] = replace(rows[i], split=split)
    chunk_arrays = [c[0] for c in per_file if c is not None]
    mels = np.concatenate(chunk_arrays, axis=0)  # (N, n_mels, chunk_frames)
    chunk_file = np.concatenate(
        [np.full(len(c), i, dtype=np.int32) for i, c in zip(usable, chunk_arrays, strict=True)]
    )  # (N,)
    dataset = Dataset(mel_config=cfg, mels=mels, chunk_file=chunk_file, manifest=rows, seed=seed)
    # the audio held of each chunk: (file's first chunk index + j) -> held audio row j
    held: dict[int, np.ndarray] = {}
    first = 0
    for c in per_file:
        if c is not None:
            held.update({first + j: row for j, row in enumerate(c[1])})
            first += len(c[0])
    kept = [i for i in dataset.check_order() if i in held][:MAX_CHECK_CHUNKS]
    if kept:
        dataset = replace(dataset, check_chunks=np.array(kept, dtype=np.int64),
                          check_audio=np.stack([held[i] for i in kept]))  # fmt: skip
    return dataset
