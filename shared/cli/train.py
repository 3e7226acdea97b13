"""``distill train``: from a folder of sounds (or a dataset) to a ``.distill`` model file.

One pipeline of jobs joined by ``depends_on``: preprocess (when given a folder) -> train.vqvae ->
train.prior. The jobs are submitted at once, so they run without this terminal; the command
then follows each stage in turn with a live line, and at the end downloads the prior job's model
artifact to ``NAME.distill``. Ctrl-C detaches: the jobs go on, and it prints how to follow,
cancel and later fetch them.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import typer

from distill.shared.bus import protocol as P
from distill.shared.cli.common import BrokerOpt, LiveLine, client, fail
from distill.shared.cli.model import check_model_output
from distill.shared.errors import ConfigError, DistillError

SERVICES = {"preprocess": "distill.preprocess", "vqvae": "distill.train.vqvae",
            "prior": "distill.train.prior"}  # fmt: skip
STAGE_CHOICES = ("all", "vqvae", "prior")
# How `--minutes N` is shared out: the workers' CPU default budgets (RVQ-VAE 8 min, prior 3 min)
# in proportion. The prior can only be as good as the codes it learns, and an epoch of the
# small LSTM costs a fraction of an RVQ-VAE epoch. Preprocessing takes seconds: not budgeted.
BUDGET_SHARE = {"vqvae": 0.7, "prior": 0.3}
LINE_WIDTH = 150
BROKER_PROBE_S = 5.0  # each of two tries at reaching the broker before anything is uploaded


# --- the live line --------------------------------------------------------------------------------


def _duration(s: float) -> str:
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def _number(row: dict[str, Any], *keys: str) -> float | None:
    for key in keys:
        value = row.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    return None


def _bits_parts(row: dict[str, Any]) -> list[str]:
    """The prior's figures: train/val bits per code beside the unigram and bigram baselines
    (a prior with too few held-out files validates on training windows, and says so)."""
    parts = []
    val = "val on training files" if row.get("validated_on") == "train" else "val"
    for label, keys in (("train", ("train_bits", "train_nll_bits", "train_nll")),
                        (val, ("val_bits", "val_nll_bits", "val_nll")),
                        ("unigram", ("unigram_bits", "unigram")),
                        ("bigram", ("bigram_bits", "bigram"))):  # fmt: skip
        value = _number(row, *keys)
        if value is not None:
            parts.append(f"{label} {value:.3f}")
    if parts:
        parts[-1] += " bits/code"
    return parts


def train_line(event: dict[str, Any]) -> str | None:
    """The live line for a training job: epoch, losses or bits per code, codebook use, ETA."""
    from distill.shared.cli.jobs import progress_line

    row = event.get("row") if event.get("type") == "metrics" else None
    if not isinstance(row, dict):
        if event.get("type") != "progress":
            return None
        return progress_line(event)
    parts = []
    if "epoch" in row:
        parts.append(f"epoch {row['epoch']}" + (f"/{row['epochs']}" if "epochs" in row else ""))
    for key in ("train_loss", "val_loss", "train_recon", "val_recon", "commit_loss"):
        if isinstance(row.get(key), (int, float)):
            parts.append(f"{key} {row[key]:.4g}")
    parts += _bits_parts(row)
    if isinstance(row.get("lr"), (int, float)):
        parts.append(f"lr {row['lr']:.3g}")
    util = row.get("utilisation") or row.get("utilization")
    if isinstance(util, list):
        parts.append("util " + " ".join(f"{u:.2f}" for u in util))
    if isinstance(row.get("steps_per_s"), (int, float)):
        parts.append(f"{row['steps_per_s']:.1f} step/s")
    if isinstance(row.get("eta_s"), (int, float)):
        parts.append(f"eta {_duration(row['eta_s'])}")
    return "  ".join(parts)


def line_width() -> int:
    """Columns for the live line: a line longer than the terminal wraps, and ``\r`` then
    rewrites only its last row."""
    import shutil

    return max(40, min(LINE_WIDTH, shutil.get_terminal_size((LINE_WIDTH + 1, 24)).columns - 1))


def preview_line(event: dict[str, Any]) -> str | None:
    """One line for a training preview: which validation file came back through the model at
    which epoch, and how to fetch it to listen. None for the original beside it (the user has
    that file) or an event without an artifact."""
    sha = event.get("artifact")
    if not isinstance(sha, str) or event.get("which", "reconstruction") != "reconstruction":
        return None
    epoch, name = event.get("epoch"), str(event.get("file") or f"chunk {event.get('chunk', 0)}")
    stem = Path(name).stem or "preview"
    part, count = event.get("file_chunk"), event.get("file_chunks")
    if isinstance(part, int) and isinstance(count, int) and count > 1:  # a long file's chunk
        name, stem = f"{name} (chunk {part} of {count})", f"{stem}-{part}"
    at = f" at epoch {epoch}" if epoch is not None else ""
    out = f"{stem}-epoch{epoch}.wav" if epoch is not None else f"{stem}-preview.wav"
    return f"preview{at}: {name} through the model: distill artifacts get {sha[:16]} {out}"


def follow_training(c: Any, job_id: str) -> dict[str, Any]:
    """Follows a job with the live line on stderr until it ends; returns its record."""
    from distill.shared.bus.jobs import JobsClient

    width, seen_metrics, live = line_width(), False, LiveLine()

    def on_event(event: dict[str, Any]) -> None:
        nonlocal seen_metrics
        kind = event.get("type")
        if kind == "status":
            live.say(f"{job_id}: {event.get('status')}")
        elif kind == "preview":
            line = preview_line(event)
            if line:
                live.say(line)
        elif kind == "note":  # something the worker did that the user should know
            live.say(f"{job_id}: {event.get('message')}")
        elif kind == "metrics" or (kind == "progress" and not seen_metrics):
            # once a training job sends metric rows, its progress events (the same epoch, fewer
            # fields) would only make the line flicker between two forms
            seen_metrics = seen_metrics or kind == "metrics"
            line = train_line(event)
            if line:
                live.update(line, width=width)
        sys.stderr.flush()

    record = JobsClient(c).follow(job_id, on_event)
    live.end()
    return record


# --- settings -------------------------------------------------------------------------------------


def parse_settings(items: list[str]) -> dict[str, Any]:
    """``["channels=256", "dilations=[1,3]", "schedule=cosine"]`` -> a dict; values are JSON
    where they parse as JSON, strings otherwise."""
    import json

    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise DistillError(f"setting {item!r} is not KEY=VALUE")
        try:
            out[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            out[key.strip()] = raw
    return out


def stage_train_settings(items: list[str], shortcuts: dict[str, Any],
                         minutes: float | None, stages: list[str]) -> dict[str, dict[str, Any]]:  # fmt: skip
    """TrainConfig overrides per training stage.

    ``--train-opt K=V`` goes to every stage, ``--train-opt vqvae.K=V`` / ``prior.K=V`` to one;
    the shortcut options (``--epochs`` ...) go to every stage; ``--minutes`` is shared out by
    :data:`BUDGET_SHARE` over the stages that run (one stage gets all of it), unless a stage's
    own ``minutes`` is set.
    """
    per_stage: dict[str, dict[str, Any]] = {s: {} for s in stages}
    for key, value in parse_settings(items).items():
        prefix, dot, rest = key.partition(".")
        if dot and prefix in BUDGET_SHARE:
            if prefix in per_stage:
                per_stage[prefix][rest] = value
        elif dot:
            raise DistillError(f"--train-opt {key}: the prefix must be vqvae. or prior.")
        else:
            for settings in per_stage.values():
                settings.setdefault(key, value)
    if minutes is not None:
        if minutes <= 0:
            raise DistillError(f"--minutes must be > 0, got {minutes:g}")
        total_share = sum(BUDGET_SHARE[s] for s in stages)
        for s in stages:
            per_stage[s].setdefault("minutes", round(minutes * BUDGET_SHARE[s] / total_share, 3))
    for settings in per_stage.values():
        for key, value in shortcuts.items():
            if value is not None:
                settings[key] = value
    return per_stage


# --- the pipeline ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Stage:
    name: str  # preprocess, vqvae, prior
    job_id: str


@dataclass(frozen=True)
class TrainRequest:
    """What ``distill train`` was asked for, settings parsed."""

    source: str | None  # a folder, a dataset id (or prefix), a preprocess job id; None: --vqvae's
    stage: str  # "all", "vqvae" or "prior"
    vqvae_ref: str | None  # --vqvae: an RVQ-VAE job or weights artifact (for --stage prior)
    name: str  # the model's name: NAME.distill
    vqvae_model: dict[str, Any] = field(default_factory=dict)
    prior_model: dict[str, Any] = field(default_factory=dict)
    train: dict[str, dict[str, Any]] = field(default_factory=dict)  # per stage


def check_settings(req: TrainRequest) -> None:
    """The settings checked as the workers will read them, before anything is uploaded: a
    misspelt or misplaced key fails now, not minutes later when its stage starts. A model
    setting given as a training one is named with the option it belongs to. Only imports the
    configs (their torch-free settings modules) when there are settings to check."""
    if not (req.vqvae_model or req.prior_model or any(req.train.values())):
        return
    from dataclasses import fields

    from distill.shared.configs import config_from_dict
    from distill.shared.model.settings import PriorConfig, VQVAEConfig
    from distill.shared.train.jobparams import prior_settings
    from distill.shared.train.settings import PriorTrainConfig, TrainConfig

    configs: dict[str, tuple[type, type, str]] = {  # training config, model config, its option
        "vqvae": (TrainConfig, VQVAEConfig, "--vqvae-opt"),
        "prior": (PriorTrainConfig, PriorConfig, "--prior-opt")}  # fmt: skip
    for stage, settings in req.train.items():
        train_config, model_config, option = configs[stage]
        known = {f.name for f in fields(train_config)}
        model_keys = {f.name for f in fields(model_config)}
        for key in settings:
            if key not in known and key in model_keys:
                raise DistillError(
                    f"--train-opt: {key} is a model setting of the {stage} stage, "
                    f"not a training one: give it as {option} {key}=VALUE")
        config_from_dict(train_config, settings, f"--train-opt ({stage} stage)")
    if "n_mels" in req.vqvae_model:
        raise DistillError("--vqvae-opt n_mels: the RVQ-VAE takes its mel bands from the "
                           "dataset (its mel settings, made when it was prepared): leave it out")  # fmt: skip
    config_from_dict(VQVAEConfig, req.vqvae_model, "--vqvae-opt")
    prior_keys = {f.name for f in fields(PriorConfig)}
    unknown = sorted(k for k in req.prior_model if k not in prior_keys)
    if unknown:
        raise DistillError(f"--prior-opt: unknown keys {unknown}; known keys {sorted(prior_keys)}")
    # types and bounds now, over the sizes the prior stage would choose (those come from the
    # RVQ-VAE's codes: whether levels and codebook_size fit them is the stage's to say)
    try:
        prior_settings(req.prior_model)
    except ConfigError as e:
        raise ConfigError(f"--prior-opt: {e}") from None


def model_name(source: str | None, vqvae_ref: str | None) -> str:
    """NAME for NAME.distill: the folder's name, else a short form of the id it came from."""
    if source and Path(source).is_dir():
        return Path(source).resolve().name or "model"
    ref = source or vqvae_ref or "model"
    # a name, never a path: a source that is no folder (an id, or a path the upload will
    # refuse) names a file here
    return f"model-{Path(ref).name.removeprefix('j-')[:12]}"


