"""``distill.preprocess``: a folder of sounds (as artifacts) in, one dataset artifact out.

Job params::

    {"files": [{"name": str, "sha256": str}, ...],   # the uploaded sounds, in folder order
     "mel_config": {...},                              # optional; MelConfig defaults
     "seed": int,                                      # optional; the train/val split seed (0)
     "silence_threshold_db": float,                    # optional; -60 dBFS (-120..0)
     "val_fraction": float}                            # optional; 0.1, in (0, 1)

Any other key, or a value of the wrong type or range, fails the job at once with a ``config``
error (:func:`distill.shared.train.jobparams.check_job_params`, which the broker also runs at
submit).

The work is :func:`distill.shared.audio.dataset.build_dataset`; this module only fetches files one at
a time (so a 500-file job never holds every file in memory), reports progress per file, checks
for cancellation per file, and stores the result. Every file appears in the returned manifest,
used or skipped with its reason.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from typing import Any, overload

from distill.shared.audio.dataset import ManifestRow, build_dataset
from distill.shared.audio.mel import MelConfig, mel_inverts
from distill.shared.errors import ConfigError
from distill.shared.ids import is_sha256
from distill.shared.train.jobparams import check_job_params
from distill.workers.runtime.context import JobContext

SERVICE = "distill.preprocess"


class _ArtifactFiles(Sequence[tuple[str, bytes]]):
    """The job's files as ``(name, bytes)``, fetched from the artifact store when indexed."""

    def __init__(self, ctx: JobContext, refs: list[tuple[str, str]]) -> None:
        self._ctx = ctx
        self._refs = refs

    def __len__(self) -> int:
        return len(self._refs)

    @overload
    def __getitem__(self, i: int) -> tuple[str, bytes]: ...
    @overload
    def __getitem__(self, i: slice) -> Sequence[tuple[str, bytes]]: ...
    def __getitem__(self, i: int | slice) -> tuple[str, bytes] | Sequence[tuple[str, bytes]]:
        if isinstance(i, slice):
            return _ArtifactFiles(self._ctx, self._refs[i])
        self._ctx.check_cancel()
        name, sha = self._refs[i]
        return name, self._ctx.artifacts.get_bytes(sha)


def _file_refs(params: dict[str, Any]) -> list[tuple[str, str]]:
    files = params.get("files")
    if not isinstance(files, list) or not files:
        raise ConfigError("preprocess: params.files must be a non-empty list of {name, sha256}")
    refs = []
    for k, f in enumerate(files):
        name = f.get("name") if isinstance(f, dict) else None
        sha = f.get("sha256") if isinstance(f, dict) else None
        if not isinstance(name, str) or not is_sha256(sha):
            raise ConfigError(f"preprocess: params.files[{k}] must be {{name: str, sha256: hex}}")
        refs.append((name, sha))
    return refs


def run_job(ctx: JobContext) -> dict[str, Any]:
    params = ctx.info.params
    check_job_params(SERVICE, params)  # as the broker does at submit: one final config error
    refs = _file_refs(params)
    cfg = MelConfig.from_dict(params.get("mel_config") or {})
    if not mel_inverts(cfg):  # a model trained on it could never make a sound
        raise ConfigError(f"preprocess: mel_config with n_fft {cfg.n_fft} has too few frequency "
                          f"bins for {cfg.n_mels} mel bands at {cfg.sample_rate} Hz: its "
                          "filterbank cannot be inverted (raise n_fft or lower n_mels)")  # fmt: skip

    def progress(done: int, total: int, row: ManifestRow) -> None:
        ctx.progress(done / total, file=row.name, status=row.status, reason=row.reason,
                     done=done, total=total)  # fmt: skip
        ctx.check_cancel()

    ds = build_dataset(
        _ArtifactFiles(ctx, refs),
        cfg,
        seed=params.get("seed", 0),  # checked above: an int >= 0, never a coerced 1.7 or "7"
        val_fraction=float(params.get("val_fraction", 0.1)),
        silence_threshold_db=float(params.get("silence_threshold_db", -60.0)),
        progress=progress,
    )
    ok = [r for r in ds.manifest if r.status == "ok"]
    sha = ctx.artifacts.put_bytes(
        ds.to_bytes(), kind="dataset", name=f"dataset-{len(ok)}-files.npz", job=ctx.info.job_id
    )
    return {
        "dataset": sha,
        "files_ok": len(ok),
        "files_skipped": len(ds.manifest) - len(ok),
        "chunks": int(ds.mels.shape[0]),
        "train_files": sum(r.split == "train" for r in ds.manifest),
        "val_files": sum(r.split == "val" for r in ds.manifest),
        "manifest": [asdict(r) for r in ds.manifest],
        "mel_config": cfg.to_dict(),
        "check_chunks": len(ds.check_chunks),  # `distill dataset show` reads this, not the dataset
    }
