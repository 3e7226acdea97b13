"""Sampling from the prior (distill.shared.model.sampling): params, determinism, prefix, regions."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from distill.shared.errors import ConfigError
from distill.shared.model import prior as prior_module
from distill.shared.model.prior import OneItemStepper, Prior, PriorConfig
from distill.shared.model.sampling import (
    NOISE_CHUNK_STEPS,
    SamplingParams,
    _apart,
    _apart_np,
    _draw_steps,
    _filter_logits,
    _generator,
    _gumbel,
    resample_region,
    sample,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

TINY = PriorConfig(levels=3, codebook_size=16, embed_dim=16, hidden=32, layers=2, dropout=0.0)
WINDOW = 12  # the longest sequence the tiny priors are trained on


@pytest.fixture(scope="module")
def prior() -> Prior:
    torch.manual_seed(0)
    return Prior(TINY).eval()  # untrained: near-uniform, so draws differ from seed to seed


@pytest.fixture(scope="module")
def cyclic_prior() -> Prior:
    """A prior trained to certainty on a cycle of 5 steps: codes (t % 5, 2t % 7, (t + 3) % 5)."""
    config = PriorConfig(levels=3, codebook_size=8, embed_dim=16, hidden=32, dropout=0.0)
    t = torch.arange(40)
    one = torch.stack([t % 5, (2 * (t % 5)) % 7, (t + 3) % 5])  # (3, 40)
    codes = torch.stack([one.roll(-s, 1)[:, :WINDOW] for s in range(5)])  # (5, 3, WINDOW)
    torch.manual_seed(0)
    model = Prior(config)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(300):
        opt.zero_grad()
        model(codes).loss.backward()
        opt.step()
    return model.eval()


def cycle_continues(codes: torch.Tensor, first: int | None) -> bool:
    """Whether codes (B, 3, T) are the cycle from step ``first`` (None: from any phase, the
    phase read from the first code, which a prior without a prefix cannot know)."""
    if first is None:
        return all(cycle_continues(item[None], int(item[0, 0])) for item in codes)
    t = torch.arange(first, first + codes.shape[2]) % 5
    want = torch.stack([t, (2 * t) % 7, (t + 3) % 5])  # (3, T)
    return bool((codes == want).all())


# ---- params ------------------------------------------------------------------------------------


def test_params_round_trip() -> None:
    params = SamplingParams(temperature=0.8, top_k=40, top_p=0.9, seed=12345)
    assert SamplingParams.from_dict(params.to_dict()) == params
    assert SamplingParams.from_dict({"temperature": 1, "top_p": 1}).temperature == 1.0


@pytest.mark.parametrize(
    ("bad", "field"),
    [
        ({"temperature": 0.0}, "temperature"),
        ({"temperature": -1.0}, "temperature"),
        ({"temperature": "hot"}, "temperature"),
        ({"top_k": -1}, "top_k"),
        ({"top_k": 2.5}, "top_k"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"seed": -3}, "seed"),
        ({"seed": True}, "seed"),
        ({"min_p": -0.1}, "min_p"),
        ({"min_p": 1.0}, "min_p"),
        ({"beam": 4}, "beam"),
    ],
)
def test_params_reject(bad: dict[str, object], field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        SamplingParams.from_dict(bad)


# ---- sample ------------------------------------------------------------------------------------


def test_shapes_and_range(prior: Prior) -> None:
    codes = sample(prior, batch=3, steps=7, params=SamplingParams())
    assert codes.shape == (3, 3, 7) and codes.dtype == torch.long
    assert int(codes.min()) >= 0 and int(codes.max()) < 16
    assert sample(prior, batch=2, steps=0, params=SamplingParams()).shape == (2, 3, 0)


def test_same_seed_same_codes_other_seed_differs(prior: Prior) -> None:
    state = torch.random.get_rng_state()
    a = sample(prior, batch=2, steps=30, params=SamplingParams(seed=7))
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG is not used
    assert torch.equal(a, sample(prior, batch=2, steps=30, params=SamplingParams(seed=7)))
    assert not torch.equal(a, sample(prior, batch=2, steps=30, params=SamplingParams(seed=8)))


def test_batch_items_are_independent_draws(prior: Prior) -> None:
    codes = sample(prior, batch=4, steps=20, params=SamplingParams(seed=1))
    assert len({tuple(item.flatten().tolist()) for item in codes}) == 4


def test_length_past_training_window(cyclic_prior: Prior) -> None:
    steps = 3 * NOISE_CHUNK_STEPS + 5  # far past WINDOW, across noise chunks
    codes = sample(cyclic_prior, batch=2, steps=steps, params=SamplingParams(top_k=1))
    assert codes.shape == (2, 3, steps)
    assert cycle_continues(codes, None)


def greedy(prior: Prior, steps: int) -> torch.Tensor:
    """Argmax at every level of every step, through the prior's step API."""
    stepper = prior.stepper()
    with torch.no_grad():
        state = stepper.begin(1)
        columns: list[torch.Tensor] = []
        for t in range(steps):
            if t:
                state = stepper.advance(state, columns[-1])
            context = stepper.head_context(state)
            codes = []
            for level in range(prior.config.levels):
                codes.append(stepper.level_logits(context, level, state).argmax(-1))
                if level + 1 < prior.config.levels:
                    context = stepper.condition(context, level, codes[-1])
            columns.append(torch.stack(codes, 1))
    return torch.stack(columns, 2)  # (1, Q, steps)


