"""Benchmark: the prior's quality after the default pipeline, and how fast it samples.

    /work/venv/bin/python bench/prior.py --threads 2 --skip-speed   # the default budgets
    /work/venv/bin/python bench/prior.py --minutes 4 --threads 1
    /work/venv/bin/python bench/prior.py --skip-quality --speed-minutes 2 --threads 2
    /work/venv/bin/python bench/prior.py --skip-speed --saved DIR   # a --save DIR's model

**Quality** (skipped with ``--skip-quality``): starts a broker and one preprocess, RVQ-VAE and
prior worker (``--threads`` torch threads each) on loopback, runs ``distill train DATA`` (the
default pipeline: each stage on its worker's default budget, on a CPU 8 minutes for the RVQ-VAE
and 3 for the prior; with ``--minutes N`` that budget shared 70/30 between them), loads the
``.distill`` file it writes, fetches the dataset, and prints:

- validation bits per code of the prior against the unigram (per-level code frequencies) and
  bigram (per-level P(code | previous code), Witten-Bell smoothed) baselines fitted on the
  training codes, computed here on the validation chunks' codes (each chunk scored from a cold
  start, as if a sound began there), beside the figures the prior job reported (goal: at least
  1 bit per code better than each);
- the same on each held-out file's codes whole (the chunks stitched; the LSTM carries its state
  through the file), against baselines fitted on the training files and on the training files
  with the variants the prior trains on (the stricter of the two);
- memorisation: the share of generated one-second code sequences (temperature 1) that match
  some window of a training file's codes at >= 90% of positions (a position is one code: one
  level at one step), beside the same share for the held-out validation chunks (real sounds the
  model never saw: what chance and shared silences give). Goal <= 10%.
- envelopes: how long the sounds ring (seconds from the loudest frame to the last within 20 dB
  of it), how many are still loud after a second, and how many start a second sound after a
  silence, for the training files, the same decoded from their codes, and 96 drawn sounds of
  2 s (by default and at a change temperature of 0.5): what the bits per code do not show (a
  prior can predict codes well step by step and still draw hits that ring on). Goal: the drawn
  sounds shaped like the training files.

With ``--saved DIR`` (a folder ``--save`` wrote) no pipeline runs: the held-out files' figures,
memorisation, the envelopes and the sampling speed of that model.

**Speed** (skipped with ``--skip-speed``): generated seconds of codes per wall second at batch 1
and 16 for priors of 6 x 128 and 4 x 512 codes per step at 94 code steps per second (at
downsample 1 the RVQ-VAE chooses 128 x 6 for 15-40 training chunks, drawn in all 6, and 512 x 12
from 100 on, drawn in as many of its first levels as keep 376 codes a second: 4), and 8 x 512 at
47 (what downsample 2 drew before), each 256 wide with 128-wide embeddings (the prior
of 20k-200k training code steps, ~3.5-35 minutes of sound; a smaller set's prior is narrower and
samples faster), for:

- baseline: ``nn.LSTM`` called one step at a time with oneDNN on, each level's probabilities
  (the head reading the level's earlier codes, mixed with the sound's cache) and
  ``torch.multinomial`` per level, codes written into the output grid (the obvious loop);
- ``sample()`` as shipped (Gumbel-max; at batch 1 on a CPU the numpy one-item loop,
  ``OneItemStepper``; at larger batches ``torch.lstm_cell`` on the nn.LSTM weights);
- the baseline with oneDNN off (what the oneDNN switch buys the obvious loop; ``sample()``
  does not go through oneDNN, measured: the switch changes nothing there);
- at batch 1, ``sample()``'s loop in torch ops (``PriorStepper.draw_one``, what batch 1 ran
  before the numpy loop; the same codes);
and the ratios to the baseline. Untrained weights: speed does not depend on what was learnt,
except that ``sample()`` at batch 1 draws a level from the cache without running its head, which
an untrained prior does for 12% of its codes and trained ones for more (a slight understatement).
The quality run ends with ``sample()`` and the baseline on the prior it trained, at batch 1 and
16: the default pipeline's own speed.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import free_port_block, spawn, stop, wait_for  # noqa: E402

from distill.shared.audio.dataset import Dataset  # noqa: E402
from distill.shared.audio.metrics import (  # noqa: E402
    DECAY_DB,
    LATE_S,
    RETRIGGER_QUIET_S,
    Envelope,
)
from distill.shared.bus.artifacts import ArtifactClient  # noqa: E402
from distill.shared.bus.cache import ArtifactCache  # noqa: E402
from distill.shared.bus.client import Client  # noqa: E402
from distill.shared.bus.jobs import JobsClient  # noqa: E402
from distill.shared.model.inference import (  # noqa: E402
    drawn_envelopes,
    file_envelopes,
    model_change_temperature,
)
from distill.shared.model.modelfile import DistillModel, load_model  # noqa: E402
from distill.shared.model.prior import (  # noqa: E402
    CACHE_DECAY,
    EARLIER_CODES,
    Prior,
    PriorConfig,
    bigram_bits,
    unigram_bits,
)
from distill.shared.model.sampling import (  # noqa: E402
    SamplingParams,
    _draw_steps,
    _generator,
    sample,
)
from distill.shared.train.prior import encode_dataset, file_mels  # noqa: E402

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "percussion"
MATCH_SHARE = 0.9  # a generated second "is" a training window when >= 90% of its codes agree

SECONDS = 2.0  # of generated codes per timed call
ENVELOPE_DRAWS = 96  # generated sounds whose envelopes are compared with the training files'


def baseline_sample(prior: Prior, batch: int, steps: int, gen: torch.Generator) -> torch.Tensor:
    """The obvious loop: nn.LSTM one step at a time, each level's probabilities (mixed with the
    cache's where the prior has one) and a multinomial draw (oneDNN as set)."""
    q, k = prior.config.levels, prior.config.codebook_size
    out = torch.empty(batch, q, steps, dtype=torch.long)
    x = prior.start.expand(batch, 1, -1)  # (B, 1, E)
    state = None
    cache, total, decay = torch.zeros(batch, q, k), 0.0, prior.config.cache_decay
    for t in range(steps):
        h, state = prior.lstm(x, state)  # (B, 1, H)
        context = prior.proj(h[:, 0])  # (B, E)
        start = F.relu(context)  # what the cache's gate reads, with each level's history
        for level in range(q):
            history = torch.zeros_like(context)
            if prior.prev_embed is not None and t:  # the level's previous code, and earlier
                history = history + prior.prev_embed(out[:, level, t - 1] + level * k)
                for j in range(min(prior.config.earlier_codes, t - 1)):
                    row = out[:, level, t - 2 - j] + (j * q + level) * k
                    history = history + prior.earlier_embed(row)
            hidden = F.relu(context) + history
            logits = F.linear(hidden, prior.head_weight[level], prior.head_bias[level])
            probs = logits.softmax(-1)  # (B, K)
            cached = prior.cache_gate is not None and prior.cache_bias is not None
            if cached and level and total:  # the cache feeds the levels after the first
                gate = ((start + history) * prior.cache_gate[level - 1]).sum(-1, keepdim=True)
                share = torch.sigmoid(gate + prior.cache_bias[level - 1])  # (B, 1)
                probs = (1 - share) * probs + share * cache[:, level] / total
            codes = torch.multinomial(probs, 1, generator=gen).squeeze(1)  # (B,)
            out[:, level, t] = codes
            if level + 1 < q:
                context = context + prior.cond_embed(codes + level * k)
        if decay:
            cache = (cache * decay).scatter_add_(2, out[:, :, t, None], torch.ones(batch, q, 1))
            total = total * decay + 1.0
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


