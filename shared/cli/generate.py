"""``distill generate``, ``encode``, ``decode`` and ``regenerate``: a ``.distill`` file used here.

These run in this process on the model file (no cluster needed): the same functions the
inference worker runs (:mod:`distill.shared.model.inference`), so a sound made here and one made
through ``distill.infer`` agree. Every exported file carries what made it (model id, seed and
sampling parameters, or the codes), which ``distill regenerate`` reads to make it again.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer

from distill.shared.cli.common import LiveLine, fail, output_file_problem, shown, write_problem

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
TrimOpt = typer.Option(
    None, "--trim", show_default=False, metavar="DB",
    help="End each sound where it has faded DB under its peak for good (10..120; e.g. 60: a "
    "drum hit ends with its decay, not after the seconds asked), with a 10-ms fade. Default: "
    "off, every sound exactly its length.",
)  # fmt: skip
ForceOpt = typer.Option(False, "--force", help="Replace the output file if it exists.")


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


def _check_folder(out: Path) -> None:
    """``-o`` checked as :func:`_writable_folder` will make it, without making it yet: before a
    sound is encoded (minutes for a long one: a bad -o was refused only after that), and
    leaving no new folder behind when a later check refuses the input."""
    from distill.shared.audio.io import AUDIO_EXTENSIONS

    if out.is_dir():
        problem = write_problem(out, "-o", out)
    elif out.exists() or out.is_symlink():
        problem = f"-o {out}: that is a file, not a folder"
    elif out.suffix.lower() in AUDIO_EXTENSIONS | {".npz"}:  # -o kick.wav made a folder so named
        problem = (f"-o {out}: -o is the folder the files go in (each is named for what made "
                   f"it), and a new folder named '{out.name}' would look like a file: give a "
                   "folder's name (an existing folder is used whatever its name)")  # fmt: skip
    else:  # made later, in the nearest folder that exists
        parent = out.parent
        while not (parent.exists() or parent.is_symlink()) and parent != parent.parent:
            parent = parent.parent
        problem = (write_problem(parent, "-o", out) if parent.is_dir()
                   else f"-o {out}: cannot make the folder ({parent} is a file)")  # fmt: skip
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


def _subtype(bits: str, suffix: str, wav: str = "--format wav") -> str:
    """``--bits`` as a subtype for a ``suffix`` file; ``wav``: how the command asks for WAV."""
    if bits not in SUBTYPES:
        fail(f"--bits must be one of {', '.join(SUBTYPES)}, got {bits!r}")
    if suffix == ".flac" and bits == "float":
        fail(f"FLAC holds integer samples: use --bits 16 or 24, or {wav}")
    return SUBTYPES[bits]


def _describe(params: dict[str, Any], step_s: float) -> str:
    """A recipe on one line; ``step_s``, the seconds per code step, gives the continued start
    (``prime``) and a resampled region (``t0``, ``t1``) in seconds."""
    shown = ("seed", "temperature", "top_k", "top_p", "min_p", "change_temperature", "seconds",
             "trim", "quality")
    parts = [f"{k}={params[k]}" for k in shown if k in params]
    if params.get("prime"):
        parts.append(f"continuing={len(params['prime'][0]) * step_s:.2f}s")
    if "t0" in params:
        parts.append(f"region={params['t0'] * step_s:.2f}-{params['t1'] * step_s:.2f}s")
    return " ".join(parts)


def _check_quality(quality: str) -> None:
    """``inference.check_quality``, as a CLI error (before any sound is encoded or drawn)."""
    from distill.shared.model import inference as inf

    _as_option(inf.check_quality, quality)


def _check_trim(trim: float | None) -> None:
    """``--trim``, before the model is read."""
    from distill.shared.model import inference as inf

    _as_option(inf.check_trim, trim)


def _as_option(check: Callable[[Any], object], value: object) -> None:
    """An inference check of one option's value; its error as a CLI error naming the option
    (the check names the field: ``--quality must be one of ...``)."""
    from distill.shared.errors import DistillError

    try:
        check(value)
    except DistillError as e:
        fail(f"--{e}")


def generate_files(model: Any, out: Path, *, count: int, seconds: float, temperature: float,
                   top_k: int, top_p: float, seed: int, quality: str, fmt: str = "wav",
                   min_p: float | None = None, change_temperature: float | None = None,
                   prime: Any = None, trim: float | None = None,
                   bits: str = "24", prefix: str = "gen", show: bool = True) -> list[Path]:  # fmt: skip
    """``count`` generated sounds (continuing ``prime``, a (Q, T0) grid, if given) written into
    ``out`` with their metadata, each ended where it fades if ``trim`` (dB under its peak) is
    given; their paths."""
    from distill.shared.audio.export import free_path
    from distill.shared.audio.io import TAIL_MARGIN_S
    from distill.shared.model import inference as inf

    params = _params(model, temperature, top_k, top_p, min_p, seed, change_temperature, show)
    subtype = _subtype(bits, f".{fmt}")
    _check_count(count)
    _writable_folder(out)  # before the draws: a refusal after them would lose their work
    # Each sound is written as its batch is decoded (a sound drawn again overwrites its file),
    # so that no more than a batch of audio is held (256 sounds of 60 s kept: 2.9 GB).
    render_frames = inf.render_frames_for(model)  # what each recipe records
    recipes = [inf.generate_recipe(params, count=count, seconds=seconds, quality=quality,
                                   index=i, render_frames=render_frames, prime=prime, trim=trim)
               for i in range(count)]  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)  # checked by _writable_folder before the draws
    paths = [free_path(out / f"{prefix}-s{seed}-{i:03d}.{fmt}") for i in range(count)]
    gains = [0.0] * count
    lengths = [0] * count  # samples, as each sound was ended (see inference.finish)
    rate = model.mel_config.sample_rate

    def write(indices: Any, audio: Any) -> None:
        for i, one in zip(indices.tolist(), audio, strict=True):
            one = inf.finish(model, recipes[i], one)
            lengths[i] = one.shape[-1]
            gains[i] = _export_one(model, paths[i], one, recipes[i], "generate", subtype)

    # The bar moves as each batch is decoded; sampling the codes comes before.
    with typer.progressbar(length=count, label="generating", hidden=not show) as bar:
        made = inf.generate_each(model, write, count=count, seconds=seconds, params=params,
                                 quality=quality, prime=prime, render_frames=render_frames,
                                 on_batch=lambda done, total: bar.update(done - bar.pos))  # fmt: skip
    if show:
        step_s = model.vqvae.config.downsample / model.mel_config.frames_per_second
        for i, path in enumerate(paths):
            gain = f" gain {gains[i]:.1f} dB" if gains[i] else ""
            ends = f" length={lengths[i] / rate:.2f}s" if trim is not None else ""
            typer.echo(shown(f"{path}  index={i} {_describe(recipes[i], step_s)}{ends}{gain}"))
    note = inf.redraw_note(made.redrawn, count)
    if show and note:
        typer.echo(note)
    # a continuation that ends where its prime does: its whole draw stayed under the trim
    # (files alike but for their seed would look like a bug)
    floor = inf.trim_floor(model, recipes[0]) if count and trim is not None else 0
    kept_only = sum(n <= floor + round(TAIL_MARGIN_S * rate) for n in lengths) if floor else 0
    if show and kept_only:
        typer.echo(f"note: in {kept_only} of {count} sounds what was drawn stayed {trim:g} dB "
                   "under the sound's peak, in the part kept: they end where the part kept does "
                   "(a larger --trim keeps more of the draw)", err=True)  # fmt: skip
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
    """Each sound of ``made`` to ``out/STEM-NNN.FMT`` with its recipe (ended as it says, see
    ``inference.finish``); prints each line."""
    from distill.shared.audio.export import free_path
    from distill.shared.model import inference as inf

    out.mkdir(parents=True, exist_ok=True)  # checked by _writable_folder before the draws
    paths = []
    step_s = model.vqvae.config.downsample / model.mel_config.frames_per_second
    rate = model.mel_config.sample_rate
    for i, (audio, recipe) in enumerate(zip(made.audio, recipes, strict=True)):
        path = free_path(out / f"{stem}-{i:03d}.{fmt}")
        audio = inf.finish(model, recipe, audio)
        gain_db = _export_one(model, path, audio, recipe, kind, subtype)
        gain = f" gain {gain_db:.1f} dB" if gain_db else ""
        ends = f" length={audio.shape[-1] / rate:.2f}s" if "trim" in recipe else ""
        if show:
            typer.echo(shown(f"{path}  index={i} {_describe(recipe, step_s)}{ends}{gain}"))
        paths.append(path)
    return paths


def _export_one(model: Any, path: Path, audio: Any, recipe: dict[str, Any], kind: str,
                subtype: str) -> float:  # fmt: skip
    """One sound to ``path`` with its recipe; the gain applied (dB, 0: none). A numbered
    file's name (see free_path) holds only the model, the seed and the index: never an
    earlier run's file (made with other settings)."""
    from distill.shared.audio.export import ExportMetadata, export_audio

    meta = ExportMetadata(kind=kind, model_id=model.model_id, title=path.stem, data=recipe)
    report = export_audio(path, audio, model.mel_config.sample_rate,
                          subtype=subtype,  # type: ignore[arg-type]  # one of SUBTYPES
                          metadata=meta)  # fmt: skip
    return float(report.gain_db)


