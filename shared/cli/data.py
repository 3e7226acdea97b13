"""``distill dataset add|ls|show``: from a folder of sounds to a dataset."""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

import typer

from distill.shared.bus import protocol as P
from distill.shared.cli.common import (
    BrokerOpt,
    LiveLine,
    ago,
    client,
    fail,
    human_bytes,
    print_table,
    shown,
)
from distill.shared.errors import DistillError

# what a preprocess job's params hold besides its list of files (seed, split, mel settings)
PARAMS_OTHER_BYTES = 8 * 1024


def _check_listable(folder: Path, names: list[str]) -> None:
    """DistillError, before anything is uploaded, when the preprocess job's list of the files
    (name and id each) would not fit the params a job may hold: it failed after uploading
    them all."""
    from distill.shared.bus.codec import pack

    size = len(pack({"files": [{"name": n, "sha256": "0" * 64} for n in names]}))
    room = P.MAX_JOB_PARAMS_BYTES - PARAMS_OTHER_BYTES
    if size > room:
        fitting = int(len(names) * room / size)
        raise DistillError(
            f"{folder}: {len(names)} files are too many for one dataset: their list is "
            f"{size // 1024} KiB packed, over the {room // 1024} KiB a job's params hold (about "
            f"{fitting} files with names like these): split the folder, or shorten its paths")


def upload_folder(ac: Any, folder: Path, *, quiet: bool = False) -> list[dict[str, str]]:
    """Upload every file of a folder as an audio artifact; returns ``[{name, sha256}]``.

    Non-audio files go too: the preprocess job lists each one in the manifest with its reason,
    so every file in the folder is accounted for."""
    from distill.shared.audio.io import left_out, scan_folder
    from distill.shared.bus.artifacts import artifact_name

    paths = scan_folder(folder)
    skipped = left_out(folder)
    if skipped:  # not in the manifest (nothing is uploaded): said here instead
        listed = [f"{p.relative_to(folder).as_posix()}: {why}" for p, why in skipped[:20]]
        more = f"; and {len(skipped) - 20} more" if len(skipped) > 20 else ""
        sys.stderr.write(shown(f"note: {len(skipped)} thing(s) in {folder} are left out: "
                               f"{'; '.join(listed)}{more}") + "\n")  # fmt: skip
    if not paths:
        raise DistillError(f"{folder}: no files in this folder")
    names = [p.relative_to(folder).as_posix() for p in paths]
    _check_listable(folder, names)
    files = []
    live = LiveLine()
    for i, (path, name) in enumerate(zip(paths, names, strict=True), 1):
        if not quiet:
            live.update(f"uploading {i}/{len(paths)} {name[:60]:<60}")
        files.append({"name": name, "sha256": ac.put_file(path, kind="audio",
                                                          name=artifact_name(name))})
    if not quiet:
        live.end()
    return files


def resolve_dataset(c: Any, ref: str) -> tuple[str, str | None]:
    """A dataset reference -> (dataset artifact sha, producing job id or None). ``ref`` is a
    dataset artifact id (or unique prefix), or the id of the preprocess job that makes it."""
    from distill.shared.bus.artifacts import ArtifactClient
    from distill.shared.bus.jobs import JobsClient
    from distill.shared.cli.jobs import resolve_artifact

    if ref.startswith("j-"):
        record = JobsClient(c).get(ref, metrics=False)
        if record["service"] != "distill.preprocess":
            raise DistillError(f"job {ref} is a {record['service']} job, not a preprocess job")
        if record["status"] in ("failed", "cancelled"):  # refused now, not by a cascade later
            raise DistillError(f"{ref}: the preprocess job {record['status']}, so there is no "
                               f"dataset: {record.get('error')}")  # fmt: skip
        sha = (record.get("result") or {}).get("dataset")
        return sha or "", ref
    if Path(ref).is_dir():  # `distill train` uploads folders before it gets here
        raise DistillError(f"{ref}: a folder, not a dataset id: `distill dataset add {ref}` "
                           "makes one")  # fmt: skip
    if Path(ref).exists():
        raise DistillError(f"{ref}: a file, not a folder of sounds (or a dataset id)")
    if not re.fullmatch(r"[0-9a-fA-F]{1,64}", ref):
        raise DistillError(f"{ref}: no such folder, and not a dataset id (a sha256 or a prefix "
                           "of one) nor a preprocess job id (j-...)")  # fmt: skip
    artifacts = ArtifactClient(c)
    sha = resolve_artifact(artifacts, ref, kind="dataset")
    kind = artifacts.stat(sha).get("kind")
    if kind != "dataset":
        raise DistillError(f"{ref}: artifact {sha[:16]} is of kind {kind!r}, not a dataset")
    return sha, None


