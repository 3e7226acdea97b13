"""Training the prior (distill.shared.train.prior): code sequences stitched per file, the code
cache, sizing, and on a small percussion subset a prior whose validation NLL beats the unigram
baseline; resume and NaN rollback through the shared loop."""

from __future__ import annotations

import dataclasses
import io
import json
import math
from typing import Any

import numpy as np
import pytest
import torch

from distill.shared.audio.dataset import Dataset, ManifestRow, build_dataset
from distill.shared.audio.io import cut_chunks, scan_folder
from distill.shared.audio.mel import MelConfig
from distill.shared.errors import ConfigError, JobCancelled, ModelFormatError
from distill.shared.model.formats import checkpoint_to_bytes, read_checkpoint
from distill.shared.model.prior import PRIOR_LEVELS, Prior, PriorConfig, prior_levels
from distill.shared.model.vqvae import VQVAEConfig
from distill.shared.train import prior as prior_training
from distill.shared.train.loop import NullHooks
from distill.shared.train.prior import (
    CODES_KIND,
    CodeSet,
    PriorPeers,
    PriorTrainConfig,
    PriorTrainer,
    codes_artifact_name,
    encode_dataset,
    file_mels,
    load_or_encode_codes,
    masked_nats,
    resolve_prior_config,
)
from distill.shared.train.vqvae import TrainConfig, VQVAETrainer
from tests.conftest import percussion_dir

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

TINY_VQVAE = VQVAEConfig(channels=32, latent_dim=16, blocks=2, codebook_size=32, levels=2)
VQVAE_TRAIN = TrainConfig(epochs=6, batch_size=8, lr=3e-3, warmup_steps=4, preview_every=0,
                          patience=0, checkpoint_every_s=0)  # fmt: skip
FAST = PriorTrainConfig(epochs=8, warmup_steps=10, patience=0, checkpoint_every_s=0)


@pytest.fixture(scope="module")
def codes() -> CodeSet:
    """24 percussion files (4 validate: enough to validate on, see MIN_VALIDATION_FILES),
    encoded by a tiny RVQ-VAE trained for six epochs."""
    paths = [p for p in scan_folder(percussion_dir()) if p.suffix == ".flac"][::5][:24]
    ds = build_dataset([(p.name, p.read_bytes()) for p in paths], MelConfig(), seed=0,
                       val_fraction=0.15)  # fmt: skip
    vqvae = VQVAETrainer(ds, TINY_VQVAE, VQVAE_TRAIN, NullHooks()).run().model
    return encode_dataset(vqvae, ds, vqvae_id="a" * 64, dataset_id="b" * 64)


class Hooks(NullHooks):
    def __init__(self, start_from: bytes | None = None, cancel_at_step: int | None = None,
                 poison_at_step: int | None = None) -> None:  # fmt: skip
        self.metrics: list[dict[str, Any]] = []
        self.checkpoints: list[bytes] = []
        self.start_from, self.cancel_at_step, self.poison_at_step = (start_from, cancel_at_step,
                                                                     poison_at_step)  # fmt: skip
        self.steps = 0
        self.trainer: PriorTrainer | None = None

    def check_cancel(self) -> None:
        self.steps += 1
        if self.cancel_at_step is not None and self.steps >= self.cancel_at_step:
            raise JobCancelled("cancelled by the test")
        if self.steps == self.poison_at_step and self.trainer is not None:
            assert self.trainer.model is not None
            with torch.no_grad():
                self.trainer.model.head_bias.fill_(math.nan)

    def on_epoch(self, metrics: dict[str, Any]) -> None:
        self.metrics.append(metrics)

    def save_checkpoint(self, data: bytes) -> None:
        self.checkpoints.append(data)

    def load_checkpoint(self) -> bytes | None:
        return self.start_from


def run(codes: CodeSet, hooks: Hooks, config: PriorTrainConfig = FAST) -> Any:
    trainer = PriorTrainer(codes, {}, config, hooks)
    hooks.trainer = trainer
    return trainer.run()


# -- code sequences ---------------------------------------------------------------------------


