"""Behaviour of a worker's local artifact cache (real files under tmp_path)."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

import pytest

from distill.shared.bus.cache import ArtifactCache, remove_dead_pid_folders, scratch_folder
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


# --- issue 9: size limit, least recently used first, leftovers --------------------------------


def _put(cache: ArtifactCache, data: bytes, last_use: float) -> str:
    sha = cache.put_bytes(data)
    os.utime(cache.path_for(sha), (last_use, last_use))
    return sha


def test_the_cache_keeps_within_its_size_evicting_the_least_recently_used(tmp_path: Path) -> None:
    """Before: the cache grew without limit (no max_bytes, nothing ever evicted)."""
    cache = ArtifactCache(tmp_path / "cache", max_bytes=3000)
    a = _put(cache, b"a" * 1000, 100.0)
    b = _put(cache, b"b" * 1000, 200.0)
    c = _put(cache, b"c" * 1000, 300.0)
    assert cache.has(a)  # a use: a is now the most recent, b the least
    d = cache.put_bytes(b"d" * 1000)
    assert not cache.has(b) and all(cache.has(x) for x in (a, c, d))
    assert cache.used_bytes() <= 3000
    big = cache.put_bytes(b"e" * 5000)  # larger than the cache: kept alone, for its user
    assert cache.has(big) and cache.used_bytes() == 5000


def test_part_leftovers_of_dead_writers_are_removed_at_start(tmp_path: Path) -> None:
    """Before: a worker killed mid-download left its ``*.part`` in tmp/ for ever."""
    cache = ArtifactCache(tmp_path / "cache")
    live = cache.open_writer(DATA_SHA)  # this process: alive
    live.write(b"x")
    dead = cache._tmp_dir / f"{DATA_SHA}.999999999.abcd1234.part"  # no such pid
    old_style = cache._tmp_dir / f"{DATA_SHA}.abcd1234.part"
    for leftover in (dead, old_style):
        leftover.write_bytes(b"half")
    ArtifactCache(tmp_path / "cache")
    assert not dead.exists() and not old_style.exists()
    assert len(list(cache._tmp_dir.glob("*.part"))) == 1  # the live writer's
    live.abort()


def test_scratch_folders_of_killed_jobs_are_removed_at_start(tmp_path: Path) -> None:
    """Before: a worker killed with kill -9 mid-generate left its sounds (up to gigabytes) in
    TMPDIR for ever. A job's scratch folder lives in the cache's tmp/ under its pid; the next
    cache opened on the machine removes those of processes that are gone, never a live one's."""
    root = tmp_path / "cache"
    with scratch_folder("distill-generate", root) as live:
        (Path(live) / "sound-000.wav").write_bytes(b"RIFF")
        dead = root / "tmp" / "distill-generate.999999999.k3j_x9q1.dir"  # no such pid
        (dead / "nested").mkdir(parents=True)
        (dead / "nested" / "sound-001.wav").write_bytes(b"RIFF" * 1000)
        unknown = root / "tmp" / "someone-elses.dir"  # not a scratch name: left alone
        unknown.mkdir()
        ArtifactCache(root)
        assert not dead.exists() and unknown.is_dir()
        assert Path(live).parent == root / "tmp" and (Path(live) / "sound-000.wav").exists()
    assert not Path(live).exists()  # the block's end removes it


def test_dead_pid_folders_are_removed_by_prefix_only(tmp_path: Path) -> None:
    """What `distill demo` sweeps the system's temporary folder with: only folders of its own
    prefix and a process that is gone (a name like another program's is never touched)."""
    mine_dead = tmp_path / "distill-demo.999999999.ab_c.dir"
    mine_live = tmp_path / f"distill-demo.{os.getpid()}.ab_c.dir"
    others = [tmp_path / "other.999999999.ab_c.dir", tmp_path / "distill-demo.x.ab_c.dir",
              tmp_path / "distill-demo[1].999999999.ab_c.dir"]  # fmt: skip
    for folder in (mine_dead, mine_live, *others):
        folder.mkdir()
    assert remove_dead_pid_folders(tmp_path, "distill-demo") == [mine_dead.name]
    assert not mine_dead.exists() and mine_live.is_dir() and all(p.is_dir() for p in others)


def test_the_size_limit_comes_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DISTILL_CACHE_MAX_BYTES", "1234")
    assert ArtifactCache(tmp_path / "cache").max_bytes == 1234
    monkeypatch.setenv("DISTILL_CACHE_MAX_BYTES", "big")
    with pytest.raises(ArtifactError, match="DISTILL_CACHE_MAX_BYTES"):
        ArtifactCache(tmp_path / "cache")


def test_a_damaged_cached_copy_is_found_and_removed(cache: ArtifactCache) -> None:
    """A disk that changes a cached file after it was verified: the checked reads say so and
    remove it (the artifact client then fetches it again), where a plain read trusted it."""
    cache.put_bytes(DATA)
    assert cache.read_verified(DATA_SHA) == DATA and cache.verify(DATA_SHA)
    path = cache.path_for(DATA_SHA)
    os.chmod(path, 0o644)
    path.write_bytes(DATA[:-1] + b"?")
    assert cache.read_verified(DATA_SHA) is None and not path.exists()
    cache.put_bytes(DATA)
    os.chmod(path, 0o644)
    path.write_bytes(b"short")
    assert not cache.verify(DATA_SHA) and not cache.has(DATA_SHA)
    assert cache.read_verified(DATA_SHA) is None and not cache.verify(DATA_SHA)  # absent
