"""Training the prior: the dataset's sounds as RVQ code sequences, then an LSTM over them
(:class:`distill.shared.model.prior.Prior`) on the shared loop (:mod:`distill.shared.train.loop`,
which has the phases, checkpoints, rollback, resume, the time budget and determinism).

Codes. Each usable file's log-mel is stitched back from its overlapping chunks and encoded by
the trained RVQ-VAE in one piece (the encoder is convolutional, so a file longer than a chunk
gives one sequence, with no seams at chunk edges): a :class:`CodeSet` of per-file sequences
(Q, L_f), split by file as the dataset is. Each file is also encoded as variants the prior may
train on (``augment``): its log-mel started 1..downsample-1 frames later (the same sound at
another phase of the code grid), played 10% slower and faster (:data:`VARIANT_STRETCHES`) and
moved two and four mel bands up and down (:data:`VARIANT_BAND_SHIFTS`). Encoding
is done once per (RVQ-VAE, dataset) pair and set of variants:
:func:`load_or_encode_codes` keeps the code set as an artifact of kind "codes" named by them,
so a retry or a second prior job finds it instead of encoding again.

Training. Teacher forcing on windows of ``window`` code steps: each epoch, every training
sequence's first window and ceil(L / window) - 1 more at random offsets (a sequence shorter than
the window is one item; batches are drawn eight at a time and sorted by length so that little
is padding, and padding is masked out of the loss). Only a window at a sound's start is scored
from its first step (predicted from the prior's start vector); one cut inside a sound also
reads the step before it, unscored (:class:`Window`). Each training sequence goes on for
``end_steps`` steps in its final, silent step, so that a draw longer than the sounds stays
silent after their end instead of wandering. Validation on consecutive windows of the
validation files, fixed; with fewer than MIN_VALIDATION_FILES of them or under
MIN_VALIDATION_STEPS code steps in all (the demo has one one-shot) those files train too and
validation uses the training sequences (without their tails). The loss is
the mean cross-entropy per code (a sound's first step may weigh more: ``start_weight``);
metrics are in bits per code, beside two baselines on the same validation codes, computed
once: per-level code frequencies (unigram) and per-level P(code_t | code_t-1) (bigram,
Witten-Bell smoothed), both from the training sequences. Early stopping and the best epoch
follow the validation NLL; an epoch is at least MIN_STEPS_PER_EPOCH steps, so patience means
hundreds of steps.

Peers. Where the budget leaves room (see AUTO_PEERS), two priors (:class:`PriorPeers`) train
side by side on the same batches, each also learning the other's heads' distribution (mutual
learning, PEER_WEIGHT); validation, early stopping, the metrics and the result are the first's,
and the checkpoint holds both, so a resumed run goes on as the uninterrupted one would.
"""

from __future__ import annotations

import io
import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any, Protocol, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distill.shared.audio.augment import gain_mel, move_bands
from distill.shared.audio.dataset import Dataset
from distill.shared.errors import ConfigError, DatasetError, ModelFormatError
from distill.shared.model.prior import (
    PRIOR_CODES_PER_SECOND,
    CodeNats,
    Prior,
    PriorConfig,
    bigram_bits,
    choose_prior_config,
    prior_levels,
    unigram_bits,
)
from distill.shared.model.vqvae import VQVAE
from distill.shared.train.loop import Trainer, TrainHooks

# PriorTrainConfig and its defaults live in settings (no torch there); imported here as before
from distill.shared.train.settings import LABEL_SMOOTHING as LABEL_SMOOTHING
from distill.shared.train.settings import MAX_PEERS as MAX_PEERS
from distill.shared.train.settings import PEER_WEIGHT as PEER_WEIGHT
from distill.shared.train.settings import PriorTrainConfig as PriorTrainConfig