def torch_one_item(prior: Prior, steps: int, change_temperature: float = 1.0) -> torch.Tensor:
    """``sample()``'s loop at batch 1 with torch ops throughout (``PriorStepper.draw_one``), as it
    ran before the numpy one-item loop: the same codes."""
    params = SamplingParams(change_temperature=change_temperature)
    with torch.inference_mode():
        stepper = prior.stepper()
        return _draw_steps(stepper, stepper.begin(1), steps, params,
                           _generator(prior, params.seed), numpy_one_item=False)  # fmt: skip


def speed_case(
    prior: Prior, batch: int, steps: int, budget_s: float, change_temperature: float = 1.0
) -> tuple[float, float, float, float | None]:
    """(baseline, sample(), baseline with oneDNN off, and at batch 1 sample()'s loop in torch
    ops), generated seconds per wall second; ``sample()`` at ``change_temperature``."""
    generated = SECONDS * batch
    gen = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        base = rate(partial(baseline_sample, prior, batch, steps, gen), generated, budget_s)
    ours = rate(
        partial(sample, prior, batch=batch, steps=steps,
                params=SamplingParams(change_temperature=change_temperature)),
        generated, budget_s,
    )  # fmt: skip
    with torch.inference_mode():
        off = rate(partial(baseline_onednn_off, prior, batch, steps, gen), generated, budget_s)
    in_torch = (rate(partial(torch_one_item, prior, steps, change_temperature), generated, budget_s)
                if batch == 1 else None)  # fmt: skip
    return base, ours, off, in_torch