def test_file_mels_stitches_overlapping_chunks_back_into_whole_files() -> None:
    cfg, g = MelConfig(), torch.Generator().manual_seed(0)
    lengths = [94, 141, 200, 300]  # one chunk; a regular grid; last chunk aligned to the end
    whole = [torch.randn(cfg.n_mels, n, generator=g) for n in lengths]
    chunks = [cut_chunks(m, cfg.chunk_frames, cfg.chunk_hop_frames) for m in whole]
    rows = [ManifestRow(f"f{i}.wav", f"{i}" * 64, "ok", None, 1.0, 44100, 1, len(c), "train")
            for i, c in enumerate(chunks)]  # fmt: skip
    ds = Dataset(cfg, torch.cat(chunks).numpy(),
                 np.concatenate([np.full(len(c), i, np.int32) for i, c in enumerate(chunks)]),
                 rows, 0)  # fmt: skip
    stitched = file_mels(ds)
    assert [f for f, _ in stitched] == [0, 1, 2, 3]
    for (_, mel), original in zip(stitched, whole, strict=True):
        assert torch.equal(mel, original)


def test_a_code_set_round_trips_and_bad_bytes_are_refused(
    codes: CodeSet, monkeypatch: pytest.MonkeyPatch
) -> None:
    back = CodeSet.from_bytes(codes.to_bytes())
    assert np.array_equal(back.codes, codes.codes) and back.files == codes.files
    assert (back.splits, back.vqvae, back.dataset) == (codes.splits, "a" * 64, "b" * 64)
    assert back.variants == codes.variants
    every = codes.sequences("train", variants=True) + codes.sequences("val", variants=True)
    assert sum(s.shape[1] for s in every) == codes.codes.shape[1]
    with pytest.raises(ModelFormatError, match="corrupt"):
        CodeSet.from_bytes(codes.to_bytes()[:100])
    with monkeypatch.context() as m:
        m.setattr(prior_training, "CODES_FORMAT_VERSION", 9)  # as a newer Distill writes
        data = codes.to_bytes()
    with pytest.raises(ModelFormatError, match="format_version 9"):
        CodeSet.from_bytes(data)


def test_each_file_is_encoded_with_its_variants_after_the_files(codes: CodeSet) -> None:
    files = codes.n_files
    assert codes.variants[:files] == [""] * files and all(codes.variants[files:])
    lengths = np.diff(codes.offsets)  # (N,) steps of each sequence
    plain = dict(zip(codes.files[:files], lengths[:files], strict=True))
    assert len(plain) == files  # each file once, as it is, before any variant
    for name, variant, length in zip(codes.files, codes.variants, lengths, strict=True):
        if variant.startswith("stretch"):  # 0.9 and 1.1 times as long, give or take a step
            assert abs(length - float(variant[7:]) * plain[name]) <= 2, (variant, plain[name])
        elif variant:  # moved in frequency or gain: as long as the file
            assert length == plain[name], (variant, plain[name])
    # downsample 1 here: no shifted encodings; two stretches, four band moves, two gains
    assert sorted(set(codes.variants[files:])) == ["bands+2", "bands+4", "bands-2", "bands-4",
                                                   "gain+3", "gain-3", "stretch0.9",
                                                   "stretch1.1"]  # fmt: skip
    assert len(codes.files) == 9 * files
    # A code set written before variants (format 1) reads as files without variants.
    meta = {"format_version": 1, "files": codes.files[:files], "splits": codes.splits[:files],
            "codebook_size": codes.codebook_size, "vqvae": "", "dataset": ""}  # fmt: skip
    buf = io.BytesIO()
    np.savez(buf, meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8),
             codes=codes.codes[:, : codes.offsets[files]], offsets=codes.offsets[: files + 1])
    old = CodeSet.from_bytes(buf.getvalue())
    assert old.variants == [""] * files and old.n_files == files


def test_mel_variants_shift_stretch_move_bands_and_change_gain() -> None:
    mel = torch.arange(8.0)[:, None] * 10 + torch.arange(20.0)[None]  # (M 8, T 20): band*10 + t
    variants = dict(prior_training.mel_variants(mel, downsample=2, log_floor=1.0))  # floor ln 1
    assert sorted(variants) == ["bands+2", "bands+4", "bands-2", "bands-4", "gain+3", "gain-3",
                                "shift1", "stretch0.9", "stretch1.1"]  # fmt: skip
    step = 3 / 20 * math.log(10)  # 3 dB in ln magnitude
    assert torch.allclose(variants["gain+3"], mel + step)
    softer = variants["gain-3"]  # never below the floor (ln 1e-5 in a real config; 0 here)
    assert torch.allclose(softer, (mel - step).clamp_min(0.0)) and float(softer.min()) == 0.0
    assert torch.equal(variants["shift1"], mel[:, 1:])  # one frame later
    assert variants["stretch0.9"].shape == (8, 18) and variants["stretch1.1"].shape == (8, 22)
    up, down = variants["bands+2"], variants["bands-2"]
    assert up[:, 0].tolist() == [0, 0, 0, 10, 20, 30, 40, 50]  # moved up, the lowest repeated
    assert down[:, 0].tolist() == [20, 30, 40, 50, 60, 70, 70, 70]  # down, the highest repeated
    assert variants["bands+4"][:, 0].tolist() == [0, 0, 0, 0, 0, 10, 20, 30]