def print_manifest(rows: list[dict[str, Any]]) -> None:
    table = [[r["name"][:40], r["status"], r.get("split") or "-", f"{r['duration_s']:.2f}s",
              r["sample_rate"] or "-", r["channels"] or "-", r["chunks"], r.get("reason") or ""]
             for r in rows]
    print_table(["file", "status", "split", "duration", "rate", "ch", "chunks", "reason"], table)
    ok = sum(r["status"] == "ok" for r in rows)
    typer.echo(f"{ok} of {len(rows)} files used, {len(rows) - ok} skipped")


def register(app: typer.Typer) -> None:
    dataset = typer.Typer(help="Turn a folder of sounds into a dataset; inspect it.", no_args_is_help=True)
    app.add_typer(dataset, name="dataset")

    @dataset.command("add")
    def dataset_add(
        folder: Path = typer.Argument(..., exists=True, file_okay=False, help="A folder of sounds."),
        broker: str = BrokerOpt,
        seed: int = typer.Option(0, help="Seed of the train/validation split (by file)."),
        val_fraction: float = typer.Option(0.1, help="Share of files held out for validation."),
        silence_db: float = typer.Option(-60.0, help="Trim threshold for leading/trailing silence (dBFS)."),
        sample_rate: int = typer.Option(48000, help="Model sample rate."),
    ) -> None:
        """Upload FOLDER and preprocess it into a dataset (every file accounted for)."""
        from distill.shared.bus.artifacts import ArtifactClient
        from distill.shared.bus.jobs import JobsClient
        from distill.shared.train.jobparams import PREPROCESS, check_job_params

        settings = {"seed": seed, "val_fraction": val_fraction, "silence_threshold_db": silence_db,
                    "mel_config": {"sample_rate": sample_rate}}  # fmt: skip
        try:  # the settings as the broker checks them, before anything is uploaded
            check_job_params(PREPROCESS, {"files": [{"name": "-", "sha256": "0" * 64}], **settings})
            with client(broker, timeout_s=60.0) as c:
                files = upload_folder(ArtifactClient(c), folder)
                params = {"files": files, **settings}
                job = JobsClient(c).submit("distill.preprocess", params)
                typer.echo(f"preprocess job {job['id']}: {len(files)} files")
                from distill.shared.cli.train import Stage, follow_training, warn_missing_workers

                warn_missing_workers(c, [Stage("preprocess", job["id"])])
                record = follow_training(c, job["id"])
        except DistillError as e:
            fail(str(e))
        if record["status"] != "succeeded":
            fail(f"preprocess job {job['id']} {record['status']}: {record.get('error')}")
        result = record["result"]
        print_manifest(result["manifest"])
        typer.echo(f"dataset {result['dataset']}  ({result['chunks']} chunks; "
                   f"{result['train_files']} train / {result['val_files']} validation files)")

    @dataset.command("ls")
    def dataset_ls(broker: str = BrokerOpt) -> None:
        """List the broker's datasets: files used and skipped, chunks, split, rate, size."""
        from distill.shared.bus.artifacts import ArtifactClient
        from distill.shared.bus.jobs import JobsClient

        try:
            with client(broker) as c:
                items = ArtifactClient(c).list(kind="dataset")
                jobs = JobsClient(c)
                results = [_made_by(jobs, a) for a in items]
        except DistillError as e:
            fail(str(e))
        rows = []
        for a, r in zip(items, results, strict=True):
            rate = (r.get("mel_config") or {}).get("sample_rate")
            rows.append([a["sha256"][:16], _count(r, "files_ok"), _count(r, "files_skipped"),
                         _count(r, "chunks"), f"{_count(r, 'train_files')}/{_count(r, 'val_files')}",
                         rate or "-", human_bytes(a["size"]), a.get("job") or "-",
                         ago(a["created_at"])])  # fmt: skip
        print_table(["dataset", "files", "skipped", "chunks", "train/val", "rate", "size", "job",
                     "created"], rows)  # fmt: skip
        if not items:
            typer.echo("no datasets yet: `distill dataset add FOLDER` makes one")

    @dataset.command("show")
    def dataset_show(ref: str = typer.Argument(..., help="Dataset id (or prefix), or its preprocess job id."),
                     broker: str = BrokerOpt) -> None:
        """Print a dataset's manifest: every file, used or skipped with its reason."""
        try:
            with client(broker, timeout_s=60.0) as c:
                sha, job = resolve_dataset(c, ref)
                if not sha:  # a preprocess job still queued or running
                    fail(f"{ref}: the preprocess job has not finished, its dataset is not made "
                         f"yet (follow it with `distill jobs watch {ref}`)")
                summary = _summary_from_job(c, sha, job) or _summary_from_dataset(c, sha)
        except DistillError as e:
            fail(str(e))
        rows, cfg, chunks, kept = summary
        print_manifest(rows)
        check = (f"the sound of {kept} chunk{'' if kept == 1 else 's'} kept for the RVQ-VAE's "
                 "audio check" if kept else "no sound kept (prepared by an earlier Distill: "
                 "the RVQ-VAE's audio check is on mel bins; add the files again for one on "
                 "their sound)")  # fmt: skip
        typer.echo(f"dataset {sha}: {chunks} chunks of {cfg.chunk_frames} frames, "
                   f"{cfg.sample_rate} Hz, {cfg.n_mels} mels, hop {cfg.hop_length}; {check}")