CODES_FORMAT_VERSION = 2  # 2: variant encodings beside each file (1 still reads: none)
CODES_KIND = "codes"  # the artifact kind of a cached CodeSet
# An epoch is at least this many optimiser steps (the windows drawn again at fresh offsets), so
# that patience, counted in epochs, is counted in hundreds of steps on any dataset: with 9 files
# an epoch used to be 4 steps, and early stopping ended the run after ~100 steps, before the
# prior had learnt how a sound starts (measured on the demo's sounds: 4 of 8 samples silent).
MIN_STEPS_PER_EPOCH = 25
# With fewer validation files than this, or fewer code steps in them, the validation NLL
# measures a moment of one sound, not the dataset (the demo's one validation one-shot, ~50 code
# steps, went from 1.8 to 6 bits while samples got better): those files train too, and
# validation, early stopping and the baselines use training windows, which say nothing of how
# the prior does on sounds it has not seen. The 20 textures hold out two files (a 15-second drum
# loop and a vinyl noise, 743 steps): validated on them, the prior stops when it starts to learn
# its sounds by heart, and its figures are held-out ones (3 files were needed before: the
# textures trained on their two and the held-out figures printed for them were not).
MIN_VALIDATION_FILES = 2
MIN_VALIDATION_STEPS = 200  # ~2 s at the default 94 code steps per second
# Label smoothing: LABEL_SMOOTHING (distill.shared.train.settings says why).
# Time stretches of each file's log-mel encoded beside it (linear interpolation along time: a
# hit that rings 10% shorter or longer). A prior overfits a hundred one-shots' codes within a
# few hundred steps; measured on percussion at 800 steps, validation bits per code 5.69 plain,
# 5.32 with the shifted encodings, 5.19 with these stretches too (0.95/1.05: the same 5.19).
VARIANT_STRETCHES = (0.9, 1.1)
# Mel bands each file's log-mel is moved up and down by (the edge band repeated into the gap):
# above ~1 kHz, where mel bands are log-spaced, a move of two bands is a pitch shift of a few
# percent. On top of the shifts and stretches: 5.02 -> 4.80 bits per code (the same code set);
# moves of four bands too: 4.72 -> 4.66 at 1000 steps (odd moves, 1 and 3: no better than 2, 4).
VARIANT_BAND_SHIFTS = (-4, -2, 2, 4)
# Gains (dB) each file's log-mel is played at too (the log floor, silence, stays where it is):
# the same hit a little softer or louder encodes to other codes. On top of the variants above,
# the same code set: one prior at 800 steps 4.434 -> 4.357 (seed 0), 4.422 -> 4.381 (seed 1);
# the default pair in 3 minutes 4.326 -> 4.299, 4.339 -> 4.302. +-1.5 dB 4.397, +-4 4.369,
# +-6 4.389, +-12 4.400, -3, -1.5, 1.5, 3 4.373: small moves help most.
VARIANT_GAINS_DB = (-3.0, 3.0)
# Mutual learning: PEER_WEIGHT and MAX_PEERS (distill.shared.train.settings says why).
# Automatic (peers 0): two where the prior reads earlier codes and has under
# PEERS_MAX_CODE_STEPS training code steps (where it was measured; a larger set needs more
# steps than a pair makes in a default budget), and the budget leaves the pair enough steps.
# On small sets, on files held out from the prior (3 minutes, one thread): 8 percussion files
# 6.20 bits per code as a pair against 6.53 alone, 20 files 5.91 against 6.13, the textures
# 8.02 against 8.29. A pair makes half the steps a lone prior makes in the same minutes: at 1 minute
# on percussion (2 CPU cores) 400 steps scored 4.506 bits per code where a lone prior's 800
# scored 4.434; at the 3-minute CPU default 4.33 where a lone prior scored 4.472 (early
# stopping at epoch 16, best 6). Below PEERS_MIN_MINUTES (or on a budget in epochs, which a pair
# takes twice as long over) one trains alone.
AUTO_PEERS = 2
PEERS_MIN_MINUTES = 2.5
PEERS_MAX_CODE_STEPS = 20_000
VALIDATION_BATCH = 64  # windows per validation forward pass
BUCKET_BATCHES = 8  # batches drawn together and sorted by length, so little is padding

# --------------------------------------------------------------------------------------------
# Code sequences


