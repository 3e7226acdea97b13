"""Reading, preparing, chunking and writing audio (distill.shared.audio.io)."""

from __future__ import annotations

import io
import math
import re
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from distill.shared.audio.io import (
    chunk_starts,
    cut_chunks,
    load_audio,
    normalise,
    pad_to_length,
    peak_db,
    prepare_audio,
    read_audio,
    read_metadata,
    resample,
    scan_folder,
    to_mono,
    trim_silence,
    trim_tail,
    write_audio,
)
from distill.shared.errors import AudioError
from tests.conftest import percussion_dir

SR = 48000




def sine(freq: float, seconds: float, rate: int = SR, amp: float = 0.5) -> np.ndarray:
    t = np.arange(round(seconds * rate)) / rate
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def encode(
    audio: np.ndarray, rate: int = SR, fmt: str = "WAV", subtype: str | None = None
) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, audio, rate, format=fmt, subtype=subtype)
    return buf.getvalue()


def dominant_hz(audio: torch.Tensor, rate: int) -> float:
    spectrum = torch.fft.rfft(audio * torch.hann_window(len(audio))).abs()
    return float(spectrum.argmax()) * rate / len(audio)


# --- reading ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "subtype"),
    [
        ("WAV", "PCM_16"),
        ("WAV", "PCM_24"),
        ("WAV", "FLOAT"),
        ("FLAC", "PCM_24"),
        ("OGG", "VORBIS"),
        ("MP3", "MPEG_LAYER_III"),
        ("AIFF", "PCM_16"),
    ],
)
def test_every_format_reads_to_model_ready_mono(fmt: str, subtype: str) -> None:
    stereo = np.stack([sine(440, 0.5, 44100), sine(440, 0.5, 44100)], axis=1)  # (frames, 2)
    decoded = read_audio(encode(stereo, 44100, fmt, subtype), name=f"x.{fmt.lower()}")
    assert (decoded.sample_rate, decoded.channels, decoded.format) == (44100, 2, fmt)
    assert decoded.samples.dtype == np.float32 and decoded.samples.shape[0] == 2
    audio = prepare_audio(decoded, SR)
    assert audio.ndim == 1 and audio.dtype == torch.float32
    assert peak_db(audio) == pytest.approx(-1.0, abs=0.01)  # peak-normalised to -1 dBFS
    assert dominant_hz(audio, SR) == pytest.approx(440, abs=5)


def test_reads_from_a_path_too(tmp_path: Path) -> None:
    path = tmp_path / "tone.flac"
    sf.write(path, sine(1000, 0.25, 96000), 96000, subtype="PCM_24")
    decoded = read_audio(path)
    assert decoded.name == "tone.flac" and decoded.sample_rate == 96000
    assert decoded.duration_s == pytest.approx(0.25)


def test_real_percussion_files_at_every_rate_and_width() -> None:
    seen = set()
    for path in scan_folder(percussion_dir()):
        if path.suffix != ".flac":
            continue
        info = sf.info(path)
        key = (info.samplerate, info.channels, info.subtype)
        if key in seen:
            continue
        seen.add(key)
        audio = load_audio(path, SR)
        expected = info.frames * SR / info.samplerate
        assert 0 < len(audio) <= expected + 1, path.name  # trimmed, never longer
        assert torch.isfinite(audio).all()
    assert {44100, 96000, 192000} <= {rate for rate, _, _ in seen}
    assert {1, 2} <= {channels for _, channels, _ in seen}


def _bad_inputs() -> dict[str, tuple[bytes, str]]:
    tone = sine(440, 1.0)
    return {
        "empty": (b"", "empty file"),
        "text named .wav": (b"kick drum, take 3\n" * 40, "text file"),
        "random bytes": (np.random.default_rng(0).bytes(3000), "not an audio format"),
        "truncated wav": (encode(tone)[:40000], "truncated"),
        "truncated flac": (encode(tone, fmt="FLAC")[:20000], "truncated"),
        "truncated aiff": (encode(tone, fmt="AIFF")[:20000], "truncated"),
        "nan": (encode(np.array([0.1, np.nan] * 200, np.float32), subtype="FLOAT"), "NaN"),
        "inf": (encode(np.array([0.1, -np.inf] * 200, np.float32), subtype="FLOAT"), "infinite"),
        "rate too low": (encode(tone[:900], 900), "sample rate 900 Hz"),
        "rate too high": (encode(tone, 800_000), "sample rate 800000 Hz"),
        "one sample": (encode(tone[:1]), "too short"),
        "no samples": (encode(np.zeros(0, np.float32)), "no audio samples"),
    }


