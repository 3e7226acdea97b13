"""``distill dataset add|show`` and ``distill train``: from a folder of sounds to a model."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import typer

from distill.shared.errors import DistillError


def _client(broker: str | None, timeout_s: float = 60.0) -> Any:
    from distill.shared.client import Client

    return Client(broker, timeout_s=timeout_s)


def upload_folder(ac: Any, folder: Path, *, quiet: bool = False) -> list[dict[str, str]]:
    """Upload every file of a folder as an audio artifact; returns ``[{name, sha256}]``.

    Non-audio files go too: the preprocess job lists each one in the manifest with its reason,
    so every file in the folder is accounted for."""
    from distill.shared.audio import scan_folder

    paths = scan_folder(folder)
    if not paths:
        raise DistillError(f"{folder}: no files in this folder")
    files = []
    for i, path in enumerate(paths, 1):
        name = path.relative_to(folder).as_posix()
        if not quiet:
            sys.stderr.write(f"\ruploading {i}/{len(paths)} {name[:60]:<60}")
            sys.stderr.flush()
        files.append({"name": name, "sha256": ac.put_file(path, kind="audio", name=name)})
    if not quiet:
        sys.stderr.write("\n")
    return files


def resolve_dataset(c: Any, ref: str) -> tuple[str, str | None]:
    """A dataset reference -> (dataset artifact sha, producing job id or None). ``ref`` is a
    dataset artifact id (or unique prefix), or the id of the preprocess job that makes it."""
    from distill.shared.artifacts import ArtifactClient
    from distill.shared.cli_jobs import resolve_artifact
    from distill.shared.jobs import JobsClient

    if ref.startswith("j-"):
        record = JobsClient(c).get(ref, metrics=False)
        if record["service"] != "distill.preprocess":
            raise DistillError(f"job {ref} is a {record['service']} job, not a preprocess job")
        sha = (record.get("result") or {}).get("dataset")
        return sha or "", ref
    return resolve_artifact(ArtifactClient(c), ref), None


def print_manifest(rows: list[dict[str, Any]], print_table: Any) -> None:
    table = [[r["name"][:40], r["status"], r.get("split") or "-", f"{r['duration_s']:.2f}s",
              r["sample_rate"] or "-", r["channels"] or "-", r["chunks"], r.get("reason") or ""]
             for r in rows]
    print_table(["file", "status", "split", "duration", "rate", "ch", "chunks", "reason"], table)
    ok = sum(r["status"] == "ok" for r in rows)
    typer.echo(f"{ok} of {len(rows)} files used, {len(rows) - ok} skipped")


def train_line(event: dict[str, Any]) -> str | None:
    """The live line for a training job: epoch, losses, codebook use, ETA."""
    from distill.shared.cli_jobs import progress_line

    row = event.get("row") if event.get("type") == "metrics" else None
    if not isinstance(row, dict):
        return progress_line(event) if event.get("type") == "progress" else None
    parts = []
    if "epoch" in row:
        parts.append(f"epoch {row['epoch']}" + (f"/{row['epochs']}" if "epochs" in row else ""))
    for key in ("train_loss", "val_loss", "train_recon", "val_recon", "commit_loss", "lr"):
        if isinstance(row.get(key), (int, float)):
            parts.append(f"{key} {row[key]:.4g}")
    util = row.get("utilisation") or row.get("utilization")
    if isinstance(util, list):
        parts.append("util " + " ".join(f"{u:.2f}" for u in util))
    if isinstance(row.get("steps_per_s"), (int, float)):
        parts.append(f"{row['steps_per_s']:.1f} step/s")
    if isinstance(row.get("eta_s"), (int, float)):
        parts.append(f"eta {_duration(row['eta_s'])}")
    return "  ".join(parts)


def _duration(s: float) -> str:
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def follow_training(c: Any, job_id: str) -> dict[str, Any]:
    from distill.shared.jobs import JobsClient

    def on_event(event: dict[str, Any]) -> None:
        if event.get("type") == "status":
            sys.stderr.write(f"\n{job_id}: {event.get('status')}")
        elif event.get("type") == "preview":
            sys.stderr.write(f"\npreview: artifact {str(event.get('artifact'))[:16]} ({event.get('name', '')})\n")
        else:
            line = train_line(event)
            if line:
                sys.stderr.write("\r" + line[:150].ljust(150))
        sys.stderr.flush()

    record = JobsClient(c).follow(job_id, on_event)
    sys.stderr.write("\n")
    return record


def parse_settings(items: list[str]) -> dict[str, Any]:
    """``["channels=256", "dilations=[1,3]", "schedule=cosine"]`` -> a dict; values are JSON
    where they parse as JSON, strings otherwise."""
    import json

    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise DistillError(f"setting {item!r} is not KEY=VALUE")
        try:
            out[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            out[key.strip()] = raw
    return out


def register(app: typer.Typer, broker_opt: Any, fail: Any, print_table: Any) -> None:
    dataset = typer.Typer(help="Turn a folder of sounds into a dataset; inspect it.", no_args_is_help=True)
    app.add_typer(dataset, name="dataset")

    @dataset.command("add")
    def dataset_add(
        folder: Path = typer.Argument(..., exists=True, file_okay=False, help="A folder of sounds."),
        broker: str = broker_opt,
        seed: int = typer.Option(0, help="Seed of the train/validation split (by file)."),
        val_fraction: float = typer.Option(0.1, help="Share of files held out for validation."),
        silence_db: float = typer.Option(-60.0, help="Trim threshold for leading/trailing silence (dBFS)."),
        sample_rate: int = typer.Option(48000, help="Model sample rate."),
    ) -> None:
        """Upload FOLDER and preprocess it into a dataset (every file accounted for)."""
        from distill.shared.artifacts import ArtifactClient
        from distill.shared.jobs import JobsClient

        try:
            with _client(broker) as c:
                files = upload_folder(ArtifactClient(c), folder)
                params = {"files": files, "seed": seed, "val_fraction": val_fraction,
                          "silence_threshold_db": silence_db, "mel_config": {"sample_rate": sample_rate}}
                job = JobsClient(c).submit("distill.preprocess", params)
                typer.echo(f"preprocess job {job['id']}: {len(files)} files")
                record = follow_training(c, job["id"])
        except DistillError as e:
            fail(str(e))
        if record["status"] != "succeeded":
            fail(f"preprocess job {job['id']} {record['status']}: {record.get('error')}")
        result = record["result"]
        print_manifest(result["manifest"], print_table)
        typer.echo(f"dataset {result['dataset']}  ({result['chunks']} chunks; "
                   f"{result['train_files']} train / {result['val_files']} validation files)")

    @dataset.command("show")
    def dataset_show(ref: str = typer.Argument(..., help="Dataset id (or prefix), or its preprocess job id."),
                     broker: str = broker_opt) -> None:
        """Print a dataset's manifest: every file, used or skipped with its reason."""
        from distill.shared.artifacts import ArtifactClient
        from distill.shared.dataset import Dataset

        try:
            with _client(broker) as c:
                sha, _ = resolve_dataset(c, ref)
                if not sha:
                    fail(f"{ref}: the preprocess job has not produced a dataset (yet)")
                ds = Dataset.from_bytes(ArtifactClient(c).get_bytes(sha))
        except DistillError as e:
            fail(str(e))
        from dataclasses import asdict

        print_manifest([asdict(r) for r in ds.manifest], print_table)
        cfg = ds.mel_config
        typer.echo(f"dataset {sha}: {len(ds.mels)} chunks of {cfg.chunk_frames} frames, "
                   f"{cfg.sample_rate} Hz, {cfg.n_mels} mels, hop {cfg.hop_length}")

    @app.command()
    def train(
        dataset_ref: str = typer.Argument(..., metavar="DATASET", help="Dataset id (or prefix) or preprocess job id."),
        broker: str = broker_opt,
        stage: str = typer.Option("vqvae", help="Which model to train: vqvae."),
        epochs: int = typer.Option(None, help="Maximum epochs (early stopping may end sooner)."),
        batch_size: int = typer.Option(None, help="Chunks per batch."),
        lr: float = typer.Option(None, help="Peak learning rate."),
        codebook_size: int = typer.Option(None, help="Codes per level (default: chosen from the data)."),
        levels: int = typer.Option(None, help="RVQ levels (default: chosen from the data)."),
        seed: int = typer.Option(None, help="Training seed."),
        model_opt: list[str] = typer.Option([], "--model-opt", help="Model setting KEY=VALUE (repeatable), e.g. channels=256."),
        train_opt: list[str] = typer.Option([], "--train-opt", help="Training setting KEY=VALUE (repeatable), e.g. patience=20."),
        detach: bool = typer.Option(False, "--detach", help="Submit and print the job id; do not follow."),
    ) -> None:
        """Train a model stage on a dataset, with a live progress line."""
        from distill.shared.jobs import JobsClient

        if stage != "vqvae":
            fail(f"unknown stage {stage!r} (available: vqvae)")
        try:
            model = {**parse_settings(model_opt), **{k: v for k, v in
                     {"codebook_size": codebook_size, "levels": levels}.items() if v is not None}}
            train_cfg = {**parse_settings(train_opt), **{k: v for k, v in
                         {"epochs": epochs, "batch_size": batch_size, "lr": lr, "seed": seed}.items()
                         if v is not None}}
            with _client(broker) as c:
                sha, producer = resolve_dataset(c, dataset_ref)
                params: dict[str, Any] = {"model": model, "train": train_cfg}
                if sha:
                    params["dataset"] = sha
                else:
                    params["dataset_from"] = producer
                job = JobsClient(c).submit("distill.train.vqvae", params,
                                           depends_on=[producer] if producer else [])
                typer.echo(f"training job {job['id']} (stage {stage})")
                if detach:
                    return
                record = follow_training(c, job["id"])
        except DistillError as e:
            fail(str(e))
        if record["status"] != "succeeded":
            fail(f"training job {job['id']} {record['status']}: {record.get('error')}")
        result = record["result"] or {}
        chosen = result.get("chosen") or {}
        if chosen.get("why"):
            typer.echo(f"codebooks: {chosen.get('codebook_size')} codes x {chosen.get('levels')} levels — {chosen['why']}")
        typer.echo(f"model {result.get('model')}  (best validation loss {result.get('best_val_loss')})")
