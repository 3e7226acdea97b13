"""``distill.train.prior``: a trained RVQ-VAE and its dataset in, a ``.distill`` model out.

Job params (every key optional)::

    {"vqvae": sha256,      # the RVQ-VAE weights artifact (kind "vqvae"); absent: the "model" of
                           # the one dependency whose result has one (a distill.train.vqvae job)
     "dataset": sha256,    # the dataset artifact; absent: the "dataset" of that same dependency
                           # (or of the one dependency that has a "dataset")
     "prior": {...},       # PriorConfig overrides; "codebook_size" comes from the RVQ-VAE
                           # (another value is an error), "levels" is how many of its first
                           # levels the prior draws (1..Q; default prior_levels: 376 codes a
                           # second, 4 levels at 94 code steps a second, 8 at 47);
                           # the rest default to choose_prior_config's size for the training
                           # code steps
     "train": {...},       # PriorTrainConfig overrides (distill.shared.train.prior); "minutes"
                           # absent: the device's default budget (see DEFAULT_MINUTES), 0: no
                           # budget, epochs only; "peers" 0 (default): a pair trained side by
                           # side where that budget leaves room (AUTO_PEERS), the first kept
     "name": str}          # the model's name (1..64 printable characters, no "/"); default
                           # "model"; the artifact is named NAME.distill

Any other key, or a setting of the wrong type or range, fails the job at once with a ``config``
error, before any code is encoded (:func:`distill.shared.train.jobparams.check_job_params`,
which the broker also runs at submit).

Result::

    {"model": sha256,      # the .distill file (artifact kind "model", name NAME.distill)
     "model_id": str,      # the file's header checksum: the id exported audio refers to
     "name": str,
     "vqvae": sha256, "dataset": sha256,
     "codes": sha256,      # the cached code sequences (artifact kind "codes"), reused by retries
     "encoding": {"cached": bool, "seconds": float, "files": int,
                  "sequences": int, "code_steps": int},  # sequences: files and variants
     "epochs": int, "best_epoch": int, "best_val_bits": float,
     "stopped": "epochs" | "budget" | "early_stopping",
     "metrics": {...},     # the last epoch's row (below)
     "baselines": {"unigram_bits": float, "bigram_bits": float, "val_codes": int,
                   "validated_on": "val" | "train",
                   "fitted_on": "training files and variants" | "training files"},
     "chosen": {"prior": PriorConfig dict, "why": str, "overridden": [keys]},
     "budget": {"minutes": float, "source": "params" | "default", "why": str,
                "planned_epochs": int, "steps": int, "spent_s": float, "stopped": str},
     "train_config": PriorTrainConfig dict,
     "sampling": {"change_temperature": float,  # the model's default, chosen by drawing sounds
                  "distances": {"1": float, "0.5": float},  # at each setting (see
                  "draws": int, "files": int}}    # inference.choose_change_temperature)

Per epoch the job publishes a metrics row and a progress event with ``epoch``, ``epochs`` (the
planned last epoch), ``train_bits`` and ``val_bits`` (NLL in bits per code), ``unigram_bits``
and ``bigram_bits`` (the baselines on the same validation codes), ``best_val``, ``best_epoch``,
``lr``, ``epoch_s``, ``eta_s``; a ``checkpoint`` event per stored checkpoint (paced by
``checkpoint_every_s``). A retried job resumes from its last checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, cast

from torch import Tensor

from distill.shared.audio.dataset import Dataset
from distill.shared.bus.cache import scratch_folder
from distill.shared.errors import ConfigError
from distill.shared.ids import is_sha256
from distill.shared.model import inference as inf
from distill.shared.model.formats import weights_from_bytes
from distill.shared.model.modelfile import SUFFIX, DistillModel, save_model
from distill.shared.train.jobparams import check_job_params, is_model_name
from distill.shared.train.loop import PreviewLabel, with_default_budget
from distill.shared.train.prior import (
    CodeSet,
    CodeStore,
    PriorTrainConfig,
    PriorTrainer,
    PriorTrainResult,
    encode_dataset,
    file_mels,
    load_or_encode_codes,
)
from distill.workers.runtime.context import JobContext

SERVICE = "distill.train.prior"
# Minutes per device kind when the job does not say: on ~100 one-shot files the prior's
# validation NLL levels off within about three CPU minutes; a GPU gets there several times
# sooner, MPS about twice.
DEFAULT_MINUTES = {"cpu": 3.0, "cuda": 1.0, "mps": 1.5}
DEFAULT_NAME = "model"  # a name is 1..64 printable characters, no path separators


class JobHooks:
    """TrainHooks over a JobContext (the prior has no previews)."""

    def __init__(self, ctx: JobContext) -> None:
        self.ctx = ctx

    def check_cancel(self) -> None:
        self.ctx.check_cancel()

    def on_epoch(self, metrics: dict[str, Any]) -> None:
        self.ctx.metrics(**metrics)
        keys = ("epoch", "epochs", "train_bits", "val_bits", "unigram_bits", "bigram_bits",
                "eta_s")  # fmt: skip
        self.ctx.progress(metrics["epoch"] / metrics["epochs"], **{k: metrics[k] for k in keys})

    def save_checkpoint(self, data: bytes) -> None:
        self.ctx.save_checkpoint(data, name=f"prior-{self.ctx.info.job_id}.ckpt")

    def load_checkpoint(self) -> bytes | None:
        return self.ctx.load_checkpoint()

    def on_preview(
        self, epoch: int, mels: Tensor, recon: Tensor, labels: list[PreviewLabel]
    ) -> None:
        return None


# --- params ----------------------------------------------------------------------------------


def _from_deps(ctx: JobContext, params: dict[str, Any]) -> tuple[str, str]:
    """The RVQ-VAE and dataset ids: from the params, else from the dependencies' results."""
    results = [r for r in ctx.info.deps.values() if isinstance(r, dict)]
    vqvae = params.get("vqvae")
    source: dict[str, Any] = {}
    if vqvae is None:
        found = [r for r in results if "model" in r]
        if len(found) != 1:
            raise ConfigError("train.prior: give params.vqvae, or depend on exactly one "
                              f"distill.train.vqvae job (found {len(found)} with a model)")  # fmt: skip
        source, vqvae = found[0], found[0]["model"]
    dataset = params.get("dataset", source.get("dataset"))
    if dataset is None:
        found_ds = {r["dataset"] for r in results if "dataset" in r}
        if len(found_ds) != 1:
            raise ConfigError("train.prior: give params.dataset, or depend on a job whose result "
                              "names the dataset")  # fmt: skip
        dataset = found_ds.pop()
    for key, value in (("vqvae", vqvae), ("dataset", dataset)):
        if not is_sha256(value):
            raise ConfigError(f"train.prior: {key} must be an artifact id (sha256 hex), got "
                              f"{value!r}")  # fmt: skip
    return str(vqvae), str(dataset)


