"""``distill.train.vqvae``: a dataset artifact in, trained RVQ-VAE weights out.

Job params::

    {"dataset": sha256,          # a dataset artifact (distill.preprocess's result)
     "model": {...},             # optional VQVAEConfig overrides; codebook size/levels left
                                 # out are chosen from the dataset size
     "train": {...}}             # optional TrainConfig overrides; "minutes" absent: the
                                 # device's default budget (DEFAULT_MINUTES), 0: epochs only

Any other key, or a setting of the wrong type or range, fails the job at once with a ``config``
error, before the dataset is downloaded (:func:`distill.shared.train.jobparams.check_job_params`,
which the broker also runs at submit).

The training is :class:`distill.shared.train.vqvae.VQVAETrainer`; this module only adapts the
job context to its hooks: metrics and progress per epoch, checkpoint artifacts paced by
``checkpoint_every_s`` (a retried job resumes from the last one), and Griffin-Lim audio
previews of validation chunks.

Result: ``{"model": weights sha256 (kind "vqvae"), "dataset": sha256, "config", "train_config",
"chosen", "audio", "refine", "codes_in_use", "epochs", "best_epoch", "best_val_loss", "stopped",
"metrics", "budget"}``;
``chosen`` says why the codebooks (``why``) and the model size (``why_size``, from the device:
``DEVICE_SIZES``) are what they are; ``audio`` is the returned (best-epoch) model's decoded
spectral convergence beside the Griffin-Lim floor, the ratio and the epoch it is from;
``budget`` says the minutes, where they came from and why, the planned last epoch and the steps
made; ``codes_in_use`` is, per level, the share of the codebook that the returned model uses to
encode the training chunks.
"""

from __future__ import annotations

import io
from typing import Any

from torch import Tensor

from distill.shared.audio.dataset import Dataset
from distill.shared.audio.export import within_full_scale
from distill.shared.audio.io import write_audio
from distill.shared.audio.mel import MelConfig
from distill.shared.audio.phase import mel_to_audio
from distill.shared.errors import ConfigError
from distill.shared.ids import is_sha256
from distill.shared.model.formats import weights_to_bytes
from distill.shared.model.vqvae import VQVAEConfig, choose_size
from distill.shared.train.jobparams import check_job_params
from distill.shared.train.loop import PreviewLabel, with_default_budget
from distill.shared.train.vqvae import TrainConfig, VQVAETrainer
from distill.workers.runtime.context import JobContext

SERVICE = "distill.train.vqvae"
# Minutes per device kind when the job does not say: the CPU default model reaches its quality
# plateau on a ~100-file collection in about eight minutes of two cores; a GPU makes the same
# steps several times faster, MPS about twice.
DEFAULT_MINUTES = {"cpu": 8.0, "cuda": 3.0, "mps": 4.0}


class JobHooks:
    """TrainHooks over a JobContext."""

    def __init__(self, ctx: JobContext, mel_config: MelConfig) -> None:
        self.ctx, self.mel_config = ctx, mel_config

    def check_cancel(self) -> None:
        self.ctx.check_cancel()

    def on_epoch(self, metrics: dict[str, Any]) -> None:
        self.ctx.metrics(**metrics)
        keys = ("epoch", "epochs", "train_recon", "val_recon", "eta_s", "audio_sc_ratio")
        brief = {k: metrics[k] for k in keys if k in metrics}
        self.ctx.progress(metrics["epoch"] / metrics["epochs"], **brief)

    def save_checkpoint(self, data: bytes) -> None:
        self.ctx.save_checkpoint(data, name=f"vqvae-{self.ctx.info.job_id}.ckpt")

    def load_checkpoint(self) -> bytes | None:
        return self.ctx.load_checkpoint()

    def on_preview(
        self, epoch: int, mels: Tensor, recon: Tensor, labels: list[PreviewLabel]
    ) -> None:
        for i, label in enumerate(labels):
            for which, mel in (("original", mels[i]), ("reconstruction", recon[i])):
                name = f"epoch{epoch:04d}-{i}-{which}.wav"
                # the job and epoch in the file's tags make its bytes its own: the store keeps
                # identical bytes once, tagged with the first job, so a second run's previews
                # of the same files were missing from its own list (the UI's Previews tab)
                tags = {"title": name, "comment": f"distill preview of job "
                        f"{self.ctx.info.job_id}, epoch {epoch}, {label.file}"}  # fmt: skip
                wav = _wav_bytes(mel_to_audio(mel, self.mel_config), self.mel_config.sample_rate,
                                 tags)  # fmt: skip
                sha = self.ctx.artifacts.put_bytes(
                    wav, kind="preview", name=name, job=self.ctx.info.job_id,
                )  # fmt: skip
                self.ctx.event("preview", artifact=sha, epoch=epoch, chunk=i, file=label.file,
                               file_chunk=label.chunk, file_chunks=label.chunks,
                               which=which)  # fmt: skip