def speed_figures(budget_s: float) -> None:
    cases = [(6, 128, 94.0), (4, 512, 94.0), (8, 512, 47.0)]
    per_run = budget_s / (len(cases) * 7)
    print(f"{'prior':<28}{'batch':>6}{'baseline':>10}{'sample()':>10}{'ratio':>8}"
          f"{'base, oneDNN off':>18}{'ratio':>8}{'torch ops':>11}{'ratio':>8}   (generated s "
          "per wall s)")  # fmt: skip
    for levels, size, rate_hz in cases:
        config = PriorConfig(levels=levels, codebook_size=size, prev_codes=True,
                             earlier_codes=EARLIER_CODES, cache_decay=CACHE_DECAY)  # fmt: skip
        # the heads and the cache as sized; H 256 E 128
        prior = Prior(config).eval()
        for batch in (1, 16):
            base, ours, off, in_torch = speed_case(prior, batch, int(SECONDS * rate_hz), per_run)
            name = f"Q{levels} K{size} H{prior.config.hidden} @{rate_hz:g}/s"
            torch_ops = (f"{in_torch:>10.1f}x{ours / in_torch:>7.2f}x" if in_torch else
                         f"{'-':>11}{'-':>8}")  # fmt: skip
            print(f"{name:<28}{batch:>6}{base:>9.1f}x{ours:>9.1f}x{ours / base:>7.2f}x"
                  f"{off:>17.1f}x{off / base:>7.2f}x{torch_ops}", flush=True)  # fmt: skip


# --- quality: the default pipeline through real processes ----------------------------------------


def start_cluster(tmp: Path, threads: int) -> tuple[str, list[subprocess.Popen[bytes]]]:
    """A broker and one preprocess, vqvae and prior worker on loopback, logs in ``tmp``."""
    os.environ["DISTILL_CACHE"] = str(tmp / "cache")  # the workers' artifact cache
    port = free_port_block()
    endpoint = f"tcp://127.0.0.1:{port}"
    procs = [spawn(["broker", "--port", str(port), "--data-dir", str(tmp / "broker")],
                   tmp / "broker.log")]  # fmt: skip
    for service in ("preprocess", "vqvae", "prior"):
        procs.append(spawn(["worker", service, "--broker", endpoint, "--device", "cpu",
                            "--threads", str(threads)], tmp / f"worker-{service}.log"))  # fmt: skip

    def registered() -> bool:
        try:
            with Client(endpoint, timeout_s=2) as c:
                return len(c.workers()["workers"]) >= 3
        except Exception:  # the broker is still starting
            return False

    wait_for(registered, timeout_s=120)
    return endpoint, procs


DEFAULT_PIPELINE_MINUTES = 11.0  # the CPU defaults: RVQ-VAE 8 + prior 3


