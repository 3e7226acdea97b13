"""Small text helpers the screens share: ages, durations, progress cells, event log lines.
Pure functions of their arguments (no clock), so snapshots with fixed data stay fixed."""

from __future__ import annotations

from typing import Any

from distill.shared.ids import escaped


def ago(seconds: float | None) -> str:
    if not isinstance(seconds, (int, float)):
        return "-"
    return f"{seconds:.1f}s" if seconds < 60 else f"{seconds / 60:.0f}m"


def duration(seconds: float | None) -> str:
    if not isinstance(seconds, (int, float)) or seconds < 0:
        return "-"
    s = int(seconds)
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s"


def short_job(job_id: Any) -> str:
    return str(job_id) if job_id else "-"


def job_progress(job: dict[str, Any]) -> tuple[str, str]:
    """(progress, ETA) cells for a job record or a progress event."""
    progress = job.get("progress") or {}
    fraction = progress.get("fraction")
    status = job.get("status")
    if status == "succeeded":
        return "100%", "-"
    if status in ("failed", "cancelled") and isinstance(fraction, (int, float)) and fraction >= 1:
        fraction = None  # "failed 100%" read as done: how far it got says nothing there
    cell = f"{fraction * 100:.0f}%" if isinstance(fraction, (int, float)) else "-"
    eta = progress.get("eta_s") if job.get("status") == "running" else None
    return cell, duration(eta)


def event_line(event: dict[str, Any]) -> str:
    """One log line for a bus event; empty for events not worth a line. One line: a newline
    (or an ESC) in an error is written out, as the rest of the UI writes names."""
    return escaped(_event_line(event))


def _event_line(event: dict[str, Any]) -> str:
    kind = event.get("type", "?")
    topic = str(event.get("topic", ""))
    head = f"{event.get('seq', 0):>7} {topic[:28]:<28} {kind:<9}"
    if kind == "status":
        error = f" — {event['error']}" if event.get("error") else ""
        return f"{head}{event.get('status')} (attempt {event.get('attempts')}){error}"[:200]
    if kind == "progress":
        fraction = event.get("fraction")
        done = f"{fraction * 100:5.1f}%" if isinstance(fraction, (int, float)) else ""
        extra = event.get("file") or (f"epoch {event['epoch']}" if "epoch" in event else "")
        return f"{head}{done} {extra}".rstrip()
    if kind == "metrics":
        row = event.get("row") or {}
        return f"{head}epoch {row.get('epoch', '?')}" if "epoch" in row else f"{head}row"
    if kind == "preview":
        part, count = event.get("file_chunk"), event.get("file_chunks")
        where = f" chunk {part} of {count}" if isinstance(count, int) and count > 1 else ""
        return f"{head}{event.get('which', '')} of {event.get('file', '')}{where} (epoch {event.get('epoch')})"
    if kind == "busy":  # the broker says which job, not where (the ready event said that)
        job = f" with job {event['job']}" if event.get("job") else ""
        return f"{head}{event.get('service', '')}{job}"
    if kind in ("ready", "idle"):
        return f"{head}{event.get('service', '')} on {event.get('host', '?')} ({event.get('device', '?')})"
    if kind == "gone":
        return f"{head}{event.get('reason', '')}"
    if kind == "note":
        return f"{head}{event.get('message', '')}"
    return head.rstrip()