def _dataset_source(c: Any, source: str, stages: list[Stage]) -> tuple[str, str | None]:
    """(dataset sha or "", the job that makes it or None); a folder is uploaded and preprocessed."""
    from distill.shared.bus.artifacts import ArtifactClient
    from distill.shared.bus.jobs import JobsClient
    from distill.shared.cli.data import resolve_dataset, upload_folder

    folder = Path(source)
    if not folder.is_dir():
        return resolve_dataset(c, source)
    files = upload_folder(ArtifactClient(c), folder)
    job = JobsClient(c).submit(SERVICES["preprocess"], {"files": files})
    stages.append(Stage("preprocess", job["id"]))
    return "", job["id"]


def _vqvae_source(c: Any, ref: str) -> tuple[str, str | None, str]:
    """``--vqvae`` -> (weights sha or "", the RVQ-VAE job still to finish or None, its dataset
    sha or "")."""
    from distill.shared.bus.artifacts import ArtifactClient
    from distill.shared.bus.jobs import JobsClient
    from distill.shared.cli.jobs import resolve_artifact

    if not ref.startswith("j-"):
        sha = resolve_artifact(ArtifactClient(c), ref, kind="vqvae")
        kind = ArtifactClient(c).stat(sha).get("kind")
        if kind != "vqvae":
            raise DistillError(
                f"--vqvae {ref}: artifact {sha[:16]} is a {kind!r}, not RVQ-VAE weights"
            )
        return sha, None, ""
    record = JobsClient(c).get(ref, metrics=False)
    if record["service"] != SERVICES["vqvae"]:
        raise DistillError(f"--vqvae {ref}: a {record['service']} job, not an RVQ-VAE job")
    if record["status"] in ("queued", "running"):
        return "", ref, ""
    if record["status"] != "succeeded":
        raise DistillError(f"--vqvae {ref}: the job {record['status']}: {record.get('error')}")
    result = record.get("result") or {}
    return str(result.get("model") or ""), None, str(result.get("dataset") or "")


