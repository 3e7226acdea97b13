"""Benchmark: train the default RVQ-VAE on the percussion set and measure what it reconstructs.

    /work/venv/bin/python bench/vqvae.py --minutes 4
    /work/venv/bin/python bench/vqvae.py --minutes 4 --model '{"spectral_weight": 0.5}'
    /work/venv/bin/python bench/vqvae.py --minutes 3 --subset 10 --spread --unseen 8 --quick

Prints, on the validation files and on a sample of training files (whole files, medians; with
``--unseen K``, on K files of the set outside a ``--subset`` too):

- log-mel L1 of the reconstructed mel against the true mel (the model's own error);
- spectral convergence and log-mel L1 of the decoded audio (Griffin-Lim from the reconstructed
  mel) against the original, beside the same for Griffin-Lim of the true mel: the floor
  (the bar: 1.25x the floor on training files and 1.5x on held-back ones);
- the same decoded from the unquantized latents (the encoder and decoder without the codes:
  how much of the gap the quantizer makes), and each file's ratio, worst first;
- the same spectral convergence decoding only the first k levels (progressive reconstruction);
- codebook utilisation per level, epoch time, and the training throughput of the real loop
  (validation, metrics and a serialised checkpoint every epoch) as a ratio to a bare PyTorch
  loop over the same model and batches in the same run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from distill.shared.audio.dataset import Dataset, build_dataset
from distill.shared.audio.io import load_audio, scan_folder
from distill.shared.audio.mel import MelConfig, log_mel
from distill.shared.audio.metrics import log_mel_l1, spectral_convergence
from distill.shared.audio.phase import mel_to_audio
from distill.shared.model.vqvae import SEARCH_CANDIDATES, VQVAE, VQVAEConfig, choose_size
from distill.shared.train.loop import PreviewLabel
from distill.shared.train.vqvae import TrainConfig, TrainResult, VQVAETrainer

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "percussion"


class TimingHooks:
    """Real hooks' work without a broker: keep the checkpoint bytes, time each epoch."""

    def __init__(self) -> None:
        self.times: list[tuple[int, float]] = []  # (step, perf_counter) at each epoch's end
        self.metrics: list[dict[str, Any]] = []
        self.checkpoint_bytes = 0

    def check_cancel(self) -> None:
        return None

    def on_epoch(self, metrics: dict[str, Any]) -> None:
        self.times.append((metrics["step"], time.perf_counter()))
        self.metrics.append(metrics)
        print(f"  epoch {metrics['epoch']:3d}  train {metrics['train_recon']:.4f}  "
              f"val {metrics['val_recon']:.4f}  val L1 {metrics['val_l1']:.3f}  "
              f"util {' '.join(f'{u:.2f}' for u in metrics['utilisation'])}  "
              f"{metrics['epoch_s']:.1f} s", flush=True)  # fmt: skip

    def save_checkpoint(self, data: bytes) -> None:
        self.checkpoint_bytes = len(data)

    def load_checkpoint(self) -> bytes | None:
        return None

    def on_preview(self, epoch: int, mels: torch.Tensor, recon: torch.Tensor,
                   labels: list[PreviewLabel]) -> None:  # fmt: skip
        return None


def bare_steps_per_s(trainer: VQVAETrainer, steps: int) -> float:
    """A plain loop (forward, loss, backward, clip, Adam) over the trainer's own batches."""
    torch.manual_seed(0)
    model = VQVAE(trainer.model_config)
    trainer._init_model_(model)
    opt = trainer.build_optimizer(model)
    batches = [x for epoch in range(1, 100) for x in trainer.batches(epoch)][: steps + 3]
    started = 0.0
    for i, x in enumerate(batches):
        if i == 3:  # the first steps pay one-off costs (einx graph solving, allocations)
            started = time.perf_counter()
        out = model(x)
        loss = model.reconstruction_loss(x, out.recon) + out.commit_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), trainer.train_config.grad_clip)
        opt.step()
    return steps / (time.perf_counter() - started)


