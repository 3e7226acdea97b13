"""``echo``: returns each request's frames unchanged (for tests, scripting and ``distill ping``)."""

from __future__ import annotations

SERVICE = "echo"
RAW = True  # plain requests are echoed frame for frame, not decoded
USES_TORCH = False
