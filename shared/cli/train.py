"""``distill train``: train a model stage on a dataset, with a live progress line."""

from __future__ import annotations

import sys
from typing import Any

import typer

from distill.shared.cli.common import BrokerOpt, client, fail
from distill.shared.errors import DistillError


def register(app: typer.Typer) -> None:
    app.command()(train)


def train_line(event: dict[str, Any]) -> str | None:
    """The live line for a training job: epoch, losses, codebook use, ETA."""
    from distill.shared.cli.jobs import progress_line

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
    from distill.shared.bus.jobs import JobsClient

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


def train(
    dataset_ref: str = typer.Argument(..., metavar="DATASET", help="Dataset id (or prefix) or preprocess job id."),
    broker: str = BrokerOpt,
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
    from distill.shared.bus.jobs import JobsClient
    from distill.shared.cli.data import resolve_dataset

    if stage != "vqvae":
        fail(f"unknown stage {stage!r} (available: vqvae)")
    try:
        model = {**parse_settings(model_opt), **{k: v for k, v in
                 {"codebook_size": codebook_size, "levels": levels}.items() if v is not None}}
        train_cfg = {**parse_settings(train_opt), **{k: v for k, v in
                     {"epochs": epochs, "batch_size": batch_size, "lr": lr, "seed": seed}.items()
                     if v is not None}}
        with client(broker, timeout_s=60.0) as c:
            sha, producer = resolve_dataset(c, dataset_ref)
            params: dict[str, Any] = {"model": model, "train": train_cfg}
            if sha:  # else the job takes the dataset from its preprocess dependency's result
                params["dataset"] = sha
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