def test_top_k_one_is_greedy_and_small_top_p_too(prior: Prior) -> None:
    want = greedy(prior, 25)
    for seed in (0, 1):
        assert torch.equal(
            sample(prior, batch=1, steps=25, params=SamplingParams(top_k=1, seed=seed)), want
        )
        assert torch.equal(
            sample(prior, batch=1, steps=25, params=SamplingParams(top_p=1e-6, seed=seed)), want
        )


def test_low_temperature_approaches_greedy(prior: Prior) -> None:
    cold = sample(prior, batch=1, steps=25, params=SamplingParams(temperature=1e-4, seed=3))
    assert torch.equal(cold, greedy(prior, 25))


def test_top_k_keeps_draws_among_the_k_likeliest(prior: Prior) -> None:
    """With top_k=2 the level-0 code of step 0 is always one of the two likeliest."""
    stepper = prior.stepper()
    with torch.no_grad():
        logits = stepper.level_logits(stepper.head_context(stepper.begin(1)), 0)  # (1, K)
    allowed = set(logits.topk(2).indices.flatten().tolist())
    firsts = {int(sample(prior, batch=1, steps=1, params=SamplingParams(top_k=2, seed=s))[0, 0, 0])
              for s in range(30)}  # fmt: skip
    assert firsts <= allowed and len(firsts) == 2


def test_min_p_keeps_draws_among_the_codes_near_the_likeliest(prior: Prior) -> None:
    """With min_p the level-0 code of step 0 is one whose probability is at least min_p times
    the likeliest code's; with min_p 0 the rest are drawn too."""
    stepper = prior.stepper()
    with torch.no_grad():
        probs = stepper.level_logits(stepper.head_context(stepper.begin(1)), 0).softmax(-1)[0]
    share = 0.95  # the untrained prior is nearly flat: keeps a few of its 16 codes
    allowed = set(torch.nonzero(probs >= share * probs.max()).flatten().tolist())
    assert 1 < len(allowed) < len(probs)

    def firsts(min_p: float) -> set[int]:
        drawn = sample(prior, batch=400, steps=1, params=SamplingParams(min_p=min_p, seed=0))
        return set(drawn[:, 0, 0].tolist())

    assert firsts(share) == allowed
    assert firsts(0.0) > allowed  # off: codes below the cut are drawn too


