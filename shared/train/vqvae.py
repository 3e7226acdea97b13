"""Training the RVQ-VAE: what it adds to the shared loop (:mod:`distill.shared.train.loop`,
which has the phases, checkpoints, rollback, resume, the time budget and determinism); the
checkpoint and weights formats are in :mod:`distill.shared.model.formats`.

It adds: normalisation and k-means codebooks from the training chunks at the start; batches of
shuffled (optionally augmented) chunks; the reconstruction + commitment loss; validation loss
and log-mel L1; codebook health per epoch (utilisation, perplexity, dead codes, usage counts of
the epoch's batches) and, at every decoded-audio check, the codes the model as it stands uses to
encode the training chunks (``codes_in_use``: every level, no quantizer dropout); Griffin-Lim
previews every ``preview_every`` epochs; and the number that judges the sound:
every ``audio_every`` epochs (and for the returned model) a few validation chunks are decoded to
audio with Griffin-Lim and scored by spectral convergence against their sound (the audio the
dataset keeps of them), beside the same for Griffin-Lim of the true mel (the floor, computed
once): the metric of the bar and of bench/vqvae.py. The quantizer dropout and
dead-code replacement draw from torch's global RNG, which the loop checkpoints.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from torch import Tensor

from distill.shared.audio.augment import AugmentConfig, augment_mel, gain_mel, move_bands
from distill.shared.audio.dataset import Dataset
from distill.shared.audio.mel import MelConfig, log_mel
from distill.shared.audio.metrics import spectral_convergence
from distill.shared.audio.phase import mel_to_audio
from distill.shared.errors import ConfigError, DatasetError
from distill.shared.model.vqvae import (
    DEAD_CODE_SHARE,
    VQVAE,
    VQVAEConfig,
    dead_code_threshold_for,
    resolve_config,
)
from distill.shared.train.loop import (
    PreviewLabel,
    Trainer,
    TrainHooks,
    code_counts,
    in_use,
    perplexity,
)

# TrainConfig lives in settings (no torch there); imported from here as before
from distill.shared.train.settings import TrainConfig as TrainConfig

MIN_STEPS_PER_EPOCH = 8  # a 5-file collection still gets a few optimiser steps per epoch
KMEANS_MAX_VECTORS = 65536  # latents pooled for codebook init; more only slows k-means
USAGE_CELLS = 128  # a level's usage counts in a metric row: at most this many, summed in groups


def usage_group(codebook_size: int) -> int:
    """How many neighbouring codes one usage cell sums (1 up to USAGE_CELLS codes a level)."""
    return -(-codebook_size // USAGE_CELLS)


def grouped_usage(usage: Tensor) -> Tensor:
    """(Q, K) counts -> (Q, ceil(K / group)) sums of each group of ``usage_group(K)`` codes: a
    metric row stays within its 16 KiB whatever the codebook size (a terminal column shows
    several codes anyway)."""
    group = usage_group(usage.shape[1])
    if group == 1:
        return usage
    pad = (-usage.shape[1]) % group
    padded = torch.nn.functional.pad(usage, (0, pad))  # (Q, K + pad)
    return padded.reshape(usage.shape[0], -1, group).sum(-1)


REFINE_GAINS_DB = (-3.0, 3.0)  # the variants whose latents refine the codebooks (refine_iters)
REFINE_BAND_MOVES = (-2, 2)
REFINE_DECODER_LR_SHARE = 0.3  # the decoder's rate after refinement, as a share of lr
REFINE_CHECK_EVERY = 25  # decoder steps between the loss checks that pick the state kept
REFINE_BUDGET_SHARE = 0.1  # the refinement's time past a spent budget, as a share of it

# --------------------------------------------------------------------------------------------
# Config


# --------------------------------------------------------------------------------------------
# Result


@dataclass
class TrainResult:
    model: VQVAE  # with the weights of the best validation epoch, in eval mode
    model_config: VQVAEConfig
    train_config: TrainConfig
    chosen: dict[str, Any]  # {"codebook_size", "levels", "why"}
    epochs: int  # epochs run
    best_val_loss: float
    best_epoch: int
    stopped: str  # "epochs", "budget" or "early_stopping"
    metrics: dict[str, Any]  # the last epoch's row
    budget: dict[str, Any]  # the loop's budget summary (minutes, planned epochs, steps, why)
    audio: dict[str, Any]  # the returned model's decoded-audio check (AudioCheck.measure)
    refine: dict[str, Any]  # the codebook refinement after training (VQVAETrainer.refine)
    # Per level, the share of its codes that the returned model's encoding of the training
    # chunks uses (every level, no dropout): the codebooks' health at the end, where the
    # per-epoch utilisation counts one epoch's batches with quantizer dropout.
    codes_in_use: list[float]


# --------------------------------------------------------------------------------------------
# Decoded-audio check


def decoded_sc(logmel: Tensor, target: Tensor, cfg: MelConfig, n_iter: int) -> Tensor:
    """Spectral convergence of Griffin-Lim audio from ``logmel`` (n, M, T) against ``target``
    (n, M, T), on mel magnitudes: ||mel(audio) - e^target|| / ||e^target|| per chunk, (n,).

    For a dataset that keeps no audio of its chunks (written before format 2), the reference
    is the true mel's magnitude. The model's own SC comes out close to bench/vqvae.py's (STFT
    bins against the original audio: 0.82 here, 0.85-0.91 there), but the floor is lower at mel
    resolution (0.07 against 0.26: mel bins smooth away much of Griffin-Lim's phase error), so
    the ratio runs about 3x higher than the bench's (6.7x here where the bench gave 2.3x).
    """
    audio = mel_to_audio(logmel.float().cpu(), cfg, n_iter=n_iter, seed=0)  # (n, (T-1) * hop)
    est = log_mel(audio, cfg).exp()  # (n, M, T)
    ref = target.float().cpu().exp()  # (n, M, T)
    return torch.linalg.vector_norm(est - ref, dim=(1, 2)) / torch.linalg.vector_norm(
        ref, dim=(1, 2)
    ).clamp_min(1e-12)


class AudioCheck:
    """Decodes a fixed few chunks (one per file, as many files as allowed) and scores them
    against the floor; the floor is computed once, the first time.

    With ``audio`` (n, samples), the sound each chunk's log-mel was computed from, spectral
    convergence is on STFT magnitudes against that sound (``on`` "audio"), as the bar and
    bench/vqvae.py judge. Without (a dataset written before it kept audio) it is on mel bins
    against the chunk's mel (``on`` "mel bins"), whose floor is far lower: see ``decoded_sc``.
    """

    def __init__(self, mels: Tensor, names: list[str], cfg: MelConfig, n_iter: int,
                 audio: Tensor | None = None) -> None:  # fmt: skip
        self.mels, self.names, self.cfg, self.n_iter = mels, names, cfg, n_iter  # (n, M, T)
        self.audio = audio  # (n, samples) or None
        self._floor: Tensor | None = None

    def _sc(self, logmel: Tensor) -> Tensor:
        """Spectral convergence per chunk, (n,), of Griffin-Lim audio from ``logmel``."""
        if self.audio is None:
            return decoded_sc(logmel, self.mels, self.cfg, self.n_iter)
        decoded = mel_to_audio(logmel.float().cpu(), self.cfg, n_iter=self.n_iter, seed=0)
        return spectral_convergence(self.audio, decoded, self.cfg)

    @torch.no_grad()
    def measure(self, model: VQVAE) -> dict[str, Any]:
        """{"sc", "floor", "ratio"} medians over the chunks, what they are measured on, and the
        files they came from."""
        if self._floor is None:
            self._floor = self._sc(self.mels)  # (n,)
        was_training = model.training
        model.eval()
        recon = model(self.mels).recon  # (n, M, T)
        model.train(was_training)
        sc = self._sc(recon)  # (n,)
        # the median as statistics.median and the bench take it (torch's is the lower middle
        # one: 4 chunks whose floors were 0.10, 0.11, 0.30 and 0.55 gave 0.11)
        median, floor = float(sc.quantile(0.5)), float(self._floor.quantile(0.5))
        return {"sc": median, "floor": floor, "ratio": median / max(floor, 1e-12),
                "chunks": len(self.mels), "files": self.names,
                "on": "mel bins" if self.audio is None else "audio"}  # fmt: skip


# --------------------------------------------------------------------------------------------
# The trainer


class VQVAETrainer(Trainer[VQVAE]):
    """Trains one VQVAE on one dataset; ``run()`` once. Resumes from ``hooks.load_checkpoint``."""

    kind = "vqvae"
    train_config: TrainConfig

    def __init__(
        self,
        dataset: Dataset,
        model_config: VQVAEConfig,
        train_config: TrainConfig,
        hooks: TrainHooks,
        *,
        device: str = "cpu",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(train_config, hooks, device=device, clock=clock)
        train_idx, val_idx = dataset.train_indices(), dataset.val_indices()
        if len(train_idx) == 0:
            raise DatasetError("the dataset has no training chunks")
        if model_config.n_mels != dataset.mel_config.n_mels:
            raise ConfigError(
                f"model n_mels {model_config.n_mels} != dataset n_mels {dataset.mel_config.n_mels}"
            )
        self.dataset = dataset
        mels = torch.from_numpy(dataset.mels)  # (N, M, T)
        self.train_mels = mels[torch.from_numpy(train_idx)].to(self.device)  # (N_train, M, T)
        self.val_mels = mels[torch.from_numpy(val_idx)].to(self.device)  # (N_val, M, T)
        self.preview_pool = preview_pool(dataset, val_idx if len(val_idx) else train_idx)
        self.audio_check = self._audio_check(dataset, train_config.audio_chunks)
        self.model_config, why = resolve_config(model_config, len(train_idx))
        per_batch, size = self.batch_vectors, self.model_config.codebook_size or 1
        if self.model_config.dead_code_threshold is None:  # from the latents of one batch
            threshold = round(dead_code_threshold_for(per_batch, size), 6)
            self.model_config = replace(self.model_config, dead_code_threshold=threshold)
            why += (f" A code whose use falls below {threshold:.3g} per batch of {per_batch} "
                    f"latents ({DEAD_CODE_SHARE:.0%} of an average code's) is replaced.")  # fmt: skip
        elif self.model_config.dead_code_threshold >= per_batch / size:
            raise ConfigError(
                f"dead_code_threshold {self.model_config.dead_code_threshold:g} is at or above "
                f"an average code's use per batch ({per_batch / size:.3g}: {per_batch} latents "
                f"over {size} codes): codes in use would be replaced at every step; use a "
                f"threshold below it (unset: {DEAD_CODE_SHARE:.0%} of it)"
            )
        self.chosen = {"codebook_size": self.model_config.codebook_size,
                       "levels": self.model_config.levels,
                       "dead_code_threshold": self.model_config.dead_code_threshold,
                       "why": why}  # fmt: skip

    @property
    def chunk_steps(self) -> int:
        """Latent (code) steps per chunk."""
        return -(-self.train_mels.shape[-1] // self.model_config.downsample)

    @property
    def batch_vectors(self) -> int:
        """Latent vectors in one training batch: chunks x code steps per chunk."""
        return min(self.train_config.batch_size, len(self.train_mels)) * self.chunk_steps

    def _audio_check(self, dataset: Dataset, limit: int) -> AudioCheck:
        """The first ``limit`` chunks of ``Dataset.check_order`` (the first chunk of each
        validation file, then the second of each, ...), scored against their sound where the
        dataset keeps it."""
        order = dataset.check_order()
        kept = set(dataset.check_chunks.tolist())
        if kept:  # the chunks the dataset kept the sound of (a prefix of that order, bar those
            order = [i for i in order if i in kept]  # past a file's first few chunks)
        chosen = order[:limit]
        mels = torch.from_numpy(dataset.mels[chosen]).to(self.device)  # (n, M, T)
        names = [dataset.manifest[int(dataset.chunk_file[i])].name for i in chosen]
        audio = dataset.chunk_audio(chosen)  # (n, samples) or None
        return AudioCheck(mels, names, dataset.mel_config, self.train_config.audio_iters,
                          None if audio is None else torch.from_numpy(audio))  # fmt: skip

    def run(self) -> TrainResult:
        """Train to the last epoch, the budget's end or early stop (see ``Trainer.run_loop``);
        the returned (best) model's decoded audio is checked once more for the result, on a
        chunk of every validation file."""
        r = self.run_loop()
        refine = self.refine()
        best_val = refine["val_loss_after"] if refine["kept"] else r.best_val
        # the returned model on the first chunk of every validation file (as many as the
        # dataset kept the sound of, up to 64; at least the epochs' few): the figure of record,
        # once. Not every chunk: 23 of percussion's, where a ringing bell and a door have
        # several each, gave 3.4x where one per file gave 2.1x, as the bench does on whole files
        files = len({int(self.dataset.chunk_file[i]) for i in self.dataset.check_order()})
        final = (self.audio_check if files <= self.train_config.audio_chunks  # the same chunks:
                 else self._audio_check(self.dataset, files))  # its floor is already computed
        audio = {**final.measure(r.model), "epoch": r.best_epoch}
        return TrainResult(model=r.model, model_config=self.model_config,
                           train_config=self.train_config, chosen=self.chosen, epochs=r.epochs,
                           best_val_loss=best_val, best_epoch=r.best_epoch, stopped=r.stopped,
                           metrics=r.metrics, budget=r.budget, audio=audio,
                           refine=refine, codes_in_use=self.codes_in_use(r.model))  # fmt: skip

    @torch.no_grad()
    def codes_in_use(self, model: VQVAE) -> list[float]:
        """Per level, the share of the codebook that ``model`` uses to encode the training
        chunks (every level, no quantizer dropout); ``model`` is left in the mode it was in.

        The codebooks' health as a user meets it. An epoch's ``utilisation`` counts its batches,
        where quantizer dropout gives level q only the items that kept q levels (at 12 levels,
        half of them for the finest), so a code the model uses for a few latents of the whole
        set can go unseen there: percussion's finest level, 0.74-0.89 in the epochs' batches,
        was 0.91 over the training chunks for the same model. The cost: one encoder pass over
        the training chunks (0.8 s on percussion's 209 on one CPU thread, about an epoch's
        fifth), made at the decoded-audio checks only. In eval mode throughout: quantizing in
        training mode would move the EMA codebooks."""
        was_training = model.training
        model.eval()
        codes = torch.cat([model.encode(x) for x in self.train_mels.split(64)])  # (N, Q, T')
        model.train(was_training)
        return in_use(code_counts(codes, model.rvq.codebook_size))

    def refine(self) -> dict[str, Any]:
        """Refine the trained model's codebooks (``TrainConfig.refine_iters``), then tune its
        decoder to them (``refine_decoder_steps``, encoder and codebooks fixed), and keep the
        state, of those checked every REFINE_CHECK_EVERY decoder steps, with the lowest
        validation loss among those where neither the training nor the validation loss is
        worse than as trained; none such: the model as trained. What was done, for the result.

        Refined alone, a few files' codes stop being what the decoder learnt to read (they are
        its tokens more than the latents' means) and the training files decode worse; the
        decoder's steps give that back."""
        cfg = self.train_config
        if cfg.refine_iters == 0:
            return {"iters": 0, "kept": False}
        started = self.clock()
        # within the budget: what is left of it, or at least REFINE_BUDGET_SHARE of it (a
        # 500-file run's refinement took 3.4 minutes after a 1.4-minute stage)
        budget_s = cfg.minutes * 60
        deadline = (None if budget_s <= 0 else
                    started + max(REFINE_BUDGET_SHARE * budget_s, budget_s - self.spent_s()))  # fmt: skip
        model = self._model()
        before = self._losses(model)
        saved = _snapshot(model)
        latents = self._refine_latents(model)
        model.refine_codebooks_(latents, self.batch_vectors, cfg.refine_iters)
        best: tuple[int, tuple[float, float], dict[str, Tensor]] | None = None  # steps, losses
        cut_short = False
        for steps in self._tune_decoder(model):  # 0 (refined only), then every few steps
            losses = self._losses(model)
            if all(a <= b for a, b in zip(losses, before, strict=True)) and (
                best is None or losses[1] < best[1][1]
            ):
                best = (steps, losses, _snapshot(model))
            if deadline is not None and self.clock() > deadline:
                cut_short = steps < cfg.refine_decoder_steps
                break
        model.load_state_dict(best[2] if best is not None else saved)
        model.eval()
        after = best[1] if best is not None else before
        return {"iters": cfg.refine_iters, "latents": len(latents),
                "decoder_steps": best[0] if best is not None else 0,
                "train_loss_before": before[0], "train_loss_after": after[0],
                "val_loss_before": before[1], "val_loss_after": after[1],
                "kept": best is not None, "cut_short": cut_short,
                "seconds": round(self.clock() - started, 2)}  # fmt: skip

    def _tune_decoder(self, model: VQVAE) -> Iterator[int]:
        """Adam on the decoder alone over training batches (encoder and codebooks fixed,
        quantizer dropout as in training, seeded); yields the steps done: 0, then every
        REFINE_CHECK_EVERY steps up to ``refine_decoder_steps``."""
        cfg = self.train_config
        yield 0
        if cfg.refine_decoder_steps == 0:
            return
        params = list(model.decoder.parameters())
        opt = torch.optim.Adam(params, lr=cfg.lr * REFINE_DECODER_LR_SHARE,
                               betas=(cfg.adam_beta1, cfg.adam_beta2))  # fmt: skip
        g = torch.Generator().manual_seed(cfg.seed)
        n, bs = len(self.train_mels), min(cfg.batch_size, len(self.train_mels))
        model.eval()  # the codebooks' EMA stays as refined
        for step in range(1, cfg.refine_decoder_steps + 1):
            x = self.train_mels[torch.randint(n, (bs,), generator=g).to(self.device)]  # (B, M, T)
            with torch.no_grad():
                keep = model._dropout_levels(bs, x.device, generator=g)
                quantized, _, _ = model.quantize(model.encode_latents(x), keep)  # (B, T', D)
            loss = model.reconstruction_loss(x, model.decode_latents(quantized, x.shape[-1]))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            if step % REFINE_CHECK_EVERY == 0 or step == cfg.refine_decoder_steps:
                yield step

    def _losses(self, model: VQVAE) -> tuple[float, float]:
        """Reconstruction loss of ``model`` (in eval mode) on the training chunks as they are
        and on the validation chunks (the training ones again when there are none)."""
        model.eval()
        val = self.val_mels if len(self.val_mels) else self.train_mels
        return _mean_losses(model, self.train_mels)[0], _mean_losses(model, val)[0]

    @torch.no_grad()
    def _refine_latents(self, model: VQVAE) -> Tensor:
        """Latents (N, D) of the training chunks and of their gain and band variants (of at
        most KMEANS_MAX_VECTORS vectors' worth of chunks, drawn at random)."""
        floor = self.dataset.mel_config.log_floor
        mels = self.train_mels  # (N, M, T)
        views = 1 + len(REFINE_GAINS_DB) + len(REFINE_BAND_MOVES)
        most = max(1, KMEANS_MAX_VECTORS // (views * self.chunk_steps))
        if len(mels) > most:
            g = torch.Generator().manual_seed(self.train_config.seed)
            mels = mels[torch.randperm(len(mels), generator=g)[:most].to(mels.device)]
        parts = []
        for x in mels.split(64):  # (b, M, T)
            variants = [x, *(gain_mel(x, db, floor) for db in REFINE_GAINS_DB),
                        *(move_bands(x, bands) for bands in REFINE_BAND_MOVES)]  # fmt: skip
            parts += [model.encode_latents(v).flatten(0, 1) for v in variants]  # (b * T', D)
        return torch.cat(parts)

    # -- model ----------------------------------------------------------------------------------

    def build_model(self) -> VQVAE:
        model = VQVAE(self.model_config).to(self.device)
        self._init_model_(model)
        return model

    @torch.no_grad()
    def _init_model_(self, model: VQVAE) -> None:
        """Normalisation from the training chunks (each bin's mean, one scale for every bin),
        then codebooks by k-means over their latents.

        One scale, not each bin's own std: in nine kick drums the quiet bins above 3 kHz vary a
        quarter to a sixth as much as the loud bottom ones (std 1.0-1.5 nats against 5.8); by their
        own std they are scaled up to count as much, so the PCA codec spends its components on
        them and the loss weighs their error up four to six times, while spectral convergence
        and the ear go by the loud bins; a held-back sound then comes back worst where it is loud.
        PCA alone (no quantizer, no training) of nine kick drums decodes the tenth at 3.52x the
        floor with each bin's std, 1.95x with one scale (20 files 1.66x -> 1.32x; 115 files
        1.05x -> 1.06x). The trained model (bench/vqvae.py --minutes 10 --quick, held-back /
        training files against the floor, seeds 0 and 1; each bin's std -> one scale):
        10 percussion files 2.50x, 3.19x / 1.06x, 1.16x -> 1.98x, 1.80x / 1.08x, 1.02x;
        20 files 1.47x, 1.35x / 1.26x, 1.31x -> 1.33x, 1.36x / 1.20x, 1.22x;
        40 files 1.58x, 1.73x / 1.27x, 1.27x -> 1.69x, 1.67x / 1.22x, 1.13x;
        115 files 1.54x, 1.46x / 1.09x, 1.06x -> 1.46x, 1.56x / 1.06x, 1.00x;
        the 20 textures (seed 0) 1.80x / 1.14x -> 1.84x / 1.13x.
        """
        x = self.train_mels  # (N, M, T)
        model.set_normalisation_(x.mean(dim=(0, 2)), x.std().expand(x.shape[1]))
        model.pca_init_(x, seed=self.train_config.seed)
        latents = torch.cat([model.encode_latents(b) for b in x.split(64)])  # (N, T', D)
        pooled = latents.reshape(-1, latents.shape[-1])  # (N * T', D)
        if len(pooled) > KMEANS_MAX_VECTORS:
            g = torch.Generator().manual_seed(self.train_config.seed)
            pooled = pooled[torch.randperm(len(pooled), generator=g)[:KMEANS_MAX_VECTORS]]
        model.kmeans_init_(pooled, self.batch_vectors, seed=self.train_config.seed)

    def build_optimizer(self, model: VQVAE) -> torch.optim.Optimizer:
        cfg = self.train_config
        linear = [p for m in (model.encoder.linear, model.decoder.linear) if m is not None
                  for p in m.parameters()]  # fmt: skip
        ids = {id(p) for p in linear}
        rest = [p for p in model.parameters() if id(p) not in ids]
        groups: list[dict[str, Any]] = [{"params": rest}]
        if linear:
            groups.append({"params": linear, "lr_share": cfg.linear_lr_share})
        return torch.optim.Adam(groups, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2))

    def checkpoint_state(self) -> dict[str, Any]:
        return {"model_config": self.model_config.to_dict(),
                "train_config": self.train_config.to_dict(),
                "mel_config": self.dataset.mel_config.to_dict(), "chosen": self.chosen}  # fmt: skip

    def restore_model(self, ckpt: dict[str, Any]) -> VQVAE:
        self.model_config = VQVAEConfig.from_dict(ckpt["model_config"])
        self.train_config = TrainConfig.from_dict(ckpt["train_config"])
        self.chosen = dict(ckpt["chosen"])
        model = VQVAE(self.model_config).to(self.device)
        model.load_state_dict(ckpt["state_dict"])
        return model

    # -- batch ----------------------------------------------------------------------------------

    @property
    def steps_per_epoch(self) -> int:
        n, bs = len(self.train_mels), min(self.train_config.batch_size, len(self.train_mels))
        return max(math.ceil(n / bs), MIN_STEPS_PER_EPOCH)

    def batches(self, epoch: int) -> Iterator[Tensor]:
        """Full batches (B, M, T) for ``epoch``, shuffled by a generator seeded by the epoch."""
        cfg, n = self.train_config, len(self.train_mels)
        bs = min(cfg.batch_size, n)
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)
        need = self.steps_per_epoch * bs
        order = torch.cat([torch.randperm(n, generator=g) for _ in range(math.ceil(need / n))])
        for i in range(self.steps_per_epoch):
            x = self.train_mels[order[i * bs : (i + 1) * bs].to(self.device)]  # (B, M, T)
            yield self._augment(x, g)

    def _augment(self, x: Tensor, g: torch.Generator) -> Tensor:
        cfg = self.train_config
        if not cfg.augment:
            return x
        aug = AugmentConfig(gain=cfg.augment_gain, time_shift=cfg.augment_time_shift,
                            noise=cfg.augment_noise, pitch_shift=cfg.augment_pitch_shift)  # fmt: skip
        return augment_mel(x, self.dataset.mel_config, aug, g)

    # -- step -----------------------------------------------------------------------------------

    def new_totals(self) -> dict[str, Any]:
        rvq = self._model().rvq
        return {"loss": 0.0, "recon": 0.0, "commit": 0.0, "items": 0,
                "usage": torch.zeros(rvq.num_quantizers, rvq.codebook_size, dtype=torch.long)}  # fmt: skip

    def step_loss(self, batch: Tensor, totals: dict[str, Any]) -> Tensor:
        """Reconstruction + commitment loss of batch (B, M, T); loss sums and code counts."""
        model = self._model()
        out = model(batch)
        recon = model.reconstruction_loss(batch, out.recon)
        loss = recon + out.commit_loss
        totals["loss"] += loss.item() * len(batch)
        totals["recon"] += recon.item() * len(batch)
        totals["commit"] += out.commit_loss.item() * len(batch)
        totals["items"] += len(batch)
        totals["usage"] += code_counts(out.codes, model.rvq.codebook_size)
        return loss

    # -- validation and metrics -----------------------------------------------------------------

    @torch.no_grad()
    def validate(self) -> tuple[float, dict[str, Any]]:
        """Validation loss and log-mel L1 (training chunks when there is no validation split)."""
        model = self._model()
        model.eval()
        loss, l1 = _mean_losses(model, self.val_mels if len(self.val_mels) else self.train_mels)
        model.train()
        return loss, {"val_l1": l1}

    def epoch_metrics(self, totals: dict[str, Any], validation: dict[str, Any]) -> dict[str, Any]:
        usage: Tensor = totals["usage"]  # (Q, K)
        n = max(totals["items"], 1)
        return {
            "train_loss": totals["loss"] / n,
            "train_recon": totals["recon"] / n,
            "commit_loss": totals["commit"] / n,
            "val_recon": validation["val_loss"],
            "val_l1": validation["val_l1"],
            "validated_on": "val" if len(self.val_mels) else "train",
            "utilisation": in_use(usage),
            "perplexity": perplexity(usage),
            "dead_codes": self._model().dead_codes(),
            # (Q, K) code counts this epoch for a heatmap, summed over groups of `usage_group`
            # neighbouring codes past USAGE_CELLS a level (2048 x 12 codes overflowed the row)
            "usage": grouped_usage(usage).tolist(),
            "usage_group": usage_group(usage.shape[1]),
            **self._audio_metrics(),
        }

    def _audio_metrics(self) -> dict[str, Any]:
        """The decoded-audio check every ``audio_every`` epochs and at the planned last one."""
        every, epoch = self.train_config.audio_every, self.state.epoch
        if every == 0 or (epoch % every != 0 and epoch < self.planned_epochs):
            return {}
        a = self.audio_check.measure(self._model())
        return {"audio_sc": a["sc"], "audio_sc_floor": a["floor"], "audio_sc_ratio": a["ratio"],
                "codes_in_use": self.codes_in_use(self._model())}  # fmt: skip

    def after_epoch(self, epoch: int) -> None:
        every = self.train_config.preview_every
        if every == 0 or epoch % every != 0:
            return
        pool = self.val_mels if len(self.val_mels) else self.train_mels
        picked = self.preview_pool[: self.train_config.preview_chunks]
        chunks = pool[torch.tensor([p.row for p in picked], device=pool.device)]  # (n, M, T)
        model = self._model()
        model.eval()
        with torch.no_grad():
            recon = model(chunks).recon  # (n, M, T)
        model.train()
        self.hooks.on_preview(epoch, chunks.cpu(), recon.cpu(), [p.label for p in picked])


