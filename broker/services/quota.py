"""Artifact quota per key: how many bytes of artifacts each client or worker key has stored.

An upload is charged to the key that begins it, once per artifact (content addressing: a
second key that uploads the same bytes is charged nothing, since nothing new is stored).
Deleting an artifact frees it from every key's usage. The ledger survives restarts in a
small JSON file beside the artifact store.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

from distill.shared.errors import ArtifactError


class ArtifactQuota:
    def __init__(self, path: Path, limit_bytes: int | None) -> None:
        self.path = Path(path)
        self.limit_bytes = limit_bytes  # None: unlimited (usage is still counted)
        self._lock = threading.Lock()
        self._usage: dict[str, dict[str, int]] = self._read()  # owner -> {sha256: size}

    def _read(self) -> dict[str, dict[str, int]]:
        if not self.path.is_file():
            return {}
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError) as e:
            raise ArtifactError(f"quota ledger {self.path} is unreadable: {e}") from e
        return {
            str(owner): {str(sha): int(size) for sha, size in shas.items()}
            for owner, shas in data.items()
        }

    def _write(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self._usage))
        os.replace(tmp, self.path)

    def usage(self, owner: str) -> int:
        return sum(self._usage.get(owner, {}).values())

    def charge(self, owner: str, sha256: str, size: int, label: str | None = None) -> None:
        """Charge ``size`` bytes of a new artifact to ``owner``; ArtifactError over quota,
        naming the key as ``label`` (default: ``owner``)."""
        if size < 0:
            raise ArtifactError(f"artifact {sha256} has a negative size ({size})")
        with self._lock:
            shas = self._usage.setdefault(owner, {})
            if sha256 in shas:
                return  # a resumed upload: charged when it began
            used = sum(shas.values())
            if self.limit_bytes is not None and used + size > self.limit_bytes:
                raise ArtifactError(
                    f"artifact quota exceeded for key {label or owner}: it stores {used} of "
                    f"{self.limit_bytes} bytes, and {sha256} needs {size} more "
                    "(delete artifacts it no longer needs, or ask for a larger quota)"
                )
            shas[sha256] = size
            self._write()

    def forget(self, sha256: str) -> None:
        """The artifact was deleted: no key pays for it any more."""
        with self._lock:
            changed = False
            for shas in self._usage.values():
                changed |= shas.pop(sha256, None) is not None
            if changed:
                self._write()