def run_pipeline(endpoint: str, data: Path, minutes: float, out: Path,
                 train_opts: list[str] | None = None,
                 model_opts: dict[str, list[str]] | None = None) -> str:  # fmt: skip
    """``distill train DATA [--minutes N] -o OUT`` (its live lines pass through; N 0: the
    workers' default budgets); the prior job id."""
    args = [sys.executable, "-m", "distill.shared.cli", "train", str(data), "-o", str(out),
            "--broker", endpoint] + (["--minutes", str(minutes)] if minutes else [])  # fmt: skip
    for option in train_opts or []:  # distill train's --train-opt [STAGE.]K=V
        args += ["--train-opt", option]
    for flag, options in (model_opts or {}).items():  # --vqvae-opt / --prior-opt K=V
        for option in options:
            args += [flag, option]
    wall = (minutes or DEFAULT_PIPELINE_MINUTES) * 60 * 3 + 600
    done = subprocess.run(args, stdout=subprocess.PIPE, text=True, timeout=wall)
    print(done.stdout, flush=True)
    if done.returncode != 0:
        raise SystemExit(f"distill train failed ({done.returncode})")
    found = re.search(r"prior (j-\S+)", done.stdout)
    if not found:
        raise SystemExit("distill train printed no prior job id")
    return found.group(1)


@torch.no_grad()
def chunk_codes(model: DistillModel, ds: Dataset, indices: Any) -> torch.Tensor:
    """Codes (N, Q, T') of the dataset's chunks ``indices``, encoded by the model's RVQ-VAE."""
    mels = torch.from_numpy(ds.mels[indices])  # (N, M, T)
    return torch.cat([model.vqvae.encode(mels[i : i + 64]) for i in range(0, len(mels), 64)])


def file_windows(ds: Dataset, indices: Any, codes: torch.Tensor, steps: int) -> torch.Tensor:
    """Every window of ``steps`` steps of each file's codes (its chunks end to end): (W, Q, S)."""
    files = ds.chunk_file[indices]
    windows = []
    for f in sorted(set(files.tolist())):
        stream = torch.cat(list(codes[files == f]), dim=1)  # (Q, L): the file's chunks in order
        windows.append(stream.unfold(1, steps, 1).transpose(0, 1))  # (L - S + 1, Q, S)
    return torch.cat(windows)


def matched_share(seqs: torch.Tensor, windows: torch.Tensor) -> tuple[float, float]:
    """(the share of ``seqs`` (N, Q, S) equal to some window (W, Q, S) at >= MATCH_SHARE of codes,
    the median over ``seqs`` of the best agreement with any window)."""
    best = torch.stack([(windows == seq).float().mean(dim=(1, 2)).max() for seq in seqs])  # (N,)
    return float((best >= MATCH_SHARE).float().mean()), float(best.median())


def whole_file_figures(model: DistillModel, ds: Dataset) -> None:
    """Bits per code on each held-out file's codes whole (the LSTM carrying its state through
    the file, the chunks stitched), against baselines fitted on the training files and on the
    training files with the variants the prior trained on."""
    assert model.prior is not None
    codes = encode_dataset(model.vqvae, ds).first_levels(model.prior.config.levels)
    val, k = codes.sequences("val"), codes.codebook_size
    if not val:
        print("whole files: no validation files")
        return
    count = sum(v.numel() for v in val)
    prior_bits = sum(float(model.prior.nll_bits(v[None])) * v.numel() for v in val) / count
    line = f"whole held-out files ({len(val)} files, {count} codes): prior {prior_bits:.3f}"
    for fitted, variants in (("training files", False), ("files and variants", True)):
        train = codes.sequences("train", variants=variants)
        uni, bi = unigram_bits(train, val, k), bigram_bits(train, val, k)
        line += (f"\n  baselines fitted on {fitted}: unigram {uni:.3f} ({uni - prior_bits:+.3f} "
                 f"better)   bigram {bi:.3f} ({bi - prior_bits:+.3f} better)")  # fmt: skip
    print(line)


