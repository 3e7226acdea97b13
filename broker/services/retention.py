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
"""

from __future__ import annotations

import re
from collections.abc import Callable

from distill.broker.store.artifacts import ArtifactRecord, ArtifactStore
from distill.broker.store.journal import JobRecord, JobStore
from distill.shared.errors import ArtifactError, JobError
from distill.shared.logs import get_logger

log = get_logger("broker.retention")

CHECKPOINT_KIND = "checkpoint"
PREVIEW_KIND = "preview"
_PREVIEW_EPOCH = re.compile(r"^epoch(\d+)-")


class Retention:
    def __init__(
        self,
        jobs: JobStore,
        artifacts: ArtifactStore,
        delete: Callable[[str], None],
        *,
        keep_preview_epochs: int,
    ) -> None:
        self.jobs = jobs
        self.artifacts = artifacts
        self.delete = delete  # removes one artifact (and its quota charge); raises ArtifactError
        self.keep_preview_epochs = keep_preview_epochs
        self.deleted = 0  # artifacts removed so far, for logs and tests

    def _remove(self, sha: str, why: str, in_use: set[str]) -> None:
        if sha in in_use or not self.artifacts.has(sha):
            return
        try:
            self.delete(sha)
        except ArtifactError as e:  # gone meanwhile, or in use: nothing to free now
            log.info("retention_skipped", artifact=sha, reason=str(e))
            return
        self.deleted += 1
        log.info("artifact_released", artifact=sha, reason=why)

    def superseded(self, job_id: str, previous: str) -> None:
        """``previous`` was the job's checkpoint until a newer one was registered just now."""
        self._remove(
            previous, f"checkpoint of {job_id} superseded", self.jobs.referenced_artifacts()
        )

    def job_finished(self, record: JobRecord) -> None:
        """A job ended: a succeeded one needs no checkpoint any more (it cannot be retried)."""
        if record.status == "succeeded":
            self._release_checkpoints(record, self.jobs.referenced_artifacts())

    def _release_checkpoints(self, record: JobRecord, in_use: set[str]) -> None:
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

    def trim_previews(self, job_id: str, in_use: set[str] | None = None) -> None:
        """Keep the previews of the job's last ``keep_preview_epochs`` preview epochs."""
        by_epoch: dict[int, list[ArtifactRecord]] = {}
        for artifact in self.artifacts.list(kind=PREVIEW_KIND, job=job_id):
            if (m := _PREVIEW_EPOCH.match(artifact.name)) is not None:
                by_epoch.setdefault(int(m.group(1)), []).append(artifact)
        old = sorted(by_epoch)[: max(0, len(by_epoch) - self.keep_preview_epochs)]
        if not old:
            return
        in_use = self.jobs.referenced_artifacts() if in_use is None else in_use
        for epoch in old:
            for artifact in by_epoch[epoch]:
                self._remove(artifact.sha256, f"preview of {job_id} epoch {epoch}", in_use)

    def sweep(self, now: float = 0.0) -> None:
        """Apply the rules to every job that has checkpoints or previews in the store."""
        in_use = self.jobs.referenced_artifacts()
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
