"""Benchmark: phase options, generation speed, decode latency and an edit's round trip.

    /work/venv/bin/python bench/infer.py --threads 2
    /work/venv/bin/python bench/infer.py --only phase --files 24

Prints, each against a baseline measured in the same run:

- **phase**: for Griffin-Lim from a random start (the old path) and from the phase-vocoder start
  at several iteration counts, the mean spectral convergence against the original audio of real
  percussion files (their log-mels inverted), its ratio to Griffin-Lim-32 from a random start,
  and speed in audio seconds per wall second (mel inversion included);
- **generation** (prior + decode + phase), default-sized model (RVQ-VAE 256 ch, 4 x 256 codes,
  LSTM 256), untrained weights (speed does not depend on what was learnt), 4-second sounds, in
  generated seconds per wall second at batch 1 and 16, for each phase quality and for the
  Griffin-Lim-32 path (random start, as before this benchmark);
- **decode latency** of a 4-second grid: cold (the model file read and built, then decoded) and
  warm (cached model), against the phase reconstruction alone on the same mel (goal: warm <=
  1.15x);
- **edit round trip**: a broker and an infer worker on loopback; a client applies edits to a
  4-second grid (``op: edit``, coarse preview) and times each reply (goal: median <= 100 ms);
- **job memory**: a generate job (``--job-count`` sounds of ``--job-seconds``, default 64 x 10
  s) the way it ran before (baseline: every sound's audio kept until the last was decoded, then
  each exported and stored) and as ``infer.run_job`` runs it now (each sound written to a file
  as its batch is decoded, stored at the end), each in a fresh process: the peak of numpy's
  allocations (tracemalloc) and the peak resident memory over the process with the model loaded
  (VmHWM, reset after loading), the ratios to the baseline, the time it took and whether the
  two stored the same files (the same bytes).

    /work/venv/bin/python bench/infer.py --only job --threads 1
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import free_port_block, spawn, stop, wait_for  # noqa: E402

from distill.shared.audio.export import ExportMetadata, export_audio  # noqa: E402
from distill.shared.audio.io import load_audio  # noqa: E402
from distill.shared.audio.mel import MelConfig, log_mel  # noqa: E402
from distill.shared.audio.metrics import spectral_convergence  # noqa: E402
from distill.shared.audio.phase import mel_to_audio, mel_to_audio_quality  # noqa: E402
from distill.shared.model import inference as inf  # noqa: E402
from distill.shared.model.codes import CodeGrid, EditSession  # noqa: E402
from distill.shared.model.modelfile import DistillModel, load_model, save_model  # noqa: E402
from distill.shared.model.prior import Prior, PriorConfig  # noqa: E402
from distill.shared.model.sampling import SamplingParams, sample  # noqa: E402
from distill.shared.model.vqvae import VQVAE, VQVAEConfig  # noqa: E402
from distill.workers import infer  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "percussion"
SECONDS = 4.0
PHASE_OPTIONS = [("random", 32), ("random", 8), ("random", 4), ("vocoder", 0), ("vocoder", 2),
                 ("vocoder", 4), ("vocoder", 6), ("vocoder", 8), ("vocoder", 16),
                 ("vocoder", 32)]  # fmt: skip


CLOCK: Callable[[], float] = time.perf_counter  # --clock cpu: time.process_time


def timed(fn: Callable[[], object], runs: int = 3) -> float:
    """The best time of ``runs`` calls: the machine is shared; the best is least disturbed."""
    best = float("inf")
    for _ in range(runs):
        start = CLOCK()
        fn()
        best = min(best, CLOCK() - start)
    return best


def _wall(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench_phase(n_files: int) -> None:
    cfg = MelConfig()
    files = sorted(DATA.glob("*.flac"))
    files = files[:: max(1, len(files) // n_files)][:n_files]
    sounds = [load_audio(f, cfg.sample_rate) for f in files]
    mels = [log_mel(a, cfg) for a in sounds]
    total_s = sum(a.shape[-1] for a in sounds) / cfg.sample_rate
    print(f"\nphase: {len(files)} percussion files, {total_s:.1f} s (log-mel -> audio)")
    print(f"{'start':8} {'iters':>5} {'SC':>7} {'SC/GL32':>8} {'x realtime':>11}")
    base = None
    for init, n_iter in PHASE_OPTIONS:
        outs: list[torch.Tensor] = []

        def run(init: str = init, n_iter: int = n_iter, outs: list[torch.Tensor] = outs) -> None:
            outs.clear()
            for a, m in zip(sounds, mels, strict=True):
                outs.append(mel_to_audio(m, cfg, n_iter=n_iter, init=init, length=a.shape[-1]))  # type: ignore[arg-type]

        wall = timed(run, 2)
        sc = statistics.mean(
            float(spectral_convergence(a, y, cfg)) for a, y in zip(sounds, outs, strict=True)
        )
        base = sc if base is None else base
        print(f"{init:8} {n_iter:5d} {sc:7.3f} {sc / base:8.2f} {total_s / wall:10.1f}x")


def default_model() -> DistillModel:
    torch.manual_seed(0)
    vq = VQVAE(VQVAEConfig(codebook_size=256, levels=4)).eval()
    prior = Prior(PriorConfig(levels=4, codebook_size=256)).eval()
    return DistillModel(mel_config=MelConfig(), vqvae=vq, prior=prior, summary={})


def bench_generation(model: DistillModel) -> None:
    print(f"\ngeneration: prior + decode + phase, {SECONDS:g} s sounds, generated s per "
          f"{'CPU' if CLOCK is time.process_time else 'wall'} s")  # fmt: skip
    params = SamplingParams(seed=1)
    rows: list[tuple[str, Callable[[int], object]]] = []
    for quality in ("preview", "fast", "best"):
        rows.append((quality, lambda b, q=quality: inf.generate(
            model, count=b, seconds=SECONDS, params=params, quality=q)))  # fmt: skip

    def gl32(batch: int) -> object:  # the path before: Griffin-Lim 32 from a random start
        grid = sample(model.prior, batch=batch, steps=inf.steps_for(model, SECONDS), params=params)  # type: ignore[arg-type]
        with torch.inference_mode():
            mel = model.vqvae.decode_codes(grid)
            return mel_to_audio(mel, model.mel_config, n_iter=32)

    rows.insert(0, ("GL-32 random (baseline)", gl32))
    base: dict[int, float] = {}
    for name, fn in rows:
        cells = []
        for batch in (1, 16):
            speed = (
                batch
                * SECONDS
                / timed(lambda fn=fn, batch=batch: fn(batch), 2 if batch == 1 else 1)
            )
            base.setdefault(batch, speed)
            cells.append(f"batch {batch:2d}: {speed:6.1f}x ({speed / base[batch]:.2f} of baseline)")
        print(f"  {name:24} " + "   ".join(cells))


def bench_decode(model: DistillModel, path: Path) -> None:
    steps = inf.steps_for(model, SECONDS)
    codes = np.random.default_rng(0).integers(0, 256, (4, steps))
    print(f"\ndecode latency, a {SECONDS:g} s grid ({steps} steps)")
    with torch.inference_mode():
        mel = model.vqvae.decode_codes(torch.from_numpy(codes)[None])  # (1, M, frames)
    for quality in ("preview", "fast", "best"):
        cold = timed(lambda q=quality: inf.decode(load_model(path), codes, None, q), 2)
        warm = timed(lambda q=quality: inf.decode(model, codes, None, q), 3)
        phase = timed(lambda q=quality: mel_to_audio_quality(mel, model.mel_config, q), 3)
        print(f"  {quality:8} cold {cold * 1e3:6.1f} ms  warm {warm * 1e3:6.1f} ms  "
              f"phase alone {phase * 1e3:6.1f} ms  warm/phase {warm / phase:.2f}x (goal <= 1.15)")  # fmt: skip


def bench_round_trip(path: Path, threads: int, edits: int) -> None:
    from distill.shared.bus.artifacts import ArtifactClient
    from distill.shared.bus.cache import ArtifactCache
    from distill.shared.bus.client import Client

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        port = free_port_block()
        endpoint = f"tcp://127.0.0.1:{port}"
        procs = [
            spawn(["broker", "--port", str(port), "--data-dir", str(tmp / "b")], tmp / "b.log")
        ]
        procs.append(spawn(["worker", "infer", "--broker", endpoint, "--device", "cpu",
                            "--threads", str(threads)], tmp / "w.log"))  # fmt: skip
        try:
            with Client(endpoint, timeout_s=60) as c:
                wait_for(lambda: c.mmi_service("distill.infer"), 120)
                sha = ArtifactClient(c, cache=ArtifactCache(tmp / "cache")).put_file(
                    path, kind="model", name=path.name)  # fmt: skip
                steps = round(SECONDS * 48000 / 512)
                grid = np.random.default_rng(0).integers(0, 256, (4, steps))
                session = EditSession(CodeGrid(grid, 256)).to_dict()
                body = {"op": "edit", "model": sha, "session": session, "quality": "preview"}
                session = c.request("distill.infer", body)["session"]  # loads the model
                times = []
                for i in range(edits):
                    edit = {"op": "set_cell", "level": i % 4, "t": (7 * i) % steps, "code": i % 256}
                    start = time.perf_counter()
                    reply = c.request("distill.infer", {**body, "session": session,
                                                        "action": "apply", "edit": edit})  # fmt: skip
                    times.append(time.perf_counter() - start)
                    session = reply["session"]
                # the transport alone: a round trip the broker answers itself
                # wall time whatever --clock: a CPU clock would time only this client
                ping = statistics.median(
                    _wall(lambda: c.mmi_service("distill.infer")) for _ in range(20)
                )
        finally:
            for p in reversed(procs):
                stop(p)
    med, worst = statistics.median(times), max(times)
    print(f"\nedit round trip through the broker ({SECONDS:g} s grid, preview): median "
          f"{med * 1e3:.1f} ms, max {worst * 1e3:.1f} ms over {edits} edits (goal <= 100 ms); "
          f"broker round trip (mmi.service) {ping * 1e3:.2f} ms")  # fmt: skip


# --- job memory ----------------------------------------------------------------------------------

JOB_WAYS = ("kept (baseline)", "stored as made")


class _Store:
    """The artifact store as a job sees it, keeping the sha256 of each sound's bytes, not the
    bytes."""

    def __init__(self, model: Path) -> None:
        self.model = model
        self.stored: list[str] = []  # in the order stored

    def get_file(self, sha: str) -> Path:
        return self.model

    def put_bytes(self, data: bytes, *, kind: str, name: str, job: str | None = None) -> str:
        self.stored.append(hashlib.sha256(data).hexdigest())
        return self.stored[-1]

    def put_file(self, path: Path, *, kind: str, name: str, job: str | None = None) -> str:
        return self.put_bytes(path.read_bytes(), kind=kind, name=name, job=job)


class _Context:
    def __init__(self, params: dict[str, object], store: _Store) -> None:
        from distill.workers.runtime.context import JobInfo

        self.info = JobInfo(job_id="bench", service=infer.SERVICE, params=params)
        self.device, self.artifacts = "cpu", store
        self.batches: list[float] = []  # when each batch of first draws was decoded

    def check_cancel(self) -> None:
        pass

    def progress(self, fraction: float | None = None, **fields: object) -> None:
        if fields.get("stage") == "decoding":
            self.batches.append(time.perf_counter())


def job_before(ctx: _Context, count: int, seconds: float, quality: str, fmt: str) -> None:
    """``infer.run_job`` as it was: every sound decoded and kept, then each exported (through a
    temporary file) and stored."""
    model = infer.CACHE.get(str(ctx.info.params["model"]), "cpu", ctx.artifacts.get_file)
    params = infer._sampling(ctx.info.params, model)
    out = inf.generate(model, count=count, seconds=seconds, params=params, quality=quality,
                       on_batch=lambda done, total: ctx.progress(stage="decoding"))  # fmt: skip
    for i, audio in enumerate(out.audio):
        name = f"gen-{params.seed}-{i:03d}.{fmt}"
        recipe = inf.generate_recipe(params, count=count, seconds=seconds, quality=quality,
                                     index=i, render_frames=out.render_frames)  # fmt: skip
        meta = ExportMetadata(kind="generate", model_id=model.model_id, title=name, data=recipe)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / f"sound.{fmt}"
            export_audio(path, audio, out.sample_rate, metadata=meta,
                         subtype="FLOAT" if fmt == "wav" else "PCM_24")  # fmt: skip
            ctx.artifacts.put_bytes(path.read_bytes(), kind="audio", name=name)


def _rss_mib(field: str) -> float:
    """VmRSS or VmHWM (the peak) of this process, MiB; the peak from getrusage without /proc."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def job_child(way: int, model_path: Path, count: int, seconds: float, quality: str,
              trace: bool) -> None:  # fmt: skip
    """One way of running the job, in this (fresh) process; prints one JSON line. ``trace``:
    under tracemalloc, which sees numpy's arrays (not torch's) and slows the draw's Python
    loop several times: its run is timed apart."""
    store = _Store(model_path)
    ctx = _Context({"op": "generate", "model": "0" * 64, "count": count, "seconds": seconds,
                    "seed": 1, "quality": quality, "format": "wav"}, store)  # fmt: skip
    model = infer.CACHE.get("0" * 64, "cpu", store.get_file)
    inf.generate(model, count=1, seconds=0.5, params=SamplingParams(), quality=quality)  # warm
    loaded = _rss_mib("VmRSS")
    try:  # the peak from here on (Linux: 5 resets VmHWM to the current RSS)
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    if trace:
        tracemalloc.start()
    start = time.perf_counter()
    if way == 0:
        job_before(ctx, count, seconds, quality, "wav")
    else:
        infer.run_job(ctx)  # type: ignore[arg-type]
    wall = time.perf_counter() - start
    _, traced = tracemalloc.get_traced_memory()  # (0, 0) untraced
    tracemalloc.stop()
    t = ctx.batches
    # the codes are drawn before the first batch is decoded; the batches take alike
    drawn = t[0] - start - (t[-1] - t[0]) / max(1, len(t) - 1) if len(t) > 1 else float("nan")
    print(json.dumps({"traced_mib": traced / 2**20, "peak_mib": _rss_mib("VmHWM") - loaded,
                      "loaded_mib": loaded, "wall_s": wall, "draw_s": drawn,
                      "decode_s": t[-1] - start - drawn if t else float("nan"),
                      "files": store.stored}))  # fmt: skip