def test_a_level_keeps_its_code_at_the_priors_odds_and_moves_at_the_change_temperature() -> None:
    """Drawn apart, the previous code keeps exactly its probability p; the other codes share
    1 - p in proportion to their probabilities to the power 1 / change_temperature, after
    min-p among them (relative to the likeliest of them); numpy gives torch's numbers."""
    probs = torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05], [0.1, 0.4, 0.3, 0.15, 0.05]])
    prev = torch.tensor([0, 1])
    params = SamplingParams(change_temperature=0.5, min_p=0.3)
    got = _apart(probs.log(), prev, params).exp()
    assert got.sum(-1).tolist() == pytest.approx([1.0, 1.0])
    # row 0 keeps 0.5; the others 0.2, 0.15, 0.1 (0.05 < 0.3 x 0.2 is cut), squared
    others = torch.tensor([0.04, 0.0225, 0.01])
    want0 = torch.cat([torch.tensor([0.5]), 0.5 * others / others.sum(), torch.zeros(1)])
    assert got[0].tolist() == pytest.approx(want0.tolist(), abs=1e-6)
    # row 1 keeps 0.4 (not the other codes' likeliest); 0.05 < 0.3 x 0.3 is cut
    others = torch.tensor([0.01, 0.09, 0.0225])
    want1 = torch.tensor([0.6 * 0.01, 0.4, 0.6 * 0.09, 0.6 * 0.0225, 0.0]) / torch.tensor(
        [others.sum(), 1.0, others.sum(), others.sum(), 1.0])
    assert got[1].tolist() == pytest.approx(want1.tolist(), abs=1e-6)
    for row in range(2):
        logits = probs[row].log().numpy().copy()
        _apart_np(logits, int(prev[row]), np.float32(math.log(0.3)), np.float32(0.5))
        np.testing.assert_allclose(np.exp(logits), got[row].numpy(), atol=1e-7)
    # a certain code stays certain, and so does a draw with nothing else left (top-k 1)
    certain = _apart(torch.tensor([[0.0, -math.inf, -math.inf]]), torch.tensor([0]), params)
    assert certain.exp().tolist() == [[1.0, 0.0, 0.0]]
    row = np.array([0.0, -np.inf, -np.inf], dtype=np.float32)
    _apart_np(row, 0, np.float32(math.log(0.3)), np.float32(0.5))
    assert np.exp(row).tolist() == [1.0, 0.0, 0.0]


def test_drawn_apart_the_code_is_kept_as_often_as_the_prior_says() -> None:
    """Many draws from one distribution through the filter and Gumbel-max: the previous code
    is kept at its probability, the others come at the change temperature's odds; and with the
    change temperature 1 the draw is the plain one (min-p over all codes)."""
    logits = torch.tensor([0.6, 0.25, 0.1, 0.05]).log().expand(40_000, -1)
    prev = torch.zeros(40_000, dtype=torch.long)
    noise = _gumbel(torch.Generator().manual_seed(0), (40_000, 4), torch.device("cpu"))

    def shares(params: SamplingParams) -> list[float]:
        drawn = (_filter_logits(logits, params, prev=prev) + noise).argmax(-1)
        return (torch.bincount(drawn, minlength=4) / 40_000).tolist()

    others = torch.tensor([0.25, 0.1, 0.05]) ** 2
    want = [0.6] + (0.4 * others / others.sum()).tolist()
    assert shares(SamplingParams(change_temperature=0.5, min_p=0.0)) == pytest.approx(want, abs=0.01)
    plain = shares(SamplingParams(change_temperature=1.0, min_p=0.0))
    assert plain == pytest.approx([0.6, 0.25, 0.1, 0.05], abs=0.01)
    # min-p 0.3 off: over all codes it cuts 0.1 and 0.05 (below 0.3 x 0.6), among the others
    # only 0.05 (below 0.3 x 0.25): the kept code's share is not raised
    assert shares(SamplingParams(change_temperature=1.0, min_p=0.3)) == pytest.approx(
        [0.6 / 0.85, 0.25 / 0.85, 0.0, 0.0], abs=0.01)
    assert shares(SamplingParams(change_temperature=1.01, min_p=0.3))[0] == pytest.approx(0.6, abs=0.01)


def test_prefix_continues_the_cycle(cyclic_prior: Prior) -> None:
    t = torch.arange(7)
    prefix = torch.stack([t % 5, (2 * (t % 5)) % 7, (t + 3) % 5]).unsqueeze(0)  # (1, 3, 7)
    new = sample(cyclic_prior, batch=3, steps=20, params=SamplingParams(seed=5), prefix=prefix)
    assert new.shape == (3, 3, 20)  # only the new steps
    assert cycle_continues(new, 7)


def test_prefix_must_match_batch(prior: Prior) -> None:
    with pytest.raises(ValueError, match="prefix batch"):
        sample(
            prior,
            batch=3,
            steps=2,
            params=SamplingParams(),
            prefix=torch.zeros(2, 3, 4, dtype=torch.long),
        )


def test_bad_arguments(prior: Prior) -> None:
    with pytest.raises(ValueError, match="batch"):
        sample(prior, batch=0, steps=2, params=SamplingParams())
    with pytest.raises(ValueError, match="steps"):
        sample(prior, batch=1, steps=-1, params=SamplingParams())


# ---- resample_region ---------------------------------------------------------------------------