def _prior_params(c: Any, req: TrainRequest, stages: list[Stage], dataset: str,
                  producer: str | None, vqvae_source: tuple[str, str | None, str] | None
                  ) -> tuple[dict[str, Any], list[str]]:  # fmt: skip
    """The prior job's params and dependencies. What is known now goes in the params; the rest
    the worker takes from its dependencies' results (the RVQ-VAE job's names both)."""
    params: dict[str, Any] = {
        "prior": req.prior_model,
        "train": req.train["prior"],
        "name": req.name,
    }
    if req.stage == "all":
        return params, [stages[-1].job_id]
    assert vqvae_source is not None  # resolved by submit_pipeline before any upload
    weights, vqvae_job, vqvae_dataset = vqvae_source
    if req.source is None:
        dataset, producer = vqvae_dataset, None
    if producer and vqvae_job:
        # both results would name a dataset: settle which one here by waiting for the preprocess
        prep = stages[-1] if stages else Stage("preprocess", producer)
        record = follow_stage(c, prep, 1, 1)
        if record["status"] != "succeeded":
            raise StageFailed(cascade_report(c, [prep], 0, record))
        dataset, producer = str((record.get("result") or {}).get("dataset") or ""), None
    deps = [j for j in (producer, vqvae_job) if j]
    params |= {k: v for k, v in (("vqvae", weights), ("dataset", dataset)) if v}
    return params, deps