def bench_job(path: Path, count: int, seconds: float, quality: str, threads: int) -> None:
    audio = count * seconds * 48000 * 4 / 2**20
    print(f"\njob memory: a generate job of {count} sounds of {seconds:g} s ({quality}, WAV; "
          f"{audio:.0f} MiB of float32 audio), each way in a fresh process")  # fmt: skip
    runs = []
    for way in range(len(JOB_WAYS)):
        run = {}
        for trace in (False, True):  # resident memory and time; then numpy's peak
            out = subprocess.run([sys.executable, __file__, "--job-child", str(way), "--model",
                                  str(path), "--job-count", str(count), "--job-seconds",
                                  str(seconds), "--job-quality", quality, "--threads",
                                  str(threads), *(["--job-trace"] if trace else [])],
                                 capture_output=True, text=True, check=True)  # fmt: skip
            got = json.loads(out.stdout.strip().splitlines()[-1])
            run.update({"traced_mib": got["traced_mib"]} if trace else got)
        runs.append(run)
    base = runs[0]
    print(f"  (the process with the model loaded: {base['loaded_mib']:.0f} MiB resident)")
    for name, r in zip(JOB_WAYS, runs, strict=True):
        print(f"  {name:16} numpy peak {r['traced_mib']:7.1f} MiB ({r['traced_mib'] / base['traced_mib']:.3f} "
              f"of baseline)   resident peak over loaded {r['peak_mib']:7.1f} MiB "
              f"({r['peak_mib'] / base['peak_mib']:.3f} of baseline)   {r['wall_s']:6.1f} s "
              f"(drawing ~{r['draw_s']:.1f} s, decoding ~{r['decode_s']:.1f} s)")  # fmt: skip
    same = "yes" if runs[0]["files"] == runs[1]["files"] else "NO"
    print(f"  the same {len(runs[0]['files'])} files stored, in the same order: {same}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--files", type=int, default=24)
    parser.add_argument("--edits", type=int, default=30)
    parser.add_argument("--only", choices=["phase", "generation", "decode", "edit", "job"],
                        default=None)  # fmt: skip
    parser.add_argument("--job-count", type=int, default=64)
    parser.add_argument("--job-seconds", type=float, default=10.0)
    parser.add_argument("--job-quality", default="fast")
    parser.add_argument("--job-child", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--job-trace", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="cpu: this process's CPU time (a loaded machine inflates wall time "
                             "far more than CPU time; use with --threads 1)")  # fmt: skip
    args = parser.parse_args()
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    torch.set_num_threads(args.threads)
    if args.job_child is not None:
        job_child(args.job_child, args.model, args.job_count, args.job_seconds, args.job_quality,
                  args.job_trace)  # fmt: skip
        return
    print(f"torch threads {args.threads}, clock {args.clock}, load average "
          f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}")  # fmt: skip
    model = default_model()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "default.distill"
        model = DistillModel(mel_config=model.mel_config, vqvae=model.vqvae, prior=model.prior,
                             summary={}, model_id=save_model(path, model))  # fmt: skip
        if args.only in (None, "phase"):
            bench_phase(args.files)
        if args.only in (None, "generation"):
            bench_generation(model)
        if args.only in (None, "decode"):
            bench_decode(model, path)
        if args.only in (None, "edit"):
            bench_round_trip(path, args.threads, args.edits)
        if args.only in (None, "job"):
            bench_job(path, args.job_count, args.job_seconds, args.job_quality, args.threads)


if __name__ == "__main__":
    main()