@dataclass(frozen=True)
class PreviewChunk:
    row: int  # position in the pool of chunks (validation, or training when none validate)
    label: PreviewLabel


def preview_pool(dataset: Dataset, idx: np.ndarray) -> list[PreviewChunk]:
    """The chunks ``idx`` of ``dataset`` in the order previews take them: the first chunk of
    each file, then each file's second, and so on, so that two previews are two sounds where
    there are two (a long file's chunks used to fill them all). Each carries its file's name
    and which of the file's chunks it is."""
    seen: dict[int, int] = {}
    within = []  # each chunk's position among its file's chunks, in dataset order
    for f in dataset.chunk_file.tolist():
        within.append(seen.get(f, 0))
        seen[f] = within[-1] + 1
    chunks = []
    for row, i in enumerate(idx.tolist()):
        f = int(dataset.chunk_file[i])
        label = PreviewLabel(dataset.manifest[f].name, within[i] + 1, seen[f])
        chunks.append(PreviewChunk(row, label))
    return sorted(chunks, key=lambda c: (c.label.chunk, c.row))


def train_vqvae(
    dataset: Dataset,
    model_config: VQVAEConfig,
    train_config: TrainConfig,
    hooks: TrainHooks,
    *,
    device: str = "cpu",
) -> TrainResult:
    """Train (or resume, when ``hooks.load_checkpoint()`` returns one) and return the result."""
    return VQVAETrainer(dataset, model_config, train_config, hooks, device=device).run()


@torch.no_grad()
def _mean_losses(model: VQVAE, mels: Tensor) -> tuple[float, float]:
    """Mean reconstruction loss and log-mel L1 of ``model`` as it is (train or eval mode) over
    the chunks ``mels`` (N, M, T)."""
    loss = l1 = 0.0
    for x in mels.split(64):
        recon = model(x).recon  # (b, M, T)
        loss += float(model.reconstruction_loss(x, recon)) * len(x)
        l1 += float((recon - x).abs().mean()) * len(x)
    return loss / len(mels), l1 / len(mels)


def _snapshot(model: VQVAE) -> dict[str, Tensor]:
    """A copy of the model's state (weights, codebooks and their EMA buffers)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}