@torch.no_grad()
def evaluate(model: VQVAE, paths: list[Path], cfg: MelConfig, levels: int | None = None,
             search: int = SEARCH_CANDIDATES) -> dict[str, Any]:  # fmt: skip
    """Medians over whole files of the model's mel L1 and decoded audio vs the floor; with every
    level, also the decoded audio of the unquantized latents (``sc_latents``: what the encoder
    and decoder alone lose) and each file's ratio to its floor (``files``, worst first).

    Files are encoded as ``distill encode`` and the inference worker encode them: codes chosen
    by what they decode to among ``search`` candidates (``VQVAE.search_codes``); ``search`` 1:
    the quantizer's nearest codes, as the trainer and the prior's code sets use."""
    keys = ("mel_l1", "sc", "sc_floor", "l1", "l1_floor", *(f"l1_{b}" for b in BANDS))
    rows: dict[str, list[float]] = {k: [] for k in (*keys, "sc_latents")}
    files: list[tuple[str, float]] = []
    for path in paths:
        audio = load_audio(path, cfg.sample_rate)  # as the dataset prepared it
        mel = log_mel(audio, cfg)  # (M, T)
        z = model.encode_latents(mel[None])  # (1, T', D)
        codes = model.search_codes(mel[None], search)  # (1, Q, T')
        recon = model.decode_codes(codes, levels)[0, :, : mel.shape[-1]]  # (M, T)
        decoded = mel_to_audio(recon, cfg, length=audio.shape[-1])
        floor = mel_to_audio(mel, cfg, length=audio.shape[-1])
        if levels is None:
            latents = model.decode_latents(z, mel.shape[-1])[0]  # (M, T), no quantizer
            unquantized = mel_to_audio(latents, cfg, length=audio.shape[-1])
            rows["sc_latents"].append(float(spectral_convergence(audio, unquantized, cfg)))
        rows["mel_l1"].append(float((recon - mel).abs().mean()))
        for band, err in loudness_bands(mel, recon).items():
            rows[f"l1_{band}"].append(err)
        rows["sc"].append(float(spectral_convergence(audio, decoded, cfg)))
        rows["sc_floor"].append(float(spectral_convergence(audio, floor, cfg)))
        rows["l1"].append(float(log_mel_l1(audio, decoded, cfg)))
        rows["l1_floor"].append(float(log_mel_l1(audio, floor, cfg)))
        files.append((path.name, rows["sc"][-1] / rows["sc_floor"][-1]))
    out: dict[str, Any] = {k: statistics.median(v) for k, v in rows.items() if v}
    if rows["sc_latents"]:
        ratios = [a / f for a, f in zip(rows["sc_latents"], rows["sc_floor"], strict=True)]
        out["latents_ratio"] = statistics.median(ratios)
    out["files"] = sorted(files, key=lambda f: -f[1])
    return out


# Loudness bands (dB below the file's loudest mel bin) for the mel L1: spectral convergence of
# the decoded audio is set by the loud bins, the plain L1 weighs every bin alike.
BANDS = ("0-20dB", "20-40dB", "40-60dB", "60dB+")


def loudness_bands(mel: torch.Tensor, recon: torch.Tensor) -> dict[str, float]:
    """Mean |recon - mel| (nats) over the bins of each loudness band of the true mel (M, T)."""
    below = (mel.max() - mel) * (20 / 2.302585)  # dB below the peak (log-mel is ln magnitude)
    err = (recon - mel).abs()
    edges = [(0, 20), (20, 40), (40, 60), (60, 1e9)]
    out = {}
    for band, (lo, hi) in zip(BANDS, edges, strict=True):
        sel = (below >= lo) & (below < hi)
        out[band] = float(err[sel].mean()) if bool(sel.any()) else float("nan")
    return out