@dataclass(frozen=True)
class CodeSet:
    """A dataset's usable files as RVQ code sequences, concatenated; split by file."""

    codes: np.ndarray  # (Q, S) int32: every sequence's code steps, end to end
    offsets: np.ndarray  # (N + 1,) int64: sequence n is codes[:, offsets[n] : offsets[n + 1]]
    files: list[str]  # (N,) the file each sequence encodes, in manifest order
    splits: list[str]  # (N,) "train" or "val"
    codebook_size: int
    vqvae: str  # the RVQ-VAE weights artifact that encoded them ("" when not from one)
    dataset: str  # the dataset artifact they came from ("" when not from one)
    # (N,) "" for a file as it is, else the variant encoded ("shift1", "stretch0.9", ...)
    variants: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        n = len(self.files)
        if not self.variants:  # a set encoded without variants (format 1)
            object.__setattr__(self, "variants", [""] * n)
        ok = (self.codes.ndim == 2 and self.offsets.shape == (n + 1,) and len(self.splits) == n
              and len(self.variants) == n
              and int(self.offsets[0]) == 0 and int(self.offsets[-1]) == self.codes.shape[1]
              and bool(np.all(np.diff(self.offsets) > 0)))  # fmt: skip
        if not ok:
            raise ModelFormatError(f"code set is inconsistent: codes {self.codes.shape}, "
                                   f"{len(self.offsets)} offsets, {n} sequences")  # fmt: skip

    @property
    def levels(self) -> int:
        return int(self.codes.shape[0])

    def first_levels(self, levels: int) -> CodeSet:
        """The same set with only its first ``levels`` levels (what a prior of them trains on)."""
        if not 1 <= levels <= self.levels:
            raise ConfigError(f"prior levels must be in 1..{self.levels} (the RVQ-VAE's), got "
                              f"{levels!r}")  # fmt: skip
        return replace(self, codes=self.codes[:levels])

    @property
    def n_files(self) -> int:
        return self.variants.count("")

    def code_steps(self, split: str) -> int:
        """Code steps of the files (not their variants) in ``split``: what a prior is sized by."""
        return sum(int(self.offsets[n + 1] - self.offsets[n]) for n, s in enumerate(self.splits)
                   if s == split and not self.variants[n])  # fmt: skip

    def sequences(self, split: str, variants: bool = False) -> list[Tensor]:
        """The code sequences (Q, L) int64 of the files in ``split``, in manifest order; with
        ``variants``, each file's variant encodings after them."""
        keep = [n for n, s in enumerate(self.splits) if s == split and not self.variants[n]]
        if variants:
            keep += [n for n, s in enumerate(self.splits) if s == split and self.variants[n]]
        return [torch.from_numpy(self.codes[:, self.offsets[n] : self.offsets[n + 1]]).long()
                for n in keep]  # fmt: skip

    def to_bytes(self) -> bytes:
        meta = {"format_version": CODES_FORMAT_VERSION, "files": self.files,
                "splits": self.splits, "variants": self.variants,
                "codebook_size": self.codebook_size, "vqvae": self.vqvae,
                "dataset": self.dataset}  # fmt: skip
        buf = io.BytesIO()
        np.savez(buf, meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8),
                 codes=self.codes.astype(np.int32), offsets=self.offsets.astype(np.int64))  # fmt: skip
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> CodeSet:
        """What ``to_bytes`` wrote; ModelFormatError when corrupt or newer (nothing unpickled)."""
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as npz:
                meta = json.loads(bytes(npz["meta"]).decode())
                codes, offsets = npz["codes"], npz["offsets"]
        except Exception as e:  # zip, npy and JSON errors alike
            raise ModelFormatError(f"code set is corrupt: {type(e).__name__}: {e}") from e
        version = meta.get("format_version") if isinstance(meta, dict) else None
        if not isinstance(version, int) or not 1 <= version <= CODES_FORMAT_VERSION:
            raise ModelFormatError(f"code set has format_version {version!r}; this Distill "
                                   f"reads 1..{CODES_FORMAT_VERSION}")  # fmt: skip
        try:
            return cls(codes=codes, offsets=offsets, files=list(meta["files"]),
                       splits=list(meta["splits"]), codebook_size=int(meta["codebook_size"]),
                       vqvae=str(meta["vqvae"]), dataset=str(meta["dataset"]),
                       variants=[str(v) for v in meta.get("variants", [])])  # fmt: skip
        except (KeyError, TypeError, ValueError) as e:
            raise ModelFormatError(f"code set metadata is invalid: {e}") from e


def file_mels(dataset: Dataset) -> list[tuple[int, Tensor]]:
    """Each usable file's whole log-mel (M, T), stitched from its overlapping chunks.

    Chunks start every ``chunk_hop_frames`` except the last, which may be aligned to the file's
    end: its offset is found where its frames equal the previous chunk's (both are slices of
    one log-mel, so they are equal exactly).
    """
    cfg = dataset.mel_config
    size, hop = cfg.chunk_frames, cfg.chunk_hop_frames
    out = []
    for f in np.unique(dataset.chunk_file):
        chunks = torch.from_numpy(dataset.mels[dataset.chunk_file == f])  # (n, M, size)
        parts = [c[:, :hop] for c in chunks[:-2]] + [chunks[max(0, len(chunks) - 2)]]
        if len(chunks) > 1:
            prev, last = chunks[-2], chunks[-1]
            shift = next((d for d in range(hop, 0, -1)
                          if torch.equal(last[:, : size - d], prev[:, d:])), size)  # fmt: skip
            parts.append(last[:, size - shift :])  # the frames past the previous chunk's end
        out.append((int(f), torch.cat(parts, dim=1)))  # (M, T)
    return out


