"""The prior (distill.shared.model.prior): config, shapes, teacher forcing, baselines."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from distill.shared.errors import ConfigError
from distill.shared.model.prior import (
    CACHE_DECAY,
    EARLIER_CODES,
    Prior,
    PriorConfig,
    PriorState,
    bigram_bits,
    choose_prior_config,
    prior_parameter_count,
    unigram_bits,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

TINY = PriorConfig(levels=2, codebook_size=8, embed_dim=16, hidden=32, layers=1, dropout=0.0)


def train(prior: Prior, codes: torch.Tensor, steps: int, lr: float = 1e-2) -> None:
    opt = torch.optim.Adam(prior.parameters(), lr=lr)
    prior.train()
    for _ in range(steps):
        opt.zero_grad()
        prior(codes).loss.backward()
        opt.step()
    prior.eval()


def markov_codes(batch: int, steps: int, k: int, seed: int) -> torch.Tensor:
    """Level 0 follows a sparse random Markov chain; level 1 is a function of level 0 plus noise."""
    gen = torch.Generator().manual_seed(seed)
    table = torch.randint(0, k, (k, 2), generator=gen)  # two likely successors per code
    out = torch.zeros(batch, 2, steps, dtype=torch.long)
    out[:, 0, 0] = torch.randint(0, k, (batch,), generator=gen)
    for t in range(1, steps):
        pick = torch.randint(0, 2, (batch,), generator=gen)
        out[:, 0, t] = table[out[:, 0, t - 1], pick]
    out[:, 1] = (out[:, 0] * 3 + 1) % k
    return out


# ---- config ------------------------------------------------------------------------------------


def test_config_round_trip() -> None:
    config = PriorConfig(levels=6, codebook_size=512, embed_dim=64, hidden=384, layers=2)
    assert PriorConfig.from_dict(config.to_dict()) == config
    assert PriorConfig.from_dict({**config.to_dict(), "dropout": 0}).dropout == 0.0


@pytest.mark.parametrize(
    ("bad", "field"),
    [
        ({"hidden": 5000}, "hidden"),
        ({"levels": 0}, "levels"),
        ({"levels": 17}, "levels"),
        ({"codebook_size": 9000}, "codebook_size"),
        ({"dropout": 0.95}, "dropout"),
        ({"layers": "2"}, "layers"),
        ({"hidden": 256.0}, "hidden"),
        ({"embed_dim": True}, "embed_dim"),
        ({"colour": 1}, "colour"),
    ],
)
def test_config_rejects(bad: dict[str, object], field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        PriorConfig.from_dict({**TINY.to_dict(), **bad})


def test_config_rejects_non_map() -> None:
    with pytest.raises(ConfigError, match="map"):
        PriorConfig.from_dict([1, 2])  # type: ignore[arg-type]


def test_choose_prior_config_grows_with_data() -> None:
    small, why_small = choose_prior_config(4, 256, 5_000)
    large, _ = choose_prior_config(4, 256, 2_000_000)
    assert (small.levels, small.codebook_size) == (4, 256)
    assert small.hidden < large.hidden and small.dropout > large.dropout
    assert "5000 training code steps" in why_small and "dropout" in why_small
    with pytest.raises(ConfigError, match="n_train_steps"):
        choose_prior_config(4, 256, -1)


def test_parameter_count_matches_model() -> None:
    configs = (TINY, PriorConfig(levels=3, codebook_size=64, layers=2, prev_codes=True))
    for config in configs:
        assert prior_parameter_count(config) == sum(p.numel() for p in Prior(config).parameters())


# ---- model -------------------------------------------------------------------------------------


def test_forward_shapes_and_finite_loss() -> None:
    prior = Prior(TINY)
    codes = torch.randint(0, 8, (3, 2, 11))
    out = prior(codes)
    assert out.logits.shape == (3, 11, 2, 8)
    assert torch.isfinite(out.loss)
    assert float(prior.nll_bits(codes)) == pytest.approx(float(out.loss.detach()) / math.log(2))
    assert prior.training  # nll_bits restores the mode


def test_state_dict_is_standard_lstm_layout() -> None:
    keys = set(Prior(TINY).state_dict())
    assert {"lstm.weight_ih_l0", "lstm.weight_hh_l0", "lstm.bias_ih_l0", "lstm.bias_hh_l0"} <= keys
    assert "offsets" not in keys  # derived from the config, not stored


@pytest.mark.parametrize(
    ("codes", "match"),
    [
        (torch.full((1, 2, 4), -1), "no code"),
        (torch.full((1, 2, 4), 8), r"0\.\.7"),
        (torch.zeros(1, 3, 4, dtype=torch.long), r"\(B, 2, T\)"),
        (torch.zeros(1, 2, 4), "integers"),
    ],
)
def test_rejects_invalid_codes(codes: torch.Tensor, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Prior(TINY)(codes)


def test_logits_are_causal() -> None:
    """Changing step t changes no logits before t, and level 1 of step t only from level 1 on."""
    prior = Prior(TINY).eval()
    codes = torch.randint(0, 8, (1, 2, 9))
    changed = codes.clone()
    changed[0, 0, 5] = (codes[0, 0, 5] + 1) % 8
    with torch.no_grad():
        a, b = prior(codes).logits, prior(changed).logits
    assert torch.equal(a[:, :5], b[:, :5])
    assert torch.equal(a[:, 5, 0], b[:, 5, 0])  # level 0 of step 5 does not see its own code
    assert not torch.equal(a[:, 5, 1], b[:, 5, 1])  # level 1 sees level 0 of the same step


@pytest.mark.parametrize(
    ("prev_codes", "earlier", "decay"),
    [(False, 0, 0.0), (True, 0, 0.0), (True, 2, 0.0), (False, 0, 0.5), (True, 1, 0.7)],
)
def test_the_step_api_gives_the_teacher_forced_logits(
    prev_codes: bool, earlier: int, decay: float
) -> None:
    """Step by step (what sampling runs) and in one forward pass (training): the same logits
    (with a cache: the same log-probabilities of the mix)."""
    config = dataclasses.replace(TINY, levels=3, layers=2, prev_codes=prev_codes,
                                 earlier_codes=earlier, cache_decay=decay)  # fmt: skip
    prior = Prior(config).eval()
    with torch.no_grad():
        for p in prior.parameters():  # nothing stays at its zero initialisation
            p.add_(torch.randn_like(p) * 0.1)
        if decay:
            prior.cache_bias.fill_(0.0)  # half from the cache
        codes = torch.randint(0, 8, (2, 3, 7))
        want = prior(codes).logits  # (B, T, Q, K)
        stepper = prior.stepper()

        def got(context: torch.Tensor, level: int, state: PriorState) -> torch.Tensor:
            if not decay:
                return stepper.level_logits(context, level, state)
            gates = stepper.cache_gates(stepper.head_context(state), state)
            return stepper.level_log_probs(context, level, state, gates)

        state = stepper.begin(2)
        for t in range(7):
            if t:
                state = stepper.advance(state, codes[:, :, t - 1])
            context = stepper.head_context(state)
            for level in range(3):
                torch.testing.assert_close(got(context, level, state), want[:, t, level],
                                           rtol=1e-4, atol=1e-5)  # fmt: skip
                if level < 2:
                    context = stepper.condition(context, level, codes[:, level, t])
        for cut in (1, 2, 4):  # a prefix: the state after step cut - 1
            resumed = stepper.begin(2, codes[:, :, :cut])
            torch.testing.assert_close(got(stepper.head_context(resumed), 0, resumed),
                                       want[:, cut, 0], rtol=1e-4, atol=1e-5)  # fmt: skip
    if prev_codes:
        with pytest.raises(ValueError, match="previous step"):
            stepper.level_logits(context, 0)


def test_the_cache_mixes_in_the_codes_the_sound_used() -> None:
    """With a cache, each prediction is a distribution (the mix sums to 1), the codes the sound
    used earlier at a level after the first gain probability there, the first level is the
    heads' alone, and ``code_nats`` (what training computes, the drawn code only) gives the
    forward pass's cross-entropy."""
    config = dataclasses.replace(TINY, levels=3, cache_decay=0.7)
    torch.manual_seed(0)
    prior = Prior(config).eval()
    codes = torch.tensor([[[3, 3, 5, 1, 3, 0], [2, 6, 6, 6, 7, 2], [3, 3, 5, 1, 3, 0]]])
    with torch.no_grad():
        prior.cache_bias.fill_(0.0)  # half from the cache
        logits = prior(codes).logits  # (1, T, Q, K)
        torch.testing.assert_close(logits.logsumexp(-1), torch.zeros(1, 6, 3))
        plain = Prior(dataclasses.replace(config, cache_decay=0.0))
        plain.load_state_dict({k: v for k, v in prior.state_dict().items() if "cache" not in k})
        base = torch.log_softmax(plain.eval()(codes).logits, -1)
        assert torch.equal(logits[:, 0], base[:, 0])  # nothing cached before the first step
        torch.testing.assert_close(logits[:, :, 0], base[:, :, 0])  # level 0: the heads only
        mixed, heads = logits[0].exp(), base[0].exp()  # (T, Q, K) probabilities
        # at step 5 the cache holds level 1's 2, 6, 6, 6, 7 and level 2's 3, 3, 5, 1, 3,
        # weighted 0.7^4 .. 1: code 3 has (0.7^4 + 0.7^3 + 1) / (1 + 0.7 + .. + 0.7^4) of level 2's
        weights = 0.7 ** torch.arange(4, -1, -1)
        for level, code, where in ((2, 3, [0, 1, 4]), (1, 6, [1, 2, 3]), (2, 6, [])):
            share = float(weights[where].sum() / weights.sum())
            want = 0.5 * float(heads[5, level, code]) + 0.5 * share  # the gate is at 0: half
            assert float(mixed[5, level, code]) == pytest.approx(want, rel=1e-4)
        nll, spread, heads_log = prior.code_nats(codes)  # (1, T, Q) each; (1, T, Q, K)
        want = -logits.gather(-1, codes.transpose(1, 2)[..., None])[..., 0]
        torch.testing.assert_close(nll, want)
        torch.testing.assert_close(spread, -base.mean(-1))  # the heads' own part
        torch.testing.assert_close(heads_log, base)
        assert float(prior(codes).loss) == pytest.approx(float(nll.mean()), rel=1e-5)


