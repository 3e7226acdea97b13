"""``distill.sleep``: sleeps, then answers. The test and benchmark service for slow requests and
for the job queue (the "sleep-and-echo" service).

Direct request ``{"seconds": s, "value": v}`` → ``{"value": v, "pid": …}`` after ``s`` seconds.
Job params ``{"sleep_s", "steps", "value", "fail", "fail_attempts", "checkpoint",
"fail_attempts_at_end"}``: sleeps in ``steps`` cancellable steps with progress, fails on purpose
when asked (at the start, or with ``fail_attempts_at_end`` after its steps), returns the value,
the attempt and the dependencies' results. With ``checkpoint`` it stores one after each step and
resumes after the last one stored (``resumed_at``, also in its failures): the harness for
checkpoint handling that needs no training.
"""

from __future__ import annotations

import os
import time
from typing import Any

from distill.workers.runtime.context import JobContext

SERVICE = "distill.sleep"
USES_TORCH = False


def handle_request(ctx: JobContext, body: dict[str, Any]) -> dict[str, Any]:
    seconds = float(body.get("seconds", 0.0))
    steps = max(1, int(seconds / 0.05))
    for _ in range(steps):
        ctx.check_cancel()  # the worker stopping (or the request abandoned) ends it within a step
        time.sleep(seconds / steps)
    return {"value": body.get("value"), "pid": os.getpid()}


def run_job(ctx: JobContext) -> dict[str, Any]:
    params = ctx.info.params
    steps = max(1, int(params.get("steps", 1)))
    sleep_s = float(params.get("sleep_s", 0.0))
    if int(params.get("fail_attempts", 0)) >= ctx.info.attempt:
        raise RuntimeError(f"asked to fail attempt {ctx.info.attempt}")
    if params.get("fail"):
        raise RuntimeError(str(params["fail"]))
    saved = ctx.load_checkpoint() if params.get("checkpoint") else None
    resumed_at = int(saved.decode()) if saved else 0
    for step in range(resumed_at, steps):
        ctx.check_cancel()
        time.sleep(sleep_s / steps)
        ctx.progress((step + 1) / steps, step=step + 1, steps=steps)
        ctx.metrics(step=step + 1, value=float(step))
        if params.get("checkpoint"):
            ctx.save_checkpoint(str(step + 1).encode(), name=f"step {step + 1}")
    ctx.check_cancel()
    if int(params.get("fail_attempts_at_end", 0)) >= ctx.info.attempt:
        raise RuntimeError(f"asked to fail attempt {ctx.info.attempt} at its end "
                           f"(resumed at step {resumed_at})")
    return {"value": params.get("value"), "attempt": ctx.info.attempt, "deps": ctx.info.deps,
            "steps_done": steps, "resumed_at": resumed_at, "pid": os.getpid()}