def test_resample_region_keeps_outside(prior: Prior) -> None:
    codes = sample(prior, batch=2, steps=30, params=SamplingParams(seed=11))
    before = codes.clone()
    out = resample_region(prior, codes, 10, 20, SamplingParams(seed=12))
    assert torch.equal(codes, before)  # the input is not changed
    assert torch.equal(out[:, :, :10], codes[:, :, :10])
    assert torch.equal(out[:, :, 20:], codes[:, :, 20:])
    assert not torch.equal(out[:, :, 10:20], codes[:, :, 10:20])
    assert torch.equal(out, resample_region(prior, codes, 10, 20, SamplingParams(seed=12)))


def test_resample_region_follows_what_comes_before(cyclic_prior: Prior) -> None:
    t = torch.arange(30)
    codes = torch.stack([t % 5, (2 * (t % 5)) % 7, (t + 3) % 5]).unsqueeze(0)  # (1, 3, 30)
    damaged = codes.clone()
    damaged[:, :, 12:18] = 0
    assert torch.equal(
        resample_region(cyclic_prior, damaged, 12, 18, SamplingParams(seed=2)), codes
    )


@pytest.mark.parametrize(("t0", "t1"), [(5, 5), (6, 2), (-1, 3), (0, 31), (2.0, 4)])
def test_resample_region_rejects_bad_regions(prior: Prior, t0: object, t1: object) -> None:
    codes = torch.zeros(1, 3, 30, dtype=torch.long)
    with pytest.raises(ValueError, match="t0 < t1 <= 30"):
        resample_region(prior, codes, t0, t1, SamplingParams())  # type: ignore[arg-type]


def test_resample_region_rejects_missing_codes(prior: Prior) -> None:
    codes = torch.zeros(1, 3, 30, dtype=torch.long)
    codes[0, 2, 4] = -1
    with pytest.raises(ValueError, match="no code"):
        resample_region(prior, codes, 10, 20, SamplingParams())


# ---- a prior with a cache ----------------------------------------------------------------------


def cache_prior(bias: float) -> Prior:
    """An untrained prior with a cache whose share of every prediction is sigmoid(bias)."""
    torch.manual_seed(0)
    prior = Prior(PriorConfig(levels=3, codebook_size=16, embed_dim=16, hidden=32,
                              dropout=0.0, cache_decay=0.7)).eval()  # fmt: skip
    with torch.no_grad():
        prior.cache_bias.fill_(bias)
    return prior


@pytest.mark.parametrize("batch", [1, 3])
def test_a_cache_only_prior_draws_the_codes_the_sound_used(batch: int) -> None:
    """Drawn from the cache alone, every step after the first repeats, at each level after the
    first, a code that level drew before; the first level comes from the heads (batch 1 draws
    only the chosen part; larger batches draw both)."""
    codes = sample(cache_prior(30.0), batch=batch, steps=20, params=SamplingParams(seed=4))
    assert codes.shape == (batch, 3, 20)
    assert bool((codes[:, 1:, 1:] == codes[:, 1:, :1]).all())  # the first step's codes, held
    assert not bool((codes[:, 0, 1:] == codes[:, 0, :1]).all())  # the untrained heads move
    mixed = sample(cache_prior(0.0), batch=batch, steps=40, params=SamplingParams(seed=4))
    assert not bool((mixed[:, 1:, 1:] == mixed[:, 1:, :1]).all())  # half from the heads


def test_the_cache_part_draws_by_the_decayed_counts() -> None:
    """After a prefix whose level has code 2 then code 9, the cache part gives 9 weight 1 and 2
    weight 0.7: drawn 9 in 1 / 1.7 = 59% of the draws, at batch 1 and in a batch; at
    temperature 0.3 the weights are raised to 1 / 0.3, as the heads' probabilities are."""
    prior = cache_prior(30.0)
    prefix = torch.tensor([[[2, 9], [2, 9], [9, 2]]])  # (1, Q 3, T 2): level 2 the other way

    def share_of_nine(params: SamplingParams, batch: int, level: int) -> float:
        drawn = sample(prior, batch=batch, steps=1, params=params, prefix=prefix)[:, level, 0]
        assert set(drawn.tolist()) <= {2, 9}
        return float((drawn == 9).float().mean())

    assert share_of_nine(SamplingParams(seed=1), 4000, 1) == pytest.approx(1 / 1.7, abs=0.03)
    assert share_of_nine(SamplingParams(seed=1), 4000, 2) == pytest.approx(0.7 / 1.7, abs=0.03)
    ones = [share_of_nine(SamplingParams(seed=s), 1, 1) for s in range(300)]
    assert sum(ones) / len(ones) == pytest.approx(1 / 1.7, abs=0.07)
    colder = share_of_nine(SamplingParams(seed=1, temperature=0.3), 4000, 1)
    assert colder == pytest.approx(1 / (1 + 0.7 ** (1 / 0.3)), abs=0.03)  # 0.77