def test_the_prior_trains_on_the_variants_and_validates_on_the_files(codes: CodeSet) -> None:
    plain = PriorTrainer(codes, {}, dataclasses.replace(FAST, augment=False), NullHooks())
    augmented = PriorTrainer(codes, {}, FAST, NullHooks())
    assert len(plain.train_seqs) == len(codes.sequences("train"))
    assert len(augmented.train_seqs) == len(codes.sequences("train", variants=True))
    assert len(plain.val_windows) == len(augmented.val_windows)
    assert all(torch.equal(a.codes, b.codes)
               for a, b in zip(plain.val_windows, augmented.val_windows, strict=True))  # fmt: skip
    assert plain.chosen == augmented.chosen  # sized by the files, not by their variants
    assert augmented.train_code_steps == sum(s.shape[1] for s in codes.sequences("train"))
    assert len(codes.sequences("train", variants=True)) > len(codes.sequences("train"))
    assert augmented.baselines["fitted_on"] == "training files and variants"
    assert augmented.baselines["bigram_bits"] != plain.baselines["bigram_bits"]


class MemoryStore:
    def __init__(self) -> None:
        self.items: dict[str, tuple[bytes, str, str]] = {}

    def put_bytes(self, data: bytes, *, kind: str, name: str, job: str | None = None) -> str:
        sha = f"{len(self.items):064x}"
        self.items[sha] = (data, kind, name)
        return sha

    def get_bytes(self, sha256: str) -> bytes:
        return self.items[sha256][0]

    def list(self, *, kind: str | None = None, job: str | None = None) -> list[dict[str, Any]]:
        return [{"sha256": s, "kind": k, "name": n} for s, (_, k, n) in self.items.items()
                if kind is None or k == kind]  # fmt: skip


def test_codes_are_encoded_once_per_model_and_dataset(
    codes: CodeSet, monkeypatch: pytest.MonkeyPatch
) -> None:
    store, calls = MemoryStore(), []

    def encode() -> CodeSet:
        calls.append(1)
        return codes

    first, sha, cached = load_or_encode_codes(store, "a" * 64, "b" * 64, encode)
    assert not cached and store.items[sha][1:] == (
        CODES_KIND,
        codes_artifact_name("a" * 64, "b" * 64),
    )
    again, sha2, cached2 = load_or_encode_codes(store, "a" * 64, "b" * 64, encode)
    assert cached2 and sha2 == sha and len(calls) == 1
    assert np.array_equal(again.codes, codes.codes)
    store.items[sha2] = (b"not a code set", CODES_KIND, store.items[sha2][2])  # damaged cache
    _, sha3, cached3 = load_or_encode_codes(store, "a" * 64, "b" * 64, encode)
    assert not cached3 and sha3 != sha and len(calls) == 2
    assert "-s0.9,1.1-b-4,-2,+2,+4-g-3,+3-" in codes_artifact_name("a" * 64, "b" * 64)
    monkeypatch.setattr(prior_training, "VARIANT_BAND_SHIFTS", (-2, 2))  # other variants:
    load_or_encode_codes(store, "a" * 64, "b" * 64, encode)  # not the cached code set
    assert len(calls) == 3


def test_the_prior_is_sized_from_the_codes_and_overrides_are_checked(codes: CodeSet) -> None:
    config, chosen = resolve_prior_config(codes, {"hidden": 64})
    assert (config.levels, config.codebook_size, config.hidden) == (2, 32, 64)
    assert chosen["overridden"] == ["hidden"] and "training code steps" in chosen["why"]
    with pytest.raises(ConfigError, match="levels must equal the code set's"):
        resolve_prior_config(codes, {"levels": 3})


