"""``distill generate``, ``encode``, ``decode`` and ``regenerate``: a ``.distill`` file used here.

These run in this process on the model file (no cluster needed): the same functions the
inference worker runs (:mod:`distill.shared.model.inference`), so a sound made here and one made
through ``distill.infer`` agree. Every exported file carries what made it (model id, seed and
sampling parameters, or the codes), which ``distill regenerate`` reads to make it again.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import typer

from distill.shared.cli.common import fail, output_file_problem, write_problem

SUBTYPES = {"16": "PCM_16", "24": "PCM_24", "float": "FLOAT"}
QualityOpt = typer.Option("best", "--quality", help="Phase quality: preview, fast or best.")
# The sampling and output options `generate` and `resample` share
TemperatureOpt = typer.Option(1.0, "--temperature")
TopKOpt = typer.Option(0, "--top-k", help="0: off.")
TopPOpt = typer.Option(1.0, "--top-p", help="1: off.")
MinPOpt = typer.Option(
    None, "--min-p", show_default=False,
    help="Drop codes less likely than this share of the likeliest one (0: off; default 0.01: "
    "the prior's smoothing floor).",
)  # fmt: skip
ChangeOpt = typer.Option(
    None, "--change-temperature", show_default=False,
    help="Draw which code a level moves to at this temperature, apart from whether it moves "
    "(which keeps the prior's odds); min-p counts among those codes. 1: off. Default: the "
    "model's, chosen when its prior was trained (1 or 0.5: whichever drew sounds shaped more "
    "like the training sounds; 1 for older models).",
)  # fmt: skip
SeedOpt = typer.Option(0, "--seed", help="Seed of the whole batch: the same seed, -n and settings "
                                         "give the same files; one sound of a batch alone: "
                                         "`distill regenerate` on its file.")
OutOpt = typer.Option(Path("."), "-o", "--out", help="Folder for the files.")
FormatOpt = typer.Option("wav", "--format", help="wav or flac.")
BitsOpt = typer.Option("24", "--bits", help="16, 24 or float (wav only).")
DeviceOpt = typer.Option("cpu", "--device")
ForceOpt = typer.Option(False, "--force", help="Replace the output file if it exists.")
# An input sound's length is checked against MAX_SECONDS after its silence is trimmed; a header
# that states more than this much longer is refused before anything is decoded (a 10-minute
# 192 kHz file took 4.5 GB to decode, trim and resample just to be refused).
INPUT_SLACK_S = 60.0


def _load(path: Path, device: str) -> Any:
    from distill.shared.devices import resolve_device
    from distill.shared.errors import DistillError
    from distill.shared.model.modelfile import load_model

    try:
        resolved = resolve_device(device)  # torch's own errors about devices are tracebacks
    except DistillError as e:
        fail(f"--{e}")  # "device 'cuda': CUDA is not available on this machine"
    try:
        return load_model(path, resolved)
    except DistillError as e:
        fail(str(e))


def _writable_folder(out: Path) -> None:
    """Make the ``-o`` folder and check a file can be written in it, before any sound is drawn:
    a refusal after the draws would lose their work."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        fail(f"-o {out}: that is a file, not a folder")
    except OSError as e:
        fail(f"-o {out}: cannot make the folder ({e.strerror or e})")
    problem = write_problem(out, "-o", out)
    if problem:
        fail(problem)


def _new_file(path: Path, force: bool, name: str = "-o") -> None:
    """Refuse the output file ``path`` before any work (``output_file_problem``)."""
    problem = output_file_problem(path, force, name)
    if problem:
        fail(problem)


def _check_count(count: int) -> None:
    """``-n``, before the model is read (``inference.generate`` checks it again)."""
    from distill.shared.model import inference as inf

    try:
        inf.check_int(count, "-n", 1, inf.MAX_COUNT)
    except inf.BadInput as e:
        fail(str(e))


def _subtype(bits: str, suffix: str) -> str:
    if bits not in SUBTYPES:
        fail(f"--bits must be one of {', '.join(SUBTYPES)}, got {bits!r}")
    if suffix == ".flac" and bits == "float":
        fail("FLAC holds integer samples: use --bits 16 or 24, or --format wav")
    return SUBTYPES[bits]