def _wav_bytes(audio: Tensor, sample_rate: int, tags: dict[str, str] | None = None) -> bytes:
    """A preview as WAV bytes (with ``tags``), scaled down (not clipped) where it peaks above
    full scale."""
    buf = io.BytesIO()
    write_audio(buf, within_full_scale(audio), sample_rate, format="WAV", metadata=tags)
    return buf.getvalue()


def _dataset_id(params: dict[str, Any]) -> str:
    sha = params.get("dataset")
    if not is_sha256(sha):
        raise ConfigError("train.vqvae: params.dataset must be a dataset artifact id (sha256 hex)")
    return str(sha)


def _params(
    params: dict[str, Any], device: str, n_mels: int
) -> tuple[VQVAEConfig, TrainConfig, dict[str, Any], str]:
    """Configs (the device's model size and budget where unset; the mel bands the dataset's
    ``n_mels``), the budget's note and why the model has its size."""
    model, train = params.get("model") or {}, params.get("train") or {}
    if not isinstance(model, dict):
        raise ConfigError("train.vqvae: params.model must be a map of VQVAEConfig settings")
    if not isinstance(train, dict):
        raise ConfigError("train.vqvae: params.train must be a map of TrainConfig settings")
    given = model.get("n_mels", n_mels)
    if given != n_mels:
        raise ConfigError(f"train.vqvae: params.model.n_mels is {given!r}, but the dataset has "
                          f"{n_mels} mel bands: leave n_mels out (it is the dataset's)")  # fmt: skip
    model, why_size = choose_size(device, {**model, "n_mels": n_mels})
    train, budget_note = with_default_budget(train, device, DEFAULT_MINUTES, "RVQ-VAE")
    model_config, train_config = VQVAEConfig.from_dict(model), TrainConfig.from_dict(train)
    return model_config, train_config, budget_note, why_size


def _with_dataset_from_deps(ctx: JobContext) -> dict[str, Any]:
    """``distill train <preprocess job>`` submits before the dataset exists: the job depends on
    the preprocess job and takes the dataset from its result."""
    params = dict(ctx.info.params)
    if "dataset" not in params:
        found = [
            r["dataset"] for r in ctx.info.deps.values() if isinstance(r, dict) and "dataset" in r
        ]
        if len(found) != 1:
            raise ConfigError(
                "train.vqvae: give params.dataset, or depend on exactly one preprocess job"
            )
        params["dataset"] = found[0]
    return params


def run_job(ctx: JobContext) -> dict[str, Any]:
    # as the broker does at submit, before the dataset is downloaded: one final config error
    check_job_params(SERVICE, ctx.info.params)
    params = _with_dataset_from_deps(ctx)
    sha = _dataset_id(params)
    dataset = Dataset.from_bytes(ctx.artifacts.get_bytes(sha))
    model_config, train_config, budget_note, why_size = _params(
        params, ctx.device, dataset.mel_config.n_mels
    )
    hooks = JobHooks(ctx, dataset.mel_config)
    trainer = VQVAETrainer(dataset, model_config, train_config, hooks, device=ctx.device)
    if ctx.info.checkpoint is None:  # said: on a large set it is minutes before the first epoch
        ctx.progress(0.0, phase="setting up the codec from the training chunks (PCA, k-means "
                                "codebooks)")  # fmt: skip
    result = trainer.run()
    summary = {"dataset": sha, "epochs": result.epochs, "best_epoch": result.best_epoch,
               "best_val_loss": result.best_val_loss, "chosen": result.chosen,
               "audio": result.audio, "refine": result.refine,
               "codes_in_use": result.codes_in_use}  # fmt: skip
    weights = weights_to_bytes(result.model, dataset.mel_config, summary)
    model_sha = ctx.artifacts.put_bytes(weights, kind="vqvae", name="vqvae.pt", job=ctx.info.job_id)
    metrics = {k: v for k, v in result.metrics.items() if k != "usage"}
    return {
        "model": model_sha,
        "dataset": sha,
        "config": result.model_config.to_dict(),
        "train_config": result.train_config.to_dict(),
        "chosen": {**result.chosen, "why_size": why_size},
        "audio": result.audio,
        "refine": result.refine,
        "codes_in_use": result.codes_in_use,
        "epochs": result.epochs,
        "best_epoch": result.best_epoch,
        "best_val_loss": result.best_val_loss,
        "stopped": result.stopped,
        "metrics": metrics,
        "budget": {**result.budget, **budget_note},
    }