def test_a_prior_models_the_rvq_vaes_first_levels(codes: CodeSet) -> None:
    first = codes.first_levels(1)
    assert first.levels == 1 and first.files == codes.files
    pairs = zip(first.sequences("train", variants=True), codes.sequences("train", variants=True),
                strict=True)  # fmt: skip
    assert all(torch.equal(a, b[:1]) for a, b in pairs)
    with pytest.raises(ConfigError, match=r"prior levels must be in 1\.\.2"):
        codes.first_levels(3)
    assert prior_levels(2) == 2 and prior_levels(12) == PRIOR_LEVELS == 8
    one = PriorTrainer(codes, {"levels": 1}, FAST, NullHooks())
    assert one.prior_config.levels == 1 and all(s.shape[0] == 1 for s in one.train_seqs)
    assert PriorTrainer(codes, {}, FAST, NullHooks()).prior_config.levels == 2  # all of 2
    with pytest.raises(ConfigError, match=r"prior levels must be in 1\.\.2"):
        PriorTrainer(codes, {"levels": 3}, FAST, NullHooks())
    with pytest.raises(ConfigError):
        PriorTrainConfig.from_dict({"window": 1})


def test_the_prior_draws_as_many_levels_as_keep_its_codes_a_second() -> None:
    frames = MelConfig().frames_per_second  # code steps a second at downsample 1, 2 below
    assert frames == 48000 / 512
    assert prior_levels(12, frames) == 4 and prior_levels(12, frames / 2) == 8 == PRIOR_LEVELS
    assert prior_levels(3, frames) == 3 and prior_levels(12, 44100 / 512) == 4
    assert prior_levels(12, 1000.0) == 1  # always at least one
    assert prior_levels(6, frames) == 6 and prior_levels(6, 1000.0) == 6  # small codebooks: all
    assert prior_levels(7, frames) == 4
    for levels in (12, 6):  # a small codebook's rate is checked too
        with pytest.raises(ConfigError, match="steps_per_second"):
            prior_levels(levels, 0.0)
    g = np.random.default_rng(0)
    eight = CodeSet(codes=g.integers(0, 8, (8, 400)).astype(np.int32),
                  offsets=np.array([0, 100, 200, 300, 400]), files=["a", "b", "c", "d"],
                  splits=["train", "train", "train", "val"], codebook_size=8, vqvae="",
                  dataset="")  # fmt: skip
    trainer = PriorTrainer(eight, {}, FAST, NullHooks(), steps_per_second=frames)
    assert trainer.prior_config.levels == 4 and all(s.shape[0] == 4 for s in trainer.train_seqs)
    assert "first 4 of 8 levels" in trainer.chosen["why"]
    chosen = PriorTrainer(eight, {"levels": 6}, FAST, NullHooks(), steps_per_second=frames).chosen
    assert "It draws" not in chosen["why"]  # the job chose
    assert PriorTrainer(eight, {}, FAST, NullHooks()).prior_config.levels == 8  # 47/s: up to 8


def test_padding_is_left_out_of_the_loss() -> None:
    prior = Prior(PriorConfig(levels=2, codebook_size=8, embed_dim=8, hidden=8)).eval()
    g = torch.Generator().manual_seed(0)
    short, long = (torch.randint(0, 8, (2, n), generator=g) for n in (5, 9))
    codes, mask = torch.zeros(2, 2, 9, dtype=torch.long), torch.zeros(2, 9, dtype=torch.bool)
    codes[0, :, :5], codes[1], mask[0, :5], mask[1] = short, long, True, True
    with torch.no_grad():
        together, count = masked_nats(prior, codes, mask)
        alone = [masked_nats(prior, s[None], torch.ones(1, s.shape[1], dtype=torch.bool))
                 for s in (short, long)]  # fmt: skip
    assert count == 2 * (5 + 9) == alone[0][1] + alone[1][1]
    assert float(together) == pytest.approx(float(alone[0][0] + alone[1][0]), rel=1e-5)


def synthetic_codes(lengths: list[int], splits: list[str], k: int = 8) -> CodeSet:
    """Random 2-level sequences of the given lengths (no RVQ-VAE needed)."""
    g = np.random.default_rng(0)
    codes = g.integers(0, k, (2, sum(lengths))).astype(np.int32)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    return CodeSet(codes=codes, offsets=offsets, files=[f"f{i}.wav" for i in range(len(lengths))],
                   splits=splits, codebook_size=k, vqvae="", dataset="")  # fmt: skip


