"""The RVQ-VAE: log-mel -> conv encoder -> ResidualVQ -> conv decoder -> log-mel.

Shapes: B batch, M mel bins, T mel frames, T' = T / downsample latent steps, D latent dim,
Q quantizer levels, K codes per level. The model's input and output are real log-mel (as
``distill.shared.audio.mel.log_mel`` makes it); it normalises inside, with the dataset's per-bin
mean and a scale (the trainer sets one for every bin) held as buffers so that they travel with
the weights.

The encoder and decoder treat the mel bins as channels (a 1-D conv over time) and get their
capacity from residual blocks with dilated convolutions (as in DAC/EnCodec): a plain 3-layer
conv recipe measured capacity-bound. The ResidualVQ is ``vector_quantize_pytorch``'s; the
residual loop over its levels is run here so that quantizer dropout can be per item (as in DAC)
through the library's ``mask``: a dropped level emits index -1, takes no EMA update and no
commitment loss.

A linear path beside each conv stack (``linear_path``, on for every job through choose_size)
starts the model as a PCA codec: its weights are the principal components of the training
set's normalised frame pairs, the conv stacks' last layers start at zero, and the codebooks are
k-means-fitted to those latents. Measured before it: an untrained PCA of frame pairs with 32
of 256 components reconstructs validation percussion at 1.28x the Griffin-Lim floor, while the
conv model after a 5-minute CPU budget managed 2.48x, and continuous latents (no quantizer)
no better -- a short CPU budget is spent learning what a linear map gets for free. With the
6 x 512 RVQ on those PCA latents (k-means, no training) it is 2.09x: at this codebook size
the bits, not only the decoder, cap held-back files (8 levels 1.96x, 12 levels 1.79x).

Measured with bench/vqvae.py (one thread, 115 percussion files, side by side, 6 minutes):
without the linear path 2.46x the floor on held-back files and 1.69x on training files; with
it 2.28x and 1.42x; 10 minutes on two idle cores, 2.25x and 1.48x (validation L1 is best
after ~60 epochs and early stopping ends the run at ~220 s; run to the whole budget, the best
epoch is still 55: 2.23x / 1.44x). On 9 files it reconstructs its training files at 1.02x
(was 4.02x). The bar (1.5x held-back, 1.25x training) is not met: see the PCA figures above.
Encoded by what the codes decode to (``search_codes``, what every encode outside training does)
instead of by the nearest codes, the 10-minute model's held-back files come back at 1.63x (was
2.26x; per-file median 1.27x) and training files at 1.05x (1.11x); textures 2.25x (3.37x).
Tried and did not help: a loss restricted to the loudest 60 dB of each chunk, the
loudness-weighted term at weight 1 and 3, ConvNeXt blocks (Vocos-style, with LayerNorm, at
1e-3 and 3e-3), whitened PCA latents, zero-initialised residual branches and a randomly
initialised linear path (before PCA), spectral-convergence losses on exp(log-mel)
(unstable), batch 4, weight norm, Adam betas 0.8/0.99, dead-code threshold 0.2 or 1.5 (for the
audio; it is now 2% of an average code's use, for the codes' sake: VQVAEConfig), no
rotation trick, k-means again after the warmup, no quantizer dropout (train better, held-back
alike).
"""

from __future__ import annotations

import math
import types
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from vector_quantize_pytorch import ResidualVQ

from distill.shared.errors import ConfigError
from distill.shared.model.kmeans import kmeans, lloyd, nearest

# VQVAEConfig lives in settings (no torch there); imported from here as before
from distill.shared.model.settings import VQVAEConfig as VQVAEConfig

# Encoding a sound by what its codes decode to (VQVAE.search_codes): codes tried per level and
# step, latent steps decoded either side of the step tried and scored either side of it, and
# the share of the sound's loudest frame energy below which a step is left as it is (-40 dB).
SEARCH_CANDIDATES = 16
SEARCH_CONTEXT = 8
SEARCH_SCORED = 4
SEARCH_QUIET = 1e-4
# The search's error: the squared magnitude error relative to the sound's (what spectral
# convergence weighs, set by the loud bins) plus this much of the log-mel L1 (what the quiet
# bins, a decay, a tail, are heard by). Measured on 13 held-back and 13 training percussion
# files (median of per-file ratios to the floor; mel L1): 0 -> 1.30x / 1.12x, L1 0.440 / 0.228;
# 0.2 -> 1.29x / 1.11x, L1 0.393 / 0.181; 1.0 -> 1.28x / 1.14x, 0.373 / 0.170; the nearest
# codes 2.12x / 1.26x, 0.368 / 0.157.
SEARCH_LOG_WEIGHT = 0.2

# --------------------------------------------------------------------------------------------
# Config


def search_error(out: Tensor, mel: Tensor) -> Tensor:
    """What the code search minimises, per candidate: decoded log-mels ``out`` (m, M, F)
    against the sound's ``mel`` (M, F): the squared magnitude error over the sound's energy
    (what spectral convergence weighs) plus SEARCH_LOG_WEIGHT x the log-mel L1 (the quiet
    bins a decay is heard by). (m,)"""
    want = mel.exp()  # (M, F) magnitudes
    err = ((out.exp() - want) ** 2).sum(dim=(1, 2)) / (want**2).sum()
    return err + SEARCH_LOG_WEIGHT * (out - mel).abs().mean((1, 2))