def mel_variants(mel: Tensor, downsample: int, log_floor: float) -> list[tuple[str, Tensor]]:
    """A file's log-mel (M, T) as the prior's training variants: started 1..downsample-1 frames
    later (another phase of the code grid), stretched in time by VARIANT_STRETCHES, moved by
    VARIANT_BAND_SHIFTS mel bands, and played VARIANT_GAINS_DB louder or softer (no lower than
    ``log_floor``, the mel config's: silence stays silence)."""
    out = [(f"shift{s}", mel[:, s:]) for s in range(1, downsample) if mel.shape[1] > s]
    for factor in VARIANT_STRETCHES:
        frames = max(2, round(mel.shape[1] * factor))
        stretched = F.interpolate(mel[None], size=frames, mode="linear", align_corners=True)[0]
        out.append((f"stretch{factor:g}", stretched))
    out += [(f"bands{bands:+d}", move_bands(mel, bands)) for bands in VARIANT_BAND_SHIFTS]
    out += [(f"gain{db:+g}", gain_mel(mel, db, log_floor)) for db in VARIANT_GAINS_DB]
    return out


@torch.no_grad()
def encode_dataset(
    vqvae: VQVAE, dataset: Dataset, *, vqvae_id: str = "", dataset_id: str = "",
    device: str = "cpu", variants: bool = True,
) -> CodeSet:  # fmt: skip
    """Every usable file of ``dataset`` as a code sequence of ``vqvae`` (all levels), and with
    ``variants`` each file's :func:`mel_variants` after all the files."""
    if vqvae.config.n_mels != dataset.mel_config.n_mels:
        raise ConfigError(f"RVQ-VAE n_mels {vqvae.config.n_mels} != dataset n_mels "
                          f"{dataset.mel_config.n_mels}")  # fmt: skip
    vqvae = vqvae.to(device).eval()
    encoded: list[tuple[np.ndarray, str, str, str]] = []  # (codes (Q, T'), file, split, variant)
    for f, mel in file_mels(dataset):
        row = dataset.manifest[f]
        extra = (mel_variants(mel, vqvae.config.downsample, dataset.mel_config.log_floor)
                 if variants else [])  # fmt: skip
        for variant, m in [("", mel)] + extra:
            codes = vqvae.encode(m[None].to(device))[0].cpu().numpy().astype(np.int32)
            encoded.append((codes, row.name, str(row.split), variant))
    if not encoded:
        raise DatasetError("the dataset has no usable files to encode")
    encoded.sort(key=lambda e: e[3] != "")  # the files as they are first, then the variants
    seqs = [e[0] for e in encoded]
    offsets = np.concatenate([[0], np.cumsum([s.shape[1] for s in seqs])]).astype(np.int64)
    return CodeSet(codes=np.concatenate(seqs, axis=1), offsets=offsets,
                   files=[e[1] for e in encoded], splits=[e[2] for e in encoded],
                   codebook_size=int(vqvae.rvq.codebook_size), vqvae=vqvae_id,
                   dataset=dataset_id, variants=[e[3] for e in encoded])  # fmt: skip


class CodeStore(Protocol):
    """The part of the artifact store the code cache needs (an ArtifactClient has it)."""

    def put_bytes(self, data: bytes, *, kind: str, name: str, job: str | None = None) -> str: ...
    def get_bytes(self, sha256: str) -> bytes: ...
    def list(self, *, kind: str | None = None, job: str | None = None) -> list[dict[str, Any]]: ...


def variants_tag() -> str:
    """Which variants a code set holds (stretch factors, band moves, gains), as a name part: a
    code set encoded with other variants is not the one this version trains on."""
    stretches = ",".join(f"{f:g}" for f in VARIANT_STRETCHES)
    bands = ",".join(f"{b:+d}" for b in VARIANT_BAND_SHIFTS)
    gains = ",".join(f"{g:+g}" for g in VARIANT_GAINS_DB)
    return f"s{stretches}-b{bands}-g{gains}"


def codes_artifact_name(vqvae_id: str, dataset_id: str) -> str:
    """The cache key: one code set per (RVQ-VAE weights, dataset) pair and set of variants."""
    return f"codes-v{CODES_FORMAT_VERSION}-{variants_tag()}-{vqvae_id}-{dataset_id}.npz"


