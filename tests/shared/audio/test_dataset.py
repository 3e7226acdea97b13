"""Building, splitting and storing datasets (distill.shared.audio.dataset)."""

from __future__ import annotations

import dataclasses
import io
import json
import pickle
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from distill.shared.audio.dataset import (
    FORMAT_VERSION,
    MIN_VAL_CHUNKS,
    Dataset,
    ManifestRow,
    build_dataset,
    split_files,
)
from distill.shared.audio.io import scan_folder
from distill.shared.audio.mel import MelConfig, log_mel
from distill.shared.errors import ConfigError, DatasetError
from tests.conftest import percussion_dir

CFG = MelConfig()
SR = 48000




def read_folder(folder: Path) -> list[tuple[str, bytes]]:
    return [(p.relative_to(folder).as_posix(), p.read_bytes()) for p in scan_folder(folder)]


def wav(audio: np.ndarray, rate: int = SR, subtype: str | None = None) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, audio, rate, format="WAV", subtype=subtype)
    return buf.getvalue()


def tone(freq: float, seconds: float, rate: int = SR, decay: float = 3.0) -> np.ndarray:
    t = np.arange(round(seconds * rate)) / rate
    return (0.5 * np.sin(2 * np.pi * freq * t) * np.exp(-decay * t)).astype(np.float32)


def good_files(n: int, seconds: float = 0.3) -> list[tuple[str, bytes]]:
    return [(f"hit{i:02d}.wav", wav(tone(100.0 + 37 * i, seconds))) for i in range(n)]


@pytest.fixture(scope="module")
def percussion() -> Iterator[tuple[list[tuple[str, bytes]], Dataset]]:
    # One build for the module's tests; one torch thread because this 2-core box is shared
    # (two OpenMP threads fighting other processes ran many times slower than one).
    files = read_folder(percussion_dir())
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ds = build_dataset(files, CFG, seed=0)
    finally:
        torch.set_num_threads(before)
    yield files, ds


# --- the real folder -------------------------------------------------------------------------


@pytest.mark.slow  # builds the full percussion dataset
def test_percussion_folder_builds_and_accounts_for_every_file(
    percussion: tuple[list[tuple[str, bytes]], Dataset],
) -> None:
    files, ds = percussion
    assert [row.name for row in ds.manifest] == [name for name, _ in files]  # one row each
    ok = [r for r in ds.manifest if r.status == "ok"]
    skipped = {r.name: r.reason for r in ds.manifest if r.status == "skipped"}
    assert len(ok) == sum(name.endswith(".flac") for name, _ in files) == 128
    # the folder's notes are skipped by content, each with its reason (two are identical)
    assert set(skipped) == {"LICENSE_NOTE.txt", "README_SOURCE.md", "SOURCES_upstream_README.md"}
    assert all(
        "text file" in reason or reason.startswith("duplicate of ")
        for reason in skipped.values()
        if reason
    )
    assert all(r.chunks >= 1 and r.split in ("train", "val") for r in ok)
    assert ds.mels.shape == (sum(r.chunks for r in ok), 128, 94)
    assert ds.mels.dtype == np.float32 and np.isfinite(ds.mels).all()
    assert {r.sample_rate for r in ok} == {44100, 96000, 192000}


@pytest.mark.slow  # builds the full percussion dataset
def test_percussion_split_is_by_file(percussion: tuple[list[tuple[str, bytes]], Dataset]) -> None:
    _, ds = percussion
    train, val = ds.train_indices(), ds.val_indices()
    assert len(train) + len(val) == len(ds.mels) and not set(train) & set(val)
    train_files, val_files = set(ds.chunk_file[train]), set(ds.chunk_file[val])
    assert not train_files & val_files  # no file has chunks on both sides
    assert len(val_files) == round(128 * 0.1)
    assert all(ds.manifest[i].split == "val" for i in val_files)


@pytest.mark.slow  # builds the full percussion dataset
def test_percussion_round_trips_through_bytes_and_disk(
    percussion: tuple[list[tuple[str, bytes]], Dataset], tmp_path: Path
) -> None:
    _, ds = percussion
    for back in (Dataset.from_bytes(ds.to_bytes()), _saved_and_loaded(ds, tmp_path)):
        assert back.manifest == ds.manifest and back.mel_config == ds.mel_config
        assert back.seed == ds.seed
        assert np.array_equal(back.mels, ds.mels) and np.array_equal(back.chunk_file, ds.chunk_file)
        assert np.array_equal(back.val_indices(), ds.val_indices())


