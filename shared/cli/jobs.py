"""``distill jobs …`` and ``distill artifacts …``."""

from __future__ import annotations

import json
import re
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

import typer

from distill.shared.cli.common import (
    BrokerOpt,
    LiveLine,
    ago,
    client,
    fail,
    human_bytes,
    print_table,
    shown,
)
from distill.shared.errors import DistillError


def progress_line(event: dict[str, Any], width: int = 30) -> str:
    """One line for a progress or metrics event: a bar and the interesting fields."""
    fraction = event.get("fraction")
    bar = ""
    if isinstance(fraction, (int, float)):
        done = int(max(0.0, min(1.0, fraction)) * width)
        bar = f"[{'#' * done}{'.' * (width - done)}] {fraction * 100:5.1f}%"
    skip = {"type", "job", "fraction", "seq", "topic", "broker_ts", "broker_epoch", "ts",
            "worker", "row", "recorded"}  # recorded: the broker's own flag on a stored row
    fields = {k: v for k, v in event.items() if k not in skip}
    if isinstance(event.get("row"), dict):
        fields.update(event["row"])
    text = " ".join(f"{k}={_fmt(v)}" for k, v in fields.items()
                    if v is not None and not isinstance(v, (list, dict)))  # fmt: skip
    return f"{bar} {text}".strip()


SHOWN_ITEMS = 6  # a list's items `jobs show` prints; the rest are counted


def abridged(value: Any) -> Any:
    """``value`` with every list over SHOWN_ITEMS items cut to its first ones and a count of
    the rest: a 500-file job's params and result were 185 kB on two lines."""
    if isinstance(value, dict):
        return {k: abridged(v) for k, v in value.items()}
    if isinstance(value, list):
        head = [abridged(v) for v in value[:SHOWN_ITEMS]]
        return head + [f"... {len(value) - SHOWN_ITEMS} more"] if len(value) > SHOWN_ITEMS else head
    return value


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