def choose_codebook(chunks: int) -> tuple[int, int, str]:
    """Codebook size and levels for ``chunks`` training chunks, and why.

    A chunk is one second of sound (long files give one every half second), so the count is
    the material the codebooks are fitted to, which the number of files is not: 18 textures
    (loops, voices, noises) make 131 chunks, 115 percussion one-shots 209, 36 of them 59.
    The bands: under 15 chunks 64 x 6; 15-40: 128 x 6; 40-100: 512 x 5; 100 on: 512 x 12.
    The figures below were measured at downsample 2 (47 code steps a second, the default
    until then), except where they say downsample 1. Under 15 chunks at downsample 1 (10
    percussion files, 11 chunks, one held back; seeds 0 / 1; held-back / training files):
    64 x 4 1.84x, 1.58x / 1.14x, 1.03x; 64 x 6 1.37x, 1.35x / 1.14x, 1.04x, every level's codes
    >= 0.92 in use; 64 x 8 1.53x / 1.06x (seed 0). 15-40 chunks at downsample 1 (20 files, 22
    chunks, two held back): 128 x 4 1.29x, 1.28x / 1.13x, 1.27x; 128 x 6 1.16x, 1.12x / 0.97x,
    0.94x, every level >= 0.96 in use. Twice the latents a second keep two more levels in use.
    40-100 chunks at downsample 1 (36 files, 55 chunks, four held back; seeds 0 / 1): 512 x 5
    1.64x, 1.60x / 1.14x, 1.14x (best epoch 4 of 44 both times); 512 x 6 1.59x / 1.07x and
    512 x 8 1.53x / 0.98x (its finest level 0.83 in use; seed 0); 256 x 8 1.54x, 1.56x / 1.06x,
    every level >= 0.98 in use. 512 x 5 stays: the prior draws every level of an RVQ-VAE of up
    to six (PRIOR_ALL_LEVELS_UP_TO) and the first four of eight, so 256 x 8 would generate from
    32 bits a step where 512 x 5 gives 45; drawn in all eight (bench/prior.py on the same 36
    files, --prior-opt levels=8) it samples as fast (82x real time against 81x, one item) but
    its prior beats the strict bigram by 0.53 bits per code where 512 x 5's beats it by 0.73,
    and neither memorises (0% of 200 drawn seconds): too little either way to change the band.
    Past a few dozen chunks the training
    files are bit-limited: the first level's 512 codes are what lets them decode close to the
    floor, and held-back files lose nothing by it.
    From 100 chunks on, the sounds a model has not heard are bit-limited too: the decoder
    reproduces them from latents fitted to them (1.02x the floor on held-back percussion) but
    not from 6 x 9 bits per step. Measured with bench/vqvae.py --minutes 10 --threads 1
    --quick, two runs side by side, codes searched as `distill encode` searches them,
    held-back / training files against the floor: percussion (209 chunks) 1.69x / 1.10x at
    512 x 6 and 1.56x / 1.06x at 512 x 8 (seed 1: 1.69x / 1.10x and 1.61x / 1.09x); the 18
    textures (131 chunks) 2.23x / 1.32x and 2.02x / 1.24x (seed 1: 2.21x / 1.38x and 2.01x /
    1.19x). Each step trains 7% slower, the
    prior samples two more levels per step (its speed: bench/prior.py) and every level of
    every epoch is in use as at 6 levels (the two finest 84-88% of their codes in an epoch's
    batches, 92-98% over the training set). At 512 x 12 (the same bench): percussion 1.54x /
    1.09x (seed 1: 1.46x / 1.06x; validation mel L1 0.188-0.189 against 0.212 at 8), textures
    1.80x / 1.14x; at 512 x 10 percussion 1.59x / 1.05x. Twelve levels cost each training step
    26% and the code search (`distill encode`) 1.6x; the prior draws only the first
    PRIOR_LEVELS (8) of them, so sampling keeps its speed (distill.shared.model.prior).
    Measured with bench/vqvae.py --minutes 5 --threads 1 --quick (two runs side by side),
    decoded held-back / training files against the floor: 18 textures (131 chunks) 3.53x /
    1.35x at 512 x 6, 3.45x / 1.58x at 256 x 6, 3.67x / 1.96x at 128 x 4 (chosen by file count
    before); 36 percussion files (59 chunks) 2.53x / 1.30x at 512 x 5 (every code in use), 2.60x
    / 1.30x at 512 x 6 (the sixth level 61% in use), 3.26x / 1.63x at 256 x 6, 2.62x / 2.86x at
    128 x 4; 18 percussion files (22 chunks) 2.73x / 1.33x at 128 x 4 (every code in use),
    3.12x / 1.33x at 256 x 5 (its last levels 25-38% in use); 9 files 64 x 2 5.48x / 1.10x
    (64 x 3: 6.28x / 1.44x). The 40-chunk edge lies between two measured sets.
    Measured again once codes were searched by what they decode to (bench/vqvae.py --minutes
    10 --threads 1 --quick --subset N, seeds 0 and 1, two runs side by side; every run
    early-stopped within two minutes): 9 files (11 chunks, one held-back file) 64 x 2 3.99x,
    2.52x / 1.22x, 1.15x; 64 x 4 (chosen then) 2.50x, 3.19x / 1.06x, 1.16x; 64 x 5 2.03x,
    2.60x / 1.16x, 1.07x; the search makes use of the extra levels, on the training files in
    both seeds. A fourth level keeps its codes in use (0.88-0.95 of them in an epoch's batches
    at worst), a fifth not (0.84-0.86), a sixth far from it (0.62); 512 codes there: 0.2-0.5.
    18 files (22 chunks): 128 x 4 1.47x, 1.35x / 1.26x, 1.31x; 128 x 6 1.31x, 1.33x / 1.24x,
    1.41x (its sixth level 0.73-0.83 in use): no better at downsample 2, so 128 x 4 stayed then.
    36 files (59 chunks): 512 x 5 1.58x / 1.27x, 512 x 12 1.63x / 1.12x with levels 6-12 at
    0.34-0.48 in use.
    """
    size, levels, band = _codebook_band(chunks)
    why = (
        f"{chunks} training chunks falls in the {band} band: {size} codes x {levels} levels "
        f"{_BAND_REASON}."
    )
    return size, levels, why


