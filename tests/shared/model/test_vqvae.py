"""The RVQ-VAE model (distill.shared.model.vqvae): config, shapes, codes, k-means init."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch
from vector_quantize_pytorch import VectorQuantize

from distill.shared.errors import ConfigError
from distill.shared.model.kmeans import kmeans, lloyd, nearest
from distill.shared.model.vqvae import (
    VQVAE,
    VQVAEConfig,
    choose_codebook,
    choose_size,
    dead_code_threshold_for,
    resolve_config,
    search_error,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

TINY = VQVAEConfig(channels=32, latent_dim=16, blocks=2, codebook_size=16, levels=3)


def tiny_model(**overrides: object) -> VQVAE:
    torch.manual_seed(0)
    return VQVAE(dataclasses.replace(TINY, **overrides))


def fake_mels(batch: int = 4, frames: int = 94) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randn(batch, 128, frames, generator=g) * 3 - 5  # (B, M, T) log-mel-like


# -- config -----------------------------------------------------------------------------------


def test_config_round_trips_through_a_plain_dict() -> None:
    cfg = VQVAEConfig(codebook_size=64, levels=2, dilations=(1, 2), downsample=2)
    d = cfg.to_dict()
    assert d["dilations"] == [1, 2] and isinstance(d["codebook_size"], int)
    assert VQVAEConfig.from_dict(d) == cfg
    assert VQVAEConfig.from_dict({}) == VQVAEConfig()


@pytest.mark.parametrize(
    "bad",
    [
        {"channelz": 3},  # unknown key
        {"channels": "wide"},  # wrong type
        {"levels": True},  # a bool is not an int
        {"levels": 0},  # out of range
        {"codebook_size": 1},
        {"dilations": [1, "2"]},
        {"downsample": 3},
        {"ema_decay": 1.0},
        {"rotation_trick": 1},
        {"quantizer_dropout": 1.5},
        {"norm": "batch"},
    ],
)
def test_config_from_dict_rejects_bad_input(bad: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        VQVAEConfig.from_dict(bad)


def test_config_from_dict_rejects_a_non_map() -> None:
    with pytest.raises(ConfigError):
        VQVAEConfig.from_dict([1, 2])


@pytest.mark.parametrize(
    ("chunks", "size", "levels"),
    [(1, 64, 6), (14, 64, 6), (15, 128, 6), (39, 128, 6), (40, 512, 5), (99, 512, 5),
     (100, 512, 12), (5000, 512, 12)],  # fmt: skip
)
def test_codebook_sizes_follow_the_training_chunks(chunks: int, size: int, levels: int) -> None:
    got_size, got_levels, why = choose_codebook(chunks)
    assert (got_size, got_levels) == (size, levels)
    assert f"{chunks} training chunks" in why and str(size) in why


def test_resolve_config_keeps_what_the_user_set() -> None:
    cfg, why = resolve_config(VQVAEConfig(codebook_size=32), 120)
    assert (cfg.codebook_size, cfg.levels) == (32, 12)
    assert why.startswith("codebook size 32 set by the user; 12 levels from the data: 120 ")
    cfg, why = resolve_config(VQVAEConfig(levels=6), 120)
    assert (cfg.codebook_size, cfg.levels) == (512, 6)
    assert why.startswith("6 levels set by the user; 512 codes from the data: 120 training")
    same, why = resolve_config(VQVAEConfig(codebook_size=8, levels=1), 120)
    assert (same.codebook_size, same.levels) == (8, 1) and "set by the user" in why
    with pytest.raises(ConfigError):
        VQVAE(VQVAEConfig())  # unresolved: no codebook size yet


# -- shapes and codes -------------------------------------------------------------------------


def test_forward_keeps_the_mel_shape_and_gives_codes_per_level() -> None:
    model = tiny_model().eval()
    x = fake_mels()
    out = model(x)
    assert out.recon.shape == x.shape
    assert out.codes.shape == (4, 3, 94) and out.codes.dtype == torch.long
    assert int(out.codes.min()) >= 0 and int(out.codes.max()) < 16
    assert float(out.commit_loss) == 0.0  # no commitment loss outside training
    assert torch.equal(model.encode(x), out.codes)


def test_quantizer_dropout_drops_trailing_levels_per_item() -> None:
    model = tiny_model(quantizer_dropout=1.0).train()
    out = model(fake_mels(batch=16))
    dropped = out.codes[:, :, 0] == -1  # (B, Q)
    assert dropped.any() and not dropped[:, 0].any()  # the first level is always kept
    for item in dropped:  # dropped levels form a suffix: keep the first k, drop the rest
        k = int((~item).sum())
        assert not item[:k].any() and item[k:].all()
    assert (out.codes == -1).all(dim=2).eq(dropped).all()  # whole items, not single frames
    assert out.commit_loss.requires_grad


def test_decode_codes_matches_forward_and_coarser_levels_differ() -> None:
    model = tiny_model().eval()
    x = fake_mels()
    codes = model.encode(x)
    full = model.decode_codes(codes)
    assert torch.allclose(full, model(x).recon, atol=1e-5)
    coarse = model.decode_codes(codes, levels=1)
    assert coarse.shape == full.shape and not torch.allclose(coarse, full)
    assert torch.allclose(model.decode_codes(codes[:, :1]), coarse)  # fewer rows = first levels
    with pytest.raises(ConfigError):
        model.decode_codes(codes, levels=4)


def test_time_downsampling_gives_fewer_code_steps_and_the_full_length_back() -> None:
    model = tiny_model(downsample=2).eval()
    x = fake_mels(frames=93)  # odd: padded inside, cropped on the way out
    out = model(x)
    assert out.codes.shape == (4, 3, 47)
    assert out.recon.shape == x.shape
    assert model.decode_codes(out.codes).shape[-1] == 94


def test_normalisation_travels_in_the_state_dict() -> None:
    model = tiny_model()
    model.set_normalisation_(torch.full((128,), -4.0), torch.full((128,), 2.0))
    other = tiny_model()
    other.load_state_dict(model.state_dict())
    assert float(other.mel_mean[0]) == -4.0 and float(other.mel_std[0]) == 2.0


def test_reconstruction_loss_is_zero_for_a_perfect_reconstruction() -> None:
    model = tiny_model()
    x = fake_mels()
    assert float(model.reconstruction_loss(x, x)) == pytest.approx(0.0, abs=1e-5)
    assert float(model.reconstruction_loss(x, x + 0.5)) > float(model.reconstruction_loss(x, x + 0.1))


# -- k-means init -----------------------------------------------------------------------------


def test_kmeans_finds_distinct_centroids_even_with_few_distinct_points() -> None:
    g = torch.Generator().manual_seed(0)
    distinct = torch.randn(10, 8, generator=g)
    x = distinct.repeat(30, 1)  # 300 vectors, only 10 distinct (silence frames look like this)
    centroids, counts = kmeans(x, 16, generator=g)
    assert torch.unique(centroids, dim=0).shape[0] == 16
    assert int(counts.sum()) == 300 and int((counts > 0).sum()) == 10


def test_kmeans_plus_plus_draws_in_proportion_and_never_a_zero_weight() -> None:
    """The seeding's draw (a uniform draw in the cumulative sum, where torch.multinomial took
    18x as long on 65536 weights): in proportion, never a point already chosen."""
    from distill.shared.model.kmeans import _draw

    weights = torch.tensor([0.0, 1.0, 3.0, 0.0, 6.0, 0.0])
    g = torch.Generator().manual_seed(0)
    counts = torch.bincount(torch.tensor([_draw(weights, g) for _ in range(20_000)]), minlength=6)
    assert counts[0] == counts[3] == counts[5] == 0
    assert torch.allclose(counts[[1, 2, 4]] / 20_000, torch.tensor([0.1, 0.3, 0.6]), atol=0.015)
    # seeded from its distances as product: the centroids are data points, all distinct
    x = torch.randn(4096, 16, generator=g)
    centroids = kmeans(x, 64, iters=0, generator=g)[0]
    assert len(torch.unique(centroids, dim=0)) == 64
    assert all(bool((x == c).all(1).any()) for c in centroids)


def test_library_kmeans_on_a_small_first_batch_duplicates_codes() -> None:
    """Why Distill initialises codebooks itself: the library's init sees one small batch."""
    torch.manual_seed(0)
    vq = VectorQuantize(dim=8, codebook_size=32, kmeans_init=True).train()
    vq(torch.randn(1, 10, 8))  # a first batch of 10 vectors for 32 codes
    assert torch.unique(vq.codebook, dim=0).shape[0] < 32


