"""Turn a worker service module into a runtime handler.

A service module defines ``SERVICE`` (its MDP name) and ``run_job(ctx) -> dict`` for jobs the
broker dispatches; it may also define ``handle_request(ctx, body) -> dict`` for short direct
requests (the code editor's decode, for instance). Replies are ``{"ok": true, "result": …}``,
or ``{"ok": false, "error": {code, message}}`` (plus ``"cancelled": true`` when cancelled).
"""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType
from typing import Any

from distill.shared.bus import protocol as P
from distill.shared.bus.artifacts import ArtifactClient
from distill.shared.bus.codec import unpack_map
from distill.shared.bus.core import check_body_size
from distill.shared.bus.messages import JobDispatch, Reply
from distill.shared.errors import ArtifactDamaged, DecodeError, DistillError, JobCancelled, code_of
from distill.shared.logs import get_logger
from distill.workers.runtime.context import JobInfo
from distill.workers.runtime.mdp import Delivery, Executor

log = get_logger("worker")


class RuntimeJobContext:
    """The JobContext a handler gets (see ``workers/runtime/context.py`` for the contract)."""

    def __init__(self, info: JobInfo, delivery: Delivery, executor: Executor, device: str) -> None:
        self.info = info
        self.device = device
        self._delivery = delivery
        self._executor = executor
        self._artifacts: ArtifactClient | None = None
        self.last_progress: dict[str, Any] | None = None  # what the job's reply carries

    @property
    def artifacts(self) -> ArtifactClient:
        if self._artifacts is None:
            self._artifacts = ArtifactClient(self._executor.client)
        return self._artifacts

    @property
    def topic(self) -> str:
        return f"job.{self.info.job_id}"

    @property
    def cancelled(self) -> bool:
        return self._delivery.cancel.is_set()

    def check_cancel(self) -> None:
        if self._delivery.cancel.is_set():
            raise JobCancelled(f"job {self.info.job_id} was cancelled")

    def progress(self, fraction: float | None = None, **fields: Any) -> None:
        event = {"type": "progress", "job": self.info.job_id, "fraction": fraction, **fields}
        self.last_progress = event
        self._executor.publish(self.topic, event)

    def metrics(self, **values: Any) -> None:
        # A request, not a fire-and-forget event: the broker stores the row before it answers,
        # so the loss curve is whole even when the event stream drops something.
        # With the attempt: the broker refuses rows from an attempt it has given up on.
        self._executor.client.request(P.SERVICE_JOBS, {"op": "metrics", "id": self.info.job_id,
                                                        "row": values, "attempt": self.info.attempt})

    def event(self, type: str, **fields: Any) -> None:
        self._executor.publish(self.topic, {**fields, "type": type, "job": self.info.job_id})

    def save_checkpoint(self, data: bytes, *, name: str) -> str:
        sha = self.artifacts.put_bytes(data, kind="checkpoint", name=name, job=self.info.job_id)
        self._executor.client.request(P.SERVICE_JOBS, {"op": "checkpoint", "id": self.info.job_id,
                                                        "sha256": sha, "attempt": self.info.attempt})
        self.info.checkpoint = sha
        self.event("checkpoint", artifact=sha, name=name)
        return sha

    def load_checkpoint(self) -> bytes | None:
        """The job's checkpoint; None (a start from scratch, said in an event and the log)
        when the broker finds it damaged and removes it: training again beats failing for
        good on a bad disk sector."""
        if self.info.checkpoint is None:
            return None
        try:
            return self.artifacts.get_bytes(self.info.checkpoint)
        except ArtifactDamaged as e:
            log.warning("checkpoint_damaged", job=self.info.job_id, reason=str(e))
            self.event("note", message=f"the job's checkpoint was damaged in the broker's "
                                       f"store ({self.info.checkpoint}): starting from scratch")
            self.info.checkpoint = None
            return None


def parse_job(msg: dict[str, Any]) -> JobInfo:
    job = msg.get("job")
    if not isinstance(job, dict):
        raise DecodeError("job dispatch needs a 'job' map")
    d = JobDispatch.from_map(job)
    return JobInfo(job_id=d.id, service=d.service, params=d.params, attempt=d.attempt,
                   previous_errors=list(d.previous_errors), deps=dict(d.deps), checkpoint=d.checkpoint)


def error_reply(e: BaseException, *, cancelled: bool = False) -> list[bytes]:
    return [Reply.failure(code_of(e), str(e), cancelled=cancelled).encode()]


def module_handler(module: ModuleType, device: str) -> Callable[[Delivery, Executor], list[bytes]]:
    run_job = getattr(module, "run_job", None)
    handle_request = getattr(module, "handle_request", None)
    raw = bool(getattr(module, "RAW", False))

    def handle(delivery: Delivery, executor: Executor) -> list[bytes]:
        if raw and delivery.job_id is None:
            return list(delivery.body)
        try:
            if len(delivery.body) != 1:  # a Distill request is one msgpack map
                raise DecodeError(f"a request to {module.SERVICE} is one body frame, got "
                                  f"{len(delivery.body)}")  # fmt: skip
            msg = unpack_map(delivery.body[0], "request body")
            if delivery.job_id is not None:
                if run_job is None:
                    raise DecodeError(f"service {module.SERVICE} runs no jobs (it answers "
                                      "requests): no other attempt can do better")
                ctx = RuntimeJobContext(parse_job(msg), delivery, executor, device)
                result = run_job(ctx)
                progress = ctx.last_progress
            else:
                if handle_request is None:
                    raise DistillError(f"service {module.SERVICE} takes jobs only "
                                       "(submit through distill.jobs)")
                info = JobInfo(job_id="", service=module.SERVICE, params={})
                result = handle_request(RuntimeJobContext(info, delivery, executor, device), msg)
                progress = None
            reply = Reply.success(result, progress=progress).encode()
            # a reply too large to travel would make the broker drop this worker (and give the
            # request to the next one, and the next): an error that says so travels instead
            check_body_size([reply], "the reply")
            return [reply]
        except JobCancelled as e:
            return error_reply(e, cancelled=True)
        except DecodeError as e:
            return error_reply(e)
        except DistillError as e:
            return error_reply(e)

    return handle
