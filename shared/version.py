"""This Distill's version, as installed (pyproject's ``version``; see the rule written there)."""

from __future__ import annotations

from functools import lru_cache


@lru_cache(maxsize=1)
def distill_version() -> str | None:
    """The installed version, or None when running from a tree that is not installed."""
    try:
        from importlib.metadata import PackageNotFoundError, version

        return version("distill")
    except (ImportError, PackageNotFoundError):
        return None