def load_or_encode_codes(
    store: CodeStore, vqvae_id: str, dataset_id: str, encode: Callable[[], CodeSet],
    *, job: str | None = None,
) -> tuple[CodeSet, str, bool]:  # fmt: skip
    """The cached code set of (vqvae_id, dataset_id), or ``encode()`` stored as one.

    Returns (codes, artifact id, whether it came from the cache). A cached artifact that does
    not load or names other ids is passed over and encoded again.
    """
    name = codes_artifact_name(vqvae_id, dataset_id)
    for record in store.list(kind=CODES_KIND):
        if record.get("name") != name:
            continue
        try:
            codes = CodeSet.from_bytes(store.get_bytes(str(record["sha256"])))
        except ModelFormatError:
            continue
        if (codes.vqvae, codes.dataset) == (vqvae_id, dataset_id):
            return codes, str(record["sha256"]), True
    codes = encode()
    sha = store.put_bytes(codes.to_bytes(), kind=CODES_KIND, name=name, job=job)
    return codes, sha, False


# --------------------------------------------------------------------------------------------
# Config and result


@dataclass
class PriorTrainResult:
    model: Prior  # with the weights of the best validation epoch, in eval mode
    prior_config: PriorConfig
    train_config: PriorTrainConfig
    chosen: dict[str, Any]  # {"prior": config dict, "why", "overridden": [keys]}
    baselines: dict[str, Any]  # {"unigram_bits", "bigram_bits", "val_codes", "validated_on"}
    epochs: int
    best_val_bits: float
    best_epoch: int
    stopped: str  # "epochs", "budget" or "early_stopping"
    metrics: dict[str, Any]  # the last epoch's row
    budget: dict[str, Any]


def resolve_prior_config(
    codes: CodeSet, overrides: dict[str, Any]
) -> tuple[PriorConfig, dict[str, Any]]:
    """choose_prior_config for the training code steps, then the given overrides; and why."""
    if not isinstance(overrides, dict):
        raise ConfigError(f"prior settings must be a map, got {type(overrides).__name__}")
    fixed = {"levels": codes.levels, "codebook_size": codes.codebook_size}
    for key, value in fixed.items():
        if key in overrides and overrides[key] != value:
            raise ConfigError(f"prior {key} must equal the code set's ({value}), got "
                              f"{overrides[key]!r}")  # fmt: skip
    sized, why = choose_prior_config(codes.levels, codes.codebook_size, codes.code_steps("train"))
    config = PriorConfig.from_dict({**sized.to_dict(), **overrides})
    overridden = sorted(k for k in overrides if k not in fixed)
    if overridden:
        why += f" Overridden by the job: {', '.join(overridden)}."
    return config, {"prior": config.to_dict(), "why": why, "overridden": overridden}


# --------------------------------------------------------------------------------------------
# The trainer


@dataclass(frozen=True)
class Window:
    """Code steps (Q, L) of one sequence; ``context`` leading steps are read, not scored.

    Only a window that begins where its sound begins is scored from its first step, which the
    prior predicts from its start vector: a window cut inside a sound carries the step before
    it, so the start vector learns how sounds start, not what the middle of one looks like.
    """

    codes: Tensor  # (Q, L)
    context: int  # 0 at a sound's start, else 1


def _cut(seq: Tensor, start: int, width: int) -> Window:
    """The window of ``seq`` (Q, L) scoring steps [start, start + width), with its context."""
    context = 1 if start > 0 else 0
    return Window(seq[:, start - context : start + width], context)


def _with_end(seq: Tensor, steps: int) -> Tensor:
    """``seq`` (Q, L) followed by its last step repeated ``steps`` times: (Q, L + steps).

    A sound's codes end in the silence it was padded with; without this tail the prior never
    sees what follows the end of a sound, and a draw longer than the sounds it learnt from
    wanders off into a steady loud or quiet state, or starts a second sound.
    """
    return torch.cat([seq, seq[:, -1:].expand(-1, steps)], dim=1)


def _pad(items: list[Window], device: torch.device) -> tuple[Tensor, Tensor]:
    """Windows -> codes (B, Q, L_max) padded with code 0, and a mask (B, L_max) of the steps
    to score (not padding, not context)."""
    longest = max(w.codes.shape[1] for w in items)
    codes = torch.zeros(len(items), items[0].codes.shape[0], longest, dtype=torch.long)
    mask = torch.zeros(len(items), longest, dtype=torch.bool)
    for i, w in enumerate(items):
        length = w.codes.shape[1]
        codes[i, :, :length], mask[i, w.context : length] = w.codes, True
    return codes.to(device), mask.to(device)