def test_cache_decay_defaults_off_for_older_files_and_is_sized() -> None:
    old = {k: v for k, v in TINY.to_dict().items() if k != "cache_decay"}
    assert PriorConfig.from_dict(old).cache_decay == 0.0
    with pytest.raises(ConfigError, match="cache_decay"):
        PriorConfig.from_dict({**old, "cache_decay": 1.0})
    assert "cache_gate" not in Prior(TINY).state_dict()
    sized, why = choose_prior_config(6, 512, 10_000)
    assert sized.cache_decay == CACHE_DECAY
    assert "the finer ones mixing in the codes they used earlier" in why
    assert choose_prior_config(2, 8, 400)[0].cache_decay == CACHE_DECAY  # a handful of sounds too
    assert sum(p.numel() for p in Prior(sized).parameters()) == prior_parameter_count(sized)


def test_prev_codes_defaults_off_for_older_files_and_on_when_sized() -> None:
    old = {k: v for k, v in TINY.to_dict().items() if k != "prev_codes"}
    assert PriorConfig.from_dict(old).prev_codes is False  # a file from before the field
    assert PriorConfig.from_dict({**old, "prev_codes": True}).prev_codes is True
    with pytest.raises(ConfigError, match="prev_codes"):
        PriorConfig.from_dict({**old, "prev_codes": 1})
    assert choose_prior_config(2, 8, 10_000)[0].prev_codes
    assert choose_prior_config(2, 8, 400)[0].prev_codes  # a handful of sounds too
    assert "prev_embed.weight" not in Prior(TINY).state_dict()


