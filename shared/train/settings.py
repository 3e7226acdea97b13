"""The training settings: :class:`LoopConfig` (the loop's, shared by every trainer),
:class:`TrainConfig` (the RVQ-VAE's) and :class:`PriorTrainConfig` (the prior's), with their
bounds. Plain Python, no torch.

The trainers are in :mod:`distill.shared.train.loop`, :mod:`distill.shared.train.vqvae` and
:mod:`distill.shared.train.prior`, which re-export all of this; the settings live here so that
what reads or checks them without training (the broker checking a job's params at submit)
loads no torch.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from distill.shared.configs import at_most, config_from_dict, require

# --------------------------------------------------------------------------------------------
# The loop


MAX_BUDGET_MINUTES = 7 * 24 * 60  # a week: past that a budget is a typo
MAX_EPOCHS = 100_000  # bounds on what a request may ask for, checked before anything is built
MAX_BATCH_SIZE = 4096
MAX_WARMUP_STEPS = 1_000_000


@dataclass(frozen=True)
class LoopConfig:
    """The loop's settings, shared by every trainer's config (which adds its own fields and may
    change these defaults). Travels in checkpoints. Reasons beside the defaults."""

    epochs: int = 300  # upper bound; early stopping or the time budget usually end sooner
    batch_size: int = 16  # small batches: more updates per second on a CPU
    lr: float = 2e-3  # Adam's peak rate; the warmup makes it safe for fresh weights
    lr_min_ratio: float = 0.05  # the cosine decays to lr x this at the last step
    warmup_steps: int = 100  # linear warmup: the first steps see freshly initialised weights
    schedule: str = "cosine"  # "cosine" or "constant" (after warmup)
    grad_clip: float = 1.0  # global norm; guards against one bad batch
    patience: int = 40  # epochs without a better validation loss before stopping; 0 = never
    seed: int = 0  # everything random in the run derives from it
    max_rollbacks: int = 2  # NaN/inf rollbacks allowed; the next one fails the job
    minutes: float = 0.0  # time budget (module docstring); 0 = epochs only, deterministic
    checkpoint_every_s: float = 60.0  # at most one checkpoint a minute: writing ~100 MB after
    # every few-second epoch costs a fifth of the run; 0 = after every epoch

    def loop_checks(self) -> list[tuple[bool, str]]:
        """The loop's checks; a subclass adds its own and passes all of them to ``require``."""
        return [
            (self.epochs >= 1, "epochs must be >= 1"),
            (self.batch_size >= 1, "batch_size must be >= 1"),
            (self.lr > 0 and math.isfinite(self.lr), "lr must be a positive number"),
            (0 <= self.lr_min_ratio <= 1, "lr_min_ratio must be in [0, 1]"),
            (self.warmup_steps >= 0, "warmup_steps must be >= 0"),
            (self.schedule in ("cosine", "constant"), "schedule must be cosine or constant"),
            (self.grad_clip > 0, "grad_clip must be > 0"),
            (self.patience >= 0 and self.seed >= 0, "patience and seed must be >= 0"),
            (self.max_rollbacks >= 0, "max_rollbacks must be >= 0"),
            (0 <= self.minutes <= MAX_BUDGET_MINUTES,
             f"minutes must be in 0..{MAX_BUDGET_MINUTES} (0 = no budget)"),
            (0 <= self.checkpoint_every_s <= 86400, "checkpoint_every_s must be in 0..86400"),
            at_most(self.epochs, MAX_EPOCHS, "epochs", "the time budget, not epochs, ends long runs"),
            at_most(self.batch_size, MAX_BATCH_SIZE, "batch_size",
                    "larger batches do not fit one device's memory for 1-s chunks"),
            at_most(self.warmup_steps, MAX_WARMUP_STEPS, "warmup_steps", "longer than any run"),
            at_most(self.patience, MAX_EPOCHS, "patience", "more epochs than a run may have"),
            at_most(self.lr, 1.0, "lr", "Adam diverges far below this"),
            at_most(self.max_rollbacks, 16, "max_rollbacks", "each halves the learning rate"),
        ]  # fmt: skip

    def __post_init__(self) -> None:
        require(self.loop_checks(), type(self).__name__)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------------------------
# The RVQ-VAE