def test_kmeans_init_writes_distinct_codebooks_and_consistent_ema_buffers() -> None:
    model = tiny_model(codebook_size=32, levels=2, dead_code_threshold=1.0)
    x = fake_mels(batch=2)  # 188 latent vectors for 32 codes
    with torch.no_grad():
        latents = model.encode_latents(x).reshape(-1, 16)  # (B * T, D)
    model.kmeans_init_(latents, batch_vectors=188, seed=0)
    books = model.codebooks()  # (Q, K, D)
    for q in range(2):
        assert torch.unique(books[q], dim=0).shape[0] == 32
        book = model.rvq.layers[q]._codebook
        assert bool(book.initted)
        size = book.cluster_size[0]  # (K,)
        assert float(size.min()) >= 1.0  # no code starts below the dead-code threshold
        assert torch.allclose(book.embed_avg[0] / size[:, None], book.embed[0], atol=1e-5)
    assert sum(model.dead_codes()) == 0
    # the second level quantizes residuals: its codes are smaller than the first level's
    assert books[1].norm(dim=1).mean() < books[0].norm(dim=1).mean()


def test_the_default_dead_code_threshold_replaces_dead_codes_not_rare_ones() -> None:
    """64 clusters, each a code, used 0.4-1.2 times per batch of 48 vectors: at the threshold
    a trainer sets (2% of an average code's use) no code leaves its cluster and the
    quantization error stays at the noise; at 1.0 use per batch the rarer codes are replaced
    by random latents every few steps and their clusters go to other codes."""

    def churn(**overrides: object) -> tuple[int, float]:
        model = tiny_model(codebook_size=64, levels=1, **overrides).train()
        g = torch.Generator().manual_seed(0)
        centres = torch.randn(64, 16, generator=g) * 3  # (K, D)
        weights = torch.linspace(1.0, 0.2, 64)

        def batch() -> torch.Tensor:
            idx = torch.multinomial(weights, 48, replacement=True, generator=g)
            return centres[idx] + 0.05 * torch.randn(48, 16, generator=g)  # (48, D)

        model.kmeans_init_(torch.cat([batch() for _ in range(50)]), batch_vectors=48, seed=0)
        moved, errors = 0, []
        with torch.no_grad():
            for _ in range(200):
                before = model.codebooks()[0].clone()  # (K, D)
                x = batch()[None]  # (1, 48, D)
                quantized, _, _ = model.quantize(x)
                moved += int(((model.codebooks()[0] - before).norm(dim=1) > 1.0).sum())
                errors.append(float((quantized - x).square().mean()))
        return moved, sum(errors[100:]) / 100

    moved, error = churn(dead_code_threshold=dead_code_threshold_for(48, 64))
    assert moved == 0 and error < 0.01  # the noise's own variance is 0.0025
    moved, error = churn(dead_code_threshold=1.0)
    assert moved > 1000 and error > 0.5