def test_earlier_codes_default_off_for_older_files_need_prev_codes_and_are_sized() -> None:
    old = {k: v for k, v in TINY.to_dict().items() if k != "earlier_codes"}
    assert PriorConfig.from_dict({**old, "prev_codes": True}).earlier_codes == 0
    with pytest.raises(ConfigError, match="needs prev_codes"):
        PriorConfig.from_dict({**old, "earlier_codes": 1})
    with pytest.raises(ConfigError, match="earlier_codes"):
        PriorConfig.from_dict({**old, "prev_codes": True, "earlier_codes": 9})
    sized = choose_prior_config(6, 512, 10_000)
    assert sized[0].earlier_codes == 1 and "last 2 codes" in sized[1]
    assert choose_prior_config(2, 8, 400)[0].earlier_codes == EARLIER_CODES
    prior = Prior(sized[0])
    assert prior.state_dict()["earlier_embed.weight"].shape == (6 * 512, sized[0].embed_dim)
    assert sum(p.numel() for p in prior.parameters()) == prior_parameter_count(sized[0])


def test_teacher_forcing_conditions_fine_levels_on_coarse() -> None:
    """Level 1 = f(level 0) of the same step, level 0 random: on fresh sequences level 1 costs
    ~0 bits (the mapping was learnt) while level 0 stays near its 3 bits."""
    gen = torch.Generator().manual_seed(0)

    def grid() -> torch.Tensor:
        coarse = torch.randint(0, 8, (32, 1, 32), generator=gen)
        return torch.cat([coarse, (coarse * 5 + 3) % 8], dim=1)  # (32, 2, 32)

    prior = Prior(dataclasses.replace(TINY, dropout=0.3))  # dropout: learn the rule, not the data
    torch.manual_seed(0)
    train(prior, grid(), steps=150)
    codes = grid()
    with torch.no_grad():
        logits = prior(codes).logits  # (B, T, Q, K)
    nll = torch.nn.functional.cross_entropy(
        logits.reshape(-1, 8), codes.transpose(1, 2).reshape(-1), reduction="none"
    ).view(32, 32, 2) / math.log(2)  # (B, T, Q) bits
    assert float(nll[..., 1].mean()) < 0.1
    assert float(nll[..., 0].mean()) > 2.5  # level 0 is random on fresh data: ~3 bits