def test_windows_inside_a_sound_read_the_step_before_and_every_start_is_drawn() -> None:
    codes = synthetic_codes([50, 7, 70, 70, 70], ["train", "train", "val", "val", "val"])
    config = dataclasses.replace(FAST, window=10, end_steps=0)
    trainer = PriorTrainer(codes, {}, config, NullHooks())
    long_seq = codes.sequences("train")[0]
    for epoch in (1, 2):
        windows = trainer._windows_at_random(torch.Generator().manual_seed(epoch))
        assert len(windows) == 5 + 1  # ceil(50 / 10) of the long sound, the short one whole
        assert windows[0].context == 0 and torch.equal(windows[0].codes, long_seq[:, :10])
        for w in windows[1:5]:
            assert w.context == 1 and w.codes.shape[1] == 11  # one step read, ten scored
            start = next(i for i in range(1, 41) if torch.equal(long_seq[:, i - 1 : i + 10],
                                                                w.codes))  # fmt: skip
            assert start >= 1
    codes_t, mask = prior_training._pad(windows[:2], torch.device("cpu"))
    assert mask[0].tolist() == [True] * 10 + [False] and mask[1].tolist() == [False] + [True] * 10
    assert trainer.steps_per_epoch >= prior_training.MIN_STEPS_PER_EPOCH
    assert trainer.validated_on == "val"
    assert trainer.label_smoothing == prior_training.LABEL_SMOOTHING


def test_validation_needs_two_files_and_enough_code_steps() -> None:
    steps = prior_training.MIN_VALIDATION_STEPS
    for lengths, held_out in (([20, 30, steps], False),  # one file, however long
                              ([20, 30, 20, steps - 21], False),  # two, too short together
                              ([20, 30, 20, steps - 20], True)):  # fmt: skip
        splits = ["train", "train"] + ["val"] * (len(lengths) - 2)
        trainer = PriorTrainer(synthetic_codes(lengths, splits), {}, FAST, NullHooks())
        assert trainer.validated_on == ("val" if held_out else "train"), lengths
        assert len(trainer.train_seqs) == (2 if held_out else len(lengths))


def test_with_too_few_validation_files_every_file_trains_and_validation_uses_them() -> None:
    codes = synthetic_codes([20, 30, 25], ["train", "train", "val"])
    config = dataclasses.replace(FAST, end_steps=6)
    trainer = PriorTrainer(codes, {}, config, NullHooks())
    assert trainer.validated_on == "train" and trainer.baselines["validated_on"] == "train"
    assert trainer.label_smoothing == prior_training.LABEL_SMOOTHING
    assert [s.shape[1] for s in trainer.train_seqs] == [26, 36, 31]  # every file, its tail
    for seq in trainer.train_seqs:  # the tail repeats the sound's last (silent) step
        assert bool((seq[:, -7:] == seq[:, -7:-6]).all())
    assert trainer.baselines["val_codes"] == 2 * (20 + 30 + 25)  # the tails are not scored


def test_start_weight_counts_a_sounds_first_step_more() -> None:
    codes = synthetic_codes([12, 12, 12, 12], ["train"] * 4)
    losses = []
    for weight in (1.0, 5.0):
        config = dataclasses.replace(FAST, start_weight=weight, window=6, label_smoothing=0.0)
        trainer = PriorTrainer(codes, {}, config, NullHooks())
        torch.manual_seed(0)
        trainer.model = trainer.build_model().eval()
        batch = prior_training._pad(trainer._windows_in_order(codes.sequences("train")),
                                    torch.device("cpu"))  # fmt: skip
        totals = trainer.new_totals()
        losses.append(float(trainer.step_loss(batch, totals).detach()))
        per_code = prior_training.code_nats(trainer.model, *batch)[0].detach()  # (B, T, Q)
    first, rest = per_code[batch[1][:, 0], 0].sum(), per_code.sum()  # 4 starts x 2 levels
    assert totals["codes"] == 4 * 12 * 2  # the metrics count every code once, unweighted
    assert losses[0] == pytest.approx(float(rest) / 96, rel=1e-5)
    assert losses[1] == pytest.approx(float(rest + 4 * first) / (96 + 4 * 8), rel=1e-5)


