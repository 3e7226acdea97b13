"""The settings that fix a model's architecture: :class:`VQVAEConfig` (the RVQ-VAE) and
:class:`PriorConfig` (the prior), with how a prior is sized for its data
(:func:`choose_prior_config`). Plain Python, no torch.

The models are in :mod:`distill.shared.model.vqvae` and :mod:`distill.shared.model.prior`,
which re-export all of this; the settings live here so that what reads or checks them without
building a model (the broker checking a job's params at submit) loads no torch.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

from distill.shared.audio.settings import MAX_N_MELS
from distill.shared.configs import at_most, config_from_dict, require
from distill.shared.errors import ConfigError

# --------------------------------------------------------------------------------------------
# The RVQ-VAE


@dataclass(frozen=True)
class VQVAEConfig:
    """Everything that fixes the architecture; travels with the weights. Never mutated."""

    n_mels: int = 128  # must equal the dataset's MelConfig.n_mels
    channels: int = 256  # with residual blocks; wider trains fewer steps per CPU minute
    latent_dim: int = 128  # wider codes hold more of 128 bins per step than 64 would
    # Residual blocks per side. With dilations 1, 3, 9 the encoder sees ±16 frames (its 7-tap
    # input conv ±3, the blocks ±13) at downsample 1; the decoder, with a 7-tap output conv
    # too, ±19.
    blocks: int = 3
    kernel_size: int = 3  # small kernels, reach from dilation (DAC's residual units)
    dilations: tuple[int, ...] = (1, 3, 9)  # cycled over the blocks
    # Time stride of the latents: 1 keeps one code step per mel frame (94 per second). Jobs
    # get 2 from choose_size (DEVICE_SIZES says why).
    downsample: int = 1
    codebook_size: int | None = None  # None: chosen from the training chunks (choose_codebook)
    levels: int | None = None  # None: chosen from the training chunks
    commitment_weight: float = 0.25  # DAC/SoundStream's weight; EMA moves the codebook itself
    ema_decay: float = 0.95  # library default 0.8 is noisy, 0.99 too slow for ~1k-step runs
    # EMA uses per batch below which a code is replaced by a latent of the batch. None: 2% of
    # the use an average code gets per batch (dead_code_threshold_for), which the trainer
    # knows from its batch; with decay 0.95 a code falls that low after ~70 unused steps:
    # dead, not merely rare. A fixed 1.0 (the library's order) suits 16-64 codes (2-9% of
    # their average) but on 512 codes, used 0.9-1.5 times per batch (16 chunks x 47 steps),
    # it replaced half of them every step: they churned among random latents and went unused.
    # Percussion, 5 min side by side (bench/vqvae.py --threads 1 --quick), at 1.0 / 0.3 / 0.1
    # / 0.03: codes in use over the training set 0.52-0.74 / 0.85-0.93 / 0.93-0.99 /
    # 0.98-1.00 per level; training loss 0.048 / 0.041 / 0.038 / 0.037; decoded training
    # files 1.25x / 1.38x / 1.20x / 1.17x the floor, held-out 2.20x / 2.22x / 2.16x / 2.23x
    # (noise). On 9 files (64 codes x 2) a fixed 0.03 left 14% of the codes unused and the
    # training files at 1.34x; 2% of the average (0.16 there) uses them all: 1.10x, held-out
    # 5.48x (1.15x / 6.75x at 1.0). The share, not a number of uses, is what carries over.
    dead_code_threshold: float | None = None
    quantizer_dropout: float = 0.5  # share of items trained on the first k levels only (DAC)
    rotation_trick: bool = True  # library default; gradients through VQ by rotation
    # Loudness-weighted L1 (see reconstruction_loss). Off by default: measured on percussion it
    # lowered decoded spectral convergence on training files but made training unstable at
    # lr 2e-3 (loss rising for hundreds of steps); plain L1 trained smoothly.
    spectral_weight: float = 0.0
    # "weight": weight norm on every conv (DAC, EnCodec). Off: on the CPU size it neither
    # steadied training at lr 2e-3 nor improved the sound (module docstring).
    norm: str = "none"
    # A linear path beside each conv stack, initialised by PCA of the training frames
    # (pca_init_): at step 0 the model is a PCA codec whose codebooks k-means fits, and the
    # conv stacks (last layers zero-initialised) learn what the linear map misses.
    linear_path: bool = False

    def __post_init__(self) -> None:
        checks = [
            (self.n_mels > 0, "n_mels must be positive"),
            (self.channels > 0 and self.latent_dim > 0, "channels and latent_dim must be positive"),
            (self.blocks >= 0, "blocks must be >= 0"),
            (self.kernel_size % 2 == 1, "kernel_size must be odd"),
            (len(self.dilations) > 0 and min(self.dilations) >= 1, "dilations must be >= 1"),
            (self.downsample in (1, 2, 4, 8), "downsample must be 1, 2, 4 or 8"),
            (self.codebook_size is None or self.codebook_size >= 2, "codebook_size must be >= 2"),
            (self.levels is None or 1 <= self.levels <= 16, "levels must be in 1..16"),
            (self.commitment_weight >= 0, "commitment_weight must be >= 0"),
            (0.0 <= self.ema_decay < 1.0, "ema_decay must be in [0, 1)"),
            (self.dead_code_threshold is None or self.dead_code_threshold >= 0,
             "dead_code_threshold must be >= 0"),
            (0.0 <= self.quantizer_dropout <= 1.0, "quantizer_dropout must be in [0, 1]"),
            (self.spectral_weight >= 0, "spectral_weight must be >= 0"),
            (self.norm in ("none", "weight"), "norm must be 'none' or 'weight'"),
            *self._bounds(),
        ]
        require(checks, "VQVAEConfig")

    def _bounds(self) -> list[tuple[bool, str]]:
        """Upper bounds, checked before any tensor exists: far above what trains well on the
        machines Distill runs on (a laptop CPU to one GPU), far below what exhausts them."""
        return [
            at_most(self.n_mels, MAX_N_MELS, "n_mels", "a mel image taller than any MelConfig"),
            at_most(self.channels, 1024, "channels", "4x the default; ~16x its memory"),
            at_most(self.latent_dim, 1024, "latent_dim", "8x the default"),
            at_most(self.blocks, 16, "blocks", "5x the default depth"),
            at_most(self.kernel_size, 31, "kernel_size", "reach comes from dilation"),
            at_most(len(self.dilations), 16, "number of dilations", "one per block at most"),
            at_most(max(self.dilations, default=1), 729, "dilation", "3^6: a 15 s reach"),
            at_most(self.codebook_size or 0, 8192, "codebook_size", "16x the largest chosen"),
        ]

    @property
    def resolved(self) -> bool:
        return self.codebook_size is not None and self.levels is not None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["dilations"] = list(self.dilations)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VQVAEConfig:
        """Build from a plain dict (msgpack, JSON); unknown keys or wrong types raise ConfigError."""
        return config_from_dict(cls, d, "VQVAEConfig")


# --------------------------------------------------------------------------------------------
# The prior

_BOUNDS: dict[str, tuple[float, float]] = {  # inclusive ranges that fit real machines
    "levels": (1, 16),
    "codebook_size": (2, 8192),
    "embed_dim": (1, 4096),
    "hidden": (1, 4096),
    "layers": (1, 8),
    "dropout": (0.0, 0.9),
    "earlier_codes": (0, 8),
    "cache_decay": (0.0, 0.99),
}


@dataclass(frozen=True)
class PriorConfig:
    """Everything that fixes the prior's architecture; travels with the weights. Never mutated."""

    levels: int = 4  # the RVQ-VAE's first levels it models (at most its Q; see prior_levels)
    codebook_size: int = 256  # must equal the RVQ-VAE's codebook size (K)
    embed_dim: int = 128  # code embeddings and head width; K <= 512 codes fit in 128 dims
    hidden: int = 256  # LSTM width: ~10x real time sampling on a CPU core at batch 1 (512: ~6x)
    layers: int = 1  # one layer: small datasets overfit a second one, and it halves sampling
    dropout: float = 0.2  # on embeddings, between layers and on the LSTM output; small data
    # each level's head also reads the same level's code of the previous step directly (a
    # learnt bigram path: fine levels repeat from frame to frame, which the summed LSTM input
    # carries poorly); off for files written before it existed
    prev_codes: bool = False
    # with prev_codes, each head also reads its level's codes of this many steps before the
    # previous one (a learnt trigram path and beyond: how fast a level moves); 0 for files
    # written before it existed
    earlier_codes: int = 0
    # each level's prediction after the first is a learnt mix of the LSTM's and of the codes
    # this sound has used so far at that level, counted with this decay per step (the last few
    # steps weigh most): a sound tends to come back to its own codes, which no fixed table of
    # what follows what knows; 0 = off, as in files written before it
    cache_decay: float = 0.0

    def __post_init__(self) -> None:
        if not isinstance(self.prev_codes, bool):
            raise ConfigError(f"PriorConfig: prev_codes must be true or false, got "
                              f"{self.prev_codes!r}")  # fmt: skip
        for f in fields(self):
            if f.name == "prev_codes":
                continue
            value = getattr(self, f.name)
            expected = float if f.name in ("dropout", "cache_decay") else int
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"PriorConfig: {f.name} must be a number, got {value!r}")
            if expected is int and not isinstance(value, int):
                raise ConfigError(f"PriorConfig: {f.name} must be an int, got {value!r}")
            low, high = _BOUNDS[f.name]
            if not low <= value <= high:
                raise ConfigError(
                    f"PriorConfig: {f.name} must be in {low:g}..{high:g}, got {value!r}"
                )
        if self.earlier_codes and not self.prev_codes:
            raise ConfigError(f"PriorConfig: earlier_codes {self.earlier_codes} needs prev_codes "
                              "on")  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PriorConfig:
        """Build from a plain dict (msgpack, JSON): the project's one config reader (unknown
        keys, wrong types -> ConfigError; an int where a float belongs is read as a float)."""
        return config_from_dict(cls, d, "PriorConfig")