def submit_pipeline(c: Any, req: TrainRequest) -> list[Stage]:
    """Submits the jobs ``req`` asks for, joined by depends_on; returns them in order."""
    from distill.shared.bus.jobs import JobsClient

    jobs = JobsClient(c)
    stages: list[Stage] = []
    vqvae_source = None
    if req.stage == "prior":  # --vqvae checked before anything is uploaded or submitted
        if not req.vqvae_ref:
            raise DistillError(
                "--stage prior needs --vqvae JOB|ARTIFACT: the RVQ-VAE whose codes it learns"
            )
        vqvae_source = _vqvae_source(c, req.vqvae_ref)
        if req.source is None and not (vqvae_source[1] or vqvae_source[2]):
            raise DistillError("--vqvae names weights: give the dataset (a folder, dataset id or "
                               "preprocess job) the prior should learn")  # fmt: skip
    dataset, producer = _dataset_source(c, req.source, stages) if req.source else ("", None)
    if req.stage in ("all", "vqvae"):
        params: dict[str, Any] = {"model": req.vqvae_model, "train": req.train["vqvae"]}
        if dataset:  # else the job takes it from its preprocess dependency's result
            params["dataset"] = dataset
        job = jobs.submit(SERVICES["vqvae"], params, depends_on=[producer] if producer else [])
        stages.append(Stage("vqvae", job["id"]))
    if req.stage in ("all", "prior"):
        params, deps = _prior_params(c, req, stages, dataset, producer, vqvae_source)
        job = jobs.submit(SERVICES["prior"], params, depends_on=deps)
        stages.append(Stage("prior", job["id"]))
    return stages


def warn_missing_workers(c: Any, stages: list[Stage]) -> None:
    for stage in stages:
        if not c.mmi_service(SERVICES[stage.name]):
            sys.stderr.write(f"note: no {SERVICES[stage.name]} worker is registered; job "
                             f"{stage.job_id} waits until one is (`distill up`, or `distill "
                             f"worker {stage.name}`)\n")  # fmt: skip


def follow_stage(c: Any, stage: Stage, index: int, count: int) -> dict[str, Any]:
    sys.stderr.write(f"[{index}/{count}] {stage.name}  job {stage.job_id}\n")
    sys.stderr.flush()
    return follow_training(c, stage.job_id)