def quality_figures(endpoint: str, prior_job: str, path: Path, samples: int,
                    save: Path | None = None) -> None:
    with Client(endpoint, timeout_s=60) as c:
        result = JobsClient(c).get(prior_job, metrics=False)["result"]
        cache = ArtifactCache(path.parent / "client-cache")
        data = ArtifactClient(c, cache=cache).get_bytes(result["dataset"])
        ds = Dataset.from_bytes(data)
    if save is not None:  # the model and its dataset, for listening or further measures
        save.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, save / path.name)
        (save / f"{path.stem}.dataset").write_bytes(data)
        print(f"saved {save / path.name} and its dataset beside it")
    model = load_model(path)
    assert model.prior is not None, "the pipeline wrote a model without a prior"
    train_idx, val_idx = ds.train_indices(), ds.val_indices()
    p = model.prior.config.levels  # the RVQ-VAE's first p levels: what the prior draws
    train_codes, val_codes = (chunk_codes(model, ds, train_idx)[:, :p],
                              chunk_codes(model, ds, val_idx)[:, :p])  # fmt: skip
    k, steps = model.prior.config.codebook_size, train_codes.shape[-1]
    prior_bits = float(model.prior.nll_bits(val_codes))
    uni, bi = unigram_bits(train_codes, val_codes, k), bigram_bits(train_codes, val_codes, k)
    print(f"\nvalidation: {len(val_idx)} chunks ({val_codes.numel()} codes, Q {val_codes.shape[1]} "
          f"x K {k}); training: {len(train_idx)} chunks")  # fmt: skip
    print(f"bits per code   prior {prior_bits:.3f}   unigram {uni:.3f} ({uni - prior_bits:+.3f} "
          f"better)   bigram {bi:.3f} ({bi - prior_bits:+.3f} better)   goal: >= 1 bit better "
          "than each")  # fmt: skip
    metrics, base = result.get("metrics") or {}, result.get("baselines") or {}
    if base.get("validated_on") == "train":
        print("  NOT HELD OUT: too few validation files or code steps, so the prior trained on "
              "them too (its job validated on training windows); the figures here and below are "
              "on sounds it has seen, the baselines' on sounds they have not")  # fmt: skip
    whole_file_figures(model, ds)
    best = float(result.get("best_val_bits", metrics.get("val_bits", float("nan"))))
    print(f"  as the prior job reported (codes stitched per file, {base.get('val_codes')} "
          f"validation codes): best val {best:.3f} (epoch {result.get('best_epoch')})   unigram "
          f"{base.get('unigram_bits', float('nan')):.3f} "
          f"({base.get('unigram_bits', float('nan')) - best:+.3f})   bigram "
          f"{base.get('bigram_bits', float('nan')):.3f} "
          f"({base.get('bigram_bits', float('nan')) - best:+.3f}); {result.get('epochs')} epochs, "
          f"{metrics.get('step')} steps, stopped: {result.get('stopped')}")  # fmt: skip

    memorisation_figures(model, ds, train_codes, val_codes, samples)
    envelope_figures(model, ds)
    trained_speed(model, steps)


def memorisation_figures(model: DistillModel, ds: Dataset, train_codes: torch.Tensor,
                         val_codes: torch.Tensor, samples: int) -> None:  # fmt: skip
    """The share of ``samples`` drawn seconds (the model's sampling defaults) that match a
    training window at >= MATCH_SHARE of codes, beside the held-out validation chunks' share."""
    assert model.prior is not None
    steps = train_codes.shape[-1]
    windows = file_windows(ds, ds.train_indices(), train_codes, steps)
    change = model_change_temperature(model)
    drawn = torch.cat([sample(model.prior, batch=min(50, samples - i), steps=steps,
                              params=SamplingParams(seed=i, change_temperature=change))
                       for i in range(0, samples, 50)])  # fmt: skip
    (generated, gen_best), (held_out, val_best) = (matched_share(drawn, windows),
                                                   matched_share(val_codes, windows))  # fmt: skip
    print(f"memorisation: {generated * 100:.1f}% of {samples} generated one-second sequences "
          f"({steps} steps) match a training window at >= {MATCH_SHARE:.0%} of codes; held-out "
          f"validation chunks: {held_out * 100:.1f}% of {len(val_codes)}"
          f"{f' (ratio {generated / held_out:.2f}x)' if held_out else ''}; goal <= 10%")  # fmt: skip
    print(f"  closest training window, median agreement: generated {gen_best:.1%}, held-out "
          f"{val_best:.1%} (ratio {gen_best / max(val_best, 1e-9):.2f}x)")  # fmt: skip