def _describe(params: dict[str, Any], step_s: float) -> str:
    """A recipe on one line; ``step_s``, the seconds per code step, gives the continued start
    (``prime``) and a resampled region (``t0``, ``t1``) in seconds."""
    shown = ("seed", "temperature", "top_k", "top_p", "min_p", "change_temperature", "seconds",
             "quality")
    parts = [f"{k}={params[k]}" for k in shown if k in params]
    if params.get("prime"):
        parts.append(f"continuing={len(params['prime'][0]) * step_s:.2f}s")
    if "t0" in params:
        parts.append(f"region={params['t0'] * step_s:.2f}-{params['t1'] * step_s:.2f}s")
    return " ".join(parts)


def _check_quality(quality: str) -> None:
    """``inference.check_quality``, as a CLI error (before any sound is encoded or drawn)."""
    from distill.shared.errors import DistillError
    from distill.shared.model import inference as inf

    try:
        inf.check_quality(quality)
    except DistillError as e:
        fail(f"--{e}")


def generate_files(model: Any, out: Path, *, count: int, seconds: float, temperature: float,
                   top_k: int, top_p: float, seed: int, quality: str, fmt: str = "wav",
                   min_p: float | None = None, change_temperature: float | None = None,
                   prime: Any = None,
                   bits: str = "24", prefix: str = "gen", show: bool = True) -> list[Path]:  # fmt: skip
    """``count`` generated sounds (continuing ``prime``, a (Q, T0) grid, if given) written into
    ``out`` with their metadata; their paths."""
    from distill.shared.model import inference as inf

    params = _params(model, temperature, top_k, top_p, min_p, seed, change_temperature, show)
    subtype = _subtype(bits, f".{fmt}")
    _check_count(count)
    _writable_folder(out)  # before the draws: a refusal after them would lose their work
    # The bar moves as each batch of 16 is decoded; sampling the codes comes before.
    with typer.progressbar(length=count, label="generating", hidden=not show) as bar:
        made = inf.generate(model, count=count, seconds=seconds, params=params, quality=quality,
                            prime=prime,
                            on_batch=lambda done, total: bar.update(done - bar.pos))  # fmt: skip
    recipes = [inf.generate_recipe(params, count=count, seconds=seconds, quality=quality,
                                   index=i, render_frames=made.render_frames, prime=prime)
               for i in range(count)]  # fmt: skip
    paths = _export_all(model, made, recipes, "generate", out, f"{prefix}-s{seed}", fmt, subtype,
                        show)  # fmt: skip
    note = inf.redraw_note(made.redrawn, count)
    if show and note:
        typer.echo(note)
    return paths


def _params(model: Any, temperature: float, top_k: int, top_p: float, min_p: float | None,
            seed: int, change_temperature: float | None = None,
            show: bool = True) -> Any:  # fmt: skip
    """The sampling parameters; min-p at its default and the change temperature at the model's
    (chosen when its prior was trained) unless given. An error names the option."""
    from distill.shared.errors import DistillError
    from distill.shared.model import inference as inf

    chosen: dict[str, Any] = {"temperature": temperature, "top_k": top_k, "top_p": top_p,
                              "seed": seed}  # fmt: skip
    if min_p is not None:
        chosen["min_p"] = min_p
    if change_temperature is not None:
        chosen["change_temperature"] = change_temperature
    else:
        note = inf.stored_change_temperature_note(model)
        if note and show:
            typer.echo(note, err=True)
    try:
        return inf.sampling_params(chosen, model)
    except DistillError as e:
        text = str(e).removeprefix("SamplingParams: ")
        field = text.split(" ", 1)[0]
        fail(f"--{field.replace('_', '-')}: {text}" if field in SAMPLING_FIELDS else text)


SAMPLING_FIELDS = ("temperature", "top_k", "top_p", "min_p", "change_temperature", "seed")