@dataclass(frozen=True)
class TrainConfig(LoopConfig):
    """How to train the RVQ-VAE: the loop's settings (LoopConfig) plus previews and
    augmentation. Travels in checkpoints. Reasons beside the defaults."""

    # Adam's peak rate. At 2e-3 (the loop's default) validation L1 climbs as the warmup reaches
    # the peak (test_vqvae_stability: 1.67x its best at downsample 2); weight norm, Adam betas
    # 0.8/0.99, dead-code threshold 0.2, no rotation trick and re-running k-means after the
    # warmup all left the climb (1.35-1.93x); 1e-3 removes it (1.10x).
    lr: float = 1e-3
    preview_every: int = 25  # epochs between audio previews; 0 = none
    preview_chunks: int = 2  # validation chunks per preview
    augment: bool = False  # mel augmentation (distill.shared.audio.augment) of training batches
    augment_gain: bool = True  # the AugmentConfig switches used when augment is on
    augment_time_shift: bool = True
    augment_noise: bool = False  # noise adds texture the reconstruction then has to invent
    augment_pitch_shift: bool = False
    # Decoded-audio check (module docstring). 8 chunks x 32 Griffin-Lim iterations every 5
    # epochs: 0.31 s, 3.8% of the time of those epochs on percussion (2 CPU threads); fewer
    # chunks make the median noisy (the floors of percussion's first 4 ranged 0.10-0.55 and
    # their median sat on one file's), fewer iterations raise the floor and hide the model's
    # own error under Griffin-Lim's.
    audio_every: int = 5  # epochs between checks; 0 = only for the returned model
    audio_chunks: int = 8  # validation chunks decoded, the first of each file first
    audio_iters: int = 32  # Griffin-Lim iterations (seeded: the same chunks, the same phase)
    adam_beta1: float = 0.9  # Adam's defaults; EnCodec and DAC train with 0.8 / 0.99
    adam_beta2: float = 0.999
    # The PCA-initialised linear paths' rate, as a share of lr: slowly, so that the codebooks
    # fitted to their latents stay fitted (percussion, 3 min: utilisation 0.60-0.84 at 0.1,
    # 0.48-0.83 at 1; decoded audio alike; frozen at 0: a little worse).
    linear_lr_share: float = 0.1
    # Lloyd iterations of the codebooks once training ends (VQVAE.refine_codebooks_), over the
    # latents of the training chunks as they are, 3 dB softer and louder, and moved two mel
    # bands down and up; then up to refine_decoder_steps steps of the decoder alone, and the
    # state kept is the one with the lowest validation loss among those where neither the
    # training nor the validation loss got worse (VQVAETrainer.refine). The EMA codebooks trail
    # the encoder. bench/vqvae.py --minutes 10, as trained -> kept:
    # - percussion: training loss 0.0486 -> 0.0441, validation 0.0696 -> 0.0670 (75 decoder
    #   steps); decoded training files 1.50x -> 1.25x the Griffin-Lim floor, held-out 2.20x ->
    #   2.15x. Refined without the decoder steps: 1.33x / 2.20x;
    # - textures: 0.1869 -> 0.1820, 0.2641 -> 0.2538 (50 steps); held-out 4.35x -> 4.05x. The
    #   codebooks alone raised the training loss (0.1936);
    # - 9 percussion files: undone (16 codes a level are the decoder's tokens more than the
    #   latents' means: refined alone, training files decode at 2.40x instead of 1.15x).
    refine_iters: int = 10
    refine_decoder_steps: int = 100  # decoder steps after refinement (VQVAETrainer.refine)

    def __post_init__(self) -> None:
        checks = [
            (self.preview_every >= 0 and self.preview_chunks >= 1, "bad preview settings"),
            (0 <= self.adam_beta1 < 1 and 0 <= self.adam_beta2 < 1, "Adam betas must be in [0, 1)"),
            (self.audio_every >= 0, "audio_every must be >= 0"),
            (0 <= self.linear_lr_share <= 10, "linear_lr_share must be in 0..10"),
            (0 <= self.refine_iters <= 100, "refine_iters must be in 0..100"),
            (0 <= self.refine_decoder_steps <= 10_000, "refine_decoder_steps must be in 0..10000"),
            (1 <= self.audio_chunks <= 64 and 1 <= self.audio_iters <= 1000,
             "audio_chunks must be in 1..64 and audio_iters in 1..1000"),
        ]  # fmt: skip
        require(self.loop_checks() + checks, "TrainConfig")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """From a plain dict; unknown keys or wrong types raise ConfigError."""
        return config_from_dict(cls, d, "TrainConfig")


# --------------------------------------------------------------------------------------------
# The prior