def code_nats(
    prior: Prior, codes: Tensor, mask: Tensor, smoothing: float = 0.0
) -> tuple[Tensor, Tensor]:
    """Cross-entropy (nats) of every code of a padded batch, 0 where ``mask`` is off: (B, T, Q);
    and the same with label smoothing ``smoothing`` (what training minimises; the first when 0).

    codes (B, Q, T), mask (B, T). The LSTM is causal, so padding after a sequence's end never
    changes what it predicts for the real steps. Smoothing is torch's: (1 - s) x the code's
    cross-entropy + s x the mean over all K codes (of the heads' own part, for a prior with a
    cache: see ``Prior.code_nats``).
    """
    return smoothed_nats(prior.code_nats(codes), codes, mask, smoothing)


def smoothed_nats(
    out: CodeNats, codes: Tensor, mask: Tensor, smoothing: float
) -> tuple[Tensor, Tensor]:
    """``code_nats`` from a prior's ``CodeNats`` for ``codes`` (B, Q, T)."""
    nll, spread = out.nll, out.spread  # (B, T, Q) each
    ce = nll * mask[:, :, None]
    if smoothing == 0.0:
        return ce, ce
    b, t, _ = nll.shape
    smooth = ((1 - smoothing) * nll + smoothing * spread) * mask[:, :, None]
    # Not where the sound holds still (every level repeats its code: silence, a held tone):
    # smoothed there, the prior learns to leave it one step in ten for a random code, and a
    # draw's silence fills with clicks (the demo's: 11% of the steps after its sounds ended).
    held = torch.zeros(b, t, dtype=torch.bool, device=codes.device)  # (B, T)
    held[:, 1:] = (codes[:, :, 1:] == codes[:, :, :-1]).all(dim=1)
    return ce, torch.where(held[:, :, None], ce, smooth)


def masked_nats(prior: Prior, codes: Tensor, mask: Tensor) -> tuple[Tensor, int]:
    """Summed cross-entropy (nats) of the scored codes of a padded batch, and how many there
    are; codes (B, Q, T), mask (B, T) (see ``code_nats``)."""
    return code_nats(prior, codes, mask)[0].sum(), int(mask.sum()) * codes.shape[1]


def peer_nats(out: CodeNats, peers: list[CodeNats], mask: Tensor) -> Tensor:
    """Summed cross-entropy (nats) of ``out``'s heads against the mean of the ``peers``' heads'
    distributions (held fixed: no gradient reaches them), over the steps ``mask`` (B, T) scores."""
    target = torch.stack([p.heads.detach().exp() for p in peers]).mean(0)  # (B, T, Q, K)
    return (-(target * out.heads).sum(-1) * mask[:, :, None]).sum()


class PriorPeers(nn.Module):
    """Priors trained side by side (mutual learning, see PEER_WEIGHT); the first is the one
    training returns, the others only teach it. Each starts from its own random weights."""

    def __init__(self, config: PriorConfig, n: int) -> None:
        super().__init__()
        self.members = nn.ModuleList(Prior(config) for _ in range(n))

    def all(self) -> list[Prior]:
        return [cast(Prior, m) for m in self.members]

    def first(self) -> Prior:
        return cast(Prior, self.members[0])