@pytest.mark.parametrize("case", list(_bad_inputs()))
def test_bad_input_raises_audio_error_naming_file_and_reason(case: str) -> None:
    data, reason = _bad_inputs()[case]
    with pytest.raises(AudioError, match=reason) as info:
        read_audio(data, name=case)
    assert str(info.value).startswith(f"{case}: ")


def test_all_silent_file_is_refused_at_the_threshold() -> None:
    silent = read_audio(encode(np.zeros(SR, np.float32)), name="silence.wav")
    with pytest.raises(AudioError, match="all silent"):
        prepare_audio(silent, SR)
    hiss = read_audio(encode(sine(1000, 0.5, amp=10 ** (-70 / 20))), name="hiss.wav")
    with pytest.raises(AudioError, match="all silent"):
        prepare_audio(hiss, SR, silence_threshold_db=-60)
    assert len(prepare_audio(hiss, SR, silence_threshold_db=-80)) > 0
    # loud channels that cancel in the mono mix are said as such, not "all silent"
    tone = sine(200, 0.5, amp=0.9)
    antiphase = read_audio(encode(np.stack([tone, -tone], axis=1)), name="antiphase.wav")
    with pytest.raises(AudioError, match="its channels cancel when mixed to mono"):
        prepare_audio(antiphase, SR)


def test_streaming_wav_with_placeholder_size_is_whole_not_truncated() -> None:
    data = bytearray(encode(sine(440, 0.1)))
    at = data.find(b"data")
    data[at + 4 : at + 8] = (0xFFFFFFFF).to_bytes(4, "little")
    assert read_audio(bytes(data)).frames == 4800


# --- preparing -------------------------------------------------------------------------------


def test_resample_keeps_pitch_and_duration() -> None:
    x = torch.from_numpy(sine(1000, 1.0, 44100))
    y = resample(x, 44100, SR)
    assert len(y) == SR
    assert dominant_hz(y, SR) == pytest.approx(1000, abs=2)
    assert resample(x, 44100, 44100) is x


def test_downmix_averages_channels() -> None:
    left = sine(300, 0.1)
    assert torch.allclose(to_mono(np.stack([left, left])), torch.from_numpy(left))
    assert to_mono(np.stack([left, -left])).abs().max() == 0  # phase-cancelled: silence
    cancelled = read_audio(encode(np.stack([left, -left], axis=1)), name="phase.wav")
    with pytest.raises(AudioError, match="phase.wav: its channels cancel when mixed to mono"):
        prepare_audio(cancelled, SR)


