"""Behaviour of a worker's local artifact cache (real files under tmp_path)."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

import pytest

from distill.shared.bus.cache import ArtifactCache
from distill.shared.errors import ArtifactError

DATA = b"a drum hit, more or less" * 1000
DATA_SHA = hashlib.sha256(DATA).hexdigest()


@pytest.fixture
def cache(tmp_path: Path) -> ArtifactCache:
    return ArtifactCache(tmp_path / "cache")


def test_written_artifact_is_cached_read_only(cache: ArtifactCache) -> None:
    assert not cache.has(DATA_SHA)
    with cache.open_writer(DATA_SHA) as writer:
        for start in range(0, len(DATA), 1000):
            writer.write(DATA[start : start + 1000])
        path = writer.commit()
    assert path == cache.path_for(DATA_SHA) == cache.root / DATA_SHA[:2] / DATA_SHA[2:]
    assert cache.has(DATA_SHA)
    assert cache.read_bytes(DATA_SHA) == DATA
    assert not path.stat().st_mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH)
    assert list((cache.root / "tmp").iterdir()) == []


def test_hash_mismatch_leaves_nothing_behind(cache: ArtifactCache) -> None:
    wrong = "f" * 64
    writer = cache.open_writer(wrong)
    writer.write(DATA)
    with pytest.raises(ArtifactError, match=f"hashing to {DATA_SHA}"):
        writer.commit()
    assert not cache.has(wrong)
    assert list((cache.root / "tmp").iterdir()) == []


def test_abort_and_unfinished_writers_discard(cache: ArtifactCache) -> None:
    writer = cache.open_writer(DATA_SHA)
    writer.write(DATA[:10])
    writer.abort()
    writer.abort()  # twice is fine
    with pytest.raises(ArtifactError, match="closed"):
        writer.write(b"more")

    with pytest.raises(RuntimeError), cache.open_writer(DATA_SHA) as failing:
        failing.write(DATA[:10])
        raise RuntimeError("connection lost mid-download")

    with cache.open_writer(DATA_SHA) as never_committed:
        never_committed.write(DATA)

    assert not cache.has(DATA_SHA)
    assert list((cache.root / "tmp").iterdir()) == []


def test_two_writers_of_the_same_artifact_both_succeed(cache: ArtifactCache) -> None:
    first, second = cache.open_writer(DATA_SHA), cache.open_writer(DATA_SHA)
    first.write(DATA[:500])
    second.write(DATA)
    first.write(DATA[500:])
    assert second.commit() == first.commit()
    assert cache.read_bytes(DATA_SHA) == DATA


def test_put_bytes_and_remove(cache: ArtifactCache) -> None:
    assert cache.put_bytes(DATA) == DATA_SHA
    assert cache.put_bytes(DATA) == DATA_SHA  # already there: a no-op
    cache.remove(DATA_SHA)
    assert not cache.has(DATA_SHA)
    with pytest.raises(ArtifactError, match="not in the local cache"):
        cache.read_bytes(DATA_SHA)


@pytest.mark.parametrize(
    "bad", ["../../etc/passwd", DATA_SHA.upper(), DATA_SHA[:63], "/" * 64, None], ids=repr
)
def test_bad_ids_never_become_paths(cache: ArtifactCache, tmp_path: Path, bad: object) -> None:
    before = sorted(tmp_path.rglob("*"))
    for call in (cache.path_for, cache.has, cache.open_writer, cache.read_bytes, cache.remove):
        with pytest.raises(ArtifactError, match="64 lowercase hex"):
            call(bad)
    assert sorted(tmp_path.rglob("*")) == before


def test_default_root_follows_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DISTILL_CACHE", str(tmp_path / "from-env"))
    assert ArtifactCache().root == tmp_path / "from-env"
    monkeypatch.delenv("DISTILL_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert ArtifactCache().root == tmp_path / "xdg" / "distill" / "artifacts"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert ArtifactCache().root == tmp_path / "home" / ".cache" / "distill" / "artifacts"
    assert os.path.isdir(tmp_path / "home" / ".cache" / "distill" / "artifacts" / "tmp")