def test_the_codebooks_keep_the_rules_every_figure_was_measured_with() -> None:
    """vector-quantize-pytorch 1.34 changed its EMA codebook: buffers starting at zero, a dead
    code judged against a share of the mean code's use, the EMA update without Laplace
    smoothing. The RVQ-VAE keeps 1.20-1.32's rules on any version (keep_codebook_rules_): an
    absolute bound of uses per batch, the smoothed update, ones and the codebook to start."""
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(8, 16, generator=g) * 3  # (K, D): far apart against the noise below

    def step(threshold: float, sizes: list[float], x: torch.Tensor) -> Any:
        model = tiny_model(codebook_size=8, levels=1, dead_code_threshold=threshold).train()
        book = model.rvq.layers[0]._codebook
        assert torch.equal(book.cluster_size, torch.ones(1, 8))  # 1.34: zeros
        assert torch.equal(book.embed_avg, book.embed)  # 1.34: zeros
        with torch.no_grad():
            book.embed.copy_(centres[None])
            book.cluster_size.copy_(torch.tensor([sizes]))
            book.embed_avg.copy_(book.embed * book.cluster_size[..., None])
            model.quantize(x[None])
        return book

    # the update: each code to its EMA mean over Laplace-smoothed sizes; a rarely used code whose
    # latents sit off its vector tells the two formulas apart (1.34: (avg + eps e) / (n + eps))
    x = torch.cat([centres[:5].repeat(10, 1), centres[5:6].repeat(10, 1) + 0.5])  # (60, D)
    book = step(0.0, [50.0] * 5 + [0.2, 50.0, 50.0], x)
    size, total = book.cluster_size[0], book.cluster_size[0].sum()
    smoothed = (size + book.eps) / (total + 8 * book.eps) * total
    assert float(size[5]) < 1.0  # rarely used: where the formulas part
    assert torch.allclose(book.embed[0], book.embed_avg[0] / smoothed[:, None], rtol=1e-6, atol=0)

    # dead codes: under an absolute bound of uses per batch, not under a share of the mean use
    x = centres[:6].repeat(10, 1) + 0.01 * torch.randn(60, 16, generator=g)
    book = step(1.0, [200.0] * 6 + [1.5, 0.5], x)  # codes 6 and 7 take no latent
    size, embed = book.cluster_size[0], book.embed[0]
    # code 6 (1.2 uses per batch: far under a share of the mean, over the bound) is kept
    assert torch.allclose(embed[6], centres[6], atol=1e-4) and 1.0 < float(size[6]) < 1.5
    # code 7 (0.4 uses, under the bound) took one of the batch's latents, its use at the bound
    assert float((x - embed[7]).norm(dim=1).min()) == 0.0 and float(size[7]) == 1.0
    assert torch.equal(book.embed_avg[0, 7], embed[7])