def _saved_and_loaded(ds: Dataset, tmp_path: Path) -> Dataset:
    path = tmp_path / "ds.npz"
    ds.save(path)
    return Dataset.load(path)


# --- bad files -------------------------------------------------------------------------------


def write_bad_folder(folder: Path) -> dict[str, str]:
    """Each kind of bad input, plus good files; returns file name -> expected reason."""
    hit = wav(tone(220, 0.5))
    bad = {
        "empty.wav": (b"", "empty file"),
        "truncated.wav": (wav(tone(220, 1.0))[:30000], "truncated"),
        "notes.wav": (b"this is not a sound\n" * 30, "text file"),
        "silent.wav": (wav(np.zeros(SR, np.float32)), "all silent"),
        "nan.wav": (wav(np.array([0.2, np.nan] * 500, np.float32), subtype="FLOAT"), "NaN"),
        "inf.wav": (wav(np.array([0.2, np.inf] * 500, np.float32), subtype="FLOAT"), "infinite"),
        "slow.wav": (wav(tone(50, 1.0, 500), 500), "sample rate 500 Hz"),
        "one.wav": (wav(np.array([0.5], np.float32)), "too short"),
        "hit_again.wav": (hit, "duplicate of hit.wav"),
    }
    (folder / "hit.wav").write_bytes(hit)
    (folder / "long.wav").write_bytes(wav(tone(330, 3.0, decay=0.0)))
    (folder / "tiny.wav").write_bytes(wav(tone(2000, 0.003)))  # 3 ms: padded, not dropped
    for name, (data, _) in bad.items():
        (folder / name).write_bytes(data)
    return {name: reason for name, (_, reason) in bad.items()}


def test_bad_files_are_listed_with_their_reasons(tmp_path: Path) -> None:
    expected = write_bad_folder(tmp_path)
    files = read_folder(tmp_path)
    seen: list[tuple[int, int, str]] = []
    ds = build_dataset(files, CFG, progress=lambda d, n, row: seen.append((d, n, row.name)))
    rows = {r.name: r for r in ds.manifest}
    assert len(rows) == len(files) == 12 and len(seen) == 12 and seen[-1][:2] == (12, 12)
    for name, reason in expected.items():
        assert rows[name].status == "skipped" and rows[name].split is None, name
        assert reason in (rows[name].reason or ""), (name, rows[name].reason)
        assert rows[name].chunks == 0
    assert rows["hit_again.wav"].duration_s == rows["hit.wav"].duration_s
    assert rows["silent.wav"].sample_rate == SR  # decoded before it was refused
    # as are NaN samples (their rows read 0.00 s, rate 0, channels 0 before)
    assert (rows["nan.wav"].duration_s, rows["nan.wav"].sample_rate, rows["nan.wav"].channels) == (
        1000 / SR, SR, 1)
    assert {n for n, r in rows.items() if r.status == "ok"} == {"hit.wav", "long.wav", "tiny.wav"}
    assert rows["tiny.wav"].chunks == 1
    # 3 s = 282 frames: chunks start at frames 0, 47, 94, 141 and 188 (which ends at 282)
    assert rows["long.wav"].chunks == 5
    assert len(ds.val_indices()) == 0  # 3 usable files: all train