@pytest.mark.slow
def test_trained_prior_beats_unigram_on_markov_codes() -> None:
    k = 16
    config = PriorConfig(levels=2, codebook_size=k, embed_dim=32, hidden=64, dropout=0.2)
    train_codes = markov_codes(16, 50, k, seed=1)  # 800 steps
    val_codes = markov_codes(24, 50, k, seed=1)[16:]  # the same chain, other sequences
    prior = Prior(config)
    torch.manual_seed(0)
    train(prior, train_codes, steps=120, lr=3e-3)  # before it overfits 800 steps
    prior_bits = float(prior.nll_bits(val_codes))
    unigram = unigram_bits(train_codes, val_codes, k)
    bigram = bigram_bits(train_codes, val_codes, k)
    assert prior_bits < unigram - 1.0, (prior_bits, unigram, bigram)
    assert prior_bits < bigram, (prior_bits, unigram, bigram)  # the chain is ~0.5 bits per code


# ---- baselines ---------------------------------------------------------------------------------


def test_unigram_uniform_codes_cost_log2_k() -> None:
    codes = torch.arange(8).repeat(2, 1).unsqueeze(0)  # (1, 2, 8): every code once per level
    assert unigram_bits(codes, codes, 8) == pytest.approx(3.0)


def test_bigram_learns_a_cycle() -> None:
    cycle = (torch.arange(400) % 4).repeat(2, 1)  # (2, 400): 0 1 2 3 0 1 ...
    bits = bigram_bits([cycle], [cycle], 4)
    assert bits < 0.1 < unigram_bits([cycle], [cycle], 4) == pytest.approx(2.0, abs=0.01)


def test_baselines_reject_bad_codes() -> None:
    good = torch.zeros(2, 5, dtype=torch.long)
    with pytest.raises(ValueError, match=r"0\.\.3"):
        unigram_bits([good], [good - 1], 4)
    with pytest.raises(ValueError, match="levels"):
        bigram_bits([good], [torch.zeros(3, 5, dtype=torch.long)], 4)