def test_lloyd_moves_centroids_to_their_means_and_an_empty_one_to_the_data() -> None:
    x = torch.tensor([[0.0, 0.0], [0.0, 2.0], [10.0, 0.0], [10.0, 2.0], [50.0, 50.0]])
    start = torch.tensor([[1.0, 1.0], [9.0, 1.0], [-100.0, -100.0]])  # the third serves nothing
    assert torch.equal(lloyd(x, start, 0), start)
    centroids = lloyd(x, start, 3)
    assert torch.equal(centroids[:2], torch.tensor([[0.0, 1.0], [10.0, 1.0]]))
    assert torch.equal(centroids[2], torch.tensor([50.0, 50.0]))  # moved to the farthest point
    assert torch.equal(start[2], torch.tensor([-100.0, -100.0]))  # the input is left alone


def test_refining_codebooks_lowers_the_quantization_error_of_the_latents() -> None:
    """Codebooks fitted to some latents, then refined on others (the encoder moved on): the
    refined ones quantize the new latents better, level by level, EMA buffers consistent."""
    model = tiny_model(codebook_size=16, levels=2, dead_code_threshold=1.0)
    g = torch.Generator().manual_seed(0)
    old, new = torch.randn(400, 16, generator=g), torch.randn(400, 16, generator=g) * 2 + 1

    def error(latents: torch.Tensor) -> float:
        with torch.no_grad():
            quantized, _, _ = model.eval().quantize(latents[None])
        return float((quantized[0] - latents).square().mean())

    model.kmeans_init_(old, batch_vectors=100, seed=0)
    before = error(new)
    model.refine_codebooks_(new, batch_vectors=100, iters=10)
    assert error(new) < 0.8 * before
    residual = new.clone()
    for q in range(2):
        book = model.rvq.layers[q]._codebook
        assert torch.allclose(book.embed_avg[0] / book.cluster_size[0][:, None], book.embed[0],
                              atol=1e-5)  # fmt: skip
        centroids = book.embed[0]
        _, assign = nearest(residual, centroids)
        used = torch.bincount(assign, minlength=16) > 0  # each used code sits at its mean
        means = torch.zeros(16, 16).index_add_(0, assign, residual)
        means = means / torch.bincount(assign, minlength=16).clamp_min(1)[:, None]
        assert torch.allclose(centroids[used], means[used], atol=0.5)
        residual = residual - centroids[assign]


