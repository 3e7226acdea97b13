"""What the artifact store keeps of a training job: policy over the job journal and the store.

A training job uploads a checkpoint (model, best weights, optimizer state: ~130 MB for the
default model) each time it saves, and audio previews every few epochs. Kept:

* the job's latest checkpoint while the job can still run or be retried (queued, running,
  failed, cancelled); a superseded checkpoint is deleted as soon as its successor is
  registered (the successor's upload finished, fsynced and renamed in, before it was
  registered), and every checkpoint of a job that succeeded is deleted (its final model, a
  separate artifact, is what stays);
* previews of the job's last ``keep_preview_epochs`` preview epochs. Previews are named
  ``epoch<NNNN>-...`` by the training worker; one whose name does not say its epoch is kept.

Deletions go through ``delete`` (the artifact service's own, so quotas are released too) and
never touch an artifact that a queued or running job needs. :meth:`Retention.sweep` applies the
same rules to the whole store, so a deletion missed by a crash is made up later.

A job removed from the journal takes its checkpoints and previews with it; what else it made
(its results: a model, sounds, a dataset) stays unless asked for too (:meth:`Retention.of_jobs`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Container, Sequence

from distill.broker.store.artifacts import ArtifactRecord, ArtifactStore
from distill.broker.store.journal import JobRecord, JobStore
from distill.shared.errors import ArtifactError, JobError
from distill.shared.logs import get_logger

log = get_logger("broker.retention")

CHECKPOINT_KIND = "checkpoint"
PREVIEW_KIND = "preview"
# What a job keeps only while it can run: gone with the job. Every other kind it made is a
# result, what the user came for.
WORKING_KINDS = frozenset({CHECKPOINT_KIND, PREVIEW_KIND})
_PREVIEW_EPOCH = re.compile(r"^epoch(\d+)-")


class Retention:
    def __init__(
        self,
        jobs: JobStore,
        artifacts: ArtifactStore,
        delete: Callable[[Sequence[str], Container[str]], list[ArtifactRecord]],
        *,
        keep_preview_epochs: int,
    ) -> None:
        self.jobs = jobs
        self.artifacts = artifacts
        # removes the stored artifacts of a list that the set (in use) does not hold, with
        # their quota charges; returns the records it removed
        self.delete = delete
        self.keep_preview_epochs = keep_preview_epochs
        self.deleted = 0  # artifacts removed so far, for logs and tests

    def _remove(self, sha: str, why: str, in_use: Container[str]) -> None:
        if sha in in_use or not self.artifacts.has(sha):
            return
        try:
            removed = self.delete([sha], in_use)
        except ArtifactError as e:  # nothing to free now
            log.info("retention_skipped", artifact=sha, reason=str(e))
            return
        if removed:
            self.deleted += 1
            log.info("artifact_released", artifact=sha, reason=why)

    def of_jobs(
        self, job_ids: Sequence[str], *, results: bool
    ) -> tuple[list[ArtifactRecord], list[ArtifactRecord]]:
        """What goes from the store when these jobs are removed from the journal, and what
        stays: their checkpoints and previews go; their results too only if ``results``.
        Whether another job still needs one is the caller's to check."""
        goes: list[ArtifactRecord] = []
        stays: list[ArtifactRecord] = []
        for artifact in self.artifacts.of_jobs(job_ids):
            (goes if results or artifact.kind in WORKING_KINDS else stays).append(artifact)
        return goes, stays

    def release(
        self, artifacts: Sequence[ArtifactRecord], in_use: Container[str]
    ) -> list[ArtifactRecord]:
        """Delete ``artifacts`` (all at once) but those ``in_use``; returns those removed."""
        removed = self.delete([a.sha256 for a in artifacts], in_use)
        self.deleted += len(removed)
        return removed

    def superseded(self, job_id: str, previous: str) -> None:
        """``previous`` was the job's checkpoint until a newer one was registered just now."""
        self._remove(
            previous, f"checkpoint of {job_id} superseded", self.jobs.in_use()
        )

    def job_finished(self, record: JobRecord) -> None:
        """A job ended: a succeeded one needs no checkpoint any more (it cannot be retried)."""
        if record.status == "succeeded":
            self._release_checkpoints(record, self.jobs.in_use())

    def _release_checkpoints(self, record: JobRecord, in_use: Container[str]) -> None:
        current = record.checkpoint if record.status != "succeeded" else None
        current_at = self._created_at(current)
        for artifact in self.artifacts.list(kind=CHECKPOINT_KIND, job=record.id):
            if artifact.sha256 == current:
                continue
            # Without a registered checkpoint to compare with, an upload may be about to be
            # registered: keep it. Older than the registered one: superseded.
            if record.status == "succeeded" or (
                current_at is not None and artifact.created_at <= current_at
            ):
                self._remove(
                    artifact.sha256, f"checkpoint of {record.status} job {record.id}", in_use
                )

    def _created_at(self, sha: str | None) -> float | None:
        if sha is None:
            return None
        try:
            return self.artifacts.stat(sha).created_at
        except ArtifactError:
            return None

    def trim_previews(self, job_id: str, in_use: Container[str] | None = None) -> None:
        """Keep the previews of the job's last ``keep_preview_epochs`` preview epochs."""
        by_epoch: dict[int, list[ArtifactRecord]] = {}
        for artifact in self.artifacts.list(kind=PREVIEW_KIND, job=job_id):
            if (m := _PREVIEW_EPOCH.match(artifact.name)) is not None:
                by_epoch.setdefault(int(m.group(1)), []).append(artifact)
        old = sorted(by_epoch)[: max(0, len(by_epoch) - self.keep_preview_epochs)]
        if not old:
            return
        in_use = self.jobs.in_use() if in_use is None else in_use
        for epoch in old:
            for artifact in by_epoch[epoch]:
                self._remove(artifact.sha256, f"preview of {job_id} epoch {epoch}", in_use)

    def sweep(self, now: float = 0.0) -> None:
        """Apply the rules to every job that has checkpoints or previews in the store."""
        in_use = self.jobs.in_use()
        jobs = {
            a.job
            for kind in (CHECKPOINT_KIND, PREVIEW_KIND)
            for a in self.artifacts.list(kind=kind)
            if a.job
        }
        for job_id in sorted(jobs):
            try:
                record = self.jobs.get(job_id, with_metrics=False)
            except JobError:
                continue  # uploaded under a job id this broker never had: the user's to delete
            self._release_checkpoints(record, in_use)
            self.trim_previews(job_id, in_use)