class PriorTrainer(Trainer[Prior | PriorPeers]):
    """Trains one prior on one code set; ``run()`` once. Resumes from ``hooks.load_checkpoint``."""

    kind = "prior"
    train_config: PriorTrainConfig

    def __init__(
        self,
        codes: CodeSet,
        prior_overrides: dict[str, Any],
        train_config: PriorTrainConfig,
        hooks: TrainHooks,
        *,
        device: str = "cpu",
        clock: Callable[[], float] = time.monotonic,
        steps_per_second: float | None = None,
    ) -> None:
        """``steps_per_second``: the code steps a second of sound (the RVQ-VAE's), which sets
        how many of its levels the prior draws by default (``prior_levels``; None: 47)."""
        super().__init__(train_config, hooks, device=device, clock=clock)
        levels = prior_overrides.get("levels", prior_levels(codes.levels, steps_per_second))
        if isinstance(levels, bool) or not isinstance(levels, int):
            raise ConfigError(f"prior levels must be an integer, got {levels!r}")
        all_levels = codes.levels
        codes = codes.first_levels(levels)  # the RVQ-VAE's first levels: what the prior draws
        augment = train_config.augment
        plain, val = codes.sequences("train"), codes.sequences("val")
        if not plain:
            raise DatasetError("the code set has no training files")
        self.train_seqs = codes.sequences("train", variants=augment)
        if len(val) < MIN_VALIDATION_FILES or codes.code_steps("val") < MIN_VALIDATION_STEPS:
            plain, val = plain + val, []
            self.train_seqs += codes.sequences("val", variants=augment)
        self.validated_on = "val" if val else "train"
        smoothing = train_config.label_smoothing
        self.label_smoothing = smoothing if smoothing >= 0 else LABEL_SMOOTHING
        self.val_windows = self._windows_in_order(val or plain)
        self.prior_config, self.chosen = resolve_prior_config(codes, prior_overrides)
        # what the prior is sized from (resolve_prior_config), and what peers are measured on
        self.train_code_steps = codes.code_steps("train")
        if "levels" not in prior_overrides and levels < all_levels:
            rate = f"{steps_per_second:.0f}" if steps_per_second else "47"
            self.chosen["why"] += (
                f" It draws the RVQ-VAE's first {levels} of {all_levels} levels: at {rate} code "
                f"steps a second, about {PRIOR_CODES_PER_SECOND} codes a second train in the "
                "budget and sample 50-90x real time on one CPU core (LSTM 256 or 128 wide; "
                "drawn steps leave the finer levels empty).")
        self.chosen["why"] += self._peers_why()
        k = codes.codebook_size
        scored = [w.codes[:, w.context :] for w in self.val_windows]  # what the prior scores
        self.baselines = {"unigram_bits": unigram_bits(self.train_seqs, scored, k),
                          "bigram_bits": bigram_bits(self.train_seqs, scored, k),
                          "val_codes": sum(c.numel() for c in scored),
                          "validated_on": self.validated_on,
                          "fitted_on": "training files and variants" if augment
                          else "training files"}  # fmt: skip
        self.train_seqs = [_with_end(s, train_config.end_steps) for s in self.train_seqs]

    def run(self) -> PriorTrainResult:
        """Train to the last epoch, the budget's end or early stop (see ``Trainer.run_loop``)."""
        r = self.run_loop()  # r.model is self.model, with the best epoch's weights
        return PriorTrainResult(model=self._first(), prior_config=self.prior_config,
                                train_config=self.train_config, chosen=self.chosen,
                                baselines=self.baselines, epochs=r.epochs,
                                best_val_bits=r.best_val, best_epoch=r.best_epoch,
                                stopped=r.stopped, metrics=r.metrics, budget=r.budget)  # fmt: skip

    # -- model ----------------------------------------------------------------------------------

    @property
    def peers(self) -> int:
        """How many priors train side by side (1: one alone); automatic where the config says 0."""
        cfg = self.train_config
        if cfg.peers:
            return cfg.peers
        roomy = cfg.minutes >= PEERS_MIN_MINUTES
        measured = self.prior_config.prev_codes and self.train_code_steps < PEERS_MAX_CODE_STEPS
        return AUTO_PEERS if measured and roomy else 1

    def _peers_why(self) -> str:
        if self.peers == 1:
            return ""
        return (f" Trained beside {self.peers - 1} peer prior{'s' if self.peers > 2 else ''}, "
                f"each also learning the others' predictions (weight "
                f"{self.train_config.peer_weight:g}); the first is kept.")  # fmt: skip

    def build_model(self) -> Prior | PriorPeers:
        if self.peers == 1:
            return Prior(self.prior_config).to(self.device)
        return PriorPeers(self.prior_config, self.peers).to(self.device)

    def _first(self) -> Prior:
        model = self._model()
        return model.first() if isinstance(model, PriorPeers) else model

    def checkpoint_state(self) -> dict[str, Any]:
        return {"model_config": self.prior_config.to_dict(),
                "train_config": self.train_config.to_dict(), "chosen": self.chosen}  # fmt: skip

    def restore_model(self, ckpt: dict[str, Any]) -> Prior | PriorPeers:
        self.prior_config = PriorConfig.from_dict(ckpt["model_config"])
        train = dict(ckpt["train_config"])
        train.setdefault("peers", 1)  # written before peers existed: by a prior trained alone
        self.train_config = PriorTrainConfig.from_dict(train)
        self.chosen = dict(ckpt["chosen"])
        model = self.build_model()
        model.load_state_dict(ckpt["state_dict"])
        return model

    # -- batch ----------------------------------------------------------------------------------

    def _windows_in_order(self, seqs: list[Tensor]) -> list[Window]:
        """Consecutive windows (<= window steps scored) of each sequence, the last one shorter."""
        w = self.train_config.window
        return [_cut(s, i, w) for s in seqs for i in range(0, s.shape[1], w)]

    def _windows_at_random(self, g: torch.Generator) -> list[Window]:
        """ceil(L / window) windows of each training sequence: the one at its start, the rest
        at random offsets (every sound's start is seen every epoch)."""
        w, out = self.train_config.window, []
        for s in self.train_seqs:
            length = s.shape[1]
            out.append(_cut(s, 0, w))
            if length <= w:
                continue
            starts = torch.randint(1, length - w + 1, (math.ceil(length / w) - 1,), generator=g)
            out.extend(_cut(s, int(i), w) for i in starts)
        return out

    @property
    def steps_per_epoch(self) -> int:
        w, bs = self.train_config.window, self.train_config.batch_size
        items = sum(max(1, math.ceil(s.shape[1] / w)) for s in self.train_seqs)
        return max(math.ceil(items / min(bs, items)), MIN_STEPS_PER_EPOCH)

    def batches(self, epoch: int) -> Iterator[tuple[Tensor, Tensor]]:
        """(codes (B, Q, T), mask (B, T)) batches for ``epoch``, drawn by a generator seeded by it."""
        g = torch.Generator().manual_seed(self.train_config.seed * 1_000_003 + epoch)
        items = self._windows_at_random(g)
        bs = min(self.train_config.batch_size, len(items))
        need = self.steps_per_epoch * bs
        order = torch.cat([torch.randperm(len(items), generator=g)
                           for _ in range(math.ceil(need / len(items)))])[:need].tolist()  # fmt: skip
        batches: list[list[int]] = []
        for start in range(0, need, bs * BUCKET_BATCHES):  # sorted is stable: deterministic
            pool = sorted(
                order[start : start + bs * BUCKET_BATCHES], key=lambda j: items[j].codes.shape[1]
            )
            batches += [pool[i : i + bs] for i in range(0, len(pool), bs)]
        for b in torch.randperm(len(batches), generator=g).tolist():
            yield _pad([items[j] for j in batches[b]], self.device)

    # -- step, validation, metrics --------------------------------------------------------------

    def new_totals(self) -> dict[str, Any]:
        return {"nats": 0.0, "codes": 0}

    def step_loss(self, batch: tuple[Tensor, Tensor], totals: dict[str, Any]) -> Tensor:
        """Mean nats per code, a sound's first step counting ``start_weight`` codes."""
        codes, mask = batch
        model = self._model()
        members = model.all() if isinstance(model, PriorPeers) else [model]
        outs = [m.code_nats(codes) for m in members]
        count = int(mask.sum()) * codes.shape[1]
        extra = self.train_config.start_weight - 1.0  # the first step is scored only at a start
        starts = int(mask[:, 0].sum()) * codes.shape[1] * extra
        w = self.train_config.peer_weight
        loss = torch.zeros((), device=codes.device)
        for i, out in enumerate(outs):
            plain, per_code = smoothed_nats(out, codes, mask, self.label_smoothing)
            if i == 0:  # the metrics are the first's, without smoothing
                totals["nats"] += plain.sum().item()
                totals["codes"] += count
            own = (per_code.sum() + per_code[:, 0].sum() * extra) / max(count + starts, 1)
            if len(outs) > 1:
                learnt = peer_nats(out, outs[:i] + outs[i + 1 :], mask) / max(count, 1)
                own = (1 - w) * own + w * learnt
            loss = loss + own
        return loss

    @torch.no_grad()
    def validate(self) -> tuple[float, dict[str, Any]]:
        """Validation NLL in bits per code (windows of the validation files, else training), of
        the prior training returns (the first of peers)."""
        model = self._first()
        model.eval()
        nats, count = 0.0, 0
        for i in range(0, len(self.val_windows), VALIDATION_BATCH):
            batch = _pad(self.val_windows[i : i + VALIDATION_BATCH], self.device)
            n, c = masked_nats(model, *batch)
            nats, count = nats + float(n), count + c
        model.train()
        return nats / count / math.log(2), {}

    def epoch_metrics(self, totals: dict[str, Any], validation: dict[str, Any]) -> dict[str, Any]:
        return {
            "train_bits": totals["nats"] / max(totals["codes"], 1) / math.log(2),
            "val_bits": validation["val_loss"],
            "unigram_bits": self.baselines["unigram_bits"],
            "bigram_bits": self.baselines["bigram_bits"],
            "validated_on": self.validated_on,
        }


def train_prior(
    codes: CodeSet,
    prior_overrides: dict[str, Any],
    train_config: PriorTrainConfig,
    hooks: TrainHooks,
    *,
    device: str = "cpu",
    steps_per_second: float | None = None,
) -> PriorTrainResult:
    """Train (or resume, when ``hooks.load_checkpoint()`` returns one) and return the result."""
    return PriorTrainer(codes, prior_overrides, train_config, hooks, device=device,
                        steps_per_second=steps_per_second).run()  # fmt: skip
