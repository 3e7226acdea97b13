"""Removing finished jobs from the journal, and what the artifact store keeps of them: policy
over the job journal and :class:`~distill.broker.services.retention.Retention`, no sockets.

Two ways in. :meth:`JobRemoval.remove` takes named jobs, all or none: a job that cannot go
(unknown, not finished, or the dependency of a queued or running job) refuses the whole
request, naming each such job and why. :meth:`JobRemoval.prune_step` takes the jobs a rule
names (finished at least so long ago, of one status if asked), oldest first, in small
transactions until a time budget is spent, and says where the next step goes on: the broker
calls it once per loop turn (automatic pruning) or once per ``prune`` request, so that
removing ten thousand jobs never holds the socket loop longer than one step.

Artifacts. A removed job's checkpoints and previews go with it; its results (a model, sounds,
a dataset: every other artifact uploaded under its id) stay unless ``results`` is asked for.
Either way an artifact that a job that stays names (in its params or its result), or that a
queued or running job resumes from, is kept, and counted as such; it then goes with the last
of the jobs that name it, whenever and however that one is removed (a dataset kept for the
RVQ-VAE job whose result names it goes with that job: otherwise where chunks happened to fall
would decide what a prune leaves). The artifacts go before the journal rows: a crash between
the two leaves jobs whose checkpoints are gone (a retry starts afresh, and says so), never
artifacts that no job in the journal owns.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from distill.broker.services.retention import Retention
from distill.broker.store.artifacts import ArtifactRecord
from distill.broker.store.journal import FinishedJob, JobStore, refusal_message
from distill.shared.errors import JobError

# One step of pruning holds the loop about this long: a request that crosses the loop twice
# (to a worker and back) may wait for two steps.
STEP_BUDGET_S = 0.04
# Jobs removed per transaction: sized as it goes so that one takes about CHUNK_TARGET_S (a job
# with thousands of metric rows costs more than a generate job with none): twice as many after
# a chunk that took under half of it, half as many after one that took over twice it. A chunk
# pays two fsyncs whatever its size (4-16 ms on a busy disk): sized by its pace alone, chunks
# shrank to one job each and 10 000 jobs took 1 200 chunks. A step takes no chunk it expects
# to run past its budget.
FIRST_CHUNK_JOBS = 32
MIN_CHUNK_JOBS = 8
MAX_CHUNK_JOBS = 512
CHUNK_TARGET_S = 0.015


@dataclass(frozen=True)
class PruneRule:
    """Which finished jobs a prune removes, and how."""

    older_than_s: float  # finished at least this long ago
    status: str | None = None  # only jobs that ended so (succeeded, failed, cancelled)
    results: bool = False  # their results go too (else only checkpoints and previews)
    dry_run: bool = False  # say what would go; change nothing


@dataclass
class Tally:
    """What a removal took from the journal and the store (in a dry run: would take)."""

    jobs: list[FinishedJob] = field(default_factory=list)
    released: list[ArtifactRecord] = field(default_factory=list)
    kept_in_use: list[ArtifactRecord] = field(default_factory=list)  # another job needs them
    kept_results: list[ArtifactRecord] = field(default_factory=list)  # not asked to remove
    pinned: list[tuple[str, str]] = field(default_factory=list)  # (job, why it stays)
    others: int = 0  # jobs the rule names that other keys own, left alone (a prune's)

    def add(self, other: Tally) -> None:
        self.jobs += other.jobs
        self.released += other.released
        self.kept_in_use += other.kept_in_use
        self.kept_results += other.kept_results
        self.pinned += other.pinned
        self.others += other.others

    def to_dict(self) -> dict[str, Any]:
        def total(artifacts: list[ArtifactRecord]) -> dict[str, int]:
            return {"count": len(artifacts), "bytes": sum(a.size for a in artifacts)}

        return {
            "jobs": [job.to_dict() for job in self.jobs],
            "released": total(self.released),
            "kept_in_use": total(self.kept_in_use),
            "kept_results": total(self.kept_results),
            "pinned": [{"id": job_id, "reason": why} for job_id, why in self.pinned],
            "others": self.others,
        }


class JobRemoval:
    def __init__(
        self,
        journal: JobStore,
        retention: Retention | None,
        *,
        timer: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.journal = journal
        self.retention = retention  # None: a broker without an artifact store
        self._timer = timer
        self.chunk = FIRST_CHUNK_JOBS

    def remove(self, ids: Sequence[str], *, results: bool, dry_run: bool) -> Tally:
        """Remove the jobs ``ids``, all or none (:class:`JobError` names each that cannot go)."""
        ids = list(dict.fromkeys(ids))
        if refusals := self.journal.removal_refusals(ids):
            raise JobError(refusal_message(refusals, len(ids)))
        jobs = []
        for job_id in ids:
            record = self.journal.get(job_id, with_metrics=False)
            assert record.finished_at is not None, record  # a finished job has its end
            jobs.append(FinishedJob(job_id, record.service, record.status, record.finished_at))
        return self._take(jobs, results=results, dry_run=dry_run)

    def prune_step(
        self,
        rule: PruneRule,
        cursor: tuple[float, int] | None,
        *,
        budget_s: float = STEP_BUDGET_S,
        may_remove: Callable[[str | None], bool] | None = None,
        owner_of: Callable[[str], str | None] | None = None,
    ) -> tuple[Tally, tuple[float, int] | None]:
        """Remove the jobs ``rule`` names from ``cursor`` on (None: from the oldest), chunk by
        chunk while ``budget_s`` lasts (one chunk at least). Returns what went and where the
        next step starts; None there: nothing is left to look at. ``may_remove(owner)``: False
        leaves a job alone, counted in ``others`` (a client's prune takes its own jobs only),
        and keeps it out of ``pinned`` (``owner_of`` gives a pinned job's owner)."""
        started = self._timer()
        tally = Tally()
        while True:
            page = self.journal.prunable(older_than_s=rule.older_than_s, status=rule.status,
                                         after=cursor, limit=self.chunk)  # fmt: skip
            pinned, jobs = page.pinned, page.jobs
            if may_remove is not None and owner_of is not None:
                pinned = [(job_id, why) for job_id, why in pinned if may_remove(owner_of(job_id))]
                tally.others += len(page.pinned) - len(pinned)
            tally.pinned += pinned
            if may_remove is not None:
                jobs = [job for job in page.jobs if may_remove(job.owner)]
                tally.others += len(page.jobs) - len(jobs)
            if jobs:
                took = self._timer()
                tally.add(self._take(jobs, results=rule.results, dry_run=rule.dry_run))
                self._resize(len(jobs), self._timer() - took)
            cursor = page.cursor
            if cursor is None or self._timer() - started + CHUNK_TARGET_S > budget_s:
                return tally, cursor

    def _resize(self, jobs: int, elapsed_s: float) -> None:
        """The next chunk's size, after one of ``jobs`` jobs (a full one: a short page says
        nothing of the pace) took ``elapsed_s``."""
        if elapsed_s < CHUNK_TARGET_S / 2 and jobs >= self.chunk:
            self.chunk = min(2 * self.chunk, MAX_CHUNK_JOBS)
        elif elapsed_s > 2 * CHUNK_TARGET_S:
            self.chunk = max(self.chunk // 2, MIN_CHUNK_JOBS)

    def _take(self, jobs: list[FinishedJob], *, results: bool, dry_run: bool) -> Tally:
        """Remove ``jobs`` (all removable) and the artifacts that go with them."""
        ids = [job.id for job in jobs]
        tally = Tally(jobs=list(jobs))
        settled: list[str] = []
        if self.retention is not None:
            goes, tally.kept_results = self.retention.of_jobs(ids, results=results)
            left = self.journal.to_release_with(ids) - {a.sha256 for a in goes}
            goes += self.retention.artifacts.records(sorted(left))
            needed = self.journal.needed_artifacts([a.sha256 for a in goes], besides=ids)
            tally.kept_in_use = [a for a in goes if a.sha256 in needed]
            goes = [a for a in goes if a.sha256 not in needed]
            tally.released = goes if dry_run else self.retention.release(goes, needed)
            settled = sorted(left - needed)  # released now, or no longer stored
        if not dry_run:
            kept = [a.sha256 for a in tally.kept_in_use]
            self.journal.remove(ids, release_later=kept, settled=settled)
        return tally