def stage_outcome(stage: Stage, result: dict[str, Any]) -> str:
    """One line for a finished stage."""
    if stage.name == "preprocess":
        line = (f"dataset {str(result.get('dataset'))[:16]}: {result.get('chunks')} chunks, "
                f"{result.get('train_files')} train / {result.get('val_files')} validation files")  # fmt: skip
        return line + _skipped_files(result)
    chosen = result.get("chosen") or {}
    reason = str(chosen.get("why") or "").rstrip(".")  # how the stage sized its model, and why
    if stage.name == "vqvae":
        return (f"RVQ-VAE {chosen.get('codebook_size')} codes x {chosen.get('levels')} levels"
                f"{f' ({reason})' if reason else ''}; {_vqvae_figures(result)}")  # fmt: skip
    # the prior: its size first (as the RVQ-VAE's line), then its figures, then why it stopped
    row = {**(result.get("baselines") or {}), **(result.get("metrics") or {})}
    best = _number(result, "best_val_bits")
    on_train = " on training files" if row.get("validated_on") == "train" else ""
    parts = [reason] if reason else []
    if best is not None:
        parts.append(f"best val{on_train} {best:.3f} bits/code (epoch {result.get('best_epoch')})")
    parts.append("last epoch " + "  ".join(_bits_parts(row)))
    stopped = str(result.get("stopped") or "?").replace("_", " ")
    line = "; ".join(parts + [f"stopped: {stopped}"])
    bigram = _number(row, "bigram_bits", "bigram")
    if best is not None and bigram is not None and best >= bigram:
        line += (f"\nnote: the prior predicts the codes no better than a bigram of them "
                 f"({best:.3f} against {bigram:.3f} bits/code): its draws will wander; train it "
                 "longer (--minutes), or on more sounds")  # fmt: skip
    return line


SKIPPED_SHOWN = 5  # skipped files named on the preprocess line; the rest are counted


def _skipped_files(result: dict[str, Any]) -> str:
    """'; skipped 2: a.txt (not audio ...), b.wav (empty ...)' for the files preprocessing could
    not use (the live line shows each once and overwrites it), or ''."""
    skipped = [r for r in result.get("manifest") or [] if r.get("status") != "ok"]
    if not skipped:
        return ""
    named = ", ".join(f"{r.get('name')} ({r.get('reason') or r.get('status')})"
                      for r in skipped[:SKIPPED_SHOWN])  # fmt: skip
    more = len(skipped) - SKIPPED_SHOWN
    rest = (f" and {more} more (`distill dataset show {str(result.get('dataset'))[:16]}` lists "
            "them)") if more > 0 else ""  # fmt: skip
    return f"; skipped {len(skipped)}: {named}{rest}"


def _vqvae_figures(result: dict[str, Any]) -> str:
    """Best validation loss (and epoch), the codebook refinement, the decoded-audio check."""
    loss = _number(result, "best_val_loss")
    # too few files to hold any out: the "validation" figures are on training chunks
    on_train = (result.get("metrics") or {}).get("validated_on") == "train"
    held = "training" if on_train else "validation"
    parts = [f"best {held} loss {loss:.4f} (epoch {result.get('best_epoch')})"
             + (" (no files held out)" if on_train else "")
             if loss is not None else "no validation loss"]  # fmt: skip
    refine = result.get("refine") or {}
    before, after = _number(refine, "val_loss_before"), _number(refine, "val_loss_after")
    if refine.get("iters") and before is not None and after is not None:
        done = (f"refined (and {refine.get('decoder_steps')} decoder steps)" if refine.get("kept")
                else "refinement undone")  # fmt: skip
        parts.append(f"codebooks {done}: {before:.4f} -> {after:.4f}")
    in_use = result.get("codes_in_use")
    if isinstance(in_use, list) and in_use:
        parts.append("codes in use on the training files " + " ".join(
            f"{float(u):.0%}" for u in in_use))  # fmt: skip
    audio = result.get("audio") or {}
    sc, floor = _number(audio, "sc"), _number(audio, "floor")
    if sc is not None and floor is not None:
        chunks = audio.get("chunks")
        ratio = f"{sc / floor:.2f}x the Griffin-Lim floor: " if floor > 0 else ""
        # on the sound (the bench's metric), or on mel bins for a dataset prepared before the
        # dataset kept the check chunks' audio (a lower floor: about 3x the ratio)
        on = ("" if audio.get("on") == "audio"
              else " on mel bins: prepare the dataset again for the figure on audio")  # fmt: skip
        parts.append(f"decoded audio {ratio}{sc:.3f} vs {floor:.3f} ({chunks} {held} "
                     f"chunk{'' if chunks == 1 else 's'}, spectral convergence{on})")  # fmt: skip
    return "; ".join(parts)


