"""Artifact quota per key: how many bytes of artifacts each client or worker key has stored.

An upload is charged to the key that begins it, once per artifact (content addressing: a
second key that uploads the same bytes is charged nothing, since nothing new is stored).
Deleting an artifact frees it from every key's usage.

The ledger survives restarts as a JSON snapshot (``quota.json``) and a log of the changes
since (``quota.log``, one JSON line each), folded into a new snapshot once the log is as long
as the ledger. Before, the whole ledger was written again at every upload and deletion, on the
broker's loop: 137 ms at 100 000 artifacts. Each change is idempotent (a key pays for an
artifact, or nobody does), so a log replayed on top of the snapshot it was folded into, after
a crash between the two writes, gives the same ledger; a torn last line is skipped.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

from distill.shared.errors import ArtifactError

COMPACT_MIN_LINES = 1000  # the log is folded once it is this long and as long as the ledger


class ArtifactQuota:
    def __init__(self, path: Path, limit_bytes: int | None) -> None:
        self.path = Path(path)
        self.log_path = self.path.with_suffix(".log")
        self.limit_bytes = limit_bytes  # None: unlimited (usage is still counted)
        self._lock = threading.Lock()
        self._usage: dict[str, dict[str, int]] = self._read()  # owner -> {sha256: size}
        self._log_lines = self._replay()
        self._totals = {owner: sum(shas.values()) for owner, shas in self._usage.items()}

    def _read(self) -> dict[str, dict[str, int]]:
        if not self.path.is_file():
            return {}
        try:
            data = json.loads(self.path.read_text())
            return {str(owner): {str(sha): int(size) for sha, size in shas.items()}
                    for owner, shas in data.items()}  # fmt: skip
        except (OSError, ValueError, AttributeError, TypeError) as e:
            raise ArtifactError(f"quota ledger {self.path} is unreadable: {e}") from e

    def _replay(self) -> int:
        """Apply the log's changes to the snapshot's ledger; how many lines it holds."""
        if not self.log_path.is_file():
            return 0
        lines = 0
        try:
            with open(self.log_path, encoding="utf-8") as f:
                for line in f:
                    lines += 1
                    try:
                        self._apply(json.loads(line))
                    except (ValueError, KeyError, TypeError):
                        continue  # a line torn by a crash mid-write
        except OSError as e:
            raise ArtifactError(f"quota log {self.log_path} is unreadable: {e}") from e
        return lines

    def _apply(self, change: dict[str, Any]) -> None:
        sha = str(change["sha"])
        if "owner" in change:
            self._usage.setdefault(str(change["owner"]), {})[sha] = int(change["size"])
        else:
            for shas in self._usage.values():
                shas.pop(sha, None)

    def _record(self, change: dict[str, Any]) -> None:
        """Log one change (held under the lock); fold the log when it has grown."""
        with open(self.log_path, "a", encoding="utf-8") as log:
            log.write(json.dumps(change, separators=(",", ":")) + "\n")
        self._log_lines += 1
        if self._log_lines >= max(COMPACT_MIN_LINES, sum(map(len, self._usage.values()))):
            self._compact()

    def _compact(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self._usage))
        os.replace(tmp, self.path)  # the snapshot first: a crash now replays an idempotent log
        self.log_path.write_text("")
        self._log_lines = 0

    def usage(self, owner: str) -> int:
        return self._totals.get(owner, 0)

    def charge(self, owner: str, sha256: str, size: int, label: str | None = None) -> None:
        """Charge ``size`` bytes of a new artifact to ``owner``; ArtifactError over quota,
        naming the key as ``label`` (default: ``owner``)."""
        if size < 0:
            raise ArtifactError(f"artifact {sha256} has a negative size ({size})")
        with self._lock:
            shas = self._usage.setdefault(owner, {})
            if sha256 in shas:
                return  # a resumed upload: charged when it began
            used = self._totals.get(owner, 0)
            if self.limit_bytes is not None and used + size > self.limit_bytes:
                raise ArtifactError(
                    f"artifact quota exceeded for key {label or owner}: it stores {used} of "
                    f"{self.limit_bytes} bytes, and {sha256} needs {size} more "
                    "(delete artifacts it no longer needs, or ask for a larger quota)"
                )
            shas[sha256] = size
            self._totals[owner] = used + size
            self._record({"owner": owner, "sha": sha256, "size": size})

    def charged_to(self, sha256: str) -> set[str]:
        """The keys that pay for the artifact: its uploader (two keys that began uploading the
        same bytes before either finished both pay)."""
        with self._lock:
            return {owner for owner, shas in self._usage.items() if sha256 in shas}

    def forget(self, sha256: str) -> None:
        """The artifact was deleted: no key pays for it any more."""
        with self._lock:
            changed = False
            for owner, shas in self._usage.items():
                size = shas.pop(sha256, None)
                if size is not None:
                    self._totals[owner] -= size
                    changed = True
            if changed:
                self._record({"sha": sha256})