def _made_by(jobs: Any, artifact: dict[str, Any]) -> dict[str, Any]:
    """The result of the preprocess job that made a dataset artifact ({} when it is gone or
    is not that job's)."""
    if not artifact.get("job"):
        return {}
    try:
        record = jobs.get(artifact["job"], metrics=False)
    except DistillError:  # the job is gone
        return {}
    result = record.get("result") or {}
    made = record.get("service") == "distill.preprocess" and result.get("dataset") == artifact["sha256"]
    return result if made else {}


def _count(result: dict[str, Any], key: str) -> str:
    value = result.get(key)
    return str(value) if isinstance(value, int) else "-"


Summary = tuple[list[dict[str, Any]], Any, int, int]  # manifest rows, MelConfig, chunks, kept


def _summary_from_job(c: Any, sha: str, job: str | None) -> Summary | None:
    """What `dataset show` prints, from the result of the preprocess job that made ``sha``
    (``job``, or the one the artifact names): a 500-file dataset is ~50 MB to download for a
    manifest its job's result holds. None when no such result says it all (a job removed, or
    one from before the result held ``check_chunks``): the dataset itself is read then."""
    from distill.shared.audio.mel import MelConfig
    from distill.shared.bus.artifacts import ArtifactClient
    from distill.shared.bus.jobs import JobsClient

    job = job or ArtifactClient(c).stat(sha).get("job")
    result = _made_by(JobsClient(c), {"job": job, "sha256": sha})
    try:
        return (list(result["manifest"]), MelConfig.from_dict(result["mel_config"]),
                int(result["chunks"]), int(result["check_chunks"]))  # fmt: skip
    except (KeyError, TypeError, ValueError, DistillError):
        return None


def _summary_from_dataset(c: Any, sha: str) -> Summary:
    from dataclasses import asdict

    from distill.shared.audio.dataset import Dataset
    from distill.shared.bus.artifacts import ArtifactClient

    ds = Dataset.from_bytes(ArtifactClient(c).get_bytes(sha))
    return [asdict(r) for r in ds.manifest], ds.mel_config, len(ds.mels), len(ds.check_chunks)