_BAND_REASON = "keeps codes well used (few dead) while leaving enough bits per frame to reconstruct"


def _codebook_band(chunks: int) -> tuple[int, int, str]:
    """(codebook size, levels, the band's name) for ``chunks`` training chunks."""
    if chunks < 15:
        return 64, 6, "under 15"
    if chunks < 40:
        return 128, 6, "15-40"
    if chunks < 100:
        return 512, 5, "40-100"
    return 512, 12, "100 or more"


# Model size per device kind, for the fields a job leaves unset. The CPU size is what makes
# enough steps in a CPU budget: bench/vqvae.py finds it step-bound (train ~ validation), so a
# larger model only makes fewer steps. downsample 1 (one code step per mel frame, 94 a second)
# on every device: once the model starts as the PCA codec and codes are searched by what they
# decode to, held-back sounds are bound by the bits per second, and twice the code steps give
# them twice the bits. bench/vqvae.py --minutes 10 --threads 1 --quick, held-back / training
# files against the Griffin-Lim floor, at downsample 1 against 2 (512 x 12 both): percussion
# 1.36x / 1.01x against 1.48-1.56x / 1.02-1.06x; the 20 textures 1.47x / 1.10x against
# 1.78-1.80x / 1.14-1.22x; the 10-file subset 1.58-1.84x / 1.03-1.14x against 2.50-3.19x /
# 1.06-1.16x at 64 x 4 (at 64 x 6, now chosen there: 1.35-1.37x / 1.04-1.14x);
# validation mel L1 0.164 against 0.189 (percussion). Every level keeps >= 0.93 of its codes in
# use over the training chunks from the third epoch (the finest at 2 fell to 0.79-0.86), as
# each batch gives each code twice the latents. The costs: each training step ~1.5x slower
# (still ~1200 steps in 10 minutes, enough to converge), the code search (`distill encode`)
# 1.35-1.6x slower, and the prior twice the code steps a second, so over 12 levels it draws half
# as many (its speed: distill.shared.model.prior.prior_levels). At downsample 2 (the default
# until this was measured) a 4-minute run made 1.9x the steps of downsample 1 without the PCA
# start and the search, and decoded better then (3.50x -> 2.95x): the bits were not yet what
# bound it.
# The linear path (PCA at init) on every device: a short budget starts from a working codec
# instead of from noise (6 min on percussion, one thread, side by side: val 2.28x vs 2.46x
# the floor, train 1.42x vs 1.69x). A GPU makes the same steps many times faster, so there the
# budget buys width and depth (DAC's decoder is 1536 channels wide); MPS in between. The GPU
# sizes are reasoned, not measured here.
DEVICE_SIZES: dict[str, dict[str, Any]] = {
    "cpu": {"channels": 256, "blocks": 3, "downsample": 1, "linear_path": True},
    "mps": {"channels": 384, "blocks": 6, "downsample": 1, "linear_path": True},
    "cuda": {"channels": 512, "blocks": 6, "downsample": 1, "linear_path": True},
}
SIZE_KEYS = ("channels", "blocks", "downsample", "linear_path")