def _export_all(model: Any, made: Any, recipes: list[dict[str, Any]], kind: str, out: Path,
                stem: str, fmt: str, subtype: str, show: bool) -> list[Path]:  # fmt: skip
    """Each sound of ``made`` to ``out/STEM-NNN.FMT`` with its recipe; prints each line."""
    from distill.shared.audio.export import ExportMetadata, export_audio, free_path

    out.mkdir(parents=True, exist_ok=True)  # checked by _writable_folder before the draws
    paths = []
    step_s = model.vqvae.config.downsample / model.mel_config.frames_per_second
    for i, (audio, recipe) in enumerate(zip(made.audio, recipes, strict=True)):
        # a numbered file's name holds only the model, the seed and the index: never an
        # earlier run's file (made with other settings)
        path = free_path(out / f"{stem}-{i:03d}.{fmt}")
        meta = ExportMetadata(kind=kind, model_id=model.model_id, title=path.stem, data=recipe)
        report = export_audio(path, audio, made.sample_rate, subtype=subtype, metadata=meta)  # type: ignore[arg-type]
        gain = f" gain {report.gain_db:.1f} dB" if report.gain_db else ""
        if show:
            typer.echo(f"{path}  index={i} {_describe(recipe, step_s)}{gain}")
        paths.append(path)
    return paths


def _check_file(path: Path, name: str) -> None:
    """Refuse an input ``path`` (``name``: the option) that is missing or a folder."""
    if path.is_dir():
        fail(f"{name} {path}: that is a folder, not a file")
    if not path.is_file():
        fail(f"{name} {path}: no such file")


def _codes_of(path: Path, model: Any, name: str) -> Any:
    """The (Q, T) codes of ``path``: a codes file from `distill encode` (.npz), or a sound
    encoded here as training prepares it. ``name`` is the option, for errors."""
    import numpy as np

    _check_file(path, name)
    if path.suffix.lower() == ".npz":
        return np.asarray(_read_codes(path, model), dtype=np.int64)
    return _encode_sound(path, model, name)


def _sound(path: Path, model: Any, name: str = "") -> Any:
    """The sound ``path`` prepared as for training, at the model's rate: (samples,). One whose
    header states far more than MAX_SECONDS (INPUT_SLACK_S for the silence trimmed) is refused
    before a sample is decoded; the exact check is ``inference.model_audio``'s, after the trim.
    An error names ``name`` (the option) and the file unless it names the file already."""
    from distill.shared.audio.io import load_audio, stated_duration_s
    from distill.shared.errors import DistillError
    from distill.shared.model import inference as inf

    rate, most = model.mel_config.sample_rate, inf.MAX_SECONDS + INPUT_SLACK_S
    try:
        stated = stated_duration_s(path)
        if stated is not None and stated > most:
            raise inf.BadInput(f"audio is {stated:.1f} s long; at most {inf.MAX_SECONDS:g} s")
        audio = load_audio(path, rate, max_s=most)  # max_s: a header that under-states it
        return inf.model_audio(model, audio.numpy(), rate)
    except DistillError as e:
        if str(e).startswith(path.name):
            fail(str(e))
        fail(f"{name} {path.name}: {e}" if name else f"{path.name}: {e}")


def _encode_sound(path: Path, model: Any, name: str = "", search: int | None = None,
                  audio: Any = None) -> Any:  # fmt: skip
    """The (Q, T) codes of the sound ``path`` (``audio``: it already prepared by ``_sound``),
    encoded with ``search`` candidates (None: the model layer's default); an error names
    ``name`` (the option) and the file."""
    from distill.shared.errors import DistillError
    from distill.shared.model import inference as inf

    if audio is None:
        audio = _sound(path, model, name)
    try:
        return inf.encode(model, audio, inf.SEARCH_CANDIDATES if search is None else search)
    except DistillError as e:
        fail(f"{name} {path.name}: {e}" if name else f"{path.name}: {e}")


def _step_at(model: Any, seconds: float, name: str) -> int:
    """The code step at ``seconds`` into a sound (0 at 0 s; past MAX_SECONDS: its step)."""
    from distill.shared.model import inference as inf

    if math.isnan(seconds):
        fail(f"{name} must be a number of seconds, got nan")
    if seconds < 0:
        fail(f"{name} must be 0 or more seconds, got {seconds:g}")
    return 0 if seconds == 0 else inf.steps_for(model, min(seconds, inf.MAX_SECONDS))