def stirred_prior(prev_codes: bool, earlier: int, decay: float, layers: int = 1) -> Prior:
    """An untrained 4 x 16 prior with every weight moved off its initialisation (nothing at
    zero), half its finer levels drawn from the cache when it has one."""
    torch.manual_seed(0)
    prior = Prior(PriorConfig(levels=4, codebook_size=16, embed_dim=16, hidden=32, layers=layers,
                              dropout=0.0, prev_codes=prev_codes, earlier_codes=earlier,
                              cache_decay=decay)).eval()  # fmt: skip
    with torch.no_grad():
        for p in prior.parameters():
            p.add_(torch.randn_like(p) * 0.3)
        if decay:
            prior.cache_bias.fill_(0.0)  # half the levels from the cache
    return prior


@pytest.mark.parametrize(("prev_codes", "earlier", "decay"),
                         [(False, 0, 0.0), (True, 1, 0.0), (True, 1, 0.7), (False, 0, 0.5)])  # fmt: skip
def test_the_one_item_step_draws_what_the_step_api_gives(
    prev_codes: bool, earlier: int, decay: float
) -> None:
    """``PriorStepper.draw_one`` (what sampling runs at batch 1) picks, level by level, from the
    same logits the step API gives: the heads', or the cache's where the level's gate beats the
    choice noise; and the finer levels see the coarser codes it drew."""
    prior = stirred_prior(prev_codes, earlier, decay)
    stepper, gen = prior.stepper(), torch.Generator().manual_seed(1)
    from_cache = 0
    with torch.inference_mode():
        state = stepper.begin(1, torch.randint(0, 16, (1, 4, 3), generator=gen))
        for _ in range(30):
            noise = -torch.empty(4, 1, 16).exponential_(generator=gen).log()  # Gumbel
            choice = (torch.rand(3, generator=gen) * 4 - 2).tolist()
            got = stepper.draw_one(state, lambda logits, level, n=noise: (logits + n[level]).argmax(-1),
                                   choice if decay else None)  # fmt: skip
            context = stepper.head_context(state)
            gates = stepper.cache_gates(context, state)
            want = []
            for level in range(4):
                cached = gates is not None and level > 0 and float(gates[0, level]) > choice[level - 1]
                from_cache += cached
                logits = (stepper.cache_logits(state, level) if cached
                          else stepper.level_logits(context, level, state))  # fmt: skip
                want.append((logits + noise[level]).argmax(-1))
                if level < 3:
                    context = stepper.condition(context, level, want[-1])
            assert torch.equal(got, torch.stack(want, 1))
            state = stepper.advance(state, got)
    assert (from_cache > 10) == bool(decay)  # the cache's part was drawn from


@pytest.mark.parametrize(("prev_codes", "earlier", "decay", "layers"),
                         [(False, 0, 0.0, 1), (True, 1, 0.0, 1), (True, 1, 0.7, 1),
                          (True, 2, 0.7, 2), (False, 0, 0.5, 2)])  # fmt: skip