def test_trim_cuts_silence_and_keeps_margins() -> None:
    body = torch.from_numpy(sine(500, 0.2))
    x = torch.cat([torch.zeros(SR // 2), body, torch.zeros(SR)])
    y = trim_silence(x, SR, -60)
    # 5 ms kept before the onset (the sine's first sample is 0, its second is loud) and 10 ms
    # after the last loud sample
    assert len(body) <= len(y) <= len(body) + round(0.016 * SR)
    assert torch.equal(trim_silence(torch.zeros(100), SR), torch.zeros(100))


def _hit() -> np.ndarray:
    """0.2 s of a decaying 80-Hz hit with noise, then 2 s of digital silence."""
    t = np.arange(round(0.2 * SR)) / SR
    rng = np.random.default_rng(0)
    hit = 0.8 * np.sin(2 * np.pi * 80 * t) * np.exp(-t * 30) + 0.1 * rng.standard_normal(
        len(t)) * np.exp(-t * 60)  # fmt: skip
    return np.concatenate([hit, np.zeros(2 * SR)]).astype(np.float32)


def test_silence_at_a_dc_offset_is_trimmed_and_the_offset_removed() -> None:
    """Before: a DC offset defeated the trim (a 0.2-s hit and 2 s of silence at +0.05 was kept
    whole: 207 code steps, not 20), and a file of nothing but a constant counted as sound."""
    plain = _hit()
    want = prepare_audio(read_audio(encode(plain, subtype="FLOAT"), name="hit.wav"), SR)
    assert len(want) < 0.3 * SR
    for dc in (0.05, -0.3):
        decoded = read_audio(encode(plain + np.float32(dc), subtype="FLOAT"), name="dc.wav")
        trimmed = trim_silence(to_mono(decoded.samples), SR)
        assert abs(len(trimmed) - len(want)) <= 8, (dc, len(trimmed), len(want))  # ~0.2 ms
        got = prepare_audio(decoded, SR)  # the offset removed, then normalised: the same sound
        assert abs(len(got) - len(want)) <= 8 and abs(float(got.mean() - want.mean())) < 1e-4
        n = min(len(got), len(want))
        assert torch.allclose(got[:n], want[:n], atol=1e-4)
    for level in (0.5, -1.0):
        only = read_audio(encode(np.full(SR, level, np.float32), subtype="FLOAT"), name="dc.wav")
        with pytest.raises(AudioError, match=re.escape(
                f"dc.wav: all silent but for a constant offset (DC {level:+.3g})")):  # fmt: skip
            prepare_audio(only, SR)
    # an offset with only faint noise on it (-70 dBFS) is as silent as the noise alone
    hiss = np.full(SR, 0.25, np.float32) + sine(1000, 1.0, amp=10 ** (-70 / 20))
    with pytest.raises(AudioError, match="all silent but for a constant offset"):
        prepare_audio(read_audio(encode(hiss, subtype="FLOAT"), name="hiss.wav"), SR)


def test_an_offset_at_one_end_only_leaves_the_clean_end_as_it_was() -> None:
    """A clean lead-in, a hit, then silence at +0.05 (a converter's bias after the sound): the
    offset taken off the whole sound made the clean start begin at -0.05, the step to it (a
    click) that taking it off was meant to prevent. Along the line from end to end, both ends
    are at zero (within a thousandth), and no sample moves by more than the offset."""
    lead_in = np.zeros(round(0.1 * SR), np.float32)
    tail = np.full(SR, 0.05, np.float32)
    whole = np.concatenate([lead_in, _hit()[: round(0.2 * SR)], tail])
    decoded = read_audio(encode(whole, subtype="FLOAT"), name="x.wav")
    got = prepare_audio(decoded, SR, normalisation="none")
    kept = trim_silence(to_mono(decoded.samples), SR)  # the same cut, the offset still on
    assert len(got) == len(kept) < 0.25 * SR
    edge = round(0.002 * SR)  # the first and the last 2 ms
    # (the line rises 0.05 over the sound's ~10k samples: under 1e-3 in its first 2 ms)
    assert float(got[:edge].abs().max()) < 1e-3, "the clean start was moved (it began at -0.05)"
    assert float(got[-edge:].abs().max()) < 1e-3, "the offset end was left on"
    assert float((got - kept).abs().max()) <= 0.05 + 1e-6


def test_sounds_without_an_offset_are_prepared_as_before() -> None:
    """The offset is looked for at a file's still, loud edges only: no real sound's edge is one
    (sound swings), so every other file's samples and datasets stay what they were."""
    from distill.shared.audio.io import silence_offset

    for path in scan_folder(percussion_dir()):
        if path.suffix == ".flac":
            decoded = read_audio(path)
            mono = to_mono(decoded.samples)
            assert silence_offset(mono, decoded.sample_rate, 0.0) == 0.0, path.name
    loop = torch.from_numpy(sine(50, 1.0) + 0.2)  # a low tone at an offset, loud at both ends
    assert silence_offset(torch.from_numpy(_hit()), SR, 1e-6) == 0.0
    assert silence_offset(loop, SR, 1e-6) == 0.0 and torch.equal(trim_silence(loop, SR), loop)


def test_trim_threshold_is_configurable() -> None:
    loud = torch.from_numpy(sine(500, 0.2))
    tail = torch.from_numpy(sine(500, 0.5, amp=0.5 * 10 ** (-40 / 20)))  # 40 dB down
    x = torch.cat([loud, tail, torch.zeros(SR // 4)])
    assert len(trim_silence(x, SR, -30)) < len(loud) + SR // 50  # tail counts as silence
    assert len(trim_silence(x, SR, -60)) > len(loud) + len(tail) - SR // 50  # tail kept


def test_a_sound_ends_where_it_has_faded_for_good_with_a_fade_and_keeps_its_start() -> None:
    t = np.arange(SR) / SR  # 1 s: a hit decaying 200 dB a second, after a quiet lead-in
    hit = (0.8 * np.sin(2 * np.pi * 200 * t) * 10 ** (-200 * t / 20)).astype(np.float32)
    x = np.concatenate([np.full(SR // 10, 1e-6, np.float32), hit])  # 100 ms nearly silent first
    before = x.copy()
    loud = np.flatnonzero(np.abs(x) >= np.abs(x).max() * 10 ** (-40 / 20))[-1]
    y = trim_tail(x, SR, 40.0)
    margin = round(0.010 * SR)
    assert len(y) == loud + 1 + margin  # the last sample within 40 dB of the peak, then 10 ms
    assert 0.25 * SR < len(y) < 0.35 * SR  # 40 dB down: ~0.2 s into the hit, after 0.1 s
    assert np.array_equal(y[: loud + 1], x[: loud + 1])  # the start and the hit untouched
    assert y[-1] == 0.0 and np.all(np.abs(y[loud + 1 :]) <= np.abs(x[loud + 1 : len(y)]))  # faded
    assert len(trim_tail(x, SR, 80.0)) > len(y)  # further down the decay: more of it kept
    # a sound that rings to its end, or is silent, keeps its length; the input is never changed
    ring = np.sin(2 * np.pi * 200 * t).astype(np.float32)
    assert np.array_equal(trim_tail(ring, SR, 60.0), ring)
    assert np.array_equal(trim_tail(np.zeros(100, np.float32), SR, 60.0), np.zeros(100))
    assert np.array_equal(x, before)  # a new array: the sound given is left as it was
    with pytest.raises(ValueError, match="must be positive"):
        trim_tail(x, SR, -60.0)
    # nothing before ``keep`` is cut (a continuation's prime): the fade starts there at the earliest
    kept = trim_tail(x, SR, 40.0, keep=len(y) + SR // 10)
    assert len(kept) == len(y) + SR // 10 + margin
    assert np.array_equal(kept[: len(y) + SR // 10], x[: len(y) + SR // 10]) and kept[-1] == 0.0
    assert np.array_equal(trim_tail(x, SR, 40.0, keep=10), y)  # a keep inside the sound: no change


def test_normalise_peak_and_rms() -> None:
    x = torch.from_numpy(sine(200, 0.5, amp=0.1))
    assert peak_db(normalise(x, "peak")) == pytest.approx(-1.0, abs=1e-3)
    y = normalise(x, "rms", target_db=-20.0)
    rms_db = 20 * math.log10(float(y.pow(2).mean().sqrt()))
    assert rms_db == pytest.approx(-20.0, abs=0.01)
    spiky = torch.zeros(SR)
    spiky[100] = 0.5  # a click: RMS levelling would need +40 dB and clip it
    assert float(normalise(spiky, "rms", -20.0).abs().max()) <= 1.0
    assert torch.equal(normalise(x, "none"), x)


def test_short_file_is_kept_and_padded() -> None:
    decoded = read_audio(encode(sine(2000, 0.002)), name="tick.wav")  # 96 samples
    audio = prepare_audio(decoded, SR)
    assert 0 < len(audio) <= 96
    padded = pad_to_length(audio, 47616)
    assert len(padded) == 47616 and torch.equal(padded[: len(audio)], audio)


# --- chunking --------------------------------------------------------------------------------


@pytest.mark.parametrize(("total", "expected"), [(10, [0]), (94, [0]), (95, [0, 1]),
                                                 (200, [0, 47, 94, 106])])  # fmt: skip
def test_chunk_starts_cover_everything(total: int, expected: list[int]) -> None:
    starts = chunk_starts(total, 94, 47)
    assert starts == expected
    covered = set().union(*(range(s, s + 94) for s in starts))
    assert set(range(total)) <= covered


def test_cut_chunks_shapes_and_content() -> None:
    x = torch.arange(2 * 200, dtype=torch.float32).reshape(2, 200)  # (channels, T)
    chunks = cut_chunks(x, 94, 47)
    assert chunks.shape == (4, 2, 94)
    assert torch.equal(chunks[-1], x[:, -94:])  # the last chunk ends where the input ends
    short = cut_chunks(torch.ones(10), 94, 47)
    assert short.shape == (1, 94) and short[0, 10:].abs().sum() == 0


# --- folders and writing ---------------------------------------------------------------------


def test_scan_folder_lists_every_file_but_hidden_ones(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / ".git").mkdir()
    for rel in ["b.wav", "a.flac", "notes.txt", "sub/c.mp3", ".DS_Store", "._b.wav", ".git/x"]:
        (tmp_path / rel).write_bytes(b"x")
    names = [p.relative_to(tmp_path).as_posix() for p in scan_folder(tmp_path)]
    assert names == ["a.flac", "b.wav", "notes.txt", "sub/c.mp3"]
    with pytest.raises(AudioError, match="not a folder"):
        scan_folder(tmp_path / "missing")


def test_broken_links_are_found_for_the_person_to_hear_of(tmp_path: Path) -> None:
    """A link to a moved file is no file (scan_folder leaves it out); broken_links finds it,
    for upload_folder to name (tests/shared/cli/test_jobs.py)."""
    from distill.shared.audio.io import broken_links

    (tmp_path / "sub").mkdir()
    (tmp_path / "kick.wav").write_bytes(b"x")
    (tmp_path / "gone.flac").symlink_to(tmp_path / "nowhere.flac")
    (tmp_path / "sub" / "moved.wav").symlink_to("/nonexistent/moved.wav")
    (tmp_path / "ok.wav").symlink_to(tmp_path / "kick.wav")  # a link that works is a file
    (tmp_path / ".hidden.wav").symlink_to("/nonexistent/x")
    assert [p.relative_to(tmp_path).as_posix() for p in broken_links(tmp_path)] == [
        "gone.flac", "sub/moved.wav"]
    assert [p.name for p in scan_folder(tmp_path)] == ["kick.wav", "ok.wav"]


def test_any_rate_resamples_in_bounded_memory_and_nearly_exactly() -> None:
    """44101 Hz -> 48000 asked torchaudio for a kernel of 2.1e9 taps (17 GB; a request at that
    rate took the inference worker down). Every rate in range now fits RESAMPLE_MAX_TAPS, the
    ratio off by at most 2.5e-4, and the rates that fitted before are resampled as before."""
    from distill.shared.audio.io import RESAMPLE_MAX_TAPS, resample, resample_ratio

    for new in (48000, 44100, 22050, 16000):
        for orig in [*range(1000, 768_001, 997), 44101, 16008, 8001, 767_999]:
            got = resample_ratio(orig, new)
            assert got.numerator * got.denominator <= 1.01 * RESAMPLE_MAX_TAPS, (orig, new, got)
            assert abs(float(got) * orig / new - 1) <= 2.5e-4 + 1e-12, (orig, new, got)
    assert resample_ratio(44100, 48000) == Fraction(160, 147)  # exact where it fits
    assert resample_ratio(37800, 48000) == Fraction(80, 63)
    t = torch.arange(44101) / 44101
    y = resample(torch.sin(2 * math.pi * 1000 * t), 44101, 48000)
    assert abs(y.shape[-1] - 48000) <= 12
    assert abs(int(torch.fft.rfft(y).abs().argmax()) * 48000 / y.shape[-1] - 1000) < 2


@pytest.mark.parametrize("fmt", ["WAV", "FLAC"])
def test_write_audio_round_trips_with_metadata(fmt: str, tmp_path: Path) -> None:
    x = sine(440, 0.5)
    meta = {"title": "kick #7", "software": "distill 0.1", "comment": "model=ab12 seed=7 t=0.9"}
    buf = io.BytesIO()
    write_audio(buf, x, SR, fmt, meta)  # type: ignore[arg-type,unused-ignore]
    path = tmp_path / f"out.{fmt.lower()}"
    write_audio(path, torch.from_numpy(np.stack([x, x])), SR, fmt, meta)  # type: ignore[arg-type,unused-ignore]
    for source in (buf.getvalue(), path):
        got = read_metadata(source)
        assert got["title"] == meta["title"] and got["comment"] == meta["comment"]
        assert got["software"].startswith(meta["software"])  # libsndfile appends its version
    back = read_audio(buf.getvalue())
    assert np.abs(back.samples[0] - x).max() < 1e-5  # 24-bit
    assert read_audio(path).channels == 2


def test_write_audio_refuses_bad_input() -> None:
    with pytest.raises(AudioError, match="format"):
        write_audio(io.BytesIO(), sine(440, 0.1), SR, "MP3")  # type: ignore[arg-type,unused-ignore]
    with pytest.raises(AudioError, match="NaN"):
        write_audio(io.BytesIO(), np.array([0.0, np.nan], np.float32), SR)
    with pytest.raises(AudioError, match="metadata"):
        write_audio(io.BytesIO(), sine(440, 0.1), SR, metadata={"seed": "1"})


def test_a_header_promising_too_much_is_refused_before_decoding() -> None:
    data = bytearray(encode(sine(440, 0.1), fmt="FLAC"))
    # STREAMINFO (34 bytes after "fLaC" and a 4-byte block header) ends with a 36-bit sample
    # count followed by a 128-bit MD5: claim 2**36 - 1 samples
    info = int.from_bytes(data[8:42], "big")
    info |= ((1 << 36) - 1) << 128
    data[8:42] = info.to_bytes(34, "big")
    with pytest.raises(AudioError, match="too much to decode at once"):
        read_audio(bytes(data), name="huge.flac")


def test_many_channels_count_against_the_decoding_bound(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The bound was on seconds (and 2**30 samples): a 1-MB FLAC of 8 channels at 192 kHz for
    5 minutes took a worker to 4.2 GB. Every channel counts, and a file is decoded into one
    array (the blocks were kept, joined and transposed: three copies)."""
    import distill.shared.audio.io as io_module

    monkeypatch.setattr(io_module, "MAX_DECODED_SAMPLES", 100_000)
    rate, frames = 48_000, int(0.35 * 48_000)
    wide = np.random.default_rng(0).uniform(-0.5, 0.5, (frames, 8)).astype(np.float32)
    sf.write(tmp_path / "eight.flac", wide, rate, subtype="PCM_24")
    with pytest.raises(AudioError, match=r"eight.flac: too much to decode at once \(16800 frames x 8"):
        read_audio(tmp_path / "eight.flac", max_s=0.4)
    sf.write(tmp_path / "two.flac", wide[:, :2], rate, subtype="PCM_24")
    two = read_audio(tmp_path / "two.flac", max_s=0.4)
    expected, _ = sf.read(tmp_path / "two.flac", dtype="float32", always_2d=True)
    assert two.samples.flags.c_contiguous and np.array_equal(two.samples, expected.T)


# --- issue 9: bounded decoding ----------------------------------------------------------------


def _wav(path: Path, seconds: float, rate: int = 8000) -> Path:
    t = np.arange(int(seconds * rate)) / rate
    sf.write(path, (0.5 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), rate)
    return path


def test_a_file_past_the_length_limit_is_skipped_without_decoding_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before: any length was decoded whole into memory (up to 2^30 samples: 4 GiB)."""
    path = _wav(tmp_path / "long.wav", 3.0)

    def no_read(*a: object, **k: object) -> None:
        raise AssertionError("decoded a file its header says is too long")

    monkeypatch.setattr(sf.SoundFile, "read", no_read)
    with pytest.raises(AudioError, match="longer than 2 s.*DISTILL_MAX_AUDIO_S.*skipped"):
        read_audio(path, max_s=2.0)
    monkeypatch.setenv("DISTILL_MAX_AUDIO_S", "1.5")
    with pytest.raises(AudioError, match="longer than 1.5 s"):
        read_audio(path)


def test_long_files_within_the_limit_decode_by_blocks_to_the_same_samples(tmp_path: Path) -> None:
    path = _wav(tmp_path / "ok.wav", 25.0)  # three 10 s blocks
    decoded = read_audio(path, max_s=30.0)
    whole, _ = sf.read(path, dtype="float32", always_2d=True)
    np.testing.assert_array_equal(decoded.samples, whole.T)


def test_stated_duration_reads_the_header_only(tmp_path: Path) -> None:
    from distill.shared.audio.io import stated_duration_s

    path = _wav(tmp_path / "ok.wav", 3.0)
    assert stated_duration_s(path) == pytest.approx(3.0)
    (tmp_path / "notes.wav").write_text("not a sound")
    assert stated_duration_s(tmp_path / "notes.wav") is None  # read_audio says why
    assert stated_duration_s(tmp_path / "gone.wav") is None
    with pytest.raises(AudioError, match="longer than 2 s"):
        load_audio(path, 48000, max_s=2.0)
