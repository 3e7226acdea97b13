"""Benchmark: how fast the prior samples, against a plain step-by-step nn.LSTM loop.

    /work/venv/bin/python bench/prior.py --minutes 2
    /work/venv/bin/python bench/prior.py --minutes 2 --threads 2

Prints generated seconds of codes per wall second at batch 1 and 16 for default-sized priors
(Q 4 x K 256 and Q 6 x K 512, at 94 and 47 code steps per second), for:

- baseline: ``nn.LSTM`` called one step at a time with oneDNN on, ``torch.multinomial`` per
  level, codes written into the output grid (the obvious loop);
- ``sample()`` as shipped (``torch.lstm_cell`` on the nn.LSTM weights, Gumbel-max, oneDNN off);
- the baseline with oneDNN off (what the oneDNN switch buys the obvious loop; ``sample()``
  does not go through oneDNN, measured: the switch changes nothing there);
and the ratios to the baseline. Untrained weights: speed does not depend on what was learnt.

The NLL-against-baselines and memorisation figures need a trained RVQ-VAE and prior on the
percussion set: see ``quality_figures``.
"""

from __future__ import annotations

import argparse
import time
import warnings
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F

from distill.shared.model.prior import Prior, PriorConfig
from distill.shared.model.sampling import SamplingParams, sample

SECONDS = 2.0  # of generated codes per timed call


def baseline_sample(prior: Prior, batch: int, steps: int, gen: torch.Generator) -> torch.Tensor:
    """The obvious loop: nn.LSTM one step at a time, multinomial per level (oneDNN as set)."""
    q, k = prior.config.levels, prior.config.codebook_size
    out = torch.empty(batch, q, steps, dtype=torch.long)
    x = prior.start.expand(batch, 1, -1)  # (B, 1, E)
    state = None
    for t in range(steps):
        h, state = prior.lstm(x, state)  # (B, 1, H)
        context = prior.proj(h[:, 0])  # (B, E)
        for level in range(q):
            logits = F.linear(F.relu(context), prior.head_weight[level], prior.head_bias[level])
            codes = torch.multinomial(logits.softmax(-1), 1, generator=gen).squeeze(1)  # (B,)
            out[:, level, t] = codes
            if level + 1 < q:
                context = context + prior.cond_embed(codes + level * k)
        x = prior.input_embed(out[:, :, t] + prior.offsets).sum(1, keepdim=True)  # (B, 1, E)
    return out


def rate(fn: Callable[[], object], generated_s: float, budget_s: float) -> float:
    """Best generated seconds per wall second over repeated calls within ``budget_s``."""
    fn()  # warm-up
    best, deadline = 0.0, time.monotonic() + budget_s
    while True:
        start = time.perf_counter()
        fn()
        best = max(best, generated_s / (time.perf_counter() - start))
        if time.monotonic() > deadline:
            return best


def baseline_onednn_off(prior: Prior, batch: int, steps: int, gen: torch.Generator) -> torch.Tensor:
    """The baseline loop with oneDNN off (it allocates on every nn.LSTM step)."""
    with warnings.catch_warnings():  # torch warns about Intel-GPU TF32 when the flags are set
        warnings.simplefilter("ignore")
        with torch.backends.mkldnn.flags(enabled=False):
            return baseline_sample(prior, batch, steps, gen)


def speed_case(prior: Prior, batch: int, steps: int, budget_s: float) -> tuple[float, float, float]:
    """(baseline, sample(), baseline with oneDNN off), generated seconds per wall second."""
    generated = SECONDS * batch
    gen = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        base = rate(partial(baseline_sample, prior, batch, steps, gen), generated, budget_s)
    ours = rate(
        partial(sample, prior, batch=batch, steps=steps, params=SamplingParams()),
        generated, budget_s,
    )  # fmt: skip
    with torch.inference_mode():
        off = rate(partial(baseline_onednn_off, prior, batch, steps, gen), generated, budget_s)
    return base, ours, off


def speed_figures(budget_s: float) -> None:
    cases = [(4, 256, 94.0), (4, 256, 47.0), (6, 512, 94.0), (6, 512, 47.0)]
    per_run = budget_s / (len(cases) * 2 * 3)
    print(f"{'prior':<28}{'batch':>6}{'baseline':>10}{'sample()':>10}{'ratio':>8}"
          f"{'base, oneDNN off':>18}{'ratio':>8}   (generated s per wall s)")  # fmt: skip
    for levels, size, rate_hz in cases:
        prior = Prior(PriorConfig(levels=levels, codebook_size=size)).eval()
        for batch in (1, 16):
            base, ours, off = speed_case(prior, batch, int(SECONDS * rate_hz), per_run)
            name = f"Q{levels} K{size} H{prior.config.hidden} @{rate_hz:g}/s"
            print(f"{name:<28}{batch:>6}{base:>9.1f}x{ours:>9.1f}x{ours / base:>7.2f}x"
                  f"{off:>17.1f}x{off / base:>7.2f}x", flush=True)  # fmt: skip


def quality_figures() -> None:
    """Validation bits per code against unigram and bigram, and memorisation: NOT YET MEASURED.

    Needs the prior training worker (a trained RVQ-VAE encoding the percussion set, a prior
    trained on its codes). Then: ``Prior.nll_bits`` on the validation codes beside
    ``unigram_bits`` / ``bigram_bits`` on the same codes (goal: >= 1 bit per code better than
    each), and the share of sampled one-second code sequences matching some training chunk at
    >= 90% of positions (goal <= 10%).
    """
    print("quality figures (NLL vs baselines, memorisation): not measured yet -- they need a "
          "trained RVQ-VAE + prior pipeline")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=2.0, help="time budget for the speed runs")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the goal: 2 cores)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s)")
    speed_figures(args.minutes * 60)
    quality_figures()


if __name__ == "__main__":
    main()