def _check_file(path: Path, name: str) -> None:
    """Refuse an input ``path`` (``name``: the option) that is missing, a link to nothing, a
    folder, not a regular file (reading a FIFO waits for a writer: regenerate hung), empty or
    unreadable, in one line each (regenerate said "not a readable audio file: ... System
    error." or "Format not recognised")."""
    if path.is_dir():
        fail(f"{name} {path}: that is a folder, not a file")
    if path.is_symlink() and not path.exists():
        fail(f"{name} {path}: a link to nothing ({os.readlink(path)})")
    if not path.exists():
        fail(f"{name} {path}: no such file")
    if not path.is_file():
        fail(f"{name} {path}: not a regular file (a pipe, a device or a socket)")
    try:
        with open(path, "rb") as f:  # a regular file: opening it does not wait
            empty = not f.read(1)
    except OSError as e:
        fail(f"{name} {path}: cannot read it ({e.strerror or e})")
    if empty:
        fail(f"{name} {path}: empty file (0 bytes)")


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
    header states far more than MAX_SECONDS (inf.INPUT_SLACK_S for the silence trimmed) is refused
    before a sample is decoded; the exact check is ``inference.model_audio``'s, after the trim.
    An error names ``name`` (the option) and the file unless it names the file already."""
    from distill.shared.audio.io import load_audio, stated_duration_s
    from distill.shared.errors import DistillError
    from distill.shared.model import inference as inf

    rate, most = model.mel_config.sample_rate, inf.MAX_SECONDS + inf.INPUT_SLACK_S
    try:
        stated = stated_duration_s(path)
        if stated is not None and stated > most:
            raise inf.BadInput(f"audio is {stated:.1f} s long; at most {inf.MAX_SECONDS:g} s")
        audio = load_audio(path, rate, max_s=most)  # max_s: a header that under-states it
        prepared = inf.model_audio(model, audio.numpy(), rate)
        # less than a code step's hop encodes to one step, which decodes to a single sample:
        # a 1-ms file was taken silently, and its codes made nothing
        step = model.mel_config.hop_length * model.vqvae.config.downsample
        if prepared.shape[-1] < step:
            raise inf.BadInput(f"{prepared.shape[-1] / rate * 1000:.1f} ms once its silence is "
                               f"trimmed; this model encodes a sound of one code step at least, "
                               f"{step / rate * 1000:.1f} ms ({step} samples at {rate} Hz)")  # fmt: skip
        return prepared
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


def _check_prior_codes(model: Any, codes: Any, path: Path) -> None:
    """Refuse codes (from a codes file) that the prior cannot go on from: no code (-1) at a
    step of the levels it draws, naming the file (was: the draw's own error, no file named)."""
    prior = getattr(model, "prior", None)
    if prior is None:  # the draw says the model has none
        return
    p = prior.config.levels
    if (codes[:p] < 0).any():
        fail(f"{path.name}: its codes hold no code (-1) at some step of the first {p} levels, "
             "which the prior draws from")  # fmt: skip


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
        _check_prior_codes(model, codes, path)
        total = int(codes.shape[1])
    else:
        audio = _sound(path, model, "--continue")
        total = inf.encoded_steps(model, int(audio.shape[-1]))
    step_s = model.vqvae.config.downsample / model.mel_config.frames_per_second
    if steps is not None and steps > total:
        typer.echo(shown(f"note: --from {start:g} s is past the end of {path.name} "
                         f"(~{total * step_s:.2f} s): the whole sound is kept"), err=True)  # fmt: skip
    kept = total if steps is None else min(steps, total)
    if kept + inf.steps_for(model, seconds) > inf.steps_for(model, inf.MAX_SECONDS):
        fail(f"--continue keeps ~{kept * step_s:.2f} s of {path.name}; with --seconds "
             f"{seconds:g} more that is over {inf.MAX_SECONDS:g} s (use --from or fewer "
             "--seconds)")  # fmt: skip
    if codes is None:  # only what is kept is searched, with a second after it for context
        assert audio is not None  # read above when the codes were not
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
    seconds: float = typer.Option(2.0, "--seconds",
                                 help="Length of each sound (<= 60; with --trim, the most)."),
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
    trim: float | None = TrimOpt,
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
    _check_trim(trim)
    _subtype(bits, f".{fmt}")
    if start is not None and cont is None:
        fail("--from needs --continue FILE (the sound to continue)")
    _check_folder(out)
    model = _load(model_file, device)
    prime, prefix = None, model_file.stem
    if cont is not None:
        # every option before the sound is encoded (a 15-s loop: a minute and more), as
        # generate_files checks them again before the draws (the note said there, once)
        _params(model, temperature, top_k, top_p, min_p, seed, change_temperature, show=False)
        prime = _continued(model, cont, start, seconds)
        prefix = f"{model_file.stem}-{cont.stem}-cont"
    try:
        generate_files(model, out, count=count, seconds=seconds, temperature=temperature,
                       top_k=top_k, top_p=top_p, min_p=min_p, seed=seed, quality=quality,
                       fmt=fmt, bits=bits, prime=prime, prefix=prefix, trim=trim,
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
    trim: float | None = TrimOpt,
) -> None:
    """A sound with the region [FROM, TO) drawn again by the prior.

    The draw is given what comes before the region; COUNT versions, each file with its recipe."""
    from distill.shared.errors import DistillError
    from distill.shared.model import inference as inf

    if fmt not in ("wav", "flac"):
        fail(f"--format must be wav or flac, got {fmt!r}")
    _check_quality(quality)  # before any sound is encoded or drawn
    _check_count(count)
    _check_trim(trim)
    subtype = _subtype(bits, f".{fmt}")
    _check_folder(out)
    model = _load(model_file, device)
    # every option before the sound is encoded (a 15-s loop: a minute and more)
    params = _params(model, temperature, top_k, top_p, min_p, seed, change_temperature)
    t0 = _step_at(model, start, "--from")
    t1 = None if end is None else _step_at(model, end, "--to")
    if t1 is not None and t1 <= t0:
        fail(f"--to must come after --from: the region [{start:g}, {end:g}) s holds no code step")
    codes = _codes_of(sound, model, "SOUND")
    _check_prior_codes(model, codes, sound)
    total = codes.shape[1]
    length_s = total / inf.steps_for(model, 1.0)  # the sound's length in seconds
    if t0 >= total:
        fail(f"--from {start:g} s is at or past the end of {sound.name} (~{length_s:.2f} s)")
    if t1 is None:
        t1 = total
    elif t1 > total:
        typer.echo(shown(f"note: --to {end:g} s is past the end of {sound.name} "
                         f"(~{length_s:.2f} s): the region runs to the end"), err=True)  # fmt: skip
        t1 = total
    _writable_folder(out)  # before the draws: a refusal after them would lose their work
    try:
        with typer.progressbar(length=count, label="resampling") as bar:
            made = inf.resample_variants(model, codes, t0, t1, params, inf.check_quality(quality),
                                         count=count,
                                         on_batch=lambda done, total: bar.update(done - bar.pos))  # fmt: skip
        recipes = [inf.resample_recipe(params, codes, t0=t0, t1=t1, count=count, quality=quality,
                                       index=i, render_frames=made.render_frames, trim=trim)
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
    if audio_file.suffix.lower() == ".npz":  # it would be refused as "not an audio format"
        fail(f"FILE {audio_file}: a codes file (.npz) is already encoded: `distill decode` "
             "makes it a sound")  # fmt: skip
    _new_file(target, force)  # before the encoding's search, which takes a while
    model = _load(model_file, device)
    codes = _encode_sound(audio_file, model, search=search)
    try:
        np.savez(target, codes=codes, codebook_size=np.int64(model.vqvae.config.codebook_size),
                 model_id=np.array(model.model_id))  # fmt: skip
    except OSError as e:
        fail(f"{target}: could not write ({e.strerror or e})")
    typer.echo(shown(  # the file's name may hold control characters: shown, not acted on
        f"{target}: {codes.shape[0]} levels x {codes.shape[1]} steps, model {model.model_id[:12]}"
    ))  # fmt: skip


# A codes file's model id is a sha256 in hex; one far longer is not a model id
MAX_MODEL_ID_CHARS = 256


def _npy_header(archive: Any, key: str) -> tuple[str, tuple[int, ...], Any] | None:
    """(member, shape, dtype) of the array ``key`` of an open .npz (``archive``, a ZipFile),
    read from its .npy header alone, or None when it holds no such array."""
    from distill.shared.audio.dataset import npy_header

    names = set(archive.namelist())
    member = next((m for m in (f"{key}.npy", key) if m in names), None)
    if member is None:
        return None
    with archive.open(member) as f:
        try:
            shape, dtype = npy_header(f)
        except ValueError as e:
            raise ValueError(f"its '{key}' is an {e}") from e
    return member, shape, dtype


def _codes_in(archive: Any, name: str, model: Any) -> tuple[str | None, Any]:
    """(None, codes) of an open codes .npz (``archive``, a ZipFile), or (why not, None): its
    model id and the codes' shape and type are checked from the .npy headers first."""
    from numpy.lib import format as npf

    from distill.shared.model import inference as inf

    found = _npy_header(archive, "codes")
    if found is None:
        return f"{name}: not a codes file from `distill encode` (it holds no 'codes')", None
    member, shape, dtype = found
    stated, model_id = _npy_header(archive, "model_id"), ""
    if stated is not None:  # compared before the codes are read
        if stated[1] != () or stated[2].kind != "U" or (
                stated[2].itemsize > 4 * MAX_MODEL_ID_CHARS):  # fmt: skip
            return f"{name}: its model_id is {stated[2]} {stated[1]}, not a model id", None
        with archive.open(stated[0]) as f:
            model_id = str(npf.read_array(f, allow_pickle=False)[()])
    if model_id and model_id != model.model_id:
        return (f"{name} was encoded with model {model_id[:12]}, not {model.model_id[:12]} "
                "(codes mean nothing to another model)"), None  # fmt: skip
    if len(shape) != 2 or dtype.kind not in "iu":
        got = f"{dtype} {shape}" if len(shape) == 2 else f"shape {shape}"
        return f"{name}: codes must be an integer grid (levels, steps), got {got}", None
    q, most = model.vqvae.config.levels, inf.steps_for(model, inf.MAX_SECONDS)
    if shape[0] != q or not 1 <= shape[1] <= most:
        return (f"{name}: codes are {shape[0]} x {shape[1]}; this model takes {q} x at most "
                f"{most} ({inf.MAX_SECONDS:g} s)"), None  # fmt: skip
    with archive.open(member) as f:
        return None, npf.read_array(f, allow_pickle=False)


def _read_codes(path: Path, model: Any) -> Any:
    """The (Q, T) codes of a codes file from `distill encode`, checked against ``model``. Each
    array's .npy header is read and checked (its shape, type and size against the model's
    levels and MAX_SECONDS) before the array is: a 2.5-MB .npz inflated to 3.2 GB before any
    check, and one whose header claimed 30 GB ended in numpy's MemoryError. Errors name the
    file."""
    import zipfile
    import zlib

    from distill.shared.errors import DistillError
    from distill.shared.model import inference as inf

    _check_file(path, "CODES")
    with open(path, "rb") as f:
        if f.read(4) != b"PK\x03\x04":  # np.load would try it as a pickle and say so
            fail(f"{path.name}: not a codes file from `distill encode` (not an .npz archive)")
    try:
        with zipfile.ZipFile(path) as archive:
            problem, codes = _codes_in(archive, path.name, model)
    except (OSError, ValueError, KeyError, EOFError, RuntimeError, NotImplementedError,
            zipfile.BadZipFile, zlib.error) as e:  # fmt: skip
        problem = f"{path.name}: not a codes file from `distill encode` ({e})"
    except MemoryError:
        problem = f"{path.name}: its codes do not fit in memory"
    if problem:
        fail(problem)
    try:  # the codes themselves: each within the codebook (-1: none)
        inf.check_grid(model, codes)
    except DistillError as e:
        fail(f"{path.name}: {e}")
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
    from distill.shared.audio.export import ExportMetadata, export_audio, export_format
    from distill.shared.errors import DistillError
    from distill.shared.model import inference as inf

    _check_file(codes_file, "CODES")
    _new_file(out, force)
    try:  # the format and depth before the decoding, whose work a refusal would lose
        export_format(out)
    except DistillError as e:
        fail(str(e))
    subtype = _subtype(bits, out.suffix.lower(), wav="a .wav -o")
    _check_quality(quality)
    model = _load(model_file, device)
    codes = _read_codes(codes_file, model)  # checked against the model, naming the file
    if levels is not None:
        try:
            inf.check_int(levels, "levels", 1, codes.shape[0])
        except DistillError as e:
            fail(f"--{e}")
    try:
        audio, _ = inf.decode(model, codes, levels, quality)
        meta = ExportMetadata(kind="decode", model_id=model.model_id, title=out.stem,
                              data=inf.decode_recipe(codes, levels, quality))  # fmt: skip
        export_audio(out, audio, model.mel_config.sample_rate,
                     subtype=subtype, metadata=meta)  # type: ignore[arg-type]  # fmt: skip
    except DistillError as e:
        fail(str(e))
    typer.echo(shown(f"{out}: {audio.shape[0] / model.mel_config.sample_rate:.2f} s"))


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
        FORMATS,
        ExportMetadata,
        export_audio,
        export_format,
        exported_samples,
        read_export_metadata,
    )
    from distill.shared.errors import DistillError
    from distill.shared.model import inference as inf

    name = audio_file.name
    _check_file(audio_file, "FILE")
    try:
        meta = read_export_metadata(audio_file)
        info = sf.info(str(audio_file))
    except DistillError as e:
        fail(str(e))
    except (OSError, RuntimeError) as e:  # read once already: gone or changed since
        fail(f"{name}: not a readable audio file: {e}")
    _check_phase(name, meta.data)  # before the model is read
    unknown = inf.unknown_recipe_keys(meta.kind, meta.data)
    if unknown:  # replayed still: if it differs, this says why it may
        typer.echo(shown(f"note: {name}'s recipe holds {', '.join(map(repr, unknown))}, which "
                         "this Distill does not know: a newer Distill probably made it, and "
                         "the sound is replayed without that rule"), err=True)  # fmt: skip
    model = _load(model_file, device)
    if meta.model_id != model.model_id:
        fail(f"{name} was made by model {meta.model_id[:12]}, but {model_file.name} "
             f"is model {model.model_id[:12]}: pass the model that made it")  # fmt: skip
    # an original in a format Distill does not write (someone converted the export: OGG,
    # AIFF, 8-bit) is regenerated as WAV, the nearest subtype that holds its samples
    suffix = audio_file.suffix if audio_file.suffix.lower() in FORMATS else ".wav"
    target = Path(out) if out else audio_file.with_name(f"{audio_file.stem}.regenerated{suffix}")
    if target.is_dir() or (out or "").endswith(("/", os.sep)):  # a folder: the file's name in it
        _writable_folder(target)  # made if it is new (as generate's -o is), before the replay
        target = target / f"{audio_file.stem}{suffix}"
    if target.resolve() == audio_file.resolve():
        fail(f"{target}: that is the file being regenerated; choose another --out")
    try:
        fmt = export_format(target)  # a bad suffix is refused before the replay's work
    except DistillError as e:
        fail(str(e))
    subtype = _written_subtype(info.subtype, fmt)
    _new_file(target, force)  # before the replay's work
    # an original in a format or subtype Distill does not write was converted from an export:
    # the regenerated sound is compared as each export Distill writes would hold it, converted
    # as the original was (one in WAV or FLAC is compared as its own format holds it first)
    foreign = not _distill_writes(info.format, info.subtype)
    if foreign:
        typer.echo(shown(f"note: {name} is {info.format} {info.subtype}, which Distill does not "
                         f"write: the sound is regenerated as {fmt} and compared as "
                         f"{info.format} {info.subtype}"), err=True)  # fmt: skip
    original = _original_samples(audio_file, info, model)
    readings = inf.readings(meta.kind, meta.data)
    note = _replay_note(meta.kind, meta.data, model, len(readings))
    if note:
        typer.echo(note, err=True)
    # A recipe from an older Distill may lack a rule it was made under: its other readings
    # (inference.readings) are tried in turn, the file as written kept when none matches.
    tried: list[str] = []
    first: np.ndarray | None = None  # the recipe as written, as the original would hold it
    written: Any = None  # the recipe as written: what the file is left holding
    match: tuple[str, str, str, np.ndarray] | None = None  # how, format, subtype, samples
    again = ExportMetadata(kind=meta.kind, model_id=meta.model_id, data=meta.data,
                           title=meta.title)  # fmt: skip
    rate = model.mel_config.sample_rate
    try:
        for how, recipe in readings:
            live = LiveLine() if note else None  # a long replay shows its batches as they go
            try:
                audio = inf.replay(model, meta.kind, recipe, _replay_progress(live))
            except DistillError as e:
                fail(_recipe_error(name, e))
            finally:
                if live is not None:
                    live.end()
            written = audio if written is None else written
            for as_fmt, as_subtype in _exports_tried(info, fmt):
                samples = exported_samples(audio, rate, as_fmt, as_subtype)  # type: ignore[arg-type]
                held = _as_original(samples, info, as_subtype)
                first = held if first is None else first
                if np.array_equal(original, held):
                    match = how, as_fmt, as_subtype, samples
                    break
            if match is not None:
                break
            tried.append(how)
        if match is not None:  # the file holds what the original holds, where its depth can
            subtype = match[2] if match[2] in _writable_subtypes(fmt) else subtype
            export_audio(target, match[3].T, rate, subtype=subtype, metadata=again,  # type: ignore[arg-type]
                         scale=False)  # fmt: skip
        else:
            export_audio(target, written, rate, subtype=subtype, metadata=again)  # type: ignore[arg-type]
    except DistillError as e:
        fail(str(e))
    assert first is not None
    # a header at another rate is another sound (played faster or slower), whatever its samples
    rates = (f"{rate} Hz against its {info.samplerate} Hz"
             if info.samplerate != rate else "")  # fmt: skip
    if match is not None and not rates:
        how = match[0]
        said = "" if how == "as written" else f" (read {how}: its recipe predates that rule)"
        if foreign:
            said += f" as {info.format} {info.subtype} holds it (written as {fmt} {subtype})"
        elif subtype != info.subtype:  # e.g. a float WAV's sound written as FLAC
            said += f" (written as {fmt} {subtype})"
        typer.echo(shown(f"{target}: identical to {name}{said}"))
        return
    held_as = f" ({fmt} {subtype})" if foreign else ""
    why = (f"{rates}, its samples otherwise identical" if match is not None
           else "; ".join(filter(None, [rates, _difference(original, first)])))  # fmt: skip
    typer.echo(shown(f"{target}{held_as}: DIFFERS from {name}: {why}"
                     + (f"; also tried it {'; '.join(tried[1:])}" if len(tried) > 1 else "")))
    raise typer.Exit(1)


def _recipe_error(name: str, e: Exception) -> str:
    """A replay's error as a line that names the file and says it is about its recipe (was:
    "error: count must be in [1, 256], got 1000000", "SamplingParams: seed must be ...")."""
    text = str(e).removeprefix("SamplingParams: ")
    if text.startswith(name):
        return text
    if not text.startswith(("the ", "cannot ")):
        text = f"the recipe's {text}"
    return f"{name}: {text}"


# What a regenerated sound is written as when its original's subtype is not one Distill
# writes: the nearest that holds each of its samples (8-bit in 16; 32-bit and double in float);
# a lossy one (Vorbis, Opus, MP3, u-law, ADPCM) in Distill's default, 24 bits.
NEAREST_SUBTYPE = {"PCM_S8": "PCM_16", "PCM_U8": "PCM_16", "PCM_32": "FLOAT", "DOUBLE": "FLOAT"}


def _writable_subtypes(fmt: str) -> list[str]:
    """The subtypes Distill writes in ``fmt`` ("WAV" or "FLAC")."""
    from distill.shared.audio.export import SUBTYPES as WRITTEN

    return [s for s in WRITTEN if not (fmt == "FLAC" and s == "FLOAT")]


def _distill_writes(fmt: str, subtype: str) -> bool:
    """Whether Distill exports files of ``fmt`` and ``subtype`` (WAV 16, 24, float; FLAC 16,
    24): a file of another (OGG, AIFF, 8-bit) was converted from an export."""
    return fmt in ("WAV", "FLAC") and subtype in _writable_subtypes(fmt)


def _written_subtype(original: str, fmt: str) -> str:
    """What a regenerated sound is written as: its original's subtype where Distill writes it in
    ``fmt``, else :data:`NEAREST_SUBTYPE`'s."""
    subtype = original if original in _writable_subtypes("WAV") else NEAREST_SUBTYPE.get(
        original, "PCM_24")  # fmt: skip
    return "PCM_24" if subtype not in _writable_subtypes(fmt) else subtype


def _exports_tried(info: Any, fmt: str) -> list[tuple[str, str]]:
    """The exports (format, subtype) an original described by ``info`` may hold the samples of,
    in the order they are tried: its own format (else ``fmt``, what is written), at its own
    depth (else the nearest), then the rest. WAV and FLAC round a float to an integer apart
    (one step of the last bit, now and then): a FLAC converted losslessly from a WAV export
    holds the WAV's samples, and compared as a FLAC export the same sound "differed"."""
    first = info.format if info.format in ("WAV", "FLAC") else fmt
    tried = []
    for each in (first, *(f for f in ("WAV", "FLAC") if f != first)):
        nearest = _written_subtype(info.subtype, each)
        tried += [(each, s) for s in (nearest, *(s for s in _writable_subtypes(each)
                                                 if s != nearest))]  # fmt: skip
    return tried


def _as_original(made: Any, info: Any, subtype: str) -> Any:
    """The samples ``made`` (frames, channels) of a ``subtype`` export as the original's format
    holds them (written there in memory and read back: 8-bit, Vorbis), when its subtype is
    another (WAV and FLAC at one depth hold the same samples)."""
    import io

    import soundfile as sf

    if info.subtype == subtype:
        return made
    buffer = io.BytesIO()
    try:
        sf.write(buffer, made, info.samplerate, subtype=info.subtype, format=info.format)
        buffer.seek(0)
        return sf.read(buffer, always_2d=True)[0]
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError):  # one it cannot write
        return made