@pytest.mark.parametrize("gate_table", [True, False])
def test_one_item_draws_in_numpy_are_the_torch_loops_draws(
    prev_codes: bool, earlier: int, decay: float, layers: int, gate_table: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """At batch 1 on a CPU, sampling runs ``OneItemStepper`` (numpy): for every filter, with and
    without a prefix, across noise chunks, it draws the codes the torch loop draws; with the
    first layer's input gates from its per-code table and, past GATE_TABLE_BYTES, without."""
    if not gate_table:
        monkeypatch.setattr(prior_module, "GATE_TABLE_BYTES", 0)
    prior = stirred_prior(prev_codes, earlier, decay, layers)
    stepper = prior.stepper()
    with torch.inference_mode():
        one = OneItemStepper(stepper, stepper.begin(1))
    assert (one.gate_table is not None) == gate_table
    prefix = torch.randint(0, 16, (1, 4, 5), generator=torch.Generator().manual_seed(2))
    steps = NOISE_CHUNK_STEPS + 9
    for params in (SamplingParams(seed=3), SamplingParams(seed=4, temperature=0.7),
                   SamplingParams(seed=10, change_temperature=0.5),
                   SamplingParams(seed=5, top_k=3, min_p=0.0), SamplingParams(seed=6, top_p=0.8),
                   SamplingParams(seed=7, min_p=0.2, temperature=1.5),
                   SamplingParams(seed=8, change_temperature=1.0),
                   SamplingParams(seed=9, change_temperature=2.0, top_k=5, min_p=0.1)):  # fmt: skip
        for start in (None, prefix):
            got = []
            last = None if start is None else start[:, :, -1]
            for numpy_one_item in (True, False):
                stepper = prior.stepper()
                with torch.inference_mode():
                    got.append(_draw_steps(stepper, stepper.begin(1, start), steps, params,
                                           _generator(prior, params.seed), numpy_one_item,
                                           last=last))  # fmt: skip
            assert got[0].shape == (1, 4, steps) and got[0].dtype == torch.long
            assert torch.equal(got[0], got[1]), (params, start is None)
    # and sample() at batch 1 is that loop
    params = SamplingParams(seed=11)
    stepper = prior.stepper()
    with torch.inference_mode():
        torch_loop = _draw_steps(stepper, stepper.begin(1), 30, params,
                                 _generator(prior, params.seed), numpy_one_item=False)  # fmt: skip
    assert torch.equal(sample(prior, batch=1, steps=30, params=params), torch_loop)
    # with a prefix, its last step is the one the first drawn step keeps or moves from
    params, drawn = SamplingParams(seed=12, change_temperature=0.5), []
    for last in (prefix[:, :, -1].expand(64, -1), None):
        stepper = prior.stepper()
        with torch.inference_mode():
            drawn.append(_draw_steps(stepper, stepper.begin(64, prefix), 2, params,
                                     _generator(prior, params.seed), last=last))  # fmt: skip
    assert torch.equal(sample(prior, batch=64, steps=2, params=params, prefix=prefix), drawn[0])
    assert not torch.equal(drawn[0][:, :, 0], drawn[1][:, :, 0])


def test_one_item_gate_table_is_kept_until_the_weights_change() -> None:
    """The per-code gate table is built once per prior and built again when its embeddings or
    W_ih change, in place or through ``.data`` (which no version counter sees): the numpy
    draws stay the torch loop's."""
    prior = stirred_prior(True, 1, 0.7, 1)

    def table() -> object:
        stepper = prior.stepper()
        with torch.inference_mode():
            return OneItemStepper(stepper, stepper.begin(1)).gate_table

    def draws_match() -> bool:
        params, got = SamplingParams(seed=8), []
        for numpy_one_item in (True, False):
            stepper = prior.stepper()
            with torch.inference_mode():
                got.append(_draw_steps(stepper, stepper.begin(1), 40, params,
                                       _generator(prior, params.seed), numpy_one_item))  # fmt: skip
        return torch.equal(got[0], got[1])

    first = table()
    assert first is not None and table() is first and draws_match()
    with torch.no_grad():
        prior.lstm.weight_ih_l0.mul_(1.5)
    second = table()
    assert second is not first and draws_match()
    prior.input_embed.weight.data.add_(0.1)
    assert table() is not second and draws_match()


def test_one_item_draws_hold_numpy_blas_to_one_thread() -> None:
    """While one item is drawn in numpy, its BLAS runs on one thread (not every core of the
    machine, beside the worker's own torch threads), and gets its threads back after."""
    from threadpoolctl import threadpool_info

    from distill.shared.model.sampling import _one_blas_thread

    def blas_threads() -> list[int]:
        return [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"]

    before = blas_threads()
    with _one_blas_thread():
        assert blas_threads() and all(n == 1 for n in blas_threads())
    assert blas_threads() == before


def test_temperatures_below_what_float32_carries_are_refused() -> None:
    from distill.shared.model.sampling import MIN_TEMPERATURE

    for name in ("temperature", "change_temperature"):
        for tiny in (1e-40, 1e-300, MIN_TEMPERATURE / 2):
            with pytest.raises(ConfigError, match=f"{name} must be > 0 \\(at least 1e-06\\)"):
                SamplingParams(**{name: tiny})
        assert getattr(SamplingParams(**{name: MIN_TEMPERATURE}), name) == MIN_TEMPERATURE