# (code steps below which the band applies, hidden, embed_dim, layers, dropout, reason). Every
# band reads each level's previous codes (prev_codes) and mixes in the sound's own (the cache):
# measured on percussion (Q 6 x K 512, 16k steps, the same 450 steps) validation 5.24 bits per
# code with prev_codes, 6.24 without (bigram 6.07); and on small sets, on files held out from
# the prior (3-minute budget, 13 held-out percussion files, baselines fitted on the training
# files and their variants): 8 training files (410 code steps) 6.20 bits per code with both at
# dropout 0.6 (6.29 at 0.5) against 7.00 without (bigram 7.37), 20 files (1042 steps) 5.94
# against 6.68 (bigram 6.99); the 18 textures (3328 steps; a held-out drum loop and a vinyl
# noise) 8.02 at dropout 0.6 (8.11 at 0.5) against 8.89 (bigram 9.00). Without them the prior
# overfits from its first epoch.
_SIZE_BANDS: list[tuple[float, int, int, int, float, str]] = [
    # a handful of sounds: at dropout 0.3 the prior learnt the demo's 10 one-shots by heart
    # (0.02 bits per code, two of 8 draws identical); 0.6 keeps draws distinct, still audible
    (5_000, 128, 64, 1, 0.6, "under 5k code steps: ~1 min of sound at 94 steps/s, ~2 at 47"),
    # percussion (16k steps): dropout 0.5 5.16 bits per code, 0.3 5.24; embeddings
    # 128 instead of 64: 5.41 (it overfits sooner). With the cache, dropout 0.7 scores 0.03-0.07
    # bits lower (at 1000 steps 0.5 4.429, 0.6 4.386, 0.7 4.359, 0.8 4.369; hidden 192 at 0.7
    # 4.380) but its draws ring on: 52% of 2-s draws still above -30 dB in their second second
    # where 32% are at 0.5 (20% of the training files; cache on the finer levels, 800 steps)
    (20_000, 128, 64, 1, 0.5, "under 20k code steps: ~3.5 min at 94 steps/s, ~7 at 47"),
    (200_000, 256, 128, 1, 0.2, "under 200k code steps: ~35 min at 94 steps/s, ~70 at 47"),
    (1_000_000, 512, 128, 2, 0.1, "under 1M code steps: ~3 h at 94 steps/s, ~6 at 47"),
    (math.inf, 768, 192, 2, 0.1, "hours of codes"),
]
# The heads also read this many steps further back (earlier_codes).
# Measured on percussion (Q 6 x K 512, the same code set and 1000 steps): validation 4.81 bits
# per code reading the previous step, 4.71 reading two steps, 4.70 reading four.
EARLIER_CODES = 1
# ... and each level after the first mixes in the sound's own codes (cache_decay). Measured on
# percussion (the same code set, 800 steps): validation 4.558 bits per code without, 4.400 with
# decay 0.7, 4.394 with two caches (0.5 and 0.95), 4.405 with 0.3 and 0.9; the mix's weight read
# from the LSTM and the level's history 4.402 (what ships: one gate per step for all levels),
# from the LSTM alone 4.435; a second cache of this sound's code transitions 4.403, one keyed on
# the coarser level's code 4.333 against 4.359 (not worth it). Not on the coarsest level, which
# sets the loudness: drawn from the cache it went back to the louder codes of a sound's attack
# in its tail, and 2-s draws had 0.30 isolated clicks per second (10 dB above both neighbouring
# steps; 0.023 without a cache, 0 in the training files); a cache on the finer levels only keeps
# 0.16 of its 0.20 bits and 0.035 clicks per second (800 steps, dropout 0.7); at dropout 0.5
# (what ships) 4.434 bits per code and 0.031 clicks per second.
CACHE_DECAY = 0.7