# Label smoothing. With nothing held out, the prior learnt the demo's 10 one-shots by heart
# without it (0.05 bits per code, 2 pairs of its 8 draws identical at 47 steps/s); smoothing 0.1
# kept all 8 apart (closest pair 87% equal codes), still audible. With a validation split it
# lowers validation NLL: percussion at 800 steps, with the variants, 5.18 -> 5.01 bits per code.
# A smoothed prior leaves a tenth of each step's probability spread over every code, which a
# draw picks now and then as an odd code, heard as a click: sampling cuts that floor
# (SamplingParams.min_p), and steps where the sound holds still are never smoothed.
LABEL_SMOOTHING = 0.1
# Mutual learning (Zhang et al., "Deep Mutual Learning", 2018): two priors train side by side on
# the same batches, each minimising (1 - w) x its own loss + w x the cross-entropy of its heads'
# distribution against the other's (held fixed for that step), and the job keeps the first.
# What it buys is an ensemble's smoothing in one model that samples as fast as one: on
# percussion (the same code set, 800 steps) validation 4.434 bits per code alone, 4.354 beside
# a peer at w 0.5 (4.584 at 0.7; at 1200 steps 4.320); the average of two priors trained apart
# 4.326. In the 3-minute CPU default budget (two seeds each): w 0.5 4.346 / 4.347, w 0.35
# 4.326 / 4.339, w 0.25 4.344. Distilling into a third prior from two trained first scored
# 4.318 at 800 steps but costs the two teachers' steps on top; a teacher that is the prior's
# own running average (EMA 0.99) scored 4.437 in the 3 minutes. A pair's step costs ~2.2x one
# prior's, and the budget fits the epochs to that.
PEER_WEIGHT = 0.35
MAX_PEERS = 4


@dataclass(frozen=True)
class PriorTrainConfig(LoopConfig):
    """How to train the prior: the loop's settings with the prior's defaults, plus the window.
    Travels in checkpoints. Reasons beside the defaults."""

    epochs: int = 200  # upper bound; early stopping on validation NLL ends small sets sooner
    batch_size: int = 16  # windows per step: on a CPU, 32 took twice as long per window
    # Adam's peak; a one-layer LSTM of this size is stable at it with clipping. A budget of a
    # minute or two makes a few hundred steps: percussion at 800 steps 4.70 bits per code at
    # 3e-3, 4.61 at 5e-3, 4.56 at 8e-3 and 1.2e-2 (at 1600 steps 8e-3 peaks at 4.58, no better)
    lr: float = 8e-3
    warmup_steps: int = 20  # small sets make few steps per epoch; the LSTM needs little warmup
    patience: int = 10  # the validation NLL of a small set turns up within a few epochs
    window: int = 188  # code steps per training window: 2 s at 94 steps/s, longer than a chunk
    start_weight: float = 1.0  # a sound's first step counts as this many codes in the loss
    # training targets keep this share spread over every code (not where the sound holds
    # still); -1, written by earlier versions ("automatic"), reads as LABEL_SMOOTHING
    label_smoothing: float = LABEL_SMOOTHING
    # Training sequences go on this long in their final (silent) step, so that a draw past a
    # sound's end stays silent: 0.5 s at 47 steps/s. 94 taught it no better and, with one-shots
    # of ~1 s, made two thirds of every training step silence: at 24, a 1.2-minute budget made
    # 350 steps instead of 250 and validation 0.21 bits per code lower.
    end_steps: int = 24
    # Train on each file's variant encodings too (see mel_variants); validation and the
    # prior's size use the files as they are, the baselines are fitted on what the prior sees.
    augment: bool = True
    # Priors trained side by side, each also learning the others' predictions (mutual
    # learning, see PEER_WEIGHT); the job keeps the first. 0: automatic (AUTO_PEERS).
    peers: int = 0
    peer_weight: float = PEER_WEIGHT  # the others' predictions' share of each one's loss

    def __post_init__(self) -> None:
        checks = [(2 <= self.window <= 100_000, "window must be in 2..100000 code steps"),
                  (0 <= self.peers <= MAX_PEERS, f"peers must be in 0..{MAX_PEERS} (0: automatic)"),
                  (0 <= self.peer_weight < 1, "peer_weight must be in [0, 1)"),
                  (1 <= self.start_weight <= 1000, "start_weight must be in 1..1000"),
                  (0 <= self.end_steps <= 100_000, "end_steps must be in 0..100000"),
                  (self.label_smoothing == -1 or 0 <= self.label_smoothing < 1,
                   "label_smoothing must be in [0, 1), or -1 (automatic)")]  # fmt: skip
        require(self.loop_checks() + checks, "PriorTrainConfig")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PriorTrainConfig:
        """From a plain dict; unknown keys or wrong types raise ConfigError."""
        return config_from_dict(cls, d, "PriorTrainConfig")