def split_paths(ds: Dataset, folder: Path, n_train: int) -> tuple[list[Path], list[Path]]:
    val = [folder / r.name for r in ds.files_in_split("val")]
    train = [folder / r.name for r in ds.files_in_split("train")]
    step = max(1, len(train) // n_train)
    return val, train[::step][:n_train]


def audio_check_cost(trainer: VQVAETrainer, result: TrainResult, hooks: TimingHooks) -> None:
    """The trainer's own decoded-audio figure, and what one check costs against the epochs
    between two checks (the floor is already computed: this is the per-check cost)."""
    started = time.perf_counter()
    trainer.audio_check.measure(result.model)
    check_s = time.perf_counter() - started
    epoch_s = statistics.median(m["epoch_s"] for m in hooks.metrics)
    every = max(trainer.train_config.audio_every, 1)
    a = result.audio
    print(f"trainer's audio check (epoch {a['epoch']}, {a['chunks']} chunks, SC on {a['on']}, "
          "nearest codes): "
          f"{a['sc']:.3f} vs floor {a['floor']:.3f} = {a['ratio']:.2f}x; one check {check_s:.2f} s "
          f"= {100 * check_s / (every * epoch_s):.1f}% of {every} epochs")  # fmt: skip
    print("val L1 per epoch:", " ".join(f"{m['val_l1']:.3f}" for m in hooks.metrics))


def report(name: str, m: dict[str, Any], bar: float) -> None:
    ratio = m["sc"] / m["sc_floor"]
    print(f"{name:>10}: mel L1 {m['mel_l1']:.3f} | decoded SC {m['sc']:.3f} vs floor "
          f"{m['sc_floor']:.3f} = {ratio:.2f}x (bar {bar}x: {'met' if ratio <= bar else 'not met'})"
          f" | decoded log-mel L1 {m['l1']:.3f} vs floor {m['l1_floor']:.3f}")  # fmt: skip
    per_file = statistics.median(r for _, r in m["files"])
    print(f"{'':>10}  median of per-file ratios {per_file:.2f}x (above: the median SC over the "
          "median floor)")  # fmt: skip
    print(f"{'':>10}  mel L1 by loudness below the file's peak: "
          + ", ".join(f"{b} {m[f'l1_{b}']:.3f}" for b in BANDS))
    if "latents_ratio" in m:  # the codes' share of the gap: the same model without quantizing
        print(f"{'':>10}  decoded from the unquantized latents: {m['latents_ratio']:.2f}x the "
              f"floor (median of per-file ratios)")  # fmt: skip
    print(f"{'':>10}  per file, worst first: "
          + ", ".join(f"{n} {r:.2f}x" for n, r in m["files"]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=3.0, help="training budget")
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--train-files", type=int, default=13, help="training files to evaluate")
    ap.add_argument("--subset", type=int, default=0, help="only the first N usable files (0: all)")
    ap.add_argument("--spread", action="store_true",
                    help="with --subset: N files spread evenly over the set, not the first N")
    ap.add_argument("--unseen", type=int, default=0,
                    help="with --subset: also decode K files of the set outside the subset")
    ap.add_argument("--quick", action="store_true", help="skip the first-k-levels figures")
    ap.add_argument("--save", type=Path, help="write the trained model here (safetensors)")
    ap.add_argument(
        "--model",
        type=json.loads,
        default={},
        help='VQVAEConfig overrides, JSON: {"channels": 256}',
    )
    ap.add_argument(
        "--train", type=json.loads, default={}, help='TrainConfig overrides, JSON: {"lr": 1e-3}'
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)  # deliberate: the bench owns the process
    torch.set_flush_denormal(True)

    cfg = MelConfig()
    paths = scan_folder(args.data)
    ds = build_dataset([(p.name, p.read_bytes()) for p in paths], cfg, seed=0)
    unseen: list[Path] = []
    if args.subset:  # the first N files the dataset took (a folder may hold a README)
        used = {r.name for r in ds.manifest if r.chunks > 0}
        usable = [p for p in paths if p.name in used]
        step = max(1, len(usable) // args.subset) if args.spread else 1
        paths = usable[::step][: args.subset]
        rest = [p for p in usable if p not in paths]
        unseen = rest[1 :: max(1, len(rest) // args.unseen)][: args.unseen] if args.unseen else []
        ds = build_dataset([(p.name, p.read_bytes()) for p in paths], cfg, seed=0)
    print(f"dataset: {len(ds.files_in_split('train'))} train / {len(ds.files_in_split('val'))} "
          f"val files, {len(ds.train_indices())} / {len(ds.val_indices())} chunks")  # fmt: skip

    sized, why_size = choose_size("cpu", args.model)  # what a CPU job gets
    model_config = VQVAEConfig.from_dict(sized)
    probe = VQVAETrainer(ds, model_config, TrainConfig.from_dict(args.train), TimingHooks())
    bare = bare_steps_per_s(probe, steps=30)
    train_config = TrainConfig.from_dict(
        {**args.train, "minutes": args.minutes, "preview_every": 0}
    )
    print(
        f"model: {probe.model_config}\nchosen: {probe.chosen['why']}\nsize: {why_size}\ntrain: {train_config}"
    )

    hooks = TimingHooks()
    started = time.perf_counter()
    trainer = VQVAETrainer(ds, model_config, train_config, hooks)
    result = trainer.run()
    wall = time.perf_counter() - started
    (s0, t0), (s1, t1) = hooks.times[0], hooks.times[-1]
    real = (s1 - s0) / (t1 - t0)
    last = hooks.metrics[-1]

    if args.save:  # tensors plus the config as JSON metadata: nothing executes on load
        from safetensors.torch import save_file

        state = {k: v.contiguous() for k, v in result.model.state_dict().items()}
        save_file(state, str(args.save), {"config": json.dumps(result.model_config.to_dict())})
    val_paths, train_paths = split_paths(ds, args.data, args.train_files)
    print(
        f"\n{result.epochs} epochs, {last['step']} steps in {wall:.0f} s "
        f"(best epoch {result.best_epoch}); epoch {statistics.median(m['epoch_s'] for m in hooks.metrics):.2f} s"
    )
    print(f"throughput: real loop {real:.2f} steps/s (validation, metrics, "
          f"{hooks.checkpoint_bytes / 1e6:.1f} MB checkpoint each epoch) vs bare loop "
          f"{bare:.2f} steps/s = {real / bare:.2f}x")  # fmt: skip
    print(
        "utilisation per level:",
        [round(u, 2) for u in last["utilisation"]],
        "perplexity:",
        [round(p) for p in last["perplexity"]],
        "dead:",
        last["dead_codes"],
    )
    later = [m["utilisation"] for m in hooks.metrics[2:]] or [last["utilisation"]]
    print("utilisation (an epoch's batches, quantizer dropout), lowest per level from epoch 3 on:",
          [round(min(u[q] for u in later), 2) for q in range(len(later[0]))])  # fmt: skip
    checks = [(m["epoch"], m["codes_in_use"]) for m in hooks.metrics if "codes_in_use" in m]
    if checks:
        print("codes in use by the model over the training chunks at each audio check:")
        for epoch, used in checks:
            print(f"  epoch {epoch:3d}  {' '.join(f'{u:.2f}' for u in used)}")
        from_3 = [u for e, u in checks if e >= 3] or [checks[-1][1]]
        print("codes in use, lowest per level from epoch 3 on:",
              [round(min(u[q] for u in from_3), 2) for q in range(len(from_3[0]))],
              "(goal >= 0.9)")  # fmt: skip
    print("returned model over all training chunks (every level):",
          [round(u, 2) for u in result.codes_in_use])  # fmt: skip
    ref = result.refine
    if ref["iters"]:
        print(f"codebook refinement: {ref['iters']} Lloyd iterations over {ref['latents']} "
              f"latents, then {ref['decoder_steps']} decoder steps kept, "
              f"in {ref['seconds']:.1f} s: training loss {ref['train_loss_before']:.4f} -> "
              f"{ref['train_loss_after']:.4f}, validation loss {ref['val_loss_before']:.4f} -> "
              f"{ref['val_loss_after']:.4f} ({'kept' if ref['kept'] else 'undone'})")  # fmt: skip
    started = time.perf_counter()
    held_back = evaluate(result.model, val_paths, cfg) if val_paths else {}
    searched_s = time.perf_counter() - started
    print(f"codes searched by what they decode to ({SEARCH_CANDIDATES} candidates per level and "
          f"step, as `distill encode` and the inference worker encode): "
          f"{searched_s:.1f} s for the held-back files")  # fmt: skip
    if val_paths:
        report("val", held_back, 1.5)
    else:  # too little sound held out to validate on (MIN_VAL_CHUNKS): every file trained
        print("       val: none (every file trains)")
    report("train", evaluate(result.model, train_paths, cfg), 1.25)
    if unseen:  # files of the set the subset's codec never heard
        report("unseen", evaluate(result.model, unseen, cfg), 1.5)
    print("the quantizer's nearest codes (no search; what the trainer's checks and the prior's "
          "code sets use):")  # fmt: skip
    for name, paths in (("val", val_paths), ("train", train_paths), ("unseen", unseen)):
        if not paths:
            continue
        m = evaluate(result.model, paths, cfg, search=1)
        print(f"  {name}: decoded SC {m['sc']:.3f} vs floor {m['sc_floor']:.3f} = "
              f"{m['sc'] / m['sc_floor']:.2f}x")  # fmt: skip
    audio_check_cost(trainer, result, hooks)
    for k in range(1, 1 if args.quick or not val_paths else result.model_config.levels or 1):
        m = evaluate(result.model, val_paths, cfg, levels=k, search=1)
        print(
            f"  val, first {k} level(s): decoded SC {m['sc']:.3f} ({m['sc'] / m['sc_floor']:.2f}x)"
        )


if __name__ == "__main__":
    main()