def test_a_file_refused_for_its_length_shows_what_its_header_states(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Before: a file skipped for its length read 0.00 s, rate -, channels - in the manifest,
    though its length is what it was skipped for."""
    monkeypatch.setenv("DISTILL_MAX_AUDIO_S", "1")
    stereo = np.stack([tone(220, 2.5, 44100), tone(330, 2.5, 44100)], 1)  # (frames, 2)
    ds = build_dataset(good_files(1) + [("loop.wav", wav(stereo, 44100))], CFG)
    row = next(r for r in ds.manifest if r.name == "loop.wav")
    assert row.status == "skipped" and "longer than 1 s" in (row.reason or "")
    assert (row.duration_s, row.sample_rate, row.channels, row.chunks) == (2.5, 44100, 2, 0)


def test_no_usable_file_fails_naming_every_file(tmp_path: Path) -> None:
    expected = write_bad_folder(tmp_path)
    files = [(n, b) for n, b in read_folder(tmp_path) if n in expected and n != "hit_again.wav"]
    with pytest.raises(DatasetError) as info:
        build_dataset(files, CFG)
    message = str(info.value)
    for name, reason in expected.items():
        if name != "hit_again.wav":
            assert f"{name}: " in message and reason in message, name
    with pytest.raises(DatasetError, match="no files"):
        build_dataset([], CFG)


# --- chunks and split ------------------------------------------------------------------------


def test_short_and_long_files_chunk_as_documented() -> None:
    steady = wav(tone(440, 2.5, decay=0.0))
    ds = build_dataset([("short", wav(tone(440, 0.1))), ("long", steady)], CFG)
    short, long = ds.manifest
    assert short.chunks == 1 and long.chunks >= 4
    first_long = ds.mels[ds.chunk_file == 1]
    # chunks overlap by half: the second chunk starts where the first one's middle is
    assert np.allclose(first_long[0][:, 47:], first_long[1][:, :47], atol=1e-5)
    floor = np.log(CFG.log_floor)
    assert np.isclose(ds.mels[0][:, -5:], floor).all()  # the padded tail is silence


def test_split_is_seeded_order_independent_and_needs_five_files() -> None:
    files = good_files(12, seconds=2.5)  # 5 chunks each: enough to validate on
    a = build_dataset(files, CFG, seed=3)
    b = build_dataset(files[::-1], CFG, seed=3)
    val_a = {r.name for r in a.manifest if r.split == "val"}
    assert val_a == {r.name for r in b.manifest if r.split == "val"}
    assert len(val_a) == 1  # round(12 * 0.1)
    shas = [r.sha256 for r in a.manifest]
    several = {tuple(split_files(shas, seed=s, val_fraction=0.1)) for s in range(6)}
    assert len(several) > 1  # the seed matters
    assert len(build_dataset(files[:4], CFG).val_indices()) == 0
    assert len(build_dataset(files[:5], CFG).files_in_split("val")) == 1


def test_a_file_with_most_of_the_sound_never_validates() -> None:
    """Five short kicks and a long loop: the loop (29 of 34 chunks) was drawn for validation
    and the codec trained on 5 chunks. Without such a file the draw is as before."""
    shas = [f"{i:064x}" for i in range(6)]
    for seed in range(20):
        split = split_files(shas, seed=seed, val_fraction=0.1, chunks=[4, 4, 4, 4, 4, 80])
        assert split[5] == "train" and split.count("val") == 1
        even = split_files(shas, seed=seed, val_fraction=0.1, chunks=[4] * 6)
        assert even == split_files(shas, seed=seed, val_fraction=0.1)
    assert "val" in {split_files(shas, seed=s, val_fraction=0.1)[5] for s in range(20)}


def test_held_out_files_with_too_little_sound_train_instead() -> None:
    """One-shots: the one or two files a small set holds out (a second of sound each) left the
    codec's validation loss flat, and the codec kept was the one before training; they train."""
    shas = [f"{i:064x}" for i in range(20)]  # 2 of 20 drawn to validate
    for seed in range(10):
        assert split_files(shas, seed=seed, val_fraction=0.1, chunks=[1] * 20) == ["train"] * 20
        drawn = split_files(shas, seed=seed, val_fraction=0.1)
        assert split_files(shas, seed=seed, val_fraction=0.1, chunks=[2] * 20) == drawn
        assert drawn.count("val") == 2  # 2 + 2 chunks: MIN_VAL_CHUNKS
    hits = good_files(10)  # 0.3 s each: one chunk
    assert not build_dataset(hits, CFG, seed=0).files_in_split("val")
    longer = build_dataset(good_files(10, seconds=2.5), CFG, seed=0)  # 5 chunks each
    assert len(longer.files_in_split("val")) == 1 and len(longer.val_indices()) >= MIN_VAL_CHUNKS


def test_split_files_bounds() -> None:
    shas = [f"{i:064x}" for i in range(10)]
    assert split_files(shas[:4], seed=0, val_fraction=0.5) == ["train"] * 4
    big = split_files(shas, seed=0, val_fraction=0.9)
    assert big.count("train") == 1  # at least one file always trains
    with pytest.raises(ConfigError):
        build_dataset(good_files(1), CFG, val_fraction=0.0)
    with pytest.raises(ConfigError):
        build_dataset(good_files(1), CFG, seed=-1)


def test_other_mel_configs_shape_the_chunks() -> None:
    cfg = MelConfig(sample_rate=22050, n_fft=1024, hop_length=256, n_mels=64, chunk_frames=32)
    ds = build_dataset(good_files(2, seconds=0.5), cfg)
    assert ds.mels.shape[1:] == (64, 32)
    assert Dataset.from_bytes(ds.to_bytes()).mel_config == cfg


# --- storage errors --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small() -> Dataset:
    return build_dataset(good_files(3), CFG)


def _npz(**arrays: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)  # type: ignore[arg-type,unused-ignore]
    return buf.getvalue()


def _arrays_of(ds: Dataset) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(ds.to_bytes())) as npz:
        return {k: npz[k] for k in npz.files}