DURATION_UNITS_S = {"s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 7 * 86_400}
FINISHED = ("succeeded", "failed", "cancelled")
# `jobs rm` and `jobs prune` share these
ResultsOpt = typer.Option(False, "--artifacts", help=(
    "Also remove the results the jobs made (models, sounds, datasets) that no other job names."))
DryRunOpt = typer.Option(False, "--dry-run", help="Say what would go; change nothing.")
SHOWN_JOBS = 20  # jobs a dry run lists; the rest are counted


def parse_duration(text: str, option: str = "--older-than") -> float:
    """``45s``, ``90m``, ``12h``, ``30d``, ``2w`` (a number and a unit; ``1.5d`` too) in
    seconds; anything else fails with one line naming ``option``."""
    found = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([smhdw])\s*", text.lower())
    if found is None:
        fail(f"{option} {text!r} is not a duration: give a number and a unit, s, m, h, d or w "
             "(45s, 90m, 12h, 30d, 2w)")  # fmt: skip
    return float(found.group(1)) * DURATION_UNITS_S[found.group(2)]


def _duration_words(seconds: float) -> str:
    """``30 days``, ``12 hours``: how a prune's age reads back."""
    for unit, size in (("week", 7 * 86_400), ("day", 86_400), ("hour", 3600), ("minute", 60)):
        if seconds >= size and seconds % size == 0:
            n = int(seconds // size)
            return f"{n} {unit}{'s' if n != 1 else ''}"
    return f"{seconds:g} seconds"


def _count(n: int, thing: str) -> str:
    return f"{n} {thing}{'' if n == 1 else 's'}"


def print_removal(reply: dict[str, Any], *, results: bool) -> None:
    """What a ``remove`` or ``prune`` reply says went (or, in a dry run, would go)."""
    dry = bool(reply.get("dry_run"))
    jobs = reply["jobs"]
    if dry and jobs:
        shown_jobs = jobs[:SHOWN_JOBS]
        rows = [[j["id"], j["service"], j["status"], ago(j["finished_at"])] for j in shown_jobs]
        print_table(["id", "service", "status", "finished"], rows)
        if len(jobs) > SHOWN_JOBS:
            typer.echo(f"... and {len(jobs) - SHOWN_JOBS} more")
    by_status = [f"{n} {s}" for s in FINISHED if (n := sum(j["status"] == s for j in jobs))]
    line = f"{'would remove' if dry else 'removed'} {_count(len(jobs), 'job')}"
    if jobs and not dry and len(jobs) <= SHOWN_ITEMS:
        line += ": " + ", ".join(j["id"] for j in jobs)
    typer.echo(line + (f" ({', '.join(by_status)})" if jobs else ""))
    released, kept = reply["released"], reply["kept_results"]
    keep = "would keep" if dry else "kept"
    what = "checkpoints, previews and results" if results else "checkpoints and previews"
    if released["count"]:
        verb = "would release" if dry else "released"
        size = human_bytes(released["bytes"])
        typer.echo(f"{verb} {_count(released['count'], 'artifact')}, {size} ({what})")
    if kept["count"]:
        size = human_bytes(kept["bytes"])
        typer.echo(f"{keep} their {_count(kept['count'], 'result')}, {size} (models, sounds, "
                   "datasets): --artifacts removes them too")  # fmt: skip
    if (needed := reply["kept_in_use"])["count"]:
        size = human_bytes(needed["bytes"])
        typer.echo(f"{keep} {_count(needed['count'], 'artifact')}, {size}: another job still "
                   "names or needs them")  # fmt: skip
    if pinned := reply.get("pinned") or []:
        listed = "; ".join(f"{p['id']} ({p['reason']})" for p in pinned[:SHOWN_ITEMS])
        more = f"; and {len(pinned) - SHOWN_ITEMS} more" if len(pinned) > SHOWN_ITEMS else ""
        typer.echo(f"{keep} {_count(len(pinned), 'job')} that a queued or running job depends "
                   f"on: {listed}{more}")  # fmt: skip
    if others := reply.get("others") or 0:
        typer.echo(f"{'would leave' if dry else 'left'} {_count(others, 'job')} of other keys "
                   "alone (only a job's own key or an admin key removes it)")  # fmt: skip


def register(app: typer.Typer) -> None:
    jobs = typer.Typer(help="List, follow, cancel, retry and remove jobs.", no_args_is_help=True)
    artifacts = typer.Typer(help="The broker's content-addressed artifact store.", no_args_is_help=True)
    app.add_typer(jobs, name="jobs")
    app.add_typer(artifacts, name="artifacts")

    @jobs.command("ls")
    def jobs_ls(broker: str = BrokerOpt, status: str = typer.Option(None, help="queued, running, …"),
                service: str = typer.Option(None), limit: int = typer.Option(50, min=1),
                mine: bool = typer.Option(False, "--mine", help=(
                    "Only the jobs this client's key submitted (under CURVE; without it "
                    "nobody owns a job, and every job is listed)."))) -> None:  # fmt: skip
        """List jobs, newest first (with an owner column when a listed job has one)."""
        from distill.shared.bus.jobs import JobsClient, owner_label

        try:
            with client(broker) as c:
                records = JobsClient(c).list(status=status, service=service, limit=limit, mine=mine)
                plain = c.security is None
        except DistillError as e:
            fail(str(e))
        if mine and plain:
            typer.echo("note: this client has no CURVE key, so no job is anyone's: every job is "
                       "listed", err=True)  # fmt: skip
        owners = any(r.get("owner") for r in records)
        rows = []
        for r in records:
            frac = (r.get("progress") or {}).get("fraction")
            rows.append([r["id"], r["service"], r["status"], f"{r['attempts']}/{r['max_attempts']}",
                         f"{frac * 100:.0f}%" if isinstance(frac, (int, float)) else "-", ago(r["created_at"]),
                         *([owner_label(r)] if owners else []), _error_cell(r)])
        print_table(["id", "service", "status", "attempts", "progress", "created",
                     *(["owner"] if owners else []), "error"], rows)  # fmt: skip

    @jobs.command("show")
    def jobs_show(job_id: str, broker: str = BrokerOpt,
                  full: bool = typer.Option(False, "--full", help="The record whole, as JSON.")
                  ) -> None:  # fmt: skip
        """Everything about one job: params, result, errors per attempt, metric history size
        (long lists abridged; --full for the whole record as JSON)."""
        from distill.shared.bus.jobs import JobsClient

        try:
            with client(broker) as c:
                r = JobsClient(c).get(job_id, metrics=False)  # the count, not every row
        except DistillError as e:
            fail(str(e))
        if full:
            typer.echo(json.dumps(r, indent=1, default=str, ensure_ascii=False))
            return
        removed = set(r.get("removed_deps") or [])  # removed from the journal since
        deps = [f"{d} (removed)" if d in removed else d for d in r.get("depends_on") or []]
        for key in ("id", "service", "status", "attempts", "max_attempts", "lost_attempts", "worker",
                    "depends_on", "checkpoint", "error"):
            value = (", ".join(deps) or "-") if key == "depends_on" else r.get(key)
            if key == "checkpoint" and value and r.get("checkpoint_stored") is False:
                value = f"{value} (released: the job has finished)" if r.get("finished_at") \
                    else f"{value} (no longer stored: its next attempt starts from scratch)"
            typer.echo(f"{key:>13}: {shown(value)}")
        for key in ("created_at", "started_at", "finished_at"):
            ts = r.get(key)
            typer.echo(f"{key:>13}: {datetime.fromtimestamp(ts).isoformat(' ', 'seconds') if ts else '-'}")
        if r.get("owner"):  # under CURVE: the client key that submitted it
            typer.echo(f"{'owner':>13}: {r.get('owner_name') or r['owner']}")
        typer.echo(f"{'params':>13}: {abridged(r.get('params'))}")
        for i, err in enumerate(r.get("attempt_errors") or [], 1):
            typer.echo(f"{'attempt ' + str(i):>13}: {err}")
        if r.get("progress"):
            typer.echo(f"{'progress':>13}: {progress_line(r['progress'])}")
        typer.echo(f"{'metrics':>13}: {r.get('metric_count', 0)} rows")
        typer.echo(f"{'result':>13}: {abridged(r.get('result'))}")

    @jobs.command("cancel")
    def jobs_cancel(job_id: str, broker: str = BrokerOpt) -> None:
        """Cancel a queued job at once, or a running one at its next step."""
        from distill.shared.bus.jobs import JobsClient

        try:
            with client(broker) as c:
                r = JobsClient(c).cancel(job_id)
        except DistillError as e:
            fail(str(e))
        typer.echo(f"{r['id']}: {r['status']}{' (cancel requested)' if r['cancel_requested'] else ''}")
        if cascaded := r.get("cascaded") or []:  # queued jobs that waited on it, anyone's
            typer.echo(f"also cancelled, as they depend on it: {', '.join(cascaded)}")

    @jobs.command("retry")
    def jobs_retry(job_id: str, broker: str = BrokerOpt) -> None:
        """Queue a failed or cancelled job again (and the dependents it took down)."""
        from distill.shared.bus.jobs import JobsClient

        try:
            with client(broker) as c:
                r = JobsClient(c).retry(job_id)
        except DistillError as e:
            fail(str(e))
        typer.echo(f"{r['id']}: {r['status']}")
        if requeued := r.get("requeued") or []:  # the dependents its end took down, anyone's
            typer.echo(f"also queued again, as they depend on it: {', '.join(requeued)}")
        if r.get("note"):  # e.g. its checkpoint is gone: it starts from scratch
            typer.echo(f"note: {r['note']}")

    @jobs.command("rm")
    def jobs_rm(job_ids: list[str] = typer.Argument(..., metavar="JOB", help="Finished jobs."),
                broker: str = BrokerOpt,
                artifacts: bool = ResultsOpt, dry_run: bool = DryRunOpt) -> None:  # fmt: skip
        """Remove finished jobs from the broker's journal, with their checkpoints and previews
        (their results stay unless --artifacts). All or none: a job that is unknown, not
        finished, or that a queued or running job depends on refuses the whole command."""
        from distill.shared.bus.jobs import JobsClient

        try:
            with client(broker) as c:
                reply = JobsClient(c).remove(job_ids, artifacts=artifacts, dry_run=dry_run)
        except DistillError as e:
            fail(str(e))
        print_removal(reply, results=artifacts)

    @jobs.command("prune")
    def jobs_prune(older_than: str = typer.Option(..., "--older-than", metavar="AGE", help=(
                       "Jobs that finished at least this long ago: 45s, 90m, 12h, 30d, 2w.")),
                   status: str = typer.Option(None, help="Only jobs that ended so: succeeded, "
                                              "failed or cancelled."),
                   broker: str = BrokerOpt,
                   artifacts: bool = ResultsOpt, dry_run: bool = DryRunOpt) -> None:  # fmt: skip
        """Remove every finished job older than AGE from the broker's journal, with its
        checkpoints and previews (its results stay unless --artifacts). Jobs that a queued or
        running job depends on stay, and are named."""
        from distill.shared.bus.jobs import JobsClient

        seconds = parse_duration(older_than)
        if status is not None and status not in FINISHED:
            fail(f"--status {status!r}: only finished jobs are removed; give succeeded, failed "
                 "or cancelled")  # fmt: skip
        try:
            with client(broker, timeout_s=30) as c:
                reply = JobsClient(c).prune(seconds, status=status, artifacts=artifacts,
                                            dry_run=dry_run)  # fmt: skip
        except DistillError as e:
            fail(str(e))
        if not reply["jobs"] and not reply.get("pinned") and not reply.get("others"):
            typer.echo(f"nothing to remove: no {status + ' ' if status else ''}job finished "
                       f"{_duration_words(seconds)} ago or more")  # fmt: skip
            return
        print_removal(reply, results=artifacts)

    @jobs.command("watch")
    def jobs_watch(job_id: str, broker: str = BrokerOpt) -> None:
        """Follow a job live (progress bar from the event stream) until it ends."""
        try:
            record = watch_job(broker, job_id)
        except DistillError as e:
            fail(str(e))
        except KeyboardInterrupt:
            sys.stderr.write(f"\nstopped watching; job {job_id} goes on (`distill jobs cancel "
                             f"{job_id}` stops it)\n")  # fmt: skip
            raise typer.Exit(130) from None
        if record["status"] != "succeeded":
            raise typer.Exit(1)

    @artifacts.command("ls")
    def artifacts_ls(broker: str = BrokerOpt,
                     kind: str = typer.Option(None, help="Only artifacts of this kind."),
                     job: str = typer.Option(None, help="Only the artifacts this job made.")
                     ) -> None:  # fmt: skip
        """List stored artifacts, then what holds the space (by kind, the largest jobs); with
        --kind or --job, the total of those listed."""
        from distill.shared.bus.artifacts import ArtifactClient
        from distill.shared.bus.jobs import owner_label

        try:
            with client(broker) as c:
                items = ArtifactClient(c).list(kind=kind, job=job)
                usage = None if kind or job else c.request("distill.artifacts", {"op": "usage"})
        except DistillError as e:
            fail(str(e))
        owners = any(a.get("owner") for a in items)  # under CURVE: whose each file is
        rows = [[a["sha256"][:16], a["kind"], a["name"], human_bytes(a["size"]), _job_cell(a),
                 ago(a["created_at"]), *([owner_label(a)] if owners else [])] for a in items]
        print_table(["id", "kind", "name", "size", "job", "created",
                     *(["owner"] if owners else [])], rows)  # fmt: skip
        if usage is None:  # the whole store's footer would not be about these
            total = sum(int(a["size"]) for a in items)
            typer.echo(f"{len(items)} artifact{'' if len(items) == 1 else 's'}, "
                       f"{human_bytes(total)} (the whole store: `distill artifacts ls`)")
        else:
            print_usage(usage)

    @artifacts.command("put")
    def artifacts_put(path: Path, broker: str = BrokerOpt, kind: str = typer.Option("file"),
                      name: str = typer.Option(None)) -> None:
        """Upload a file (resumes an interrupted upload); prints its id."""
        from distill.shared.bus.artifacts import ArtifactClient

        live = LiveLine()
        try:
            with client(broker, timeout_s=60) as c:
                sha = ArtifactClient(c).put_file(path, kind=kind, name=name or path.name,
                                                 progress=_bytes_progress("put", live))
        except (DistillError, OSError) as e:
            fail(str(e))
        live.end()
        typer.echo(sha)

    @artifacts.command("get")
    def artifacts_get(artifact: str, out: Path = typer.Argument(...), broker: str = BrokerOpt,
                      force: bool = typer.Option(False, "--force", help="Replace an existing OUT.")
                      ) -> None:  # fmt: skip
        """Download an artifact (full 64-hex id or a unique prefix) to OUT."""
        from distill.shared.bus.artifacts import ArtifactClient
        from distill.shared.cli.common import output_file_problem

        problem = output_file_problem(out, force, "OUT")
        if problem:
            fail(problem)
        live = LiveLine()
        try:
            with client(broker, timeout_s=60) as c:
                ac = ArtifactClient(c)
                sha = resolve_artifact(ac, artifact)
                ac.download(sha, out, progress=_bytes_progress("get", live))
        except (DistillError, OSError) as e:
            fail(str(e))
        live.end()
        typer.echo(f"{out} ({human_bytes(out.stat().st_size)})")

    @artifacts.command("rm")
    def artifacts_rm(artifact: str, broker: str = BrokerOpt) -> None:
        """Delete an artifact (refused while a queued or running job needs it)."""
        from distill.shared.bus.artifacts import ArtifactClient

        try:
            with client(broker) as c:
                ac = ArtifactClient(c)
                sha = resolve_artifact(ac, artifact)
                ac.delete(sha)
        except DistillError as e:
            fail(str(e))
        typer.echo(f"removed {sha}")


def _job_cell(item: dict[str, Any]) -> str:
    """The job that made an artifact, "(removed)" after it once `jobs rm` took it from the
    journal and kept its results (a broker before this mark says nothing of it)."""
    job = item.get("job") or "-"
    return f"{job} (removed)" if item.get("job_removed") else job


def print_usage(usage: dict[str, Any]) -> None:
    """The store's use against its limits, bytes by kind and the jobs holding the most."""
    typer.echo(f"\nstore: {human_bytes(usage['used_bytes'])} of {human_bytes(usage['max_bytes'])} "
               f"(DISTILL_STORE_MAX_BYTES); disk free {human_bytes(usage['disk_free_bytes'])}, "
               f"floor {human_bytes(usage['min_free_bytes'])} (DISTILL_STORE_MIN_FREE_BYTES)")
    print_table(["kind", "count", "size"],
                [[k["kind"], str(k["count"]), human_bytes(k["bytes"])] for k in usage["by_kind"]])
    if usage["top_jobs"]:
        print_table(["job", "count", "size"],
                    [[_job_cell(j), str(j["count"]), human_bytes(j["bytes"])] for j in usage["top_jobs"]])
    uploads = usage["uploads"]
    if uploads["count"]:
        typer.echo(f"uploads in progress: {uploads['count']}, {human_bytes(uploads['bytes'])} declared")


def resolve_artifact(ac: Any, ref: str, kind: str | None = None) -> str:
    """The artifact id a full id or a unique prefix names. With ``kind`` (where only that kind
    will do), a prefix shared with artifacts of other kinds (uploads, checkpoints) is unique
    enough if one artifact of that kind has it."""
    from distill.shared.errors import ArtifactError
    from distill.shared.ids import is_sha256

    if is_sha256(ref):
        return ref
    matches = [a for a in ac.iter() if a["sha256"].startswith(ref.lower())]
    if not matches:
        raise ArtifactError(f"{ref!r} matches no artifact in the broker's store "
                            "(`distill artifacts ls` lists them)")  # fmt: skip
    if len(matches) > 1 and kind is not None:
        of_kind = [a for a in matches if a.get("kind") == kind]
        if len(of_kind) == 1:
            return str(of_kind[0]["sha256"])
    if len(matches) > 1:
        raise ArtifactError(f"{ref!r} matches {len(matches)} artifacts; give more of the id")
    return str(matches[0]["sha256"])


def _bytes_progress(verb: str, live: LiveLine) -> Any:
    def show(done: int, total: int) -> None:
        pct = 100.0 * done / total if total else 100.0
        live.update(f"{verb} {done / 2**20:8.1f} / {total / 2**20:.1f} MiB {pct:5.1f}%")

    return show


ERROR_CELL_CHARS = 60


def _error_cell(record: dict[str, Any]) -> str:
    """A job's error for one table cell: for a job that failed after its attempts, the last
    attempt's reason (the head, "failed after N attempts: attempt 1: ...", says little)."""
    error = str(record.get("error") or "")
    attempts = record.get("attempt_errors") or []
    if error.startswith("failed after") and attempts:
        error = str(attempts[-1])
    return error if len(error) <= ERROR_CELL_CHARS else error[: ERROR_CELL_CHARS - 1] + "…"


def watch_job(broker: str | None, job_id: str, *, quiet: bool = False) -> dict[str, Any]:
    """Draw a live progress line for a job until it ends; returns its final record."""
    from distill.shared.bus.jobs import JobsClient

    live = LiveLine()
    fraction: list[Any] = [None]  # the latest progress event's: a metrics row has none

    def on_event(event: dict[str, Any]) -> None:
        if quiet:
            return
        if event.get("type") in ("progress", "metrics"):
            # a metrics row keeps the bar (off a terminal only the last line of a burst is
            # written: a row that came after the 100% event wrote no bar at all)
            if event.get("fraction") is not None:
                fraction[0] = event["fraction"]
            elif fraction[0] is not None:
                event = {**event, "fraction": fraction[0]}
            live.update(progress_line(event), width=118)
        elif event.get("type") == "note":  # something the worker did that the user should know
            live.say(f"{job_id}: {event.get('message')}")
        elif event.get("type") == "status" and event.get("status") in ("queued", "running"):
            # the final status is the summary line's, with its reason
            live.say(f"{job_id}: {event.get('status')}")

    with client(broker) as c:
        record = JobsClient(c).follow(job_id, on_event)
    if not quiet:
        live.end()
    status = record["status"]
    typer.echo(f"{job_id}: {status}" + (f" — {record['error']}" if record.get("error") else ""))
    return record