def _envelope_line(name: str, envs: list[Envelope]) -> tuple[str, float]:
    """One row of the envelope table, and its median decay (seconds)."""
    decays = torch.tensor([e.decay_s for e in envs])
    q = torch.quantile(decays, torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9])).tolist()
    late = sum(e.late for e in envs) / len(envs)
    again = sum(e.retrigger for e in envs) / len(envs)
    return (f"  {name:<46} {' '.join(f'{v:5.2f}' for v in q)}   {late:5.1%}   {again:5.1%}",
            q[2])  # fmt: skip


@torch.no_grad()
def envelope_figures(model: DistillModel, ds: Dataset) -> None:
    """The shape of the prior's sounds against the training files' (what the bits per code do
    not show: a prior can score well and still draw hits that ring on, or start a second one):
    each sound's envelope from its log-mel (``distill.shared.audio.metrics.envelope``), for the
    training files' first SECONDS (as long as a draw: a longer file would ring past what a draw
    can), the same decoded from the codes the prior draws (the RVQ-VAE's first levels: what the
    codec alone changes), and ENVELOPE_DRAWS sounds of SECONDS drawn at change temperatures 1
    (off) and 0.5 (keeping and moving drawn apart), the model's own choice marked."""
    assert model.prior is not None
    levels = model.prior.config.levels
    files = [mel for f, mel in file_mels(ds) if str(ds.manifest[f].split) == "train"]
    real = file_envelopes(model, files, SECONDS)
    coded = file_envelopes(model, [model.vqvae.decode_codes(model.vqvae.encode(mel[None]), levels)[0]
                                   [:, : mel.shape[1]] for mel in files], SECONDS)  # fmt: skip

    def mine(change: float) -> str:
        return " (model's)" if change == model_change_temperature(model) else ""

    def drawn(change: float) -> list[Envelope]:
        return drawn_envelopes(model, change_temperature=change, draws=ENVELOPE_DRAWS,
                               seconds=SECONDS)  # fmt: skip

    print(f"envelopes: seconds from the loudest frame to the last within {-DECAY_DB:g} dB of it "
          f"(quantiles 10/25/50/75/90); share still within {-DECAY_DB:g} dB after {LATE_S:g} s; "
          f"share with a second onset (back up after {RETRIGGER_QUIET_S:g} s quiet)")  # fmt: skip
    rows = [_envelope_line(f"training files' first {SECONDS:g} s ({len(real)})", real),
            _envelope_line(f"  the same from their first {levels} levels' codes", coded),
            _envelope_line(f"drawn {ENVELOPE_DRAWS} x {SECONDS:g} s at change temp. 1{mine(1.0)}",
                           drawn(1.0)),
            _envelope_line(f"  the same at change temp. 0.5{mine(0.5)}",
                           drawn(0.5))]  # fmt: skip
    for line, _ in rows:
        print(line)
    base = max(rows[0][1], 1e-9)
    print(f"  generated median / training files' median: {rows[2][1] / base:.2f}x at 1, "
          f"{rows[3][1] / base:.2f}x at 0.5; goal: near 1, and second onsets as rare as in the "
          "files")  # fmt: skip


def trained_speed(model: DistillModel, chunk_steps: int) -> None:
    """Sampling speed of the prior this pipeline trained (its own size, its cache as learnt)
    against the baseline loops on it (``speed_case``), at batch 1 and 16, at the change
    temperature chosen for it (the goal: >= 50x at batch 1)."""
    assert model.prior is not None
    cfg = model.mel_config
    per_s = chunk_steps * cfg.sample_rate / (cfg.chunk_frames * cfg.hop_length)  # code steps / s
    c, change = model.prior.config, model_change_temperature(model)
    for batch in (1, 16):
        base, ours, off, in_torch = speed_case(model.prior, batch, int(SECONDS * per_s), 10,
                                               change)  # fmt: skip
        torch_ops = (f"; its loop in torch ops {in_torch:.1f}x, {ours / in_torch:.2f}x"
                     if in_torch else "")  # fmt: skip
        print(f"sampling, this prior (Q{c.levels} K{c.codebook_size} H{c.hidden} E{c.embed_dim} "
              f"@{per_s:.0f}/s, change temperature {change:g}), batch {batch}: sample() "
              f"{ours:.1f}x real time, baseline loop "
              f"{base:.1f}x ({ours / base:.2f}x; oneDNN off {off:.1f}x{torch_ops}); goal at "
              "batch 1: >= 50x")  # fmt: skip