def _original_samples(path: Path, info: Any, model: Any) -> Any:
    """The samples of the file being regenerated (frames, channels), refused when it is longer
    than any sound Distill exports, before it is decoded (a 2-hour FLAC of silence is small and
    decodes to 2.7 GB), or has more channels than an export can."""
    import soundfile as sf

    from distill.shared.audio.export import MAX_CHANNELS
    from distill.shared.model import inference as inf

    rate = max(int(info.samplerate), 1)
    most = int((inf.MAX_SECONDS + 1.0) * max(rate, model.mel_config.sample_rate))
    if info.channels > MAX_CHANNELS or info.frames > most:
        fail(f"{path.name}: {info.channels} channel(s) of {info.frames / rate:.1f} s; no "
             f"sound Distill exports has over {MAX_CHANNELS} channels or "
             f"{inf.MAX_SECONDS:g} s")  # fmt: skip
    try:
        samples = sf.read(str(path), frames=most + 1, always_2d=True)[0]
    except (OSError, RuntimeError) as e:
        fail(f"{path.name}: not a readable audio file: {e}")
    if len(samples) > most:  # a header that under-states it
        fail(f"{path.name}: over {inf.MAX_SECONDS:g} s; no sound Distill exports is longer")
    return samples


def _check_phase(name: str, data: Any) -> None:
    """Refuse a recipe asking for more phase iterations than any Distill recorded (its presets'
    2, 4 or 8, and 32): 10 000 took 20 minutes a reading of a 60-s sound. (``inference.
    recorded_phase`` takes up to 10 000; its other checks come with the replay.)"""
    from distill.shared.audio.phase import QUALITY_PRESETS

    record = data.get("phase")
    if not isinstance(record, (list, tuple)) or not record:
        return
    n = record[0]
    most, preset = max((p.n_iter, q) for q, p in QUALITY_PRESETS.items())
    if isinstance(n, int) and not isinstance(n, bool) and n > most:
        fail(f"{name}: its recipe asks for {n} phase iterations; no Distill ever recorded more "
             f"than {most} (the '{preset}' preset)")  # fmt: skip


