"""Sampling code grids from a trained prior: new sounds, continuations, resampled regions.

Pure functions of the model (the inference worker calls them). Randomness comes only from a
``torch.Generator`` seeded with ``SamplingParams.seed`` on the prior's device: the same seed on
the same device gives the same codes, and the global RNG is never touched. The items of one
batch are independent draws (each draw is Gumbel-max with its own noise).

The loop runs under ``torch.inference_mode`` and calls the prior's step API, which runs the LSTM
maths with ``torch.lstm_cell`` on the ``nn.LSTM`` weights (no oneDNN in the loop, so its switch
is left alone); one item on a CPU runs the same maths in numpy (``OneItemStepper``: the same
codes, twice as fast and more); ``_draw_steps`` and ``PriorStepper`` have the measured choices.

A prior with a cache predicts a mix of two parts (its heads, and the codes the sound used so
far): each code is drawn by first choosing the part (the cache with probability
sigmoid(gate / temperature)), then a code from that part, which is an exact draw from the mix
at temperature 1 and costs no more than a draw from the heads (at batch 1 only the chosen part
is computed). Temperature, min-p, top-k and top-p shape each part as they shape the heads alone.

Whether a level keeps its code and which code it moves to are drawn apart
(``SamplingParams.change_temperature``): after the first step, each level's previous code keeps
the probability the prior gives it, and the rest of the probability goes to the other codes at
the change temperature (min-p counted among them). See CHANGE_TEMPERATURE for why.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from functools import partial
from typing import Any

import numpy as np
import torch
from threadpoolctl import ThreadpoolController
from torch import Tensor

from distill.shared.configs import config_from_dict
from distill.shared.errors import ConfigError
from distill.shared.model.prior import OneItemStepper, Prior, PriorState, PriorStepper

MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed takes a 64-bit seed
# Gumbel noise is drawn for this many steps at once: one RNG call instead of one per level, and
# bounded memory (64 x Q x B x K floats) at any length. Changing it changes what a seed draws.
NOISE_CHUNK_STEPS = 64
# Drawn apart (SamplingParams.change_temperature below 1), which code a level moves to is drawn
# at that temperature; whether it moves at all, at the prior's own probability. It helps some
# models and hurts others, so a prior's training chooses it for its model
# (inference.choose_change_temperature); off here, for a model without a choice. A prior learns where a sound goes next as a wide spread over many
# codes (it has seen each transition a few times, and label smoothing widens it further), and a
# free-running draw that follows the whole spread wanders; min-p, there to cut the smoothing's
# floor, also cut that thin spread, and so held codes longer than the prior meant. Measured with
# bench/prior.py's envelopes (192 draws of 2 s; seconds from the peak to the last frame within
# 20 dB of it, quantiles 10/25/50/75/90; share still within 20 dB after 1 s; share that start a
# second sound after 0.1 s quiet), the default pipeline's percussion prior: the files 0.04 0.08
# 0.18 0.37 0.85, 8.7%, none; drawn as before (1) 0.04 0.10 0.27 0.83 1.48, 27.6%, 6.2%; at 0.5
# 0.03 0.10 0.21 0.47 1.07, 13.0%, 3.6%; at 0.7 0.20 s median but 1.64 s at the 90th percentile
# and 9.4% second sounds. A second run of the same pipeline (96 draws): at 1 0.04 0.09 0.27 0.70
# 1.45, 20.8%, 2.1%; at 0.5 0.05 0.12 0.28 0.66 1.31, 18.8%, 6.2%: no better. The textures (sustained sounds and loops, the files' first 2 s: 0.60 s
# median, 55.6% still loud after a second, 5.6% second sounds) ring on at either setting: 1.02 s
# and 88.5% drawn as before, 1.35 s and 93.8% at 0.5, with half the second sounds (14.1% ->
# 7.3%). Two priors of the first 36 percussion files draw as their files ring without it (files
# 0.31 s median, 15.6% loud after a second; 512 x 5 codebooks: 0.26 s, 14.1%, 2.6% second sounds)
# or a little longer (256 x 8, all 8 levels drawn: 0.39 s, 29.7%, 13.0%), and at 0.5 ring longer
# (0.28 s but 25.0% loud; 0.28 s, 1.53 s at the 75th percentile, 35.4%, 9.9%): each model's
# own draws decide (bench/prior.py prints both settings). Plain temperature cannot
# do this: below 1 it makes holding likelier too (percussion at 0.7: half the draws loud after a
# second). Drawn seconds matching a training window at
# >= 90% of codes (bench/prior.py's memorisation figure, goal <= 10%): 0.5%, 1.5% as before;
# the median agreement with the closest window 37% (12% before; held-out chunks 15%): more of a
# draw is the silence after a hit. 1 is off: the draw as before it existed, which recipes
# without it replay.
CHANGE_TEMPERATURE = 1.0
# The lowest temperature and change temperature: the one-item sampler divides float32 logits by
# np.float32(t), which is 0 at 1e-300 (inf and NaN logits; a ZeroDivisionError in _apart_np) and
# subnormal below 1.2e-38 (1e-40 overflowed to inf and drew a fixed, wrong code). A prior's
# logits lie within a few hundred of each other: divided by 1e-6, twice over (temperature, then
# change temperature on log-probabilities), they stay under ~1e15, far from float32's 3.4e38.
# Nothing is lost: any temperature under ~1e-3 already draws the greedy code.
MIN_TEMPERATURE = 1e-6


@dataclass(frozen=True)
class SamplingParams:
    """How codes are drawn from the prior's distribution at each level of each step."""

    temperature: float = 1.0  # 1 draws from the learnt distribution; lower is safer, duller
    top_k: int = 0  # 0 = off; else keep only the k likeliest codes of each level
    top_p: float = 1.0  # 1 = off; else keep the likeliest codes holding this much probability
    seed: int = 0  # same seed + same device -> same codes
    # 0 = off; else drop codes less likely than min_p x the likeliest one. On by default: the
    # prior is trained with label smoothing, which leaves a floor of probability on every code
    # (0.1 / K) that a draw would otherwise pick now and then as an odd code, heard as a click.
    # Measured on percussion, 400 draws of 2 s: isolated 10 dB spikes 0.24 per second with no
    # cut, 0.014 at 0.01 (a prior trained without smoothing, drawn with no cut: 0.095).
    min_p: float = 0.01
    # Below or above 1: after the first step, each level keeps its previous code at the
    # prior's probability and draws which code it moves to at this temperature (min-p counted
    # among those codes); 1 = off. Requests and options without it take their model's choice
    # (inference.sampling_params); see CHANGE_TEMPERATURE.
    change_temperature: float = CHANGE_TEMPERATURE

    def __post_init__(self) -> None:
        for name, kind in (("temperature", float), ("top_k", int), ("top_p", float),
                           ("seed", int), ("min_p", float),
                           ("change_temperature", float)):  # fmt: skip
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(
                value, (int, float) if kind is float else int
            ):
                raise ConfigError(f"SamplingParams: {name} must be {kind.__name__}, got {value!r}")
        checks = [
            ("temperature", MIN_TEMPERATURE <= self.temperature <= 100,
             f"must be > 0 (at least {MIN_TEMPERATURE:g}) and <= 100"),
            ("top_k", self.top_k >= 0, "must be >= 0 (0 = off)"),
            ("top_p", 0 < self.top_p <= 1, "must be in (0, 1] (1 = off)"),
            ("seed", 0 <= self.seed <= MAX_SEED, f"must be in 0..{MAX_SEED}"),
            ("min_p", 0 <= self.min_p < 1, "must be in [0, 1) (0 = off)"),
            ("change_temperature", MIN_TEMPERATURE <= self.change_temperature <= 100,
             f"must be > 0 (at least {MIN_TEMPERATURE:g}) and <= 100 (1 = off)"),
        ]
        for name, ok, why in checks:
            if not ok:
                raise ConfigError(f"SamplingParams: {name} {why}, got {getattr(self, name)!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SamplingParams:
        """Build from a plain dict (msgpack, JSON): the project's one config reader (unknown
        keys, wrong types -> ConfigError; an int where a float belongs is read as a float)."""
        return config_from_dict(cls, d, "SamplingParams")


def _filter_logits(
    logits: Tensor, params: SamplingParams, in_place: bool = False, prev: Tensor | None = None
) -> Tensor:
    """Temperature, then min-p, top-k and top-p on logits (B, K); removed codes get -inf.
    ``in_place``: ``logits`` itself is changed and returned (the same numbers, no new tensors).
    ``prev`` (B,): each row's previous code at this level, when there is one: with a change
    temperature (not 1) the code kept and the codes moved to are drawn apart (``_apart``), after
    top-k and top-p (which keep the prior's likeliest codes: top-k 1 is still its greedy
    choice), with min-p counted among the codes moved to."""

    def cut(x: Tensor, drop: Tensor) -> Tensor:
        return x.masked_fill_(drop, float("-inf")) if in_place else x.masked_fill(drop, float("-inf"))

    if params.temperature != 1.0:
        logits = logits.div_(params.temperature) if in_place else logits / params.temperature
    apart = prev is not None and params.change_temperature != 1.0
    if params.min_p > 0.0 and not apart:  # p < min_p * p_max  <=>  logit < max logit + log(min_p)
        floor = logits.amax(-1, keepdim=True) + math.log(params.min_p)  # (B, 1)
        logits = cut(logits, logits < floor)
    if 0 < params.top_k < logits.shape[-1]:
        kth = logits.topk(params.top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = cut(logits, logits < kth)
    if params.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)  # (B, K)
        probs = sorted_logits.softmax(-1)
        drop_sorted = probs.cumsum(-1) - probs >= params.top_p  # the mass before it is >= p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = cut(logits, drop)  # the likeliest code always stays
    if apart:
        assert prev is not None
        logits = _apart(logits, prev, params)
    return logits


def _apart(logits: Tensor, prev: Tensor, params: SamplingParams) -> Tensor:
    """Logits (B, K) -> log-probabilities where each row's ``prev`` code keeps its probability
    p and the other codes share 1 - p as their own probabilities at ``change_temperature``
    would, after min-p among them (relative to the likeliest of them); codes already cut
    (-inf) stay cut. A new tensor."""
    log_p = logits.log_softmax(-1)  # (B, K)
    at = prev.to(logits.device).long()[:, None]  # (B, 1)
    keep = log_p.gather(1, at)  # (B, 1)
    move = log_p.scatter(1, at, float("-inf"))
    if params.min_p > 0.0:
        move = move.masked_fill(move < move.amax(-1, keepdim=True) + math.log(params.min_p),
                                float("-inf"))  # fmt: skip
    move = move / params.change_temperature
    total = move.logsumexp(-1, keepdim=True).clamp_min(-1e30)  # every other code cut: -inf
    move = move - total + torch.log1p(-keep.exp())
    return move.scatter(1, at, keep)


def _gumbel(gen: torch.Generator, shape: tuple[int, ...], device: torch.device) -> Tensor:
    """Gumbel(0, 1) noise: argmax(logits + noise) is an exact draw from softmax(logits)."""
    exp = torch.empty(shape, device=device).exponential_(generator=gen)
    return -exp.clamp_min_(torch.finfo(exp.dtype).tiny).log_()


def _draw_steps(
    prior: PriorStepper, state: PriorState, steps: int, params: SamplingParams,
    gen: torch.Generator, numpy_one_item: bool = True, last: Tensor | None = None,
    on_steps: Callable[[int, int], None] | None = None,
) -> Tensor:  # fmt: skip
    """Draw ``steps`` steps from ``state``: (B, Q, steps). ``last`` (B, Q): the codes of the step
    before the first one drawn (a prefix's last), which the change temperature reads;
    ``on_steps``: see :func:`sample`.

    Measured while choosing (variants of this loop timed side by side; Q 4, K 256, H 256, batch 1,
    one thread, per step; bench/prior.py keeps the shipped loop against the plain baseline):
    torch.multinomial per level and writing each code into the output grid 0.34 ms; Gumbel-max
    with noise drawn for NOISE_CHUNK_STEPS steps at once and codes kept in lists 0.19 ms (the
    choice); the same loop under torch.jit.script 0.14 ms, not taken: TorchScript is deprecated
    and would need its own copy of the top-k/top-p filters. At batch 1 each step goes through
    ``PriorStepper.draw_one`` with the logits filtered in place: the same draws with fewer
    ops, 0.494 -> 0.468 ms per step at Q 8, K 512, H 256 (0.405 -> 0.380 at H 128, the width
    percussion's prior gets), two threads. What is left per step at Q 8, H 256: the LSTM cell
    ~50 us and the heads ~8 us a level (reading their weights: 1.5 MB and 256 kB), the Gumbel
    noise ~65 us (``exponential_``: uniform noise and two logs would take ~15 us, but change what
    every seed draws), the rest one to two microseconds per op, ~20 ops a level. Since then one
    item on a CPU goes through ``_draw_one_item`` (numpy, the same draws) unless
    ``numpy_one_item`` is off: per op a microsecond or less instead of one to four (Q 4, K 512,
    H 128, one thread: 41-42x real time at 94 steps a second in torch ops, 90-93x in numpy;
    with the change temperature, ~13 more ops a level in torch and ~6 us a level in numpy:
    27x and 82x).
    """
    q, k = prior.prior.config.levels, prior.prior.config.codebook_size
    batch, device = state.h[-1].shape[0], state.h[-1].device
    if batch == 1 and device.type == "cpu" and numpy_one_item:
        return _draw_one_item(prior, state, steps, params, gen, last, on_steps)
    filtering = (params.temperature != 1.0 or params.top_k > 0 or params.top_p < 1.0
                 or params.min_p > 0.0 or params.change_temperature != 1.0)  # fmt: skip
    cached = prior.decay > 0  # a prior with a cache draws its noise for the choice too
    columns: list[Tensor] = []

    def previous(level: int) -> Tensor | None:  # (B,) the level's code one step back
        before = columns[-1] if columns else last
        return None if before is None else before[:, level]

    def draw(logits: Tensor, noise: Tensor, level: int) -> Tensor:  # (B, K) -> (B,)
        if filtering:
            logits = _filter_logits(logits, params, prev=previous(level))
        return (logits + noise).argmax(-1)

    def draw_level(noise: tuple[Tensor, ...], logits: Tensor, level: int) -> Tensor:
        """``draw`` on fresh logits (1, K), in place."""
        if filtering:
            logits = _filter_logits(logits, params, in_place=True, prev=previous(level))
        return logits.add_(noise[level]).argmax(-1)

    for first in range(0, steps, NOISE_CHUNK_STEPS):
        if on_steps is not None:
            on_steps(first, steps)
        n = min(NOISE_CHUNK_STEPS, steps - first)
        noise = _gumbel(gen, (n, q, batch, k), device)
        if cached:  # logistic noise (the difference of two Gumbels): the part each code is from
            pair = _gumbel(gen, (n, 2, batch, q), device)
            choice_noise = (pair[:, 0] - pair[:, 1]) * params.temperature  # (n, B, Q)
        if batch == 1:  # the stepper's one-item step: the same draws, fewer ops
            choices = choice_noise[:, 0, 1:].tolist() if cached else [None] * n
            for step_noise, choice in zip(noise[:, :, 0].unbind(0), choices, strict=True):
                if columns:
                    state = prior.advance(state, columns[-1])
                levels = step_noise[:, None].unbind(0)  # Q x (1, K)
                columns.append(prior.draw_one(state, partial(draw_level, levels), choice))
            continue
        for i, step_noise in enumerate(noise):  # (Q, B, K)
            if columns:
                state = prior.advance(state, columns[-1])
            context = prior.head_context(state)  # (B, E)
            gates = prior.cache_gates(context, state) if cached else None  # (B, Q)
            picks: list[bool] = []  # batch 1: the part chosen per level, drawn alone
            chosen: Tensor | None = None  # larger batches: both parts drawn, then chosen
            if gates is not None:
                from_cache = gates > choice_noise[i]  # (B, Q): P = sigmoid(gate / temperature)
                if batch == 1:  # only the chosen part of each level is computed
                    picks = from_cache[0].tolist()
                else:
                    chosen, cache_logits = from_cache, prior.cache_logits(state)  # (B, Q, K)
            codes: list[Tensor] = []
            for level in range(q):
                if picks and picks[level]:
                    code = draw(prior.cache_logits(state, level), step_noise[level], level)
                else:
                    code = draw(prior.level_logits(context, level, state), step_noise[level], level)
                    if chosen is not None and level:  # the cache feeds levels 1..
                        from_cache = draw(cache_logits[:, level], step_noise[level], level)
                        code = torch.where(chosen[:, level], from_cache, code)
                codes.append(code)  # (B,)
                if level + 1 < q:
                    context = prior.condition(context, level, code)
            columns.append(torch.stack(codes, 1))  # (B, Q)
    if not columns:
        return torch.empty(batch, q, 0, dtype=torch.long, device=device)
    return torch.stack(columns, 2)  # (B, Q, steps)


def _draw_one_item(
    prior: PriorStepper, state: PriorState, steps: int, params: SamplingParams,
    gen: torch.Generator, last: Tensor | None = None,
    on_steps: Callable[[int, int], None] | None = None,
) -> Tensor:  # fmt: skip
    """``_draw_steps`` for one item on a CPU, through ``OneItemStepper`` (numpy): the same noise
    from the same generator, the same filters, the same draws (to the last bit of the sums; see
    ``OneItemStepper``). Measured by bench/prior.py against the torch loop."""
    q, k = prior.prior.config.levels, prior.prior.config.codebook_size
    steps_np = OneItemStepper(prior, state)
    cached = prior.decay > 0
    temperature = np.float32(params.temperature)
    floor = np.float32(math.log(params.min_p)) if params.min_p > 0.0 else None
    apart = params.change_temperature != 1.0
    change = np.float32(params.change_temperature)
    # top-k and top-p go through the torch filter (on the same memory), as the other paths do
    tail = (replace(params, temperature=1.0, min_p=0.0, change_temperature=1.0)
            if params.top_k > 0 or params.top_p < 1.0 else None)  # fmt: skip
    out, device = np.empty((q, steps), dtype=np.int64), torch.device("cpu")
    before = None if last is None else last[0].tolist()  # the prefix's last codes
    step = [0]  # the step being drawn

    def pick(noise: np.ndarray, logits: np.ndarray, level: int) -> int:
        if params.temperature != 1.0:
            logits /= temperature
        prev = (None if not apart else int(out[level, step[0] - 1]) if step[0] else
                None if before is None else int(before[level]))  # fmt: skip
        if floor is not None and prev is None:
            logits[logits < logits.max() + floor] = -np.inf  # p < min_p * p_max
        if tail is not None:
            _filter_logits(torch.from_numpy(logits)[None], tail, in_place=True)
        if prev is not None:  # drawn apart (see _apart)
            _apart_np(logits, prev, floor, change)
        logits += noise[level]
        return int(logits.argmax())

    with _one_blas_thread():
        for first in range(0, steps, NOISE_CHUNK_STEPS):
            if on_steps is not None:
                on_steps(first, steps)
            n = min(NOISE_CHUNK_STEPS, steps - first)
            noise = _gumbel(gen, (n, q, 1, k), device)[:, :, 0].numpy()  # (n, Q, K)
            choices: list[Any] = [None] * n
            if cached:  # logistic noise (two Gumbels' difference): the part each code is from
                pair = _gumbel(gen, (n, 2, 1, q), device)
                choices = ((pair[:, 0] - pair[:, 1]) * params.temperature)[:, 0, 1:].tolist()
            for i in range(n):
                step[0] = first + i
                if first + i:
                    steps_np.advance(out[:, first + i - 1].tolist())
                out[:, first + i] = steps_np.draw(partial(pick, noise[i]), choices[i])
    return torch.from_numpy(out)[None]  # (1, Q, steps)


def _apart_np(logits: np.ndarray, prev: int, floor: np.float32 | None, change: np.float32) -> None:
    """``_apart`` on one row of float32 logits (K,), in place, in fewer passes over the row (the
    cut and the temperature need no normalised row; the scalars in Python floats): the same
    numbers to float32 rounding (measured: 11.7 -> 9.1 us a level at K 512; the min-p cut
    alone takes 2.4)."""
    kept = float(logits[prev])
    logits[prev] = -np.inf
    top = float(logits.max())  # the likeliest other code's logit (a cut keeps it)
    if top == -math.inf:  # nothing else left (top-k 1): the kept code is certain
        logits[prev] = 0.0
        return
    first = max(top, kept)
    total = float(np.exp(logits - first).sum()) + math.exp(kept - first)
    keep = kept - first - math.log(total)  # log p of the kept code
    if floor is not None:
        logits[logits < top + floor] = -np.inf
    logits /= change
    top /= float(change)
    rest = math.log1p(-math.exp(keep)) if keep < 0.0 else -math.inf  # log (1 - p)
    logits += rest - (top + math.log(float(np.exp(logits - top).sum())))
    logits[prev] = keep


_BLAS: ThreadpoolController | None = None


def _one_blas_thread() -> Any:
    """numpy's BLAS on one thread while one item is drawn: its matrix-vector products are a few
    hundred numbers wide, and a BLAS that splits them over every core of a large machine would
    fight the worker's own threads (``--threads``) and every other process for them."""
    global _BLAS
    if _BLAS is None:
        _BLAS = ThreadpoolController()  # finds the loaded BLAS libraries (~0.3 ms), once
    return _BLAS.limit(limits=1, user_api="blas")


def _generator(prior: Prior, seed: int) -> torch.Generator:
    return torch.Generator(device=prior.start.device).manual_seed(seed)


def sample(
    prior: Prior,
    *,
    batch: int,
    steps: int,
    params: SamplingParams,
    prefix: Tensor | None = None,
    on_steps: Callable[[int, int], None] | None = None,
) -> Tensor:
    """Draw ``batch`` code grids of ``steps`` steps: LongTensor (B, Q, steps).

    ``steps`` may be any length (the LSTM carries its state past the training window). With
    ``prefix`` (B or 1, Q, T0) the LSTM first reads the prefix and the draw continues it; only
    the NEW steps are returned (concatenate with the prefix for the whole grid).
    ``on_steps(drawn, steps)`` is called before each NOISE_CHUNK_STEPS steps (progress, and
    cancellation: 256 sounds of 60 s took two minutes to draw, deaf to a cancel); it changes
    no draw.
    """
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"sample: batch must be a positive int, got {batch!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"sample: steps must be a non-negative int, got {steps!r}")
    gen = _generator(prior, params.seed)
    with torch.inference_mode():
        was_training = prior.training
        prior.eval()
        try:
            stepper = prior.stepper()
            state = stepper.begin(batch, prefix)  # checks the prefix
            last = (None if prefix is None or prefix.shape[2] == 0
                    else prefix[:, :, -1].expand(batch, -1))  # fmt: skip
            return _draw_steps(stepper, state, steps, params, gen, last=last, on_steps=on_steps)
        finally:
            prior.train(was_training)


def resample_region(
    prior: Prior, codes: Tensor, t0: int, t1: int, params: SamplingParams
) -> Tensor:
    """``codes`` (B, Q, T) with steps [t0, t1) drawn again given the steps before t0.

    Everything outside [t0, t1) is kept as it was (the steps after t1 do not steer the draw:
    the prior reads left to right). Returns a new tensor; ``codes`` is not changed.
    """
    prior.check_codes(codes)
    total = codes.shape[2]
    if not (isinstance(t0, int) and isinstance(t1, int) and 0 <= t0 < t1 <= total):
        raise ValueError(
            f"resample_region: need 0 <= t0 < t1 <= {total} (the grid's steps), got "
            f"t0={t0!r}, t1={t1!r}"
        )
    prefix = codes[:, :, :t0] if t0 > 0 else None
    fresh = sample(prior, batch=codes.shape[0], steps=t1 - t0, params=params, prefix=prefix)
    out = codes.clone()
    out[:, :, t0:t1] = fresh.to(codes.device, codes.dtype)
    return out