def _name(params: dict[str, Any]) -> str:
    name = params.get("name", DEFAULT_NAME)
    if not is_model_name(name):
        raise ConfigError(f"train.prior: name must be 1..64 printable characters without '/', "
                          f"got {name!r}")  # fmt: skip
    return name


def _maps(params: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    prior, train = params.get("prior") or {}, params.get("train") or {}
    if not isinstance(prior, dict) or not isinstance(train, dict):
        raise ConfigError("train.prior: params.prior and params.train must be maps of settings")
    return prior, train


# --- the job ---------------------------------------------------------------------------------


def manifest_sha256(dataset: Dataset) -> str:
    """sha256 of the dataset's manifest as canonical JSON: which files, how each was used."""
    rows = [asdict(row) for row in dataset.manifest]
    return hashlib.sha256(
        json.dumps(rows, sort_keys=True, separators=(",", ":")).encode()
    ).hexdigest()


def _codes(ctx: JobContext, vqvae_id: str, dataset_id: str) -> tuple[CodeSet, str, dict[str, Any]]:
    """The cached code set, or the dataset encoded by the RVQ-VAE on this worker's device."""
    started = time.monotonic()

    def encode() -> CodeSet:
        ctx.progress(0.0, phase="encoding the dataset's chunks with the RVQ-VAE")
        vqvae, mel_config, _ = weights_from_bytes(ctx.artifacts.get_bytes(vqvae_id))
        dataset = Dataset.from_bytes(ctx.artifacts.get_bytes(dataset_id))
        if dataset.mel_config != mel_config:
            raise ConfigError("train.prior: the RVQ-VAE was trained on another mel configuration "
                              "than this dataset's")  # fmt: skip
        return encode_dataset(vqvae, dataset, vqvae_id=vqvae_id, dataset_id=dataset_id,
                              device=ctx.device)  # fmt: skip

    # ArtifactAccess names what every handler needs; the runtime's client also lists
    store = cast(CodeStore, ctx.artifacts)
    codes, sha, cached = load_or_encode_codes(store, vqvae_id, dataset_id, encode,
                                              job=ctx.info.job_id)  # fmt: skip
    note = {"cached": cached, "seconds": round(time.monotonic() - started, 3),
            "files": codes.n_files, "sequences": len(codes.files),
            "code_steps": int(codes.codes.shape[1])}  # fmt: skip
    return codes, sha, note


def _summary(name: str, dataset_id: str, dataset: Dataset, vqvae_summary: dict[str, Any],
             result: PriorTrainResult) -> dict[str, Any]:  # fmt: skip
    """The training summary the .distill file carries (``distill model show`` prints it)."""
    metrics = {k: result.metrics.get(k) for k in ("train_bits", "val_bits", "epoch", "step")}
    return {
        "name": name,
        "dataset": dataset_id,
        "manifest_sha256": manifest_sha256(dataset),
        "files": [row.name for row in dataset.files_in_split("train")],
        "val_files": [row.name for row in dataset.files_in_split("val")],
        "vqvae": {k: vqvae_summary.get(k) for k in ("epochs", "best_epoch", "best_val_loss")},
        "prior": {
            "epochs": result.epochs,
            "best_epoch": result.best_epoch,
            "best_val_bits": result.best_val_bits,
            "stopped": result.stopped,
            "final": metrics,
        },  # fmt: skip
        "baselines": result.baselines,
    }


def _write_model(ctx: JobContext, model: DistillModel, name: str) -> tuple[str, str]:
    """Save the .distill file and upload it (kind "model"); (artifact id, model id)."""
    with scratch_folder("distill-model") as tmp:
        path = Path(tmp) / f"{name}{SUFFIX}"
        model_id = save_model(path, model)
        sha = ctx.artifacts.put_file(path, kind="model", name=path.name, job=ctx.info.job_id)
    return sha, model_id


def run_job(ctx: JobContext) -> dict[str, Any]:
    # as the broker does at submit, before any code is encoded: one final config error
    check_job_params(SERVICE, ctx.info.params)
    params = dict(ctx.info.params)
    vqvae_id, dataset_id = _from_deps(ctx, params)
    name = _name(params)
    prior_overrides, train = _maps(params)
    train, budget_note = with_default_budget(train, ctx.device, DEFAULT_MINUTES, "prior")
    train_config = PriorTrainConfig.from_dict(train)
    codes, codes_sha, encoding = _codes(ctx, vqvae_id, dataset_id)
    vqvae, mel_config, vqvae_summary = weights_from_bytes(ctx.artifacts.get_bytes(vqvae_id))
    steps_per_second = mel_config.frames_per_second / vqvae.config.downsample
    trainer = PriorTrainer(codes, prior_overrides, train_config, JobHooks(ctx), device=ctx.device,
                           steps_per_second=steps_per_second)  # fmt: skip
    result = trainer.run()
    dataset = Dataset.from_bytes(ctx.artifacts.get_bytes(dataset_id))
    summary = _summary(name, dataset_id, dataset, vqvae_summary, result)
    model = DistillModel(mel_config=mel_config, vqvae=vqvae, prior=result.model.cpu(),
                         summary=summary)  # fmt: skip
    ctx.check_cancel()
    train_mels = [mel for f, mel in file_mels(dataset) if str(dataset.manifest[f].split) == "train"]
    summary["sampling"] = inf.choose_change_temperature(model, train_mels)
    model_sha, model_id = _write_model(ctx, model, name)
    return {
        "model": model_sha,
        "model_id": model_id,
        "name": name,
        "vqvae": vqvae_id,
        "dataset": dataset_id,
        "codes": codes_sha,
        "encoding": encoding,
        "epochs": result.epochs,
        "best_epoch": result.best_epoch,
        "best_val_bits": result.best_val_bits,
        "stopped": result.stopped,
        "metrics": result.metrics,
        "baselines": result.baselines,
        "chosen": result.chosen,
        "budget": {**result.budget, **budget_note},
        "train_config": result.train_config.to_dict(),
        "sampling": summary["sampling"],
    }