# --continue --from T searches the codes of the sound's first T seconds and this much after
# them (what the encoder and the search see past the cut), not the whole sound: a 6-s drum roll
# continued from 0.3 s searched all 6 s. Measured on percussion one-shots and the textures'
# loops: the kept codes are the same as the whole sound's.
CONTINUE_CONTEXT_S = 1.0


def _continued(model: Any, path: Path, start: float | None, seconds: float) -> Any:
    """The codes ``--continue`` keeps of ``path`` (a sound or a codes .npz): all, or up to
    ``--from`` (``start``). The kept length plus ``seconds`` is checked against MAX_SECONDS
    before the sound is encoded (its search takes 2-7 s a second of sound)."""
    import numpy as np

    from distill.shared.model import inference as inf

    steps = None if start is None else _step_at(model, start, "--from")
    if steps == 0:
        fail("--from 0 keeps nothing of the sound: leave out --continue to draw anew")
    _check_file(path, "--continue")
    codes = audio = None
    if path.suffix.lower() == ".npz":
        codes = np.asarray(_read_codes(path, model), dtype=np.int64)
        total = int(codes.shape[1])
    else:
        audio = _sound(path, model, "--continue")
        total = inf.encoded_steps(model, int(audio.shape[-1]))
    step_s = model.vqvae.config.downsample / model.mel_config.frames_per_second
    if steps is not None and steps > total:
        typer.echo(f"note: --from {start:g} s is past the end of {path.name} "
                   f"(~{total * step_s:.2f} s): the whole sound is kept", err=True)  # fmt: skip
    kept = total if steps is None else min(steps, total)
    if kept + inf.steps_for(model, seconds) > inf.steps_for(model, inf.MAX_SECONDS):
        fail(f"--continue keeps ~{kept * step_s:.2f} s of {path.name}; with --seconds "
             f"{seconds:g} more that is over {inf.MAX_SECONDS:g} s (use --from or fewer "
             "--seconds)")  # fmt: skip
    if codes is None:  # only what is kept is searched, with a second after it for context
        end = kept + inf.steps_for(model, CONTINUE_CONTEXT_S)
        hop = model.mel_config.hop_length * model.vqvae.config.downsample
        codes = _encode_sound(path, model, "--continue", audio=audio[..., : end * hop])
    return codes[:, :kept]


def register(app: typer.Typer) -> None:
    app.command("generate")(generate)
    app.command("resample")(resample)
    app.command("encode")(encode)
    app.command("decode")(decode)
    app.command("regenerate")(regenerate)


def generate(
    model_file: Path = typer.Argument(..., help="A .distill model file."),
    count: int = typer.Option(8, "-n", "--count", help="How many sounds (1..256)."),
    seconds: float = typer.Option(2.0, "--seconds", help="Length of each sound (<= 60)."),
    temperature: float = TemperatureOpt,
    top_k: int = TopKOpt,
    top_p: float = TopPOpt,
    min_p: float | None = MinPOpt,
    change_temperature: float | None = ChangeOpt,
    seed: int = SeedOpt,
    out: Path = OutOpt,
    fmt: str = FormatOpt,
    bits: str = BitsOpt,
    quality: str = QualityOpt,
    device: str = DeviceOpt,
    cont: Path | None = typer.Option(
        None, "--continue", show_default=False,
        help="Continue this sound (or a codes .npz from `distill encode`): each file is its "
        "start and SECONDS more drawn by the prior.",
    ),
    start: float | None = typer.Option(
        None, "--from", show_default=False,
        help="With --continue: keep the sound up to here (seconds) and draw on from there "
        "(default: its end).",
    ),
) -> None:
    """Generate new sounds from a model, or continue one.

    Prints each file with the parameters that make it again."""
    from distill.shared.errors import DistillError
    from distill.shared.model import inference as inf

    if fmt not in ("wav", "flac"):
        fail(f"--format must be wav or flac, got {fmt!r}")
    _check_quality(quality)  # before any sound is encoded or drawn
    try:  # nan, inf, under MIN_SECONDS (a click), past MAX_SECONDS: before the model is read
        inf.check_number(seconds, "--seconds", inf.MIN_SECONDS, inf.MAX_SECONDS)
    except DistillError as e:
        fail(str(e))
    _check_count(count)
    if start is not None and cont is None:
        fail("--from needs --continue FILE (the sound to continue)")
    model = _load(model_file, device)
    prime, prefix = None, model_file.stem
    if cont is not None:
        prime = _continued(model, cont, start, seconds)
        prefix = f"{model_file.stem}-{cont.stem}-cont"
    try:
        generate_files(model, out, count=count, seconds=seconds, temperature=temperature,
                       top_k=top_k, top_p=top_p, min_p=min_p, seed=seed, quality=quality,
                       fmt=fmt, bits=bits, prime=prime, prefix=prefix,
                       change_temperature=change_temperature)  # fmt: skip
    except DistillError as e:
        fail(str(e))


