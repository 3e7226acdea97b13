"""Export: WAV/FLAC without clipping, and metadata that survives the round trip."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from distill.shared.audio.export import (
    COMPRESSED_PREFIX,
    HEADROOM_DB,
    WAV_COMMENT_LIMIT,
    ExportError,
    ExportMetadata,
    export_audio,
    read_export_metadata,
)

SR = 48_000
META = ExportMetadata(
    kind="generate",
    model_id="ab" * 32,
    data={"seed": 7, "temperature": 0.9, "top_k": 0, "top_p": 0.95, "seconds": 1.0},
    title="drum 1",
)


def _tone(peak: float, channels: int = 1, n: int = 4800) -> np.ndarray:
    t = np.arange(n) / SR
    wave = peak * np.sin(2 * np.pi * 440.0 * t)
    return np.stack([wave] * channels) if channels > 1 else wave


@pytest.mark.parametrize(("suffix", "subtype", "tol"), [
    (".wav", "PCM_16", 2.0**-15), (".wav", "PCM_24", 2.0**-23), (".wav", "FLOAT", 1e-7),
    (".flac", "PCM_16", 2.0**-15), (".flac", "PCM_24", 2.0**-23),
])  # fmt: skip
def test_quiet_audio_is_written_unchanged(
    tmp_path: Path, suffix: str, subtype: str, tol: float
) -> None:
    audio = _tone(0.5, channels=2)
    report = export_audio(tmp_path / f"a{suffix}", audio, SR, subtype=subtype, metadata=META)  # type: ignore[arg-type]
    assert report.gain_db == 0.0 and report.peak == pytest.approx(0.5, abs=1e-6)
    assert (report.format, report.subtype, report.channels) == (suffix[1:].upper(), subtype, 2)
    back, sr = sf.read(report.path, dtype="float64", always_2d=True)
    assert sr == SR and back.shape == (4800, 2)
    assert np.abs(back.T - audio).max() <= tol
    assert read_export_metadata(report.path) == ExportMetadata(
        kind=META.kind,
        model_id=META.model_id,
        data=META.data,
        title=META.title,
        software=read_export_metadata(report.path).software,
    )
    assert read_export_metadata(report.path).software.startswith("distill ")


@pytest.mark.parametrize("subtype", ["PCM_16", "PCM_24", "FLOAT"])
def test_loud_audio_is_scaled_down_never_clipped(tmp_path: Path, subtype: str) -> None:
    audio = torch.from_numpy(_tone(3.0)).float()  # a tensor works as well as an array
    report = export_audio(tmp_path / "loud.wav", audio, SR, subtype=subtype, metadata=META)  # type: ignore[arg-type]
    ceiling = 10 ** (-HEADROOM_DB / 20)
    assert report.peak == pytest.approx(3.0, rel=1e-6)
    assert report.gain_db == pytest.approx(20 * np.log10(ceiling / 3.0), abs=1e-6)
    back, _ = sf.read(report.path, dtype="float64")
    assert np.abs(back).max() == pytest.approx(ceiling, abs=1e-4)
    # The shape survives: scaled, not clipped (a clipped sine would correlate less than 1).
    expected = audio.numpy() * ceiling / 3.0
    assert np.abs(back - expected).max() < 1e-4


def test_export_is_bit_identical_for_the_same_input(tmp_path: Path) -> None:
    a = export_audio(tmp_path / "a.flac", _tone(2.0), SR, metadata=META)
    b = export_audio(tmp_path / "b.flac", _tone(2.0), SR, metadata=META)
    assert sf.read(a.path)[0].tobytes() == sf.read(b.path)[0].tobytes()


@pytest.mark.parametrize(("suffix", "subtype"), [(".wav", "FLOAT"), (".wav", "PCM_24"),
                                                 (".flac", "PCM_24")])  # fmt: skip
def test_the_same_sound_exported_is_the_same_bytes(tmp_path: Path, suffix: str,
                                                    subtype: str) -> None:  # fmt: skip
    """libsndfile stamps a float WAV's PEAK chunk with the time it was written: two jobs that
    made the same sounds a second apart stored different files. The stamp is zeroed."""
    a = export_audio(tmp_path / f"a{suffix}", _tone(0.5, 2), SR, subtype=subtype, metadata=META)
    data = a.path.read_bytes()
    if subtype == "FLOAT":
        at = data.index(b"PEAK")
        assert data[at + 12 : at + 16] == bytes(4)  # after the id, the size and the version
    b = export_audio(tmp_path / f"b{suffix}", _tone(0.5, 2), SR, subtype=subtype, metadata=META)
    assert b.path.read_bytes() == data
    if subtype == "FLOAT":  # the samples as they were
        back = sf.read(a.path, always_2d=True, dtype="float32")[0].T
        assert np.array_equal(back, _tone(0.5, 2).astype(np.float32))
    assert read_export_metadata(a.path).data == META.data


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_audio_is_refused_naming_the_file(tmp_path: Path, bad: float) -> None:
    audio = _tone(0.5)
    audio[10] = bad
    with pytest.raises(ExportError, match=r"take3\.wav.*non-finite") as e:
        export_audio(tmp_path / "take3.wav", audio, SR, metadata=META)
    assert e.value.reason == "bad_audio"
    assert list(tmp_path.iterdir()) == []  # nothing written, no temporary left


@pytest.mark.parametrize(("name", "kwargs", "audio", "match"), [
    ("a.flac", {"subtype": "FLOAT"}, _tone(0.5), "FLAC holds integer"),
    ("a.mp3", {}, _tone(0.5), r"\.mp3"),
    ("a.wav", {"subtype": "PCM_8"}, _tone(0.5), "unknown subtype"),
    ("a.wav", {}, np.zeros((4800, 2)), "not \\(samples, channels\\)"),
    ("a.wav", {}, np.zeros(0), "at least one sample"),
    ("a.wav", {}, np.zeros((1, 2, 3)), "shape"),
    ("a.wav", {}, np.zeros(10, dtype=np.int16), "floating point"),
])  # fmt: skip
def test_bad_arguments_get_clear_errors(
    tmp_path: Path, name: str, kwargs: dict, audio: np.ndarray, match: str
) -> None:
    with pytest.raises(ExportError, match=match):
        export_audio(tmp_path / name, audio, SR, metadata=META, **kwargs)


def test_bad_sample_rate(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="sample rate"):
        export_audio(tmp_path / "a.wav", _tone(0.5), 0, metadata=META)


def _edit_history(n: int) -> dict:
    rng = np.random.default_rng(0)
    edits = [
        {
            "op": "set_cell",
            "level": int(rng.integers(4)),
            "t": int(rng.integers(400)),
            "code": int(rng.integers(512)),
            "before": int(rng.integers(512)),
        }
        for _ in range(n)
    ]
    return {"version": 1, "source": {"kind": "generate", "seed": 3}, "edits": edits}


@pytest.mark.parametrize(
    ("n_edits", "storage"), [(5, "plain"), (40, "compressed"), (2000, "chunk")]
)
def test_long_edit_history_round_trips_in_wav(tmp_path: Path, n_edits: int, storage: str) -> None:
    meta = ExportMetadata(kind="edit", model_id="cd" * 32, data=_edit_history(n_edits))
    report = export_audio(tmp_path / "edited.wav", _tone(0.5), SR, metadata=meta)
    assert report.comment_storage == storage
    with sf.SoundFile(report.path) as f:
        assert len(f.comment) <= WAV_COMMENT_LIMIT
        assert f.comment.startswith(COMPRESSED_PREFIX) == (storage == "compressed")
        assert f.frames == 4800  # the extra chunk leaves the audio readable
    back = read_export_metadata(report.path)
    assert back.data == meta.data and back.kind == "edit" and back.model_id == meta.model_id


def test_long_edit_history_round_trips_in_flac(tmp_path: Path) -> None:
    meta = ExportMetadata(kind="edit", model_id="cd" * 32, data=_edit_history(2000))
    report = export_audio(tmp_path / "edited.flac", _tone(0.5), SR, metadata=meta)
    assert report.comment_storage == "plain"
    assert read_export_metadata(report.path).data == meta.data


def test_file_without_distill_metadata(tmp_path: Path) -> None:
    sf.write(tmp_path / "plain.wav", _tone(0.5), SR)
    with sf.SoundFile(tmp_path / "other.flac", "w", SR, 1) as f:
        f.comment = "recorded on a sunny day"
        f.write(_tone(0.5))
    for name in ("plain.wav", "other.flac"):
        with pytest.raises(ExportError, match=f"{name}: has no Distill metadata") as e:
            read_export_metadata(tmp_path / name)
        assert e.value.reason == "no_metadata"


def _with_comment(path: Path, comment: str) -> Path:
    with sf.SoundFile(path, "w", SR, 1) as f:
        f.comment = comment
        f.write(_tone(0.5))
    return path


@pytest.mark.parametrize(("comment", "reason", "match"), [
    ('{"distill_export": 2, "kind": "generate", "model": "x", "data": {}}', "too_new",
     "newer than this Distill"),
    ('{"distill_export": "1", "kind": "generate", "model": "x", "data": {}}', "malformed",
     "bad version"),
    ('{"distill_export": 1, "kind": "generate", "model": "x"}', "malformed", "'data'"),
    ('{"distill_export": 1, "kind": 3, "model": "x", "data": {}}', "malformed", "'kind'"),
    (COMPRESSED_PREFIX + "not-base64!", "malformed", "corrupt"),
    ('{"distill_export": 1, "kind": "edit", "model": "x", "chunk": "dstl"}', "malformed",
     "chunk"),
])  # fmt: skip
def test_malformed_or_newer_metadata(tmp_path: Path, comment: str, reason: str, match: str) -> None:
    path = _with_comment(tmp_path / "x.wav", comment)
    with pytest.raises(ExportError, match=match) as e:
        read_export_metadata(path)
    assert e.value.reason == reason


def test_not_an_audio_file(tmp_path: Path) -> None:
    (tmp_path / "notes.wav").write_text("hello")
    with pytest.raises(ExportError, match="notes.wav: not a readable audio file") as e:
        read_export_metadata(tmp_path / "notes.wav")
    assert e.value.reason == "unreadable"
