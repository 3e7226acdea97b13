"""Preprocessing speed on the percussion set, against the bare log-mel it cannot beat.

    python bench/preprocess.py [--folder PATH] [--repeats 3] [--threads N]

Prints seconds of audio per second of wall time (x real time) for the whole
``build_dataset`` path (decode, validate, downmix, trim, resample, normalise, pad, log-mel,
chunk, split), beside ``log_mel`` alone on the same audio already decoded and resampled, timed
in the same run, and their ratio (how many times the full path costs the features alone).
Audio seconds are the files' own durations (before trimming) for both figures. Each figure is
the best of ``--repeats`` runs, since a shared machine only ever adds time.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from distill.shared.audio.dataset import build_dataset
from distill.shared.audio.io import pad_to_length, prepare_audio, read_audio, scan_folder
from distill.shared.audio.mel import MelConfig, log_mel

DEFAULT_FOLDER = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "percussion"


def best_of(repeats: int, fn: object) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()  # type: ignore[operator]
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--folder", type=Path, default=DEFAULT_FOLDER.resolve())
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = MelConfig()
    files = [(p.name, p.read_bytes()) for p in scan_folder(args.folder)]

    ds = build_dataset(files, cfg)  # warm-up: caches transforms, pages in libraries
    ok = [r for r in ds.manifest if r.status == "ok"]
    audio_s = sum(r.duration_s for r in ok)
    full_s = best_of(args.repeats, lambda: build_dataset(files, cfg))

    usable = {r.name for r in ok}
    prepared = [
        pad_to_length(
            prepare_audio(read_audio(data, name=name), cfg.sample_rate), cfg.chunk_samples
        )
        for name, data in files
        if name in usable
    ]

    def mels_only() -> None:
        with torch.no_grad():
            for audio in prepared:
                log_mel(audio, cfg)

    mel_s = best_of(args.repeats, mels_only)

    print(f"folder            {args.folder}")
    print(f"files             {len(files)} ({len(ok)} used, {len(files) - len(ok)} skipped)")
    print(f"audio             {audio_s:.1f} s, {ds.mels.shape[0]} chunks")
    print(f"torch threads     {torch.get_num_threads()}")
    print(f"build_dataset     {full_s:.3f} s  = {audio_s / full_s:8.1f} x real time")
    print(f"log_mel alone     {mel_s:.3f} s  = {audio_s / mel_s:8.1f} x real time")
    print(f"ratio             build_dataset takes {full_s / mel_s:.1f}x the time of log_mel alone")


if __name__ == "__main__":
    main()