def choose_size(device: str, overrides: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """VQVAEConfig overrides with the device's size filled in where ``overrides`` leaves it
    unset, and why. Unknown device kinds get the CPU's size."""
    kind = device.split(":")[0]
    size = DEVICE_SIZES.get(kind, DEVICE_SIZES["cpu"])
    filled = {k: v for k, v in size.items() if k not in overrides}
    if not filled:
        return dict(overrides), "channels, blocks, downsample and linear_path were set by the user."
    why = (
        f"{kind}: " + ", ".join(f"{k} {v}" for k, v in filled.items()) + ". "
        + ("A CPU budget is step-bound: this size makes the most steps that still reconstruct; "
           if kind not in ("cuda", "mps") else
           "An accelerator makes steps several times faster than a CPU, so its budget "
           "buys a wider, deeper encoder and decoder; ")
        + "downsample 1 (a code step per mel frame) gives held-back sounds the bits they need"
        + ("; the linear path starts training from the PCA codec of the training frames."
           if filled.get("linear_path") else ".")
    )  # fmt: skip
    return {**filled, **overrides}, why


def resolve_config(config: VQVAEConfig, chunks: int) -> tuple[VQVAEConfig, str]:
    """Fill codebook_size/levels left as None from the training chunks; says what was chosen."""
    size, levels, why = choose_codebook(chunks)
    if config.resolved:
        return config, "codebook size and levels were set by the user."
    if config.codebook_size is not None or config.levels is not None:  # one of the two
        user, data = ((f"codebook size {config.codebook_size}", f"{levels} levels")
                      if config.codebook_size is not None
                      else (f"{config.levels} levels", f"{size} codes"))  # fmt: skip
        why = (f"{user} set by the user; {data} from the data: {chunks} training chunks falls "
               f"in the {_codebook_band(chunks)[2]} band (whose own choice, {size} codes x "
               f"{levels} levels, {_BAND_REASON}).")  # fmt: skip
    chosen = replace(
        config,
        codebook_size=config.codebook_size if config.codebook_size is not None else size,
        levels=config.levels if config.levels is not None else levels,
    )
    return chosen, why


DEAD_CODE_SHARE = 0.02  # of an average code's use per batch (VQVAEConfig.dead_code_threshold)
NOMINAL_BATCH_VECTORS = 16 * 47  # 16 one-second chunks at downsample 2


def dead_code_threshold_for(batch_vectors: int, codebook_size: int) -> float:
    """EMA uses per batch below which a code counts as dead: DEAD_CODE_SHARE of the uses an
    average code gets from ``batch_vectors`` latent vectors per batch."""
    return DEAD_CODE_SHARE * batch_vectors / codebook_size


# --------------------------------------------------------------------------------------------
# Blocks


def _conv(config: VQVAEConfig, conv: nn.Conv1d | nn.ConvTranspose1d) -> nn.Module:
    """``conv`` with the config's normalisation (weight norm, as DAC and EnCodec use)."""
    if config.norm == "weight":
        return nn.utils.parametrizations.weight_norm(conv)
    return conv


class ResidualBlock(nn.Module):
    """x + 1x1(GELU(dilated conv(GELU(x)))): DAC's residual unit with GELU. (B, C, T) kept."""

    def __init__(self, config: VQVAEConfig, dilation: int) -> None:
        super().__init__()
        c, k = config.channels, config.kernel_size
        pad = dilation * (k - 1) // 2
        self.conv = _conv(config, nn.Conv1d(c, c, k, dilation=dilation, padding=pad))
        self.mix = _conv(config, nn.Conv1d(c, c, 1))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.mix(F.gelu(self.conv(F.gelu(x))))


def _stack(config: VQVAEConfig) -> list[nn.Module]:
    dil = config.dilations
    return [ResidualBlock(config, dil[i % len(dil)]) for i in range(config.blocks)]


class Encoder(nn.Module):
    """Normalised log-mel (B, M, T) -> latents (B, D, T / downsample)."""

    def __init__(self, config: VQVAEConfig) -> None:
        super().__init__()
        c, ds = config.channels, config.downsample
        strides = [_conv(config, nn.Conv1d(c, c, 4, stride=2, padding=1))
                   for _ in range(_n_strides(config))]  # fmt: skip
        self.net = nn.Sequential(
            _conv(config, nn.Conv1d(config.n_mels, c, 7, padding=3)),
            *strides,
            *_stack(config),
            nn.GELU(),
            _conv(config, nn.Conv1d(c, config.latent_dim, 1)),
        )
        # frames t*ds .. t*ds+ds-1 -> latent t, linearly (PCA at init)
        self.linear = (nn.Conv1d(config.n_mels, config.latent_dim, ds, stride=ds)
                       if config.linear_path else None)  # fmt: skip

    def forward(self, x: Tensor) -> Tensor:
        z = self.net(x)
        return z if self.linear is None else z + self.linear(x)


class Decoder(nn.Module):
    """Latents (B, D, T') -> normalised log-mel (B, M, T' * downsample); mirrors the encoder."""

    def __init__(self, config: VQVAEConfig) -> None:
        super().__init__()
        c = config.channels
        ups = [_conv(config, nn.ConvTranspose1d(c, c, 4, stride=2, padding=1))
               for _ in range(_n_strides(config))]  # fmt: skip
        self.net = nn.Sequential(
            _conv(config, nn.Conv1d(config.latent_dim, c, 7, padding=3)),
            *_stack(config),
            *ups,
            nn.GELU(),
            _conv(config, nn.Conv1d(c, config.n_mels, 7, padding=3)),
        )
        ds = config.downsample
        self.linear = (nn.ConvTranspose1d(config.latent_dim, config.n_mels, ds, stride=ds)
                       if config.linear_path else None)  # fmt: skip

    def forward(self, z: Tensor) -> Tensor:
        x = self.net(z)
        return x if self.linear is None else x + self.linear(z)


def _n_strides(config: VQVAEConfig) -> int:
    return int(math.log2(config.downsample))


# --------------------------------------------------------------------------------------------
# Model


@dataclass(frozen=True)
class VQVAEOutput:
    recon: Tensor  # (B, M, T) real log-mel
    codes: Tensor  # (B, Q, T') int64; -1 where quantizer dropout skipped a level
    commit_loss: Tensor  # () weighted commitment loss summed over levels (0 in eval)


class VQVAE(nn.Module):
    """RVQ-VAE over log-mel chunks. ``config`` must be resolved (see ``resolve_config``)."""

    mel_mean: Tensor  # (M,) buffers: the training set's per-bin log-mel statistics
    mel_std: Tensor

    def __init__(self, config: VQVAEConfig) -> None:
        super().__init__()
        if config.codebook_size is None or config.levels is None:
            raise ConfigError("VQVAE needs codebook_size and levels: call resolve_config first")
        self.config = config
        # Unset outside a trainer (a model loaded for inference never replaces codes): as for
        # a batch of 16 one-second chunks at downsample 2.
        self.dead_code_threshold = (
            config.dead_code_threshold if config.dead_code_threshold is not None
            else dead_code_threshold_for(NOMINAL_BATCH_VECTORS, config.codebook_size))
        self.register_buffer("mel_mean", torch.zeros(config.n_mels))  # (M,)
        self.register_buffer("mel_std", torch.ones(config.n_mels))  # (M,)
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.rvq = ResidualVQ(
            dim=config.latent_dim,
            num_quantizers=config.levels,
            codebook_size=config.codebook_size,
            decay=config.ema_decay,
            commitment_weight=config.commitment_weight,
            # dead codes: replaced by keep_codebook_rules_ below, not by the library
            rotation_trick=config.rotation_trick,
            kmeans_init=False,  # done over the whole training set by kmeans_init_
            quantize_dropout=config.levels > 1,  # lets get_output_from_indices take -1 codes
        )
        for vq in self.rvq.layers:
            keep_codebook_rules_(_book(vq), self.dead_code_threshold)

    # -- normalisation ------------------------------------------------------------------------

    def set_normalisation_(self, mean: Tensor, std: Tensor) -> None:
        """Log-mel mean and scale per bin (M,) of the training set; the scale also divides each
        bin's error in the plain L1 term of ``reconstruction_loss``."""
        self.mel_mean.copy_(mean)
        self.mel_std.copy_(std.clamp_min(1e-3))

    def _normalise(self, mel: Tensor) -> Tensor:
        return (mel - self.mel_mean[:, None]) / self.mel_std[:, None]  # (B, M, T)

    def _denormalise(self, x: Tensor) -> Tensor:
        return x * self.mel_std[:, None] + self.mel_mean[:, None]  # (B, M, T)

    # -- encoder / quantizer / decoder --------------------------------------------------------

    def encode_latents(self, mel: Tensor) -> Tensor:
        """Real log-mel (B, M, T) -> continuous latents (B, T', D) before quantization."""
        x = self._normalise(mel)
        pad = -x.shape[-1] % self.config.downsample
        x = F.pad(x, (0, pad), mode="replicate") if pad else x  # (B, M, T padded)
        return self.encoder(x).transpose(1, 2)  # (B, T', D)

    def quantize(self, z: Tensor, keep: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Residual quantization of z (B, T', D); item b uses the first ``keep[b]`` levels.

        Returns quantized (B, T', D), codes (B, Q, T') with -1 for skipped levels, and the
        weighted commitment loss summed over levels.
        """
        b, t, _ = z.shape
        residual, quantized = z, torch.zeros_like(z)
        codes, commit = [], z.new_zeros(())
        for level, vq in enumerate(self.rvq.layers):
            mask = None if keep is None else (keep > level)[:, None].expand(b, t)  # (B, T')
            if mask is not None and not bool(mask.any()):  # whole batch dropped this level
                codes.append(torch.full((b, t), -1, dtype=torch.long, device=z.device))
                continue
            if mask is not None and bool(mask.all()):
                mask = None
            q, idx, loss = vq(residual, mask=mask)  # (B, T', D), (B, T'), ()
            residual = residual - q.detach()  # as ResidualVQ: no gradient along the chain
            quantized = quantized + q
            codes.append(idx)
            commit = commit + loss.sum()
        return quantized, torch.stack(codes, dim=1), commit  # codes (B, Q, T')

    def decode_latents(self, quantized: Tensor, frames: int | None = None) -> Tensor:
        """Quantized latents (B, T', D) -> real log-mel (B, M, frames or T' * downsample)."""
        x = self.decoder(quantized.transpose(1, 2))  # (B, M, T' * downsample)
        return self._denormalise(x[..., :frames] if frames is not None else x)

    def forward(self, mel: Tensor) -> VQVAEOutput:
        """Real log-mel (B, M, T) -> reconstruction; quantizer dropout while training."""
        z = self.encode_latents(mel)  # (B, T', D)
        keep = self._dropout_levels(z.shape[0], z.device) if self.training else None
        quantized, codes, commit = self.quantize(z, keep)
        return VQVAEOutput(self.decode_latents(quantized, mel.shape[-1]), codes, commit)

    def _dropout_levels(
        self, batch: int, device: torch.device, generator: torch.Generator | None = None
    ) -> Tensor | None:
        """Levels kept per item: all, or (with p = quantizer_dropout) a uniform 1..Q (DAC)."""
        levels = self.rvq.num_quantizers
        if levels == 1 or self.config.quantizer_dropout == 0:
            return None
        drop = torch.rand(batch, generator=generator) < self.config.quantizer_dropout  # (B,)
        n = torch.randint(1, levels + 1, (batch,), generator=generator)  # (B,)
        return torch.where(drop, n, torch.full_like(n, levels)).to(device)

    @torch.no_grad()
    def encode(self, mel: Tensor) -> Tensor:
        """Real log-mel (B, M, T) -> codes (B, Q, T'), all levels, no dropout."""
        _, codes, _ = self.quantize(self.encode_latents(mel))
        return codes

    @torch.no_grad()
    def search_codes(self, mel: Tensor, candidates: int = SEARCH_CANDIDATES) -> Tensor:
        """Real log-mel (1, M, T) -> codes (1, Q, T') chosen by what they decode to.

        Analysis by synthesis, as speech codecs choose their excitation: start from the
        residual quantizer's codes (each level's nearest to what the levels before left), then,
        level by level from the coarsest and step by step, try the ``candidates`` codes nearest
        to the latent that level should add there and keep the one whose decoded mel is
        closest to ``mel`` (in squared magnitude, what the spectral convergence of the audio
        weighs, plus a little log-mel L1 for the quiet bins: SEARCH_LOG_WEIGHT). The nearest
        code in latent space is not the best one in sound: for a sound unlike the training set
        the latent lies far from every code, and the decoder reads some directions of its error
        far more than others. The code a step has is always one of its trials, so no step's
        error rises: the codes nearest to what the level should add (which counts the finer
        levels' codes) often leave it out. Measured on 13 held-back percussion files (median
        of each file's ratio to its Griffin-Lim floor / ratio of the medians, the same model):
        the quantizer's codes 2.12x / 2.27x, searched 1.28x / 1.62x (1.29x / 1.71x without the
        code there among the trials); the unquantized latents 1.10x.

        Each trial decodes SEARCH_CONTEXT steps either side of the step and scores the frames
        of SEARCH_SCORED steps either side (the decoder reaches 20 steps, but further frames
        move little: decoding the whole reach scored 1.25x at 3x the time); steps whose frames
        are 40 dB below the sound's loudest are left as the quantizer chose. Cost on one CPU
        thread: ~2 s per second of sound at 16 candidates. ``candidates`` 1: the quantizer's
        codes as they are.
        """
        if mel.ndim != 3 or mel.shape[0] != 1:
            raise ConfigError(f"search_codes: mel must be (1, M, T), got {tuple(mel.shape)}")
        z = self.encode_latents(mel)  # (1, T', D)
        codes = self.quantize(z)[1][0]  # (Q, T')
        if candidates <= 1:
            return codes[None]
        books = self.codebooks()  # (Q, K, D)
        q_total, k, _ = books.shape
        steps, ds, frames = codes.shape[1], self.config.downsample, mel.shape[-1]
        target = mel[0].exp()  # (M, T) mel magnitudes
        energy = (target**2).sum(0)  # (T,) per frame
        audible = energy > SEARCH_QUIET * energy.max()  # (T,)
        current = books[torch.arange(q_total, device=codes.device)[:, None], codes].sum(0)
        quantizer_codes = codes.clone()
        m = min(candidates, k)
        for q in range(q_total):
            for t in range(steps):
                lo, hi = max(0, t - SEARCH_CONTEXT), min(steps, t + SEARCH_CONTEXT + 1)
                f_lo = max(0, (t - SEARCH_SCORED) * ds)
                f_hi = min(frames, (t + SEARCH_SCORED + 1) * ds)
                if f_lo >= f_hi or not bool(audible[f_lo:f_hi].any()):
                    continue
                without = current[t] - books[q, codes[q, t]]  # (D,) the other levels' sum
                near = torch.topk(((books[q] - (z[0, t] - without)) ** 2).sum(-1), m,
                                  largest=False).indices  # (m,)
                if not bool((near == codes[q, t]).any()):  # the code there is always a trial:
                    near[-1] = codes[q, t]  # a step's error never rises
                trial = current[lo:hi].expand(m, -1, -1).clone()  # (m, window, D)
                trial[:, t - lo] = without + books[q, near]
                out = self.decode_latents(trial)[..., f_lo - lo * ds : f_hi - lo * ds]
                err = search_error(out, mel[0, :, f_lo:f_hi])  # (m,)
                best = near[int(err.argmin())]
                codes[q, t] = best
                current[t] = without + books[q, best]
        # Each step is scored on its own window, and a code moves frames past it too: over the
        # whole sound the search can, rarely, end worse than where it started. Then it is not
        # kept (measured: one of 13 small test sounds, by 2%).
        whole = torch.stack([codes, quantizer_codes])  # (2, Q, T')
        errors = search_error(self.decode_codes(whole)[..., :frames], mel[0])  # (2,)
        return (codes if bool(errors[0] <= errors[1]) else quantizer_codes)[None]

    @torch.no_grad()
    def decode_codes(self, codes: Tensor, levels: int | None = None) -> Tensor:
        """Codes (B, Q', T') -> real log-mel (B, M, T' * downsample) from the first ``levels``.

        Levels past ``levels`` (or past Q') and codes equal to -1 contribute nothing.
        """
        q_total = self.rvq.num_quantizers
        levels = q_total if levels is None else levels
        if not 1 <= levels <= q_total or codes.shape[1] > q_total:
            raise ConfigError(f"decode_codes: levels must be in 1..{q_total}, got {levels}")
        grid = torch.full((codes.shape[0], q_total, codes.shape[2]), -1, dtype=torch.long)
        grid = grid.to(codes.device)
        n = min(levels, codes.shape[1])
        grid[:, :n] = codes[:, :n]
        quantized = self.rvq.get_output_from_indices(grid.transpose(1, 2))  # (B, T', D)
        return self.decode_latents(quantized)

    # -- losses and codebook state ------------------------------------------------------------

    def reconstruction_loss(self, mel: Tensor, recon: Tensor) -> Tensor:
        """L1 on normalised log-mel + spectral_weight x a loudness-weighted L1.

        The plain L1 treats every bin alike (quiet tails matter to the ear). The second term
        weighs each bin's log error by its power relative to the chunk's peak, as spectral
        convergence of decoded audio does (||e^x' - e^x||^2 ~ sum e^2x (x' - x)^2), using the
        louder of target and estimate so that a loud estimate of a quiet bin costs too. It stays
        in the log domain: measured, exp() of an untrained decoder's output made training
        unstable at useful learning rates.
        """
        err = recon - mel  # (B, M, T)
        l1 = (err.abs() / self.mel_std[:, None]).mean()
        if self.config.spectral_weight == 0:
            return l1
        peak = mel.amax(dim=(1, 2), keepdim=True)  # (B, 1, 1)
        louder = torch.maximum(mel, recon.detach()) - peak
        power = (2 * louder.clamp(max=1.0)).exp()  # (B, M, T), ~1 at the peak
        weighted = (power * err.abs()).sum(dim=(1, 2)) / power.sum(dim=(1, 2))  # (B,)
        return l1 + self.config.spectral_weight * weighted.mean()

    @torch.no_grad()
    def pca_init_(self, mel: Tensor, max_vectors: int = 50_000, seed: int = 0) -> None:
        """With ``linear_path``: set both linear paths to the principal components of the
        training set's normalised frames, ``downsample`` frames at a time (``mel`` (N, M, T),
        real log-mel), and zero the conv stacks' last layers, so that the model starts as the
        PCA codec. Deterministic (an eigendecomposition of the covariance)."""
        enc, dec = self.encoder.linear, self.decoder.linear
        if enc is None or dec is None:
            return
        ds, m, d = self.config.downsample, self.config.n_mels, self.config.latent_dim
        x = self._normalise(mel.float())
        x = x[..., : x.shape[-1] // ds * ds]  # (N, M, T')
        vecs = x.reshape(x.shape[0], m, -1, ds).permute(0, 2, 1, 3).reshape(-1, m * ds)
        if len(vecs) > max_vectors:
            g = torch.Generator().manual_seed(seed)
            vecs = vecs[torch.randperm(len(vecs), generator=g)[:max_vectors]]  # CPU indices
        # On the CPU whatever the model's device: float64 (which MPS lacks) for a 128 x 128
        # eigendecomposition, the same components on every device
        vecs = vecs.cpu()
        # One mean per bin (the decoder's bias is per bin); any even/odd difference of a frame
        # group is left in the second moments, where the components can take it up.
        mu = vecs.reshape(len(vecs), m, ds).mean(dim=(0, 2)).repeat_interleave(ds)  # (M * ds,)
        centred = (vecs - mu).double()
        _, eigvecs = torch.linalg.eigh(centred.T @ centred / max(len(vecs) - 1, 1))
        n = min(d, m * ds)  # a latent wider than a frame group keeps its extra rows at zero
        w = torch.zeros(d, m * ds)
        w[:n] = eigvecs.flip(-1)[:, :n].T.float()  # (n, M * ds), largest variance first
        assert enc.bias is not None and dec.bias is not None  # both made with one
        enc.weight.copy_(w.reshape(d, m, ds))
        enc.bias.copy_(-(w @ mu))
        dec.weight.copy_(w.reshape(d, m, ds))  # transposed conv: (D, M, ds), the same basis
        dec.bias.copy_(mu[::ds])
        lasts: tuple[Any, ...] = (self.encoder.net[-1], self.decoder.net[-1])  # conv layers
        for last in lasts:
            if nn.utils.parametrize.is_parametrized(last):  # weight norm: zero its magnitude
                last.parametrizations.weight.original0.zero_()
                last.bias.zero_()
            else:
                for p in last.parameters():
                    p.zero_()

    @torch.no_grad()
    def kmeans_init_(self, latents: Tensor, batch_vectors: int, seed: int = 0) -> None:
        """Initialise every level's codebook by k-means over ``latents`` (N, D) pooled from the
        whole training set, level by level on the residuals, EMA buffers included.

        ``batch_vectors`` (latent vectors per training batch) scales the cluster sizes to what
        the EMA tracks per step, so dead-code replacement judges them on the same scale.
        """
        generator = torch.Generator().manual_seed(seed)
        residual = latents.detach().float().cpu()  # (N, D)
        for vq in self.rvq.layers:
            centroids, _ = kmeans(residual, self.rvq.codebook_size, generator=generator)
            residual = self._set_book_(vq, centroids, residual, batch_vectors)

    @torch.no_grad()
    def refine_codebooks_(self, latents: Tensor, batch_vectors: int, iters: int) -> None:
        """``iters`` Lloyd iterations of every level's codebook over ``latents`` (N, D), level by
        level on the residuals the refined coarser levels leave, from the codebooks as they are.

        Training's EMA codebooks trail a moving encoder and see a few batches at a time; this
        moves each code to the mean of the latents it quantizes once the encoder is fixed.
        ``batch_vectors`` as for ``kmeans_init_``.
        """
        residual = latents.detach().float().cpu()  # (N, D)
        for vq in self.rvq.layers:
            start = _book(vq).embed[0].detach().float().cpu()  # (K, D)
            residual = self._set_book_(vq, lloyd(residual, start, iters), residual, batch_vectors)

    def _set_book_(
        self, vq: nn.Module, centroids: Tensor, residual: Tensor, batch_vectors: int
    ) -> Tensor:
        """One level's codebook set to ``centroids`` (K, D), its EMA buffers to the use it gets
        from ``residual`` (N, D) scaled to ``batch_vectors`` per step; the residual it leaves."""
        _, assign = nearest(residual, centroids)
        counts = torch.bincount(assign, minlength=len(centroids))
        floor = max(self.dead_code_threshold, 1e-3)
        size = (counts.float() * batch_vectors / len(residual)).clamp_min(floor)  # (K,)
        book = _book(vq)
        book.embed.data.copy_(centroids[None].to(book.embed))  # (1, K, D)
        book.cluster_size.data.copy_(size[None].to(book.cluster_size))  # (1, K)
        book.embed_avg.data.copy_((centroids * size[:, None])[None].to(book.embed_avg))
        book.initted.data.copy_(torch.tensor(True))
        return residual - centroids[assign]

    def codebooks(self) -> Tensor:
        """Codebook vectors (Q, K, D)."""
        return torch.stack([_book(vq).embed[0] for vq in self.rvq.layers])

    def dead_codes(self) -> list[int]:
        """Per level, codes whose EMA use per batch is below the dead-code threshold."""
        threshold = self.dead_code_threshold
        return [int((_book(vq).cluster_size < threshold).sum()) for vq in self.rvq.layers]


def _book(vq: nn.Module) -> Any:
    """The library's EMA codebook of one level (embed, embed_avg, cluster_size, initted)."""
    return vq._codebook


# The codebooks' EMA update and dead-code replacement, as vector-quantize-pytorch 1.20-1.32 do
# them. 1.34 changed both: a dead code is one used less than a share of the mean code's use
# (1.32: less than an absolute count per batch, which the trainer sizes from its batches), the
# EMA buffers start at zero (1.32: ones and the codebook itself), and the update lost its
# Laplace smoothing of the cluster sizes. Converted to its ratios, 1.34 trained the demo's
# codecs whose draws came out quieter (16, 23, 20 of 24 audible over three seeds, against 23,
# 22, 22). Each level's codebook keeps 1.32's rules here, on either version: on 1.32 the same
# operations in the same order (the same numbers, bit for bit, as the library's own), on 1.34
# the codec every figure of this project was measured with.


def keep_codebook_rules_(book: Any, threshold: float) -> None:
    """Give one level's EMA codebook (the library's ``EuclideanCodebook``) 1.32's EMA update and
    dead-code replacement, with ``threshold`` (EMA uses per batch) as the dead-code bound."""
    if getattr(book, "use_cosine_sim", False) or not hasattr(book, "replace_sample_fn"):
        raise ConfigError("vector-quantize-pytorch: the RVQ-VAE needs its Euclidean EMA codebook "
                          f"(got {type(book).__name__})")  # fmt: skip
    with torch.no_grad():  # 1.32's starting buffers (1.34 starts both at zero)
        book.cluster_size.fill_(1.0)
        book.embed_avg.copy_(book.embed)
    book.update_ema = types.MethodType(_update_ema, book)
    book.expire_codes_ = types.MethodType(partial(_expire_codes_, threshold=threshold), book)


def _update_ema(book: Any) -> None:
    """Each code to the EMA mean of the latents it took, the cluster sizes Laplace-smoothed."""
    size = book.cluster_size  # (H, K)
    total = size.sum(dim=-1, keepdim=True)
    smoothed = (size + book.eps) / (total + book.codebook_size * book.eps) * total
    book.embed.data.copy_(book.embed_avg / smoothed[..., None])


def _expire_codes_(book: Any, batch_samples: Tensor, seq_mask: Tensor | None = None, *,
                   threshold: float) -> None:  # fmt: skip
    """Codes whose EMA use is below ``threshold`` take latents of this batch (training only);
    with more dead codes than latents, a random subset of them now, the rest at later steps."""
    if not book.training or threshold <= 0:
        return
    expired = book.cluster_size < threshold  # (H, K)
    if not torch.any(expired):
        return
    batch_samples = batch_samples.flatten(1, -2)  # (H, N, D)
    for head, (samples, mask) in enumerate(zip(batch_samples, expired, strict=True)):
        if seq_mask is not None:
            samples = samples[seq_mask[head]]
        if samples.numel() == 0:
            continue
        num_samples, num_dead = samples.shape[0], int(mask.sum().item())
        if num_dead > num_samples:
            dead = mask.nonzero(as_tuple=True)[0]
            dead = dead[torch.randperm(num_dead, device=samples.device)[:num_samples]]
            mask = torch.zeros_like(mask)
            mask[dead] = True
            num_dead = num_samples
        sampled = book.replace_sample_fn(samples[None], num_dead)[0].to(book.embed.data)
        book.embed.data[head][mask] = sampled
        book.cluster_size.data[head][mask] = threshold
        book.embed_avg.data[head][mask] = sampled * threshold