def resample(
    sound: Path = typer.Argument(..., help="A sound, or a codes .npz from `distill encode`."),
    model_file: Path = typer.Option(..., "--model", "-m", help="A .distill model file."),
    start: float = typer.Option(..., "--from", help="Start of the region to draw again (s)."),
    end: float | None = typer.Option(
        None, "--to", show_default=False, help="End of the region (s; default: the end)."
    ),
    count: int = typer.Option(4, "-n", "--count", help="How many versions (1..256)."),
    temperature: float = TemperatureOpt,
    top_k: int = TopKOpt,
    top_p: float = TopPOpt,
    min_p: float | None = MinPOpt,
    change_temperature: float | None = ChangeOpt,
    seed: int = SeedOpt,
    out: Path = OutOpt,
    fmt: str = FormatOpt,
    bits: str = BitsOpt,
    quality: str = QualityOpt,
    device: str = DeviceOpt,
) -> None:
    """A sound with the region [FROM, TO) drawn again by the prior.

    The draw is given what comes before the region; COUNT versions, each file with its recipe."""
    from distill.shared.errors import DistillError
    from distill.shared.model import inference as inf

    if fmt not in ("wav", "flac"):
        fail(f"--format must be wav or flac, got {fmt!r}")
    _check_quality(quality)  # before any sound is encoded or drawn
    _check_count(count)
    model = _load(model_file, device)
    codes = _codes_of(sound, model, "SOUND")
    total = codes.shape[1]
    length_s = total / inf.steps_for(model, 1.0)  # the sound's length in seconds
    t0 = _step_at(model, start, "--from")
    t1 = total if end is None else _step_at(model, end, "--to")
    if t0 >= total:
        fail(f"--from {start:g} s is at or past the end of {sound.name} (~{length_s:.2f} s)")
    if t1 <= t0:
        fail(f"--to must come after --from: the region [{start:g}, {end:g}) s holds no code step")
    if t1 > total:
        typer.echo(f"note: --to {end:g} s is past the end of {sound.name} (~{length_s:.2f} s): "
                   "the region runs to the end", err=True)  # fmt: skip
        t1 = total
    params = _params(model, temperature, top_k, top_p, min_p, seed, change_temperature)
    subtype = _subtype(bits, f".{fmt}")
    _writable_folder(out)  # before the draws: a refusal after them would lose their work
    try:
        with typer.progressbar(length=count, label="resampling") as bar:
            made = inf.resample_variants(model, codes, t0, t1, params, inf.check_quality(quality),
                                         count=count,
                                         on_batch=lambda done, total: bar.update(done - bar.pos))  # fmt: skip
        recipes = [inf.resample_recipe(params, codes, t0=t0, t1=t1, count=count, quality=quality,
                                       index=i, render_frames=made.render_frames)
                   for i in range(count)]  # fmt: skip
        stem = f"{sound.stem}-resample-s{seed}"
        _export_all(model, made, recipes, "resample", out, stem, fmt, subtype, show=True)
    except DistillError as e:
        fail(str(e))