def choose_prior_config(
    levels: int, codebook_size: int, n_train_steps: int
) -> tuple[PriorConfig, str]:
    """A prior sized for ``n_train_steps`` training code steps (all chunks), and why.

    An LSTM of width H holds ~4H(E+H) weights; on a few thousand steps a wide one memorises
    chunks instead of learning what follows what, so small data gets a narrow LSTM with more
    dropout, and a second layer only once there are hours of codes.
    """
    if n_train_steps < 0:
        raise ConfigError(f"choose_prior_config: n_train_steps must be >= 0, got {n_train_steps}")
    _, hidden, embed, layers, dropout, band = next(b for b in _SIZE_BANDS if n_train_steps < b[0])
    config = PriorConfig(levels, codebook_size, embed, hidden, layers, dropout, prev_codes=True,
                         earlier_codes=EARLIER_CODES, cache_decay=CACHE_DECAY)  # fmt: skip
    n_params = prior_parameter_count(config)
    why = (
        f"{n_train_steps} training code steps x {levels} levels ({band}): LSTM {layers} x "
        f"{hidden}, embeddings {embed}, dropout {dropout:g}"
        f", each level reading its last {1 + config.earlier_codes} codes, the finer ones mixing "
        "in the codes they used earlier in the sound "
        f"({n_params / 1e6:.2f} M weights, "
        f"{n_params / max(1, n_train_steps * levels):.1f} per training code) keeps it from "
        f"memorising the chunks while leaving room to learn what follows what."
    )
    return config, why


def prior_parameter_count(config: PriorConfig) -> int:
    """Weights in a ``Prior(config)``, without building it."""
    q, k, e, h = config.levels, config.codebook_size, config.embed_dim, config.hidden
    lstm = 4 * h * (e + h + 2) + (config.layers - 1) * 4 * h * (2 * h + 2)
    prev = (1 + config.earlier_codes) * q * k * e if config.prev_codes else 0
    cache = (q - 1) * (e + 1) if config.cache_decay else 0
    return (q * k * e) + e + lstm + (h * e + e) + ((q - 1) * k * e) + q * k * (e + 1) + prev + cache