def test_peers_learn_each_from_the_others_predictions_held_fixed() -> None:
    codes = synthetic_codes([12, 12, 12, 12], ["train"] * 4)
    w = 0.3
    config = dataclasses.replace(FAST, peers=2, peer_weight=w, window=6, label_smoothing=0.0)
    trainer = PriorTrainer(codes, {}, config, NullHooks())
    torch.manual_seed(0)
    trainer.model = trainer.build_model().eval()
    assert isinstance(trainer.model, PriorPeers) and len(trainer.model.members) == 2
    a, b = trainer.model.all()
    assert not torch.equal(a.head_weight, b.head_weight)  # each starts from its own weights
    batch = prior_training._pad(trainer._windows_in_order(codes.sequences("train")),
                                torch.device("cpu"))  # fmt: skip
    totals = trainer.new_totals()
    loss = trainer.step_loss(batch, totals)
    mask = batch[1][:, :, None]  # (B, T, 1)
    n = float(mask.sum()) * 2  # codes scored: 4 x 12 steps x 2 levels
    with torch.no_grad():
        own = [float((m.code_nats(batch[0]).nll * mask).sum()) / n for m in (a, b)]
        heads = [torch.log_softmax(m._parts(batch[0])[0], -1) for m in (a, b)]  # (B, T, Q, K)
        cross = [float((-(heads[1 - i].exp() * heads[i]).sum(-1) * mask).sum()) / n
                 for i in (0, 1)]  # fmt: skip
    want = sum((1 - w) * own[i] + w * cross[i] for i in (0, 1))
    assert loss.item() == pytest.approx(want, rel=1e-5)
    assert totals["nats"] == pytest.approx(own[0] * n, rel=1e-5)  # the metrics are the first's
    # a member's gradient comes from its own terms alone: the other's side is held fixed
    loss.backward()
    grad = a.head_weight.grad.clone()
    a.zero_grad()
    alone = (1 - w) * (a.code_nats(batch[0]).nll * mask).sum() / n
    alone = alone + w * (-(heads[1].exp() * torch.log_softmax(a._parts(batch[0])[0], -1))
                         .sum(-1) * mask).sum() / n  # fmt: skip
    alone.backward()
    torch.testing.assert_close(grad, a.head_weight.grad)