def saved_figures(folder: Path, samples: int) -> None:
    """The figures that need only a model and its dataset (``--save``'s folder): the held-out
    files whole against the baselines, memorisation, the envelopes and the model's sampling
    speed."""
    models, datasets = sorted(folder.glob("*.distill")), sorted(folder.glob("*.dataset"))
    if len(models) != 1 or len(datasets) != 1:
        raise SystemExit(f"{folder}: needs one .distill and one .dataset file (--save writes "
                         f"them), found {len(models)} and {len(datasets)}")  # fmt: skip
    model, ds = load_model(models[0]), Dataset.load(datasets[0])
    assert model.prior is not None, f"{models[0]} has no prior"
    print(f"{models[0]} with {datasets[0].name}")
    whole_file_figures(model, ds)
    p = model.prior.config.levels
    memorisation_figures(model, ds, chunk_codes(model, ds, ds.train_indices())[:, :p],
                         chunk_codes(model, ds, ds.val_indices())[:, :p], samples)  # fmt: skip
    envelope_figures(model, ds)
    trained_speed(model, ds.mel_config.chunk_frames // model.vqvae.config.downsample)


def quality(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="distill-bench-prior-") as tmp_dir:
        tmp = Path(tmp_dir)
        endpoint, procs = start_cluster(tmp, args.threads)
        try:
            started, model_path = time.monotonic(), tmp / f"{Path(args.data).name}.distill"
            prior_job = run_pipeline(endpoint, args.data, args.minutes, model_path,
                                     args.train_opt, {"--vqvae-opt": args.vqvae_opt,
                                                      "--prior-opt": args.prior_opt})  # fmt: skip
            budget = (f"a {args.minutes:g}-minute training budget" if args.minutes else
                      "the workers' default budgets")  # fmt: skip
            print(f"pipeline: {time.monotonic() - started:.0f} s wall for {budget}")
            quality_figures(endpoint, prior_job, model_path, args.samples, args.save)
        finally:
            for proc in reversed(procs):
                stop(proc)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=0.0,
                        help="training budget of the pipeline (quality figures); 0: each "
                        "worker's default")  # fmt: skip
    parser.add_argument("--train-opt", action="append", default=[], metavar="[STAGE.]K=V",
                        help="passed to distill train (e.g. prior.peers=1); repeatable")  # fmt: skip
    parser.add_argument("--vqvae-opt", action="append", default=[], metavar="K=V",
                        help="RVQ-VAE setting passed to distill train (e.g. levels=4)")  # fmt: skip
    parser.add_argument("--prior-opt", action="append", default=[], metavar="K=V",
                        help="prior setting passed to distill train (e.g. hidden=192)")  # fmt: skip
    parser.add_argument("--speed-minutes", type=float, default=2.0, help="budget of the speed runs")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the goal: 2 cores)")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="a folder of sounds")
    parser.add_argument("--samples", type=int, default=200, help="generated seconds to check")
    parser.add_argument("--save", type=Path, default=None, metavar="DIR",
                        help="copy the pipeline's .distill file and its dataset into DIR")  # fmt: skip
    parser.add_argument("--saved", type=Path, default=None, metavar="DIR",
                        help="no pipeline: the held-out files', memorisation, envelope and speed "
                        "figures of the model and dataset --save wrote into DIR")  # fmt: skip
    parser.add_argument("--skip-quality", action="store_true")
    parser.add_argument("--skip-speed", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s)")
    if not args.skip_speed:
        speed_figures(args.speed_minutes * 60)
    if args.saved is not None:
        saved_figures(args.saved, args.samples)
    elif not args.skip_quality:
        quality(args)


if __name__ == "__main__":
    main()