@pytest.mark.parametrize(
    ("field", "value", "bound"),
    [("channels", 4096, "1024"), ("codebook_size", 65536, "8192"), ("levels", 17, "16"),
     ("blocks", 64, "16"), ("latent_dim", 5000, "1024")],
)
def test_sizes_past_the_bounds_are_refused_naming_the_bound(field: str, value: int, bound: str) -> None:
    """Before: only lower bounds were checked; channels=4096 built a model of ~1 GB before
    anything said no."""
    with pytest.raises(ConfigError, match=f"{field}.*{bound}"):
        VQVAEConfig.from_dict({field: value})


# -- weight norm and device sizes -------------------------------------------------------------


def test_weight_norm_model_keeps_shapes_and_loads_into_the_same_config() -> None:
    model = tiny_model(norm="weight", downsample=2).eval()
    x = fake_mels()
    assert model(x).recon.shape == x.shape
    assert any("parametrizations" in k for k in model.state_dict())
    again = VQVAE(model.config)
    again.load_state_dict(model.state_dict())
    assert torch.equal(again.eval()(x).recon, model(x).recon)


def test_device_size_fills_only_what_the_job_left_unset() -> None:
    cpu, why_cpu = choose_size("cpu", {})
    cuda, why_cuda = choose_size("cuda:0", {"channels": 128})
    assert cpu == {"channels": 256, "blocks": 3, "downsample": 1, "linear_path": True}
    assert "cpu" in why_cpu and "PCA" in why_cpu and "bits" in why_cpu
    assert cuda["channels"] == 128 and cuda["blocks"] > cpu["blocks"] and "cuda" in why_cuda
    assert choose_size("xpu", {})[0] == cpu  # unknown kinds get the CPU's size
    mine = {"channels": 64, "blocks": 1, "downsample": 2, "linear_path": False}
    assert choose_size("cuda", mine) == (
        mine, "channels, blocks, downsample and linear_path were set by the user.")
    assert VQVAEConfig.from_dict(cpu).channels == VQVAEConfig().channels  # defaults agree


# -- the PCA-initialised linear path ----------------------------------------------------------


def low_rank_mels(batch: int = 12, frames: int = 64, rank: int = 6) -> torch.Tensor:
    """Log-mel-like chunks that lie in a ``rank``-dimensional space of frames."""
    g = torch.Generator().manual_seed(2)
    basis = torch.randn(rank, 128, generator=g)  # (r, M)
    weights = torch.randn(batch, frames, rank, generator=g)  # (B, T, r)
    return (weights @ basis).transpose(1, 2) - 6  # (B, M, T)


@pytest.mark.parametrize(("downsample", "norm"), [(1, "none"), (2, "none"), (2, "weight")])
def test_pca_init_makes_the_unquantized_model_the_pca_codec(downsample: int, norm: str) -> None:
    # Frames of rank 6 through a latent of 16: the PCA basis holds them exactly, so the
    # continuous path (encode_latents -> decode_latents) gives them back at step 0.
    model = tiny_model(linear_path=True, downsample=downsample, norm=norm)
    mels = low_rank_mels()
    model.set_normalisation_(mels.mean(dim=(0, 2)), mels.std(dim=(0, 2)))
    with torch.no_grad():
        random_init = model.decode_latents(model.encode_latents(mels), mels.shape[-1])
    model.pca_init_(mels)
    with torch.no_grad():
        recon = model.decode_latents(model.encode_latents(mels), mels.shape[-1])
    assert float((recon - mels).abs().max()) < 1e-3
    assert float((random_init - mels).abs().mean()) > 0.5  # what it replaced was no codec


