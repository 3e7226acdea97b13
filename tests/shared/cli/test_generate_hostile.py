"""regenerate, decode, resample and --continue given files from someone else: recipes that ask
for hours of work, codes files that inflate to gigabytes or are not grids, strings that are
terminal escapes, originals in formats Distill does not write. Each file is built here, small;
each case failed (a traceback, a wrong or nameless error, or no note) before."""

from __future__ import annotations

import io
import tracemalloc
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
from numpy.lib import format as npf

from distill.shared.audio.export import ExportMetadata, export_audio, read_export_metadata
from distill.shared.model import inference
from tests.shared.cli.test_generate import _refused, _tone, app, model_file, run, runner
from tests.workers.test_infer import Q

__all__ = ["model_file"]  # the fixture, used by name
ESC = "\x1b[2J\x1b[H\x1b]8;;http://evil.example/\x07X\x1b]8;;\x07"


def _made(model_file: Path, tmp_path: Path, *args: str) -> Path:
    """A sound `distill generate` made (0.3 s, preview)."""
    out = tmp_path / "made"
    run("generate", model_file, "-n", "1", "--seconds", "0.3", "--quality", "preview", "-o", out,
        *args)  # fmt: skip
    return next(out.glob("*.wav"))


def _crafted(made: Path, path: Path, kind: str | None = None, model: str | None = None,
             **data: Any) -> Path:  # fmt: skip
    """``made``'s samples at ``path`` with its recipe changed (``data`` merged into it)."""
    meta = read_export_metadata(made)
    audio, rate = sf.read(made, dtype="float32")
    export_audio(path, audio, rate, subtype="FLOAT", metadata=ExportMetadata(
        kind=kind or meta.kind, model_id=model or meta.model_id, data={**meta.data, **data}))  # fmt: skip
    return path


# --- 4: recipes that ask for hours of work --------------------------------------------------------