def test_peers_are_automatic_where_the_prior_reads_earlier_codes_and_the_budget_allows() -> None:
    codes = synthetic_codes([40] * 6, ["train"] * 3 + ["val"] * 3)
    alone = {"prev_codes": False, "earlier_codes": 0}
    cases = [(alone, 0, 3.0, 1),  # a prior without earlier codes trains alone
             ({"prev_codes": True}, 0, 0.0, 1),  # a budget in epochs: a pair costs twice
             ({"prev_codes": True}, 0, 1.0, 1),  # a short budget: too few steps for two
             ({"prev_codes": True}, 0, 3.0, prior_training.AUTO_PEERS),
             ({}, 3, 0.0, 3), ({"prev_codes": True}, 1, 3.0, 1)]  # set by the job  # fmt: skip
    big = synthetic_codes([prior_training.PEERS_MAX_CODE_STEPS // 3 + 1] * 3 + [40] * 3,
                          ["train"] * 3 + ["val"] * 3)  # fmt: skip
    config = dataclasses.replace(FAST, minutes=3.0)
    assert PriorTrainer(big, {"prev_codes": True}, config, NullHooks()).peers == 1  # unmeasured
    for overrides, peers, minutes, want in cases:
        config = dataclasses.replace(FAST, peers=peers, minutes=minutes)
        trainer = PriorTrainer(codes, overrides, config, NullHooks())
        assert trainer.peers == want, (overrides, peers, minutes)
        assert ("peer" in trainer.chosen["why"]) == (want > 1)
        model = trainer.build_model()
        assert isinstance(model, Prior) if want == 1 else len(model.members) == want
    with pytest.raises(ConfigError, match="peers"):
        PriorTrainConfig.from_dict({"peers": 9})
    with pytest.raises(ConfigError, match="peer_weight"):
        PriorTrainConfig.from_dict({"peer_weight": 1.0})


def test_a_checkpoint_from_before_peers_resumes_alone() -> None:
    codes = synthetic_codes([40] * 6, ["train"] * 3 + ["val"] * 3)
    config = dataclasses.replace(FAST, minutes=3.0)  # automatic: a pair for this prior now
    old = PriorTrainer(codes, {"prev_codes": True}, dataclasses.replace(config, peers=1),
                       NullHooks())  # fmt: skip
    old.model = old.build_model()
    old.optimizer = old.build_optimizer(old.model)
    old._checkpoint()
    assert old.last_checkpoint is not None
    ckpt = read_checkpoint(old.last_checkpoint)
    for key in ("peers", "peer_weight"):  # what an earlier version wrote
        del ckpt["train_config"][key]
    trainer = PriorTrainer(codes, {"prev_codes": True}, config, NullHooks())
    assert trainer.peers == 2
    trainer._restore(checkpoint_to_bytes(ckpt))
    assert trainer.peers == 1 and isinstance(trainer.model, Prior)


# -- training ---------------------------------------------------------------------------------


@pytest.mark.slow  # trains a model
def test_the_prior_beats_the_unigram_baseline_on_validation(codes: CodeSet) -> None:
    hooks = Hooks()
    result = run(codes, hooks)
    assert [m["epoch"] for m in hooks.metrics] == list(range(1, 9))
    base = result.baselines
    assert base["validated_on"] == "val" and base["val_codes"] > 0
    assert result.best_val_bits < base["unigram_bits"]  # it learned what follows what
    first, last = hooks.metrics[0], hooks.metrics[-1]
    assert last["train_bits"] < first["train_bits"] and last["val_bits"] < first["val_bits"]
    assert last["unigram_bits"] == base["unigram_bits"] and last["bigram_bits"] > 0
    assert result.best_val_bits == min(m["val_bits"] for m in hooks.metrics)
    assert isinstance(result.model, Prior) and not result.model.training
    assert len(hooks.checkpoints) == 9  # the start, then every epoch (checkpoint_every_s 0)


@pytest.mark.slow  # trains a model
@pytest.mark.parametrize("peers", [1, 2])
def test_a_resumed_prior_run_equals_an_uninterrupted_one(codes: CodeSet, peers: int) -> None:
    config = dataclasses.replace(FAST, epochs=4, peers=peers)
    steps = PriorTrainer(codes, {}, config, Hooks()).steps_per_epoch
    whole = run(codes, Hooks(), config)
    cut = Hooks(cancel_at_step=2 * steps + 2)  # inside epoch 3
    with pytest.raises(JobCancelled):
        run(codes, cut, config)
    resumed_hooks = Hooks(start_from=cut.checkpoints[-1])
    resumed = run(codes, resumed_hooks, config)
    assert [m["epoch"] for m in resumed_hooks.metrics] == [3, 4]
    assert isinstance(whole.model, Prior) and isinstance(resumed.model, Prior)  # the first
    for key, value in whole.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[key]), key


@pytest.mark.slow  # trains a model
def test_a_nan_in_the_prior_rolls_back_with_half_the_learning_rate(codes: CodeSet) -> None:
    config = dataclasses.replace(FAST, epochs=2, schedule="constant", warmup_steps=0)
    steps = PriorTrainer(codes, {}, config, Hooks()).steps_per_epoch
    hooks = Hooks(poison_at_step=steps + 2)  # during epoch 2
    result = run(codes, hooks, config)
    assert [m["epoch"] for m in hooks.metrics] == [1, 2]
    assert hooks.metrics[-1]["rollbacks"] == 1
    assert hooks.metrics[-1]["lr"] == pytest.approx(config.lr / 2)
    assert all(torch.isfinite(p).all() for p in result.model.parameters())


def test_label_smoothing_leaves_the_steps_where_the_sound_holds_still() -> None:
    # A smoothed target on a held step (silence) teaches the prior to leave it for a random code
    # one step in ten: the draw's silence fills with clicks. Held steps keep the plain loss.
    torch.manual_seed(0)
    prior = Prior(PriorConfig(levels=2, codebook_size=8, embed_dim=8, hidden=16))
    codes = torch.tensor([[[3, 5, 1, 1, 1, 6], [2, 4, 7, 7, 7, 0]]])  # (1, Q, T): 2..4 held
    mask = torch.ones(1, 6, dtype=torch.bool)
    plain, smoothed = prior_training.code_nats(prior, codes, mask, smoothing=0.1)  # (1, T, Q)
    held = torch.tensor([False, False, False, True, True, False])
    assert torch.equal(smoothed[0, held], plain[0, held])
    assert not torch.isclose(smoothed[0, ~held], plain[0, ~held]).any()