def test_pca_init_is_deterministic_and_leaves_models_without_the_path_alone() -> None:
    mels = low_rank_mels()
    states = []
    for _ in range(2):
        model = tiny_model(linear_path=True, downsample=2)
        model.set_normalisation_(mels.mean(dim=(0, 2)), mels.std(dim=(0, 2)))
        model.pca_init_(mels, max_vectors=100, seed=3)  # subsampled: still the same each time
        states.append(model.state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    plain = tiny_model()
    before = {k: v.clone() for k, v in plain.state_dict().items()}
    plain.pca_init_(mels)
    assert all(torch.equal(before[k], v) for k, v in plain.state_dict().items())


def test_a_latent_wider_than_a_frame_group_keeps_its_extra_rows_at_zero() -> None:
    # 8 mel bins x downsample 1 gives 8 components for a 16-wide latent.
    model = tiny_model(n_mels=8, linear_path=True)
    mels = low_rank_mels()[:, :8]
    model.set_normalisation_(mels.mean(dim=(0, 2)), mels.std(dim=(0, 2)))
    model.pca_init_(mels)
    w = model.encoder.linear.weight.detach()  # (D, M, 1)
    assert float(w[8:].abs().sum()) == 0.0 and float(w[:8].abs().sum()) > 0
    out = model(mels)
    assert out.recon.shape == mels.shape and torch.isfinite(out.recon).all()


# -- encoding by what the codes decode to ------------------------------------------------------


def _magnitude_error(model: VQVAE, codes: torch.Tensor, mel: torch.Tensor) -> float:
    recon = model.decode_codes(codes)[..., : mel.shape[-1]]
    return float(((recon.exp() - mel.exp()) ** 2).sum())


def pca_codec(downsample: int) -> VQVAE:
    """The PCA codec of low-rank training chunks, its codebooks k-means-fitted to their
    latents: a model that reconstructs what it was fitted to, as a trained one does."""
    model = tiny_model(linear_path=True, downsample=downsample)
    mels = low_rank_mels()
    model.set_normalisation_(mels.mean(dim=(0, 2)), mels.std(dim=(0, 2)))
    model.pca_init_(mels)
    with torch.no_grad():
        latents = model.encode_latents(mels).reshape(-1, TINY.latent_dim)  # (N, D)
    model.kmeans_init_(latents, batch_vectors=256)
    return model.eval()


@pytest.mark.parametrize("downsample", [1, 2])
def test_searched_codes_decode_closer_to_the_sound_than_the_nearest_ones(downsample: int) -> None:
    model = pca_codec(downsample)
    mel = low_rank_mels(batch=13)[12:] + 1.5  # louder than anything the codes were fitted to
    nearest = model.encode(mel)
    assert torch.equal(model.search_codes(mel, candidates=1), nearest)  # 1: nothing tried
    searched = model.search_codes(mel, candidates=8)
    assert searched.shape == nearest.shape and not torch.equal(searched, nearest)
    assert searched.min() >= 0 and searched.max() < TINY.codebook_size
    assert _magnitude_error(model, searched, mel) < 0.95 * _magnitude_error(model, nearest, mel)
    assert torch.equal(model.search_codes(mel, candidates=8), searched)  # deterministic


@pytest.mark.slow  # searches codes of a sound (seconds)
@pytest.mark.parametrize("downsample", [1, 2])
def test_the_search_keeps_a_code_no_trial_beats(downsample: int) -> None:
    # Sounds the codec makes itself, each encoded again: the code a step has is always among
    # its trials, so the search leaves no sound decoding worse than the quantizer's codes did
    # (with only the codes nearest to what the level should add tried, one of these came out
    # 37% worse than the quantizer's own), by what it minimises, over the whole sound (each
    # step is scored on its own window: without the last check one of these ended 2% worse)
    model = pca_codec(downsample)
    for mel in low_rank_mels(batch=13).split(1):
        mel = model.decode_codes(model.encode(mel))[..., : mel.shape[-1]]
        nearest, searched = model.encode(mel), model.search_codes(mel, candidates=2)
        errors = [float(search_error(model.decode_codes(c)[..., : mel.shape[-1]], mel[0]))
                  for c in (searched, nearest)]  # fmt: skip
        assert errors[0] <= errors[1]


def test_search_leaves_the_quiet_steps_as_the_quantizer_chose() -> None:
    model = pca_codec(1)
    mel = low_rank_mels(batch=13)[12:] + 1.5
    mel[..., 30:] = -40.0  # far below the loudest frames: nothing there to hear
    nearest, searched = model.encode(mel), model.search_codes(mel, candidates=8)
    assert torch.equal(searched[..., 40:], nearest[..., 40:])  # past the scored reach of step 29
    assert not torch.equal(searched[..., :26], nearest[..., :26])
    with pytest.raises(ConfigError, match="mel must be"):
        model.search_codes(fake_mels(batch=2), candidates=8)