class StageFailed(DistillError):
    pass


def cascade_report(c: Any, stages: list[Stage], failed: int, record: dict[str, Any]) -> str:
    """Why a stage ended, and what became of the stages after it."""
    from distill.shared.bus.jobs import JobsClient

    lines = [f"stage {stages[failed].name} (job {record['id']}) {record['status']}: "
             f"{record.get('error') or 'no reason given'}"]  # fmt: skip
    first = str(record.get("error") or "")
    for later in stages[failed + 1 :]:
        r = JobsClient(c).get(later.job_id, metrics=False)
        error = str(r.get("error") or "")
        if first and error.endswith(first) and len(error) > len(first):
            # "dependency j-... failed: <the reason printed just above>": say it once
            error = error[: -len(first)].rstrip(": ") + " (the reason above)"
        lines.append(f"  then {later.name} (job {later.job_id}) {r['status']}"
                     + (f": {error}" if error else ""))  # fmt: skip
    return "\n".join(lines)


def follow_pipeline(
    c: Any, stages: list[Stage], finished: list[Stage] | None = None
) -> dict[str, Any]:
    """Follows each stage in turn; returns the last stage's record, StageFailed otherwise.
    Each stage that succeeds is added to ``finished`` (what a detach message says)."""
    record: dict[str, Any] = {}
    for i, stage in enumerate(stages):
        record = follow_stage(c, stage, i + 1, len(stages))
        if record["status"] != "succeeded":
            raise StageFailed(cascade_report(c, stages, i, record))
        typer.echo(f"{stage.name}: {stage_outcome(stage, record.get('result') or {})}", err=True)
        if finished is not None:
            finished.append(stage)
    return record


def detach_message(stages: list[Stage], out: Path, finished: int = 0) -> str:
    """How to follow, cancel and fetch the jobs of ``stages``, of which the first ``finished``
    have succeeded: those are not named to follow or cancel."""
    if not stages:
        return "interrupted before any job was submitted"
    running, last = stages[min(finished, len(stages) - 1) :], stages[-1]
    lines = ["detached: the jobs run on without this terminal.",
             "  follow: " + "; ".join(f"distill jobs watch {s.job_id}  ({s.name})"
                                      for s in running),
             f"  cancel: distill jobs cancel {running[0].job_id}  ({running[0].name}"
             + ("; the stages waiting on it are cancelled with it)" if len(running) > 1 else ")")]  # fmt: skip
    if last.name == "prior":
        lines.append(
            f"  fetch:  distill model pull {last.job_id} -o {out}  (once it has succeeded)"
        )
    return "\n".join(lines)


# --- the command ----------------------------------------------------------------------------------


def register(app: typer.Typer) -> None:
    app.command()(train)


def _finish(c: Any, stages: list[Stage], record: dict[str, Any], out: Path) -> None:
    from distill.shared.cli.model import fetch_model, print_model_summary

    if stages[-1].name != "prior":
        result = record.get("result") or {}
        job_id = stages[-1].job_id
        typer.echo(f"model {result.get('model')}  (RVQ-VAE weights of job {job_id}, best "
                   f"validation loss {result.get('best_val_loss')})\nnext, a prior on its codes: "
                   f"distill train --stage prior --vqvae {job_id}")  # fmt: skip
        return
    path = fetch_model(c, record, out)
    print_model_summary(path)
    typer.echo(f"wrote {path.resolve()}")