def test_more_phase_iterations_than_distill_ever_recorded_are_refused_before_any_work(
    model_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before: 10 000 iterations (recorded_phase takes up to 10 000) kept regenerate running
    ~20 minutes a reading of a 60-s sound."""
    made = _made(model_file, tmp_path)
    monkeypatch.setattr(inference, "replay", lambda *a: pytest.fail("replayed"))
    for phase in ([33, "vocoder"], [10_000, "random"]):
        bad = _crafted(made, tmp_path / "long.wav", phase=phase)
        output = _refused("regenerate", bad, "--model", model_file, "-o", tmp_path / "x.wav")
        assert (f"long.wav: its recipe asks for {phase[0]} phase iterations; no Distill ever "
                "recorded more than 32 (the 'best' preset)") in output, output


def test_a_long_replay_says_what_it_does_before_it_starts(
    model_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A recipe of `generate -n 256 --seconds 60` is replayed (never refused), and says so first:
    before, it ran for over 10 minutes with no output."""
    made = _made(model_file, tmp_path)
    big = _crafted(made, tmp_path / "big.wav", count=256, seconds=60.0, index=3)
    said: list[str] = []

    def replay(model: Any, kind: str, data: Any, on_batch: Any = None) -> np.ndarray:  # the file's own samples
        said.append(kind)
        assert (data["count"], data["seconds"]) == (256, 60.0)
        return sf.read(big, dtype="float32")[0]

    monkeypatch.setattr(inference, "replay", replay)
    lines = run("regenerate", big, "--model", model_file).splitlines()
    assert lines[0] == ("replaying 256 sounds of 60 s to make sound 3 (its batch draws them "
                        "together): this takes a while")  # fmt: skip
    assert "identical to big.wav" in lines[-1] and said == ["generate"]
    monkeypatch.undo()
    small = run("regenerate", made, "--model", model_file, "-o", tmp_path / "again.wav")
    assert "replaying" not in small  # a short replay says nothing more


# --- 7 and 8: codes files ---------------------------------------------------------------------


def _npz(path: Path, shape: tuple[int, ...], stored: int | None = None, model_id: str = "",
         dtype: str = "<i8") -> Path:  # fmt: skip
    """A codes .npz whose codes.npy header states ``shape`` and holds ``stored`` zero bytes
    (default: all of them), deflated."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as z:
        with z.open("codes.npy", "w", force_zip64=True) as f:
            npf.write_array_header_1_0(f, {"descr": dtype, "fortran_order": False, "shape": shape})
            left = int(np.prod(shape)) * np.dtype(dtype).itemsize if stored is None else stored
            while left > 0:
                f.write(bytes(min(left, 1 << 22)))
                left -= 1 << 22
        if model_id:
            buffer = io.BytesIO()
            np.save(buffer, np.array(model_id))
            z.writestr("model_id.npy", buffer.getvalue())
    return path


def test_a_codes_file_is_checked_from_its_headers_before_it_is_read(
    model_file: Path, tmp_path: Path
) -> None:
    """Before: a 2.5-MB .npz inflated to 3.2 GB before any check (then: "codes has 16 levels",
    no file named); one whose header claimed 30 GB ended in numpy's MemoryError traceback."""
    most = inference.steps_for(inference_model(model_file), inference.MAX_SECONDS)
    claims = _npz(tmp_path / "claims.npz", (Q, 2**40), stored=800)
    output = _refused("decode", claims, "--model", model_file, "-o", tmp_path / "x.wav")
    assert (f"claims.npz: codes are {Q} x {2**40}; this model takes {Q} x at most {most} "
            "(60 s)") in output, output
    bomb = _npz(tmp_path / "bomb.npz", (Q, 2_000_000))  # 48 MB inflated, ~50 kB on disk
    assert bomb.stat().st_size < 200_000
    tracemalloc.start()
    try:
        output = _refused("decode", bomb, "--model", model_file, "-o", tmp_path / "x.wav")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert f"bomb.npz: codes are {Q} x 2000000" in output and peak < 16 << 20, (output, peak)
    # another model's codes are refused for that first, before they are read
    other = _npz(tmp_path / "other.npz", (Q, 2**40), stored=800, model_id="f" * 64)
    output = _refused("decode", other, "--model", model_file, "-o", tmp_path / "x.wav")
    assert "other.npz was encoded with model ffffffffffff" in output


def inference_model(model_file: Path) -> Any:
    from distill.shared.model.modelfile import load_model

    return load_model(model_file)


@pytest.mark.parametrize(("codes", "got"), [(np.arange(10), "shape (10,)"),
                                            (np.int64(3), "shape ()")])  # fmt: skip
def test_resample_and_continue_refuse_codes_that_are_not_a_grid(
    model_file: Path, tmp_path: Path, codes: Any, got: str
) -> None:
    """Before: IndexError: tuple index out of range (codes.shape[1])."""
    path = tmp_path / "flat.npz"
    np.savez(path, codes=codes, codebook_size=np.int64(16))
    for args in (["resample", path, "--model", model_file, "--from", "0", "-n", "1"],
                 ["generate", model_file, "--continue", path, "-n", "1", "--seconds", "0.2"]):  # fmt: skip
        output = _refused(*args, "-o", tmp_path / "o")
        assert f"flat.npz: codes must be an integer grid (levels, steps), got {got}" in output
    assert not (tmp_path / "o").exists()


# --- 14: strings from files reach the terminal escaped ------------------------------------------


def test_strings_from_files_are_shown_escaped(model_file: Path, tmp_path: Path) -> None:
    """Before: a file's name reached the terminal raw in regenerate's verdict, resample's and
    --continue's file lines and notes, and a recipe's kind or model id and a codes file's model
    id in error lines: an ESC sequence in one cleared the screen or planted a link."""
    bad = "bad_\x1b[2J\x1b[31mRED"  # a name holds no "/"
    made = _made(model_file, tmp_path)
    renamed = tmp_path / f"{bad}.wav"
    renamed.write_bytes(made.read_bytes())
    tone = _tone(tmp_path / f"{bad}-tone.wav")
    codes = tmp_path / "c.npz"
    np.savez(codes, codes=np.zeros((Q, 5), dtype=np.int64), model_id=np.array(ESC))
    o = str(tmp_path / "o")
    cases = [  # (arguments, what the line says)
        (["regenerate", renamed, "-o", tmp_path / "again.wav"], "identical to bad_"),
        (["resample", tone, "--from", "0.5", "--to", "9", "-n", "1", "--quality", "preview",
          "-o", o], "region runs to the end"),
        (["generate", model_file, "--continue", tone, "--from", "9", "--seconds", "0.2", "-n",
          "1", "--quality", "preview", "-o", o], "the whole sound is kept"),
        (["regenerate", _crafted(made, tmp_path / "kind.wav", kind=ESC)], "cannot regenerate a '"),
        (["regenerate", _crafted(made, tmp_path / "model.wav", model=ESC)], "was made by model"),
        (["decode", codes], "was encoded with model"),
    ]  # fmt: skip
    for args, says in cases:
        model = [] if args[0] == "generate" else ["--model", str(model_file)]
        out = [] if "-o" in args else ["-o", str(tmp_path / "x.wav")]
        result = runner.invoke(app, [str(a) for a in args] + model + out, color=True)
        assert says in result.output, result.output
        assert "\x1b[2J" not in result.output and "\x1b]8" not in result.output, result.output
        assert "\\x1b[2J" in result.output, result.output


def test_encode_and_decode_show_the_names_they_print_escaped(model_file: Path, tmp_path: Path) -> None:
    """Before: `encode` and `decode` printed the file they wrote raw (the rest of the CLI
    escapes names): a name holding ESC sequences cleared the screen."""
    bad = "bad_\x1b[2J\x1b[31mRED"
    tone = _tone(tmp_path / f"{bad}.wav")
    for args in (["encode", tone, "-o", tmp_path / f"{bad}.npz", "--search", "0"],
                 ["decode", tmp_path / f"{bad}.npz", "-o", tmp_path / f"{bad}-out.wav",
                  "--quality", "preview"]):  # fmt: skip
        result = runner.invoke(app, [str(a) for a in args] + ["--model", str(model_file)])
        assert result.exit_code == 0, result.output
        assert "\x1b" not in result.output and "bad_\\x1b[2J\\x1b[31mRED" in result.output, result.output


def test_inputs_that_are_no_file_to_read_are_refused_alike(model_file: Path, tmp_path: Path) -> None:
    """Before: regenerate said "not a readable audio file: ... System error." for a missing
    file or a dangling link, "Format not recognised" for a folder or an empty file (encode:
    "no such file", "empty file (0 bytes)"), and read a FIFO forever. encode given a codes
    file said it was no audio format."""
    import os

    (tmp_path / "gone.wav").symlink_to(tmp_path / "nothing.wav")
    (tmp_path / "zero.wav").write_bytes(b"")
    (tmp_path / "dir.wav").mkdir()
    os.mkfifo(tmp_path / "fifo.wav")
    np.savez(tmp_path / "c.npz", codes=np.zeros((Q, 5), dtype=np.int64))
    cases = [("gone.wav", "a link to nothing"), ("missing.wav", "no such file"),
             ("zero.wav", "empty file (0 bytes)"), ("dir.wav", "that is a folder, not a file"),
             ("fifo.wav", "not a regular file (a pipe, a device or a socket)")]  # fmt: skip
    for command in ("regenerate", "encode"):
        for name, says in cases:
            output = _refused(command, tmp_path / name, "--model", model_file, "-o",
                              tmp_path / "out")  # fmt: skip
            assert f"FILE {tmp_path / name}: {says}" in output, output
    output = _refused("encode", tmp_path / "c.npz", "--model", model_file, "-o", tmp_path / "x")
    assert "c.npz: a codes file (.npz) is already encoded: `distill decode` makes it" in output


# --- 21: errors name the file; originals Distill does not write -----------------------------------


def test_recipe_and_codes_errors_name_the_file(model_file: Path, tmp_path: Path) -> None:
    """Before: "error: count must be in [1, 256], got 1000000", "error: SamplingParams: seed
    must be in ...", "error: codes: code 99 at level 0 ...": which file, which part?"""
    made = _made(model_file, tmp_path)
    codes = tmp_path / "c.npz"
    np.savez(codes, codes=np.full((Q, 5), 99, dtype=np.int64))
    for args, says in (
        (["regenerate", _crafted(made, tmp_path / "n.wav", count=10**6)],
         "n.wav: the recipe's count must be in [1, 256], got 1000000"),
        (["regenerate", _crafted(made, tmp_path / "s.wav", seed=-1)],
         "s.wav: the recipe's seed must be in 0.."),
        (["regenerate", _crafted(made, tmp_path / "c.wav", kind="resample")],
         "c.wav: the 'resample' recipe lacks 'codes'"),
        (["decode", codes], "c.npz: codes: code 99 at level 0, step 0 is outside 0..15"),
        (["resample", codes, "--from", "0"], "c.npz: codes: code 99 at level 0"),
    ):  # fmt: skip
        out = tmp_path / ("out" if args[0] == "resample" else "out.wav")  # resample's -o: a folder
        output = _refused(*args, "--model", model_file, "-o", out)
        assert says in output, output


def test_recipe_values_are_read_strictly_and_unknown_keys_named(model_file: Path, tmp_path: Path) -> None:
    """Before: `exact_length: "yes"` was read as false (a hop short, silently), `prime: true`
    was reported as "the recipe's codes", and a key this Distill does not know (a newer one's
    rule) was ignored without a word."""
    made = _made(model_file, tmp_path)
    for data, says in (({"exact_length": "yes"},
                         "y.wav: the recipe's exact_length must be true or false, got 'yes'"),
                       ({"prime": True},
                        "y.wav: the recipe's prime is not an integer grid (it holds bool")):  # fmt: skip
        output = _refused("regenerate", _crafted(made, tmp_path / "y.wav", **data), "--model",
                          model_file, "-o", tmp_path / "out.wav")  # fmt: skip
        assert says in output, output
    meta = read_export_metadata(made)  # its samples as they are, with two keys more
    newer = tmp_path / "newer.wav"
    export_audio(newer, sf.read(made)[0], 48000, subtype="PCM_24", scale=False,
                 metadata=ExportMetadata(kind=meta.kind, model_id=meta.model_id,
                                         data={**meta.data, "swing": 0.2, "zz_rule": [1]}))  # fmt: skip
    text = run("regenerate", newer, "--model", model_file)
    assert ("note: newer.wav's recipe holds 'swing', 'zz_rule', which this Distill does not "
            "know: a newer Distill probably made it") in " ".join(text.split()), text
    assert "identical to newer.wav" in text  # replayed still
    assert "does not know" not in run("regenerate", made, "--model", model_file)


@pytest.mark.parametrize(("fmt", "subtype", "suffix"), [
    ("AIFF", "PCM_24", ".aiff"), ("WAV", "PCM_U8", ".wav"), ("OGG", "VORBIS", ".ogg"),
])  # fmt: skip
def test_an_original_in_a_format_distill_does_not_write_is_regenerated_as_wav(
    model_file: Path, tmp_path: Path, fmt: str, subtype: str, suffix: str
) -> None:
    """An export someone converted (keeping its tags) was refused: "cannot export to '.ogg'",
    "unknown subtype 'PCM_U8'". It is regenerated as WAV, said so, and compared as the file
    holds its samples."""
    made = _made(model_file, tmp_path)
    audio, rate = sf.read(made)
    with sf.SoundFile(made) as f:
        comment = f.comment
    converted = tmp_path / f"conv{suffix}"
    with sf.SoundFile(converted, "w", rate, 1, subtype=subtype, format=fmt) as f:
        f.comment = comment
        f.write(audio)
    for out in ([], ["-o", f"{tmp_path / 'dir'}/"]):
        text = run("regenerate", converted, "--model", model_file, *out)
        assert (f"conv{suffix} is {fmt} {subtype}, which Distill does not write: the sound is "
                f"regenerated as WAV and compared as {fmt} {subtype}") in text, text
        assert f"identical to conv{suffix} as {fmt} {subtype} holds it (written as WAV " in text
    assert sf.info(tmp_path / "conv.regenerated.wav").format == "WAV"
    assert (tmp_path / "dir" / "conv.wav").is_file()


def test_an_original_longer_than_any_export_is_refused_before_it_is_decoded(
    model_file: Path, tmp_path: Path
) -> None:
    """A FLAC of silence is small and decodes to gigabytes (2 hours: 2.7 GB as float64)."""
    made = _made(model_file, tmp_path)
    with sf.SoundFile(made) as f:
        comment = f.comment
    long = tmp_path / "long.flac"
    with sf.SoundFile(long, "w", 48000, 1, subtype="PCM_16", format="FLAC") as f:
        f.comment = comment
        f.write(np.zeros(70 * 48000, dtype=np.int16))
    output = _refused("regenerate", long, "--model", model_file)
    assert "long.flac: 1 channel(s) of 70.0 s; no sound Distill exports has over" in output


def test_a_real_continued_sound_still_regenerates(model_file: Path, tmp_path: Path) -> None:
    wav, codes = _tone(tmp_path / "in.wav"), tmp_path / "codes.npz"
    run("encode", wav, "--model", model_file, "-o", codes, "--search", "0")
    run("generate", model_file, "--continue", codes, "--from", "0.5", "--seconds", "0.3",
        "-n", "1", "-o", tmp_path / "o", "--quality", "preview")  # fmt: skip
    (made,) = (tmp_path / "o").glob("*.wav")
    assert "identical to" in run("regenerate", made, "--model", model_file)


def _rewritten(made: Path, path: Path, samples: Any, rate: int, fmt: str, subtype: str) -> Path:
    """``samples`` at ``path`` as ``fmt`` ``subtype`` at ``rate``, with ``made``'s recipe."""
    with sf.SoundFile(made) as f:
        comment = f.comment
    with sf.SoundFile(path, "w", rate, samples.shape[1], subtype=subtype, format=fmt) as f:
        f.comment = comment
        f.write(samples)
    return path


def test_wav_and_flac_mixed_between_file_and_out_regenerate_identical(
    model_file: Path, tmp_path: Path
) -> None:
    """Before: a WAV regenerated as FLAC (or the other way) said DIFFERS (exit code 1), with a
    note that "FILE is WAV PCM_24, which Distill does not write": libsndfile rounds a float to
    an integer apart for WAV and FLAC, and the replay was compared as the target format read it
    back. It is compared as the original's format holds it, and the file written holds the
    original's samples. A FLAC converted losslessly from a WAV export is the WAV's sound."""
    def made(name: str, *args: str) -> Path:
        run("generate", model_file, "-n", "1", "--seconds", "0.3", "--quality", "preview",
            "-o", tmp_path / name, *args)  # fmt: skip
        return next((tmp_path / name).iterdir())

    wav = made("wav")  # PCM_24
    flac = made("flac", "--format", "flac", "--bits", "16")
    floats = made("float", "--bits", "float")
    lossless = _rewritten(wav, tmp_path / "lossless.flac", sf.read(wav, always_2d=True)[0],
                          48000, "FLAC", "PCM_24")  # fmt: skip
    for original, out, says in ((wav, "a.flac", ""), (flac, "b.wav", ""),
                                (floats, "c.flac", " (written as FLAC PCM_24)"),
                                (lossless, "d.flac", ""), (lossless, "e.wav", "")):  # fmt: skip
        result = runner.invoke(app, ["regenerate", str(original), "--model", str(model_file),
                                     "-o", str(tmp_path / out)])  # fmt: skip
        assert result.exit_code == 0, result.output
        assert result.output.strip() == f"{tmp_path / out}: identical to {original.name}{says}"
        if not says:
            assert np.array_equal(sf.read(tmp_path / out)[0], sf.read(original)[0])
    assert sf.info(tmp_path / "b.wav").subtype == "PCM_16"  # the original's depth


def test_a_header_at_another_rate_or_channel_count_differs(model_file: Path, tmp_path: Path) -> None:
    """Before: an export's samples under a 44100-Hz header were called identical (the rate was
    never compared), and a stereo copy said "DIFFERS: 14400 samples against its 14400"."""
    made = _made(model_file, tmp_path)
    samples = sf.read(made, always_2d=True)[0]
    def differs(path: Path) -> str:
        result = runner.invoke(app, ["regenerate", str(path), "--model", str(model_file)])
        assert result.exit_code == 1 and "DIFFERS" in result.output, result.output
        return result.output

    rated = _rewritten(made, tmp_path / "sr44.wav", samples, 44100, "WAV", "PCM_24")
    output = differs(rated)
    assert ("sr44.regenerated.wav: DIFFERS from sr44.wav: 48000 Hz against its 44100 Hz, its "
            "samples otherwise identical") in output, output
    stereo = _rewritten(made, tmp_path / "st.wav", np.repeat(samples, 2, axis=1), 48000, "WAV",
                        "PCM_24")  # fmt: skip
    output = differs(stereo)
    assert "DIFFERS from st.wav: 1 channel against its 2\n" in output, output
    loud = _rewritten(made, tmp_path / "loud.wav", samples * 1e-3 + 0.5, 48000, "WAV", "FLOAT")
    output = differs(loud)
    assert "dB over its peak)" in output and "dB under" not in output, output