def encode(
    audio_file: Path = typer.Argument(..., help="A sound file."),
    model_file: Path = typer.Option(..., "--model", "-m", help="A .distill model file."),
    out: str = typer.Option(
        "codes.npz", "-o", "--out",
        help="The .npz to write (.npz is added if missing); a folder (or DIR/): FILE's name.npz "
        "in it.",
    ),  # fmt: skip
    device: str = typer.Option("cpu", "--device"),
    search: int | None = typer.Option(
        None, "--search", show_default=False,
        help="Codes tried per level and step, kept by what they decode to (default 16: ~2 s "
        "per second of sound on one CPU thread); 0: the quantizer's nearest codes, at once.",
    ),  # fmt: skip
    force: bool = ForceOpt,
) -> None:
    """Encode a sound into a code grid (.npz: codes, codebook_size, model_id)."""
    import os

    import numpy as np

    from distill.shared.model import inference as inf

    target = Path(out)
    if target.is_dir() or out.endswith(("/", os.sep)):  # a folder: the sound's name in it
        target = target / f"{audio_file.stem}.npz"
    elif target.suffix != ".npz":  # np.savez would add it: the name printed is the one written
        target = target.with_name(f"{target.name}.npz")
    if search is not None:
        try:
            inf.check_int(search, "search", 0, inf.MAX_SEARCH)
        except inf.BadInput as e:
            fail(f"--{e}")
    _check_file(audio_file, "FILE")
    _new_file(target, force)  # before the encoding's search, which takes a while
    model = _load(model_file, device)
    codes = _encode_sound(audio_file, model, search=search)
    try:
        np.savez(target, codes=codes, codebook_size=np.int64(model.vqvae.config.codebook_size),
                 model_id=np.array(model.model_id))  # fmt: skip
    except OSError as e:
        fail(f"{target}: could not write ({e.strerror or e})")
    typer.echo(
        f"{target}: {codes.shape[0]} levels x {codes.shape[1]} steps, model {model.model_id[:12]}"
    )


def _read_codes(path: Path, model: Any) -> Any:
    import zipfile

    import numpy as np

    _check_file(path, "CODES")
    with open(path, "rb") as f:
        if f.read(4) != b"PK\x03\x04":  # np.load would try it as a pickle and say so
            fail(f"{path.name}: not a codes file from `distill encode` (not an .npz archive)")
    try:
        with np.load(path, allow_pickle=False) as npz:
            codes, model_id = npz["codes"], str(npz["model_id"]) if "model_id" in npz else ""
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
        fail(f"{path.name}: not a codes file from `distill encode` ({e})")
    if model_id and model_id != model.model_id:
        fail(f"{path.name} was encoded with model {model_id[:12]}, not {model.model_id[:12]} "
             "(codes mean nothing to another model)")  # fmt: skip
    return codes


def decode(
    codes_file: Path = typer.Argument(..., help="A .npz from `distill encode`."),
    model_file: Path = typer.Option(..., "--model", "-m"),
    out: Path = typer.Option(Path("out.wav"), "-o", "--out"),
    levels: int | None = typer.Option(None, "--levels", help="Decode the first k levels only."),
    bits: str = typer.Option("24", "--bits"),
    quality: str = QualityOpt,
    device: str = typer.Option("cpu", "--device"),
    force: bool = ForceOpt,
) -> None:
    """Decode a code grid to a sound file."""
    from distill.shared.audio.export import ExportMetadata, export_audio
    from distill.shared.errors import DistillError
    from distill.shared.model import inference as inf

    _check_file(codes_file, "CODES")
    _new_file(out, force)
    model = _load(model_file, device)
    codes = _read_codes(codes_file, model)
    try:
        audio, _ = inf.decode(model, codes, levels, inf.check_quality(quality))
        meta = ExportMetadata(kind="decode", model_id=model.model_id, title=out.stem,
                              data=inf.decode_recipe(codes, levels, quality))  # fmt: skip
        export_audio(out, audio, model.mel_config.sample_rate,
                     subtype=_subtype(bits, out.suffix.lower()), metadata=meta)  # type: ignore[arg-type]  # fmt: skip
    except DistillError as e:
        fail(str(e))
    typer.echo(f"{out}: {audio.shape[0] / model.mel_config.sample_rate:.2f} s")