def train(
    source: str = typer.Argument(None, metavar="SOURCE",
                                 help="A folder of sounds, a dataset id (or prefix), or a "
                                      "preprocess job id. Optional with --stage prior --vqvae JOB."),
    broker: str = BrokerOpt,
    out: Path = typer.Option(None, "-o", "--output", help="The model file (default: NAME.distill here, NAME from the folder)."),
    stage: str = typer.Option("all", help="all (preprocess -> vqvae -> prior), vqvae, or prior."),
    vqvae: str = typer.Option(None, "--vqvae", help="For --stage prior: the RVQ-VAE job or weights artifact."),
    minutes: float = typer.Option(None, help="Training budget in minutes, shared 70/30 between the RVQ-VAE and the prior (default: each worker's own)."),
    epochs: int = typer.Option(None, help="Maximum epochs per stage (early stopping may end sooner)."),
    batch_size: int = typer.Option(None, help="Chunks per batch."),
    lr: float = typer.Option(None, help="Peak learning rate."),
    codebook_size: int = typer.Option(None, help="RVQ-VAE codes per level (default: chosen from the data)."),
    levels: int = typer.Option(None, help="RVQ-VAE levels (default: chosen from the data)."),
    seed: int = typer.Option(None, help="Training seed."),
    vqvae_opt: list[str] = typer.Option([], "--vqvae-opt", "--model-opt", help="RVQ-VAE setting KEY=VALUE (repeatable), e.g. channels=256."),
    prior_opt: list[str] = typer.Option([], "--prior-opt", help="Prior setting KEY=VALUE (repeatable), e.g. hidden=128."),
    train_opt: list[str] = typer.Option([], "--train-opt", help="Training setting KEY=VALUE for every stage, or vqvae.KEY=VALUE / prior.KEY=VALUE for one (repeatable)."),
    detach: bool = typer.Option(False, "--detach", help="Submit, print the job ids, do not follow."),
    force: bool = typer.Option(False, "--force", help="Replace an existing model file."),
) -> None:  # fmt: skip
    """Train a model: SOURCE -> preprocess -> RVQ-VAE -> prior -> NAME.distill, live progress."""
    if stage not in STAGE_CHOICES:
        fail(f"unknown stage {stage!r} (available: {', '.join(STAGE_CHOICES)})")
    if source is None and not (stage == "prior" and vqvae):
        fail("give SOURCE: a folder of sounds, a dataset id or a preprocess job id")
    if vqvae and stage != "prior":
        fail("--vqvae goes with --stage prior")
    if stage == "prior" and not vqvae:
        fail("--stage prior needs --vqvae JOB|ARTIFACT: the RVQ-VAE whose codes it learns")
    if stage == "vqvae" and out is not None:  # it was ignored without a word
        fail("-o names the .distill model file, which --stage vqvae does not write (it ends "
             "with RVQ-VAE weights in the broker; `distill train --stage prior --vqvae JOB -o "
             "FILE` makes the model)")
    name = out.stem if out is not None else model_name(source, vqvae)
    out = out if out is not None else Path(f"{name}.distill")
    stages: list[Stage] = []
    finished: list[Stage] = []  # the stages followed to success
    try:
        vqvae_model = {**parse_settings(vqvae_opt), **{k: v for k, v in
                       {"codebook_size": codebook_size, "levels": levels}.items() if v is not None}}  # fmt: skip
        run = ["vqvae", "prior"] if stage == "all" else [stage]
        shortcuts = {"epochs": epochs, "batch_size": batch_size, "lr": lr, "seed": seed}
        req = TrainRequest(source=source, stage=stage, vqvae_ref=vqvae, name=name,
                           vqvae_model=vqvae_model, prior_model=parse_settings(prior_opt),
                           train=stage_train_settings(train_opt, shortcuts, minutes, run))  # fmt: skip
        check_settings(req)
        if stage in ("all", "prior"):  # the model file: writable, and not replacing one
            check_model_output(out, force)
        with client(broker, timeout_s=60.0) as c:
            # a broker that is not there is said in seconds, not after the upload's 60-s wait
            c.request(P.SERVICE_WORKERS, {"op": "list"}, timeout_s=BROKER_PROBE_S, retries=1)
            stages = submit_pipeline(c, req)
            typer.echo("jobs: " + " -> ".join(f"{s.name} {s.job_id}" for s in stages))
            sys.stdout.flush()  # a script reading the ids through a pipe gets them now
            if detach:
                return
            warn_missing_workers(c, stages)
            record = follow_pipeline(c, stages, finished)
            _finish(c, stages, record, out)
    except KeyboardInterrupt:
        sys.stderr.write("\n" + detach_message(stages, out, len(finished)) + "\n")
        raise typer.Exit(130) from None
    except (DistillError, OSError) as e:
        fail(str(e))