# A replay making more audio than this (seconds, every sound of its batch in every reading) is
# said before it starts: a recipe of 256 sounds of 60 s ran for over 10 minutes with no output
LONG_REPLAY_S = 120.0


def _replay_progress(live: LiveLine | None) -> Callable[[int, int], None] | None:
    """What shows a long replay's decoded batches on ``live`` (None: nothing shown)."""
    if live is None:
        return None
    return lambda done, total: live.update(f"replaying: {done}/{total} sounds decoded")


def _replay_note(kind: str, data: Any, model: Any, readings: int) -> str | None:
    """What a long replay will do, in words, or None for a short one (or a recipe the replay
    will refuse)."""
    from distill.shared.model import inference as inf

    def number(v: object) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    count, index = data.get("count"), data.get("index")
    if not (isinstance(count, int) and number(count) and 1 <= count <= inf.MAX_COUNT
            and isinstance(index, int) and number(index)):  # fmt: skip
        return None
    step_s = model.vqvae.config.downsample / model.mel_config.frames_per_second
    if kind == "generate":
        seconds, prime = data.get("seconds"), data.get("prime")
        if not number(seconds) or not 0 < seconds <= inf.MAX_SECONDS:
            return None
        kept = len(prime[0]) if isinstance(prime, list) and prime and isinstance(
            prime[0], list) else 0  # fmt: skip
        length = float(seconds) + kept * step_s
    elif kind == "resample":
        codes = data.get("codes")
        if not isinstance(codes, list) or not codes or not isinstance(codes[0], list):
            return None
        length = len(codes[0]) * step_s
    else:  # a decode or an edit: one grid of at most MAX_SECONDS
        return None
    if count * length * readings < LONG_REPLAY_S:
        return None
    what = f"{count} sounds of {length:.3g} s" if count > 1 else f"a sound of {length:.3g} s"
    why = f" to make sound {index} (its batch draws them together)" if count > 1 else ""
    tries = f", in up to {readings} readings of its older recipe" if readings > 1 else ""
    return f"replaying {what}{why}{tries}: this takes a while"


def _difference(original: object, made: object) -> str:
    """How two sounds differ, in words: the lengths, or the largest difference against the
    original's peak."""
    import numpy as np

    a, b = np.asarray(original, dtype=np.float64), np.asarray(made, dtype=np.float64)
    if a.shape != b.shape:  # (frames, channels) each
        def channels(n: int) -> str:
            return f"{n} channel" + ("" if n == 1 else "s")

        return ", ".join(part for part in (
            f"{b.shape[0]} samples against its {a.shape[0]}" if a.shape[0] != b.shape[0] else "",
            f"{channels(b.shape[1])} against its {a.shape[1]}" if a.shape[1:] != b.shape[1:]
            else "") if part)  # fmt: skip
    largest = float(np.abs(a - b).max())
    peak = float(np.abs(a).max())
    under = 20 * np.log10(peak / largest) if largest > 0 and peak > 0 else float("inf")
    if under < 0:  # a difference larger than the original's peak (a sound nearly silent)
        return f"largest difference {largest:.2g} ({-under:.0f} dB over its peak)"
    return f"largest difference {largest:.2g} ({under:.0f} dB under its peak)"