def test_corrupt_truncated_or_foreign_bytes_raise(small: Dataset) -> None:
    good = small.to_bytes()
    for bad in [b"", b"not a zip", good[: len(good) // 2], good[:-10], b"PK\x03\x04" + good[4:100]]:
        with pytest.raises(DatasetError):
            Dataset.from_bytes(bad)
    with pytest.raises(DatasetError, match="not a Distill dataset"):
        Dataset.from_bytes(_npz(x=np.zeros(3)))
    bare = io.BytesIO()
    np.save(bare, np.zeros(3))
    with pytest.raises(DatasetError, match="not a Distill dataset"):
        Dataset.from_bytes(bare.getvalue())
    # bytes that are no archive: said so (numpy's reading called them pickled objects)
    with pytest.raises(DatasetError, match=r"holds no .npz archive \(it begins b'not a mo'\)"):
        Dataset.from_bytes(b"not a model")
    with pytest.raises(DatasetError, match="pickled objects"):
        Dataset.from_bytes(pickle.dumps({"a": 1}))
    flipped = bytearray(good)
    flipped[len(flipped) // 2] ^= 0xFF  # zip CRC catches a flipped byte in an array
    with pytest.raises(DatasetError):
        Dataset.from_bytes(bytes(flipped))


def test_newer_version_is_refused(small: Dataset) -> None:
    arrays = _arrays_of(small)
    arrays["format_version"] = np.array(FORMAT_VERSION + 1)
    with pytest.raises(DatasetError, match="newer"):
        Dataset.from_bytes(_npz(**arrays))


def test_pickled_or_inconsistent_contents_are_refused(small: Dataset, tmp_path: Path) -> None:
    arrays = _arrays_of(small)
    with pytest.raises(DatasetError):  # an object array would need pickle: never loaded
        Dataset.from_bytes(_npz(**{**arrays, "meta": np.array([{"a": 1}], dtype=object)}))
    meta = json.loads(arrays["meta"].tobytes())
    meta["manifest"][0]["chunks"] += 1
    bad_meta = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    with pytest.raises(DatasetError, match="chunks"):
        Dataset.from_bytes(_npz(**{**arrays, "meta": bad_meta}))
    meta["manifest"][0]["unexpected"] = 1
    bad_meta = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    with pytest.raises(DatasetError):
        Dataset.from_bytes(_npz(**{**arrays, "meta": bad_meta}))
    with pytest.raises(DatasetError):
        Dataset.from_bytes(_npz(**{**arrays, "chunk_file": arrays["chunk_file"] + 99}))
    with pytest.raises(DatasetError, match="cannot read"):
        Dataset.load(tmp_path / "missing.npz")
    assert zipfile.is_zipfile(io.BytesIO(small.to_bytes()))


# --- the check chunks' audio -----------------------------------------------------------------


def test_the_check_chunks_keep_their_sound(small: Dataset) -> None:
    # Three files, none held out: the check takes the training files' first chunks, then their
    # second ones, and keeps the prepared audio each chunk's log-mel was computed from.
    order = small.check_order()
    firsts = [int(np.flatnonzero(small.chunk_file == f)[0]) for f in np.unique(small.chunk_file)]
    assert order[: len(firsts)] == firsts and sorted(order) == list(range(len(small.mels)))
    assert small.check_chunks.tolist() == [i for i in order if i in set(small.check_chunks.tolist())]
    audio = small.chunk_audio(small.check_chunks.tolist())
    assert audio is not None and audio.shape == (len(small.check_chunks), CFG.chunk_samples)
    remade = np.exp(log_mel(torch.from_numpy(audio), CFG).numpy()[..., 2:-2])  # (C, M, T-4)
    kept = np.exp(small.mels[small.check_chunks][..., 2:-2])
    # the same frames in magnitude, bar int16 rounding (and the edges, cut off here)
    assert np.linalg.norm(remade - kept) < 1e-3 * np.linalg.norm(kept)
    assert small.chunk_audio([*small.check_chunks.tolist(), 10_000]) is None  # one not kept
    back = Dataset.from_bytes(small.to_bytes())
    assert np.array_equal(back.check_audio, small.check_audio)
    assert np.array_equal(back.check_chunks, small.check_chunks)


def test_a_format_1_dataset_reads_without_check_audio(small: Dataset) -> None:
    arrays = _arrays_of(small)
    older = {k: v for k, v in arrays.items() if not k.startswith("check_")}
    back = Dataset.from_bytes(_npz(**{**older, "format_version": np.array(1)}))
    assert len(back.check_chunks) == 0 and back.chunk_audio(back.check_order()[:1]) is None
    assert np.array_equal(back.mels, small.mels)


def test_bad_check_arrays_are_refused(small: Dataset) -> None:
    arrays = _arrays_of(small)
    with pytest.raises(DatasetError, match="incomplete"):
        Dataset.from_bytes(_npz(**{k: v for k, v in arrays.items() if k != "check_audio"}))
    with pytest.raises(DatasetError, match="check audio must be"):
        Dataset.from_bytes(_npz(**{**arrays, "check_audio": arrays["check_audio"][:, :100]}))
    with pytest.raises(DatasetError, match="check_chunks must be"):
        Dataset.from_bytes(_npz(**{**arrays, "check_chunks": arrays["check_chunks"] + 10_000}))
    with pytest.raises(DatasetError, match="dtypes"):
        Dataset.from_bytes(_npz(**{**arrays,
                                   "check_audio": arrays["check_audio"].astype(np.float32)}))


def test_manifest_rows_are_frozen(small: Dataset) -> None:
    row: ManifestRow = small.manifest[0]
    with pytest.raises(dataclasses.FrozenInstanceError):
        row.status = "skipped"  # type: ignore[misc,unused-ignore]


# --- issue 9: size check before inflating ----------------------------------------------------


def _bomb(inflated_bytes: int) -> bytes:
    """A deflated .npz whose mels array inflates to ``inflated_bytes`` of zeros."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for name, arr in (("format_version", np.array(1, dtype=np.int64)),
                          ("meta", np.frombuffer(b"{}", dtype=np.uint8)),
                          ("chunk_file", np.zeros(1, dtype=np.int32))):
            with z.open(f"{name}.npy", "w") as f:
                np.lib.format.write_array(f, arr)
        with z.open("mels.npy", "w", force_zip64=True) as f:
            header = {"descr": "<f4", "fortran_order": False, "shape": (inflated_bytes // 4,)}
            np.lib.format.write_array_header_1_0(f, header)
            zeros = bytes(1 << 20)
            for _ in range(inflated_bytes // len(zeros)):
                f.write(zeros)
    return buf.getvalue()


def test_a_dataset_that_inflates_past_the_limit_is_refused_before_inflating(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Before: np.load inflated every array whatever its size (a 64 MB zip bomb of a few
    hundred KB here; the same shape at 100 GB would take the worker's memory)."""
    data = _bomb(64 << 20)
    assert len(data) < 1 << 20
    monkeypatch.setenv("DISTILL_MAX_DATASET_BYTES", str(16 << 20))
    with pytest.raises(DatasetError, match="over the limit of 16777216.*DISTILL_MAX_DATASET_BYTES"):
        Dataset.from_bytes(data)


def test_an_array_header_that_promises_more_than_its_member_holds_is_corrupt() -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z, z.open("mels.npy", "w") as f:
        np.lib.format.write_array_header_1_0(
            f, {"descr": "<f4", "fortran_order": False, "shape": (10**12,)})
        f.write(b"\0" * 16)
    with pytest.raises(DatasetError, match="declares 4000000000000 bytes"):
        Dataset.from_bytes(buf.getvalue())


def test_an_archive_of_pickled_objects_is_no_dataset_and_the_error_never_suggests_pickle() -> None:
    """Before: numpy's own advice reached the user ("you can load it unsafely using the
    allow_pickle= keyword"), inviting them to turn pickle on for a file they were given."""
    import io as _io

    buf = _io.BytesIO()
    np.savez(buf, format_version=np.array(1), meta=np.array([{"a": 1}], dtype=object),
             mels=np.zeros(3), chunk_file=np.zeros(3))  # fmt: skip
    with pytest.raises(DatasetError) as info:
        Dataset.from_bytes(buf.getvalue())
    assert "pickle" in str(info.value) and "allow_pickle" not in str(info.value)
    assert "never loaded" in str(info.value)