def regenerate(
    audio_file: Path = typer.Argument(..., help="A file Distill exported."),
    model_file: Path = typer.Option(..., "--model", "-m"),
    out: str | None = typer.Option(
        None, "-o", "--out", help="A file, or a folder (FILE's name in it). Default: FILE's "
                                  "name + '.regenerated'."
    ),  # fmt: skip
    device: str = typer.Option("cpu", "--device"),
    force: bool = ForceOpt,
) -> None:
    """Make an exported sound again from its metadata (the same samples on the same device)."""
    import numpy as np
    import soundfile as sf

    from distill.shared.audio.export import (
        ExportMetadata,
        export_audio,
        export_format,
        read_export_metadata,
    )
    from distill.shared.errors import DistillError
    from distill.shared.model import inference as inf

    try:
        meta = read_export_metadata(audio_file)
    except DistillError as e:
        fail(str(e))
    model = _load(model_file, device)
    if meta.model_id != model.model_id:
        fail(f"{audio_file.name} was made by model {meta.model_id[:12]}, but {model_file.name} "
             f"is model {model.model_id[:12]}: pass the model that made it")  # fmt: skip
    target = Path(out) if out else audio_file.with_name(
        f"{audio_file.stem}.regenerated{audio_file.suffix}")
    if target.is_dir() or (out or "").endswith(("/", os.sep)):  # a folder: the file's name in it
        _writable_folder(target)  # made if it is new (as generate's -o is), before the replay
        target = target / audio_file.name
    if target.resolve() == audio_file.resolve():
        fail(f"{target}: that is the file being regenerated; choose another --out")
    _new_file(target, force)  # before the replay's work
    original = sf.read(str(audio_file), always_2d=True)[0]
    # A recipe from an older Distill may lack a rule it was made under: its other readings
    # (inference.readings) are tried in turn, the file as written kept when none matches.
    tried: list[str] = []
    first: np.ndarray | None = None  # the recipe as written: what the file is left holding
    written = None
    try:
        export_format(target)  # a bad suffix is refused before the replay's work
        subtype = sf.info(str(audio_file)).subtype
        again = ExportMetadata(kind=meta.kind, model_id=meta.model_id, data=meta.data,
                               title=meta.title)  # fmt: skip
        for how, recipe in inf.readings(meta.kind, meta.data):
            audio = inf.replay(model, meta.kind, recipe)
            export_audio(target, audio, model.mel_config.sample_rate, subtype=subtype, metadata=again)  # type: ignore[arg-type]
            made = sf.read(str(target), always_2d=True)[0]
            if first is None:
                first, written = made, audio
            if np.array_equal(original, made):
                note = "" if how == "as written" else f" (read {how}: its recipe predates that rule)"
                typer.echo(f"{target}: identical to {audio_file.name}{note}")
                return
            tried.append(how)
        if len(tried) > 1:  # leave the file as the recipe reads, not the last reading tried
            export_audio(target, written, model.mel_config.sample_rate, subtype=subtype,  # type: ignore[arg-type]
                         metadata=again)  # fmt: skip
    except DistillError as e:
        fail(str(e))
    assert first is not None
    typer.echo(f"{target}: DIFFERS from {audio_file.name}: {_difference(original, first)}"
               + (f"; also tried it {'; '.join(tried[1:])}" if len(tried) > 1 else ""))
    raise typer.Exit(1)


def _difference(original: object, made: object) -> str:
    """How two sounds differ, in words: the lengths, or the largest difference against the
    original's peak."""
    import numpy as np

    a, b = np.asarray(original, dtype=np.float64), np.asarray(made, dtype=np.float64)
    if a.shape != b.shape:
        return f"{b.shape[0]} samples against its {a.shape[0]}"
    largest = float(np.abs(a - b).max())
    peak = float(np.abs(a).max())
    under = 20 * np.log10(peak / largest) if largest > 0 and peak > 0 else float("inf")
    return f"largest difference {largest:.2g} ({under:.0f} dB under its peak)"
