"""Behaviour of the broker's content-addressed artifact store (real files under tmp_path)."""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from distill.broker.store.artifacts import ArtifactStore, OffsetMismatch
from distill.shared.bus import codec
from distill.shared.errors import ArtifactDamaged, ArtifactError, StoreFull


class FakeClock:
    def __init__(self) -> None:
        self.now = 5_000.0

    def __call__(self) -> float:
        self.now += 1.0  # every record gets a distinct, increasing time
        return self.now


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "store"


@pytest.fixture
def store(root: Path) -> Iterator[ArtifactStore]:
    with ArtifactStore(root, clock=FakeClock()) as s:
        yield s


DATA = bytes(range(256)) * 40  # 10 240 bytes
DATA_SHA = sha(DATA)


def test_chunked_put_then_read_back(store: ArtifactStore, root: Path) -> None:
    offset = store.begin_put(DATA_SHA, len(DATA), kind="audio", name="kick.wav", job=None)
    assert offset == 0
    for start in range(0, len(DATA), 4096):
        offset = store.put_chunk(DATA_SHA, offset, DATA[start : start + 4096])
    assert offset == len(DATA)
    record = store.finish_put(DATA_SHA)

    assert (record.sha256, record.size, record.kind, record.name, record.job) == (
        DATA_SHA,
        len(DATA),
        "audio",
        "kick.wav",
        None,
    )
    assert store.stat(DATA_SHA) == record
    assert store.path_of(DATA_SHA) == root / "objects" / DATA_SHA[:2] / DATA_SHA[2:]
    assert store.path_of(DATA_SHA).read_bytes() == DATA
    assert b"".join(store.read_chunk(DATA_SHA, o, 3000) for o in range(0, len(DATA), 3000)) == DATA
    assert store.read_chunk(DATA_SHA, len(DATA), 10) == b""
    assert list((root / "partial").iterdir()) == []
    assert codec.unpack(codec.pack(record.to_dict())) == record.to_dict()


def test_resume_after_a_cut_off_upload_in_a_new_store(root: Path) -> None:
    first = ArtifactStore(root)
    first.begin_put(DATA_SHA, len(DATA), kind="dataset", name="drums", job="j-0123456789")
    offset = first.put_chunk(DATA_SHA, 0, DATA[:3000])
    offset = first.put_chunk(DATA_SHA, offset, DATA[3000:7000])
    first.close()  # the broker restarts; the client reconnects

    second = ArtifactStore(root)
    assert second.uploads()[0]["received"] == 7000
    resumed = second.begin_put(DATA_SHA, len(DATA), kind="dataset", name="drums", job=None)
    assert resumed == 7000
    assert second.put_chunk(DATA_SHA, resumed, DATA[resumed:]) == len(DATA)
    record = second.finish_put(DATA_SHA)
    assert record.job == "j-0123456789"  # metadata from the first begin
    assert second.read_chunk(DATA_SHA, 0, len(DATA)) == DATA
    second.close()


def test_a_gap_names_the_expected_offset_and_chunks_held_already_are_acknowledged(
    store: ArtifactStore,
) -> None:
    """A chunk the copy holds (another uploader of the same file ahead of this one) is
    acknowledged with the bytes received, and one that overlaps it appends only its new part.
    Before: both were refused, and two scripts uploading one 40-MB file at once refused each
    other's chunks until both gave up (6 of 20 uploads failed; once all 4 of 4)."""
    store.begin_put(DATA_SHA, len(DATA), kind="audio", name="a", job=None)
    store.put_chunk(DATA_SHA, 0, DATA[:100])
    with pytest.raises(OffsetMismatch, match="expected offset 100") as info:
        store.put_chunk(DATA_SHA, 200, DATA[200:300])  # a gap
    assert info.value.expected == 100
    assert store.put_chunk(DATA_SHA, 0, DATA[:100]) == 100  # held: the other uploader's
    assert store.put_chunk(DATA_SHA, 50, DATA[50:150]) == 150  # its last 50 bytes are new
    assert store.put_chunk(DATA_SHA, 150, DATA[150:]) == len(DATA)
    assert store.finish_put(DATA_SHA).size == len(DATA)
    assert store.read_chunk(DATA_SHA, 0, len(DATA)) == DATA


def test_chunk_past_the_declared_size_is_refused(store: ArtifactStore) -> None:
    store.begin_put(DATA_SHA, 10, kind="audio", name="a", job=None)
    with pytest.raises(ArtifactError, match="past its declared size 10"):
        store.put_chunk(DATA_SHA, 0, DATA[:11])


def test_hash_mismatch_discards_the_upload(store: ArtifactStore, root: Path) -> None:
    claimed = sha(b"something else entirely")
    store.begin_put(claimed, len(DATA), kind="audio", name="a", job=None)
    store.put_chunk(claimed, 0, DATA)
    with pytest.raises(ArtifactError, match=f"hash to {DATA_SHA}"):
        store.finish_put(claimed)
    assert store.uploads() == []
    assert list((root / "partial").iterdir()) == []
    assert list((root / "objects").rglob("*")) == []
    with pytest.raises(ArtifactError, match="no artifact"):
        store.stat(claimed)
    assert store.begin_put(claimed, len(DATA), kind="audio", name="a", job=None) == 0


def test_hash_mismatch_is_caught_after_a_restart_too(root: Path) -> None:
    claimed = "0" * 64
    with ArtifactStore(root) as first:
        first.begin_put(claimed, 4, kind="audio", name="a", job=None)
        first.put_chunk(claimed, 0, b"ab")
    with ArtifactStore(root) as second:
        second.put_chunk(claimed, 2, b"cd")
        with pytest.raises(ArtifactError, match="upload discarded"):
            second.finish_put(claimed)


def test_finish_of_an_incomplete_upload_is_refused(store: ArtifactStore) -> None:
    store.begin_put(DATA_SHA, len(DATA), kind="audio", name="a", job=None)
    store.put_chunk(DATA_SHA, 0, DATA[:10])
    with pytest.raises(ArtifactError, match=f"incomplete: 10 of {len(DATA)} bytes"):
        store.finish_put(DATA_SHA)


def test_put_of_a_present_artifact_is_a_no_op(store: ArtifactStore) -> None:
    first = store.put_bytes(DATA, "audio", "kick.wav")
    assert store.begin_put(DATA_SHA, len(DATA), kind="x", name="y", job="j-1") == len(DATA)
    assert store.finish_put(DATA_SHA) == first
    assert store.put_bytes(DATA, kind="model", name="other") == first
    assert store.list() == [first]
    assert store.put_chunk(DATA_SHA, 0, DATA) == len(DATA)  # nothing left to send
    with pytest.raises(ArtifactError, match=f"stored with {len(DATA)} bytes, not 5"):
        store.begin_put(DATA_SHA, 5, kind="audio", name="a", job=None)


def test_empty_artifact(store: ArtifactStore) -> None:
    empty = sha(b"")
    assert store.begin_put(empty, 0, kind="audio", name="silence", job=None) == 0
    assert store.finish_put(empty).size == 0
    assert store.read_chunk(empty, 0, 10) == b""


def test_put_file_streams_a_local_file(store: ArtifactStore, tmp_path: Path) -> None:
    path = tmp_path / "model.distill"
    path.write_bytes(DATA * 300)  # ~3 MiB: several protocol chunks
    record = store.put_file(path, "model", "model.distill", job="j-aaaaaaaaaa")
    assert record.sha256 == sha(DATA * 300)
    assert store.path_of(record.sha256).read_bytes() == DATA * 300


def test_metadata_survives_restart(root: Path) -> None:
    with ArtifactStore(root) as first:
        a = first.put_bytes(b"one", "audio", "a.wav", "j-1111111111")
        b = first.put_bytes(b"two", "checkpoint", "step-100", "j-2222222222")
    with ArtifactStore(root) as second:
        assert second.list() == [a, b]
        assert second.list(kind="checkpoint") == [b]
        assert second.list(job="j-1111111111") == [a]
        assert second.stat(a.sha256) == a


def test_a_crash_between_rename_and_metadata_commit_is_repaired(root: Path) -> None:
    with ArtifactStore(root) as first:
        first.begin_put(DATA_SHA, len(DATA), kind="audio", name="a", job=None)
        first.put_chunk(DATA_SHA, 0, DATA)
    # What the crash leaves: the object renamed in, the upload row still present.
    final = root / "objects" / DATA_SHA[:2] / DATA_SHA[2:]
    final.parent.mkdir(parents=True)
    os.replace(root / "partial" / DATA_SHA, final)
    with ArtifactStore(root) as second:
        assert second.stat(DATA_SHA).size == len(DATA)
        assert second.uploads() == []


def test_orphan_partial_files_are_removed_on_open(root: Path) -> None:
    ArtifactStore(root).close()
    orphan = root / "partial" / ("9" * 64)
    orphan.write_bytes(b"left over")
    ArtifactStore(root).close()
    assert not orphan.exists()


def test_delete_is_refused_while_in_use(store: ArtifactStore) -> None:
    record = store.put_bytes(DATA, "checkpoint", "step-1")
    path = store.path_of(record.sha256)
    with pytest.raises(ArtifactError, match="in use"):
        store.delete(record.sha256, in_use={record.sha256})
    assert path.exists()
    store.delete(record.sha256, in_use={"f" * 64})
    assert not path.exists()
    with pytest.raises(ArtifactError, match="no artifact"):
        store.stat(record.sha256)
    with pytest.raises(ArtifactError, match="no artifact"):
        store.delete(record.sha256, in_use=set())


def test_delete_many_removes_the_jobs_artifacts_but_those_in_use_in_one_call(
    store: ArtifactStore,
) -> None:
    """What a pruned journal releases: thousands at once, never one a job still needs."""
    kept = store.put_bytes(b"in use", "checkpoint", "step-1", job="j-1")
    gone = [store.put_bytes(bytes([i]) * 100, "preview", f"epoch{i:04d}-a.wav", job="j-1")
            for i in range(3)]  # fmt: skip
    other = store.put_bytes(b"another job's", "checkpoint", "step-1", job="j-2")
    listed = {a.sha256 for a in store.of_jobs(["j-1", "j-9"])}
    assert listed == {kept.sha256} | {a.sha256 for a in gone}
    removed = store.delete_many([kept.sha256, *(a.sha256 for a in gone), "e" * 64],
                                in_use={kept.sha256})  # fmt: skip
    assert sorted(a.sha256 for a in removed) == sorted(a.sha256 for a in gone)
    assert store.has(kept.sha256) and store.has(other.sha256)
    assert not any(store.has(a.sha256) for a in gone)
    assert store.used_bytes() == kept.size + other.size
    assert store.delete_many([a.sha256 for a in gone], in_use=set()) == []  # gone already


def test_quota_refuses_uploads_that_do_not_fit(root: Path) -> None:
    with ArtifactStore(root, max_bytes=100) as store:
        store.put_bytes(b"x" * 60, "audio", "a")
        store.begin_put("1" * 64, 30, kind="audio", name="b", job=None)  # promised: 90 of 100
        with pytest.raises(StoreFull, match="store is full.*`distill artifacts ls`"):
            store.begin_put(sha(b"y" * 20), 20, kind="audio", name="c", job=None)
        assert store.used_bytes() == 90


BAD_IDS = [
    "../../etc/passwd",
    "../" * 21 + "a",
    "/" + "a" * 63,
    DATA_SHA.upper(),
    DATA_SHA[:63],
    DATA_SHA + "0",
    DATA_SHA[:63] + "\n",
    DATA_SHA[:63] + "g",
    "",
    None,
    12345,
    DATA_SHA.encode(),
]


@pytest.mark.parametrize("bad", BAD_IDS, ids=repr)
def test_bad_ids_are_refused_before_touching_disk(
    store: ArtifactStore, root: Path, tmp_path: Path, bad: object
) -> None:
    store.put_bytes(DATA, "audio", "a")
    before = files_under(tmp_path)
    calls = [
        lambda: store.begin_put(bad, 10, kind="audio", name="a", job=None),
        lambda: store.put_chunk(bad, 0, b"x"),
        lambda: store.finish_put(bad),
        lambda: store.stat(bad),
        lambda: store.read_chunk(bad, 0, 10),
        lambda: store.delete(bad, in_use=set()),
        lambda: store.path_of(bad),
    ]
    for call in calls:
        with pytest.raises(ArtifactError, match="64 lowercase hex"):
            call()
    assert files_under(tmp_path) == before
    assert store.read_chunk(DATA_SHA, 0, 4) == DATA[:4]


@pytest.mark.parametrize(
    ("kind", "name", "job"),
    [
        ("", "a", None),
        ("k" * 65, "a", None),
        ("audio", "n" * 256, None),
        ("audio", "evil\x1b[2Jname", None),
        ("audio", "a", "j" * 65),
        (3, "a", None),
    ],
)
def test_bad_metadata_is_refused(
    store: ArtifactStore, kind: object, name: object, job: object
) -> None:
    with pytest.raises(ArtifactError):
        store.begin_put(DATA_SHA, 10, kind=kind, name=name, job=job)
    assert store.uploads() == []


def test_read_chunk_bounds(store: ArtifactStore) -> None:
    store.put_bytes(DATA, "audio", "a")
    with pytest.raises(ArtifactError, match="outside"):
        store.read_chunk(DATA_SHA, len(DATA) + 1, 10)
    with pytest.raises(ArtifactError, match="outside"):
        store.read_chunk(DATA_SHA, -1, 10)
    with pytest.raises(ArtifactError, match="read length"):
        store.read_chunk(DATA_SHA, 0, 0)


# --- put/resume invariants ----------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    data=st.binary(max_size=3000),
    cuts=st.lists(st.integers(0, 3000), max_size=6),
    restarts=st.lists(st.booleans(), min_size=7, max_size=7),
    stale=st.lists(st.booleans(), min_size=7, max_size=7),
)
def test_any_chunking_with_restarts_stores_exactly_the_bytes(
    data: bytes, cuts: list[int], restarts: list[bool], stale: list[bool]
) -> None:
    """Whatever the chunk boundaries, restarts and stale resends, begin_put reports exactly the
    bytes received, a chunk past them is refused, one overlapping them adds only its new part
    (another uploader's copy is ahead), and the stored artifact is the data."""
    digest = sha(data)
    bounds = sorted({min(c, len(data)) for c in cuts} | {0, len(data)})
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        store = ArtifactStore(root)
        offset = store.begin_put(digest, len(data), kind="audio", name="x", job=None)
        assert offset == 0
        for i, (start, end) in enumerate(zip(bounds, bounds[1:], strict=False)):
            if restarts[i]:
                store.close()
                store = ArtifactStore(root)
                offset = store.begin_put(digest, len(data), kind="audio", name="x", job=None)
                assert offset == start
            if end < len(data):
                with pytest.raises(OffsetMismatch) as info:  # a gap
                    store.put_chunk(digest, start + 1, data[start + 1 : end + 1])
                assert info.value.expected == start
            if stale[i] and start > 0:  # overlaps what is held: its new part goes on
                assert store.put_chunk(digest, start - 1, data[start - 1 : end]) == end
            offset = store.put_chunk(digest, offset, data[start:end])  # held already if stale
            assert offset == end
        record = store.finish_put(digest)
        assert record.size == len(data)
        assert store.path_of(digest).read_bytes() == data
        assert store.begin_put(digest, len(data), kind="audio", name="x", job=None) == len(data)
        assert store.uploads() == []
        store.close()


def test_two_uploaders_of_the_same_content_share_one_upload(store: ArtifactStore) -> None:
    """Content addressing: any uploader's bytes at an offset are the same bytes."""
    a = store.begin_put(DATA_SHA, len(DATA), kind="audio", name="a", job=None)
    a = store.put_chunk(DATA_SHA, a, DATA[:4000])
    b = store.begin_put(DATA_SHA, len(DATA), kind="audio", name="a", job=None)
    assert b == 4000  # the second uploader resumes where the first stands
    b = store.put_chunk(DATA_SHA, b, DATA[b:])
    store.finish_put(DATA_SHA)
    assert store.put_chunk(DATA_SHA, a, DATA[a:]) == len(DATA)  # the first one is told: done
    assert store.finish_put(DATA_SHA).size == len(DATA)
    assert store.path_of(DATA_SHA).read_bytes() == DATA


# --- issue 9: expiry, floors, bounded hashing after a restart ------------------------------------


def test_an_idle_upload_expires_and_releases_its_space_even_across_a_restart(root: Path) -> None:
    """Before: an abandoned upload held its declared size for ever (no expiry existed)."""
    now = [time.time()]
    data = b"x" * 1000
    with ArtifactStore(root, max_bytes=1500, upload_idle_s=3600, clock=lambda: now[0]) as store:
        store.begin_put(sha(data), len(data), kind="audio", name="a", job=None)
        store.put_chunk(sha(data), 0, data[:10])
        assert store.used_bytes() == 1000
        now[0] += 1800
        assert store.expire_uploads() == []  # advanced 30 min ago: kept
    now[0] += 1801  # the broker was down meanwhile
    with ArtifactStore(root, max_bytes=1500, upload_idle_s=3600, clock=lambda: now[0]) as store:
        assert store.expire_uploads() == [sha(data)]
        assert store.used_bytes() == 0 and store.uploads() == []
        assert list((root / "partial").iterdir()) == []


def test_a_put_past_the_quota_or_the_free_space_floor_is_refused_at_begin(root: Path) -> None:
    with ArtifactStore(root, max_bytes=100) as store:
        with pytest.raises(ArtifactError, match="store is full.*DISTILL_STORE_MAX_BYTES"):
            store.begin_put("a" * 64, 101, kind="audio", name="a", job=None)
        assert store.uploads() == []
    with (
        ArtifactStore(root, min_free_bytes=2**62) as store,  # more than any disk has
        pytest.raises(ArtifactError, match="DISTILL_STORE_MIN_FREE_BYTES"),
    ):
        store.begin_put("a" * 64, 1, kind="audio", name="a", job=None)


def test_after_a_restart_the_hash_catches_up_in_bounded_steps(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before: put_finish after a restart hashed the whole partial file in one request."""
    import distill.broker.store.artifacts as module

    monkeypatch.setattr(module, "MAX_FINISH_HASH_BYTES", 100)
    data = os.urandom(1000)
    with ArtifactStore(root) as store:
        store.begin_put(sha(data), len(data), kind="audio", name="a", job=None)
        store.put_chunk(sha(data), 0, data[:900])
    with ArtifactStore(root) as store:
        assert store.begin_put(sha(data), len(data), kind="audio", name="a", job=None) == 900
        store.put_chunk(sha(data), 900, data[900:])
        with pytest.raises(ArtifactError, match="still being verified"):
            store.finish_put(sha(data))  # 900 bytes behind: hashes 100 of them, then refuses
        steps = []
        while hashed := store.verify_step(300):
            steps.append(hashed)
        assert max(steps) <= 300 and sum(steps) == 900  # each step bounded, all caught up
        assert store.finish_put(sha(data)).size == 1000
        assert store.read_chunk(sha(data), 0, 1000) == data


def _damage(path: Path, at: int) -> None:
    os.chmod(path, 0o644)
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


def test_an_object_damaged_on_disk_is_found_by_a_read_in_order_and_set_aside(
    store: ArtifactStore, root: Path
) -> None:
    """A bad sector or a hand edit: the read that reaches the end says so, and the object
    leaves the store (so that a new upload of the same bytes stores them afresh)."""
    store.put_bytes(DATA, kind="checkpoint", name="ckpt", job="j-1")
    # reads in order of an intact object verify and pass; so do reads out of order
    assert b"".join(store.read_chunk(DATA_SHA, o, 4096) for o in range(0, len(DATA), 4096)) == DATA
    assert store.read_chunk(DATA_SHA, 4096, 4096) == DATA[4096:8192]
    _damage(store.path_of(DATA_SHA), 5000)
    assert store.read_chunk(DATA_SHA, 4096, 10_000)  # not from the start: served unverified
    store.read_chunk(DATA_SHA, 0, 4096)
    store.read_chunk(DATA_SHA, 4096, 4096)
    with pytest.raises(ArtifactDamaged, match=f"artifact {DATA_SHA} is damaged in the broker's"):
        store.read_chunk(DATA_SHA, 8192, 4096)
    assert not store.has(DATA_SHA)
    assert (root / "damaged" / DATA_SHA).is_file()
    assert not any(p.name == DATA_SHA[2:] for p in (root / "objects").rglob("*"))
    # the same bytes uploaded again are stored afresh
    store.put_bytes(DATA, kind="checkpoint", name="ckpt", job="j-1")
    assert store.read_chunk(DATA_SHA, 0, len(DATA)) == DATA


def test_an_index_of_a_newer_distill_is_refused_naming_it_and_untouched(root: Path) -> None:
    import sqlite3

    ArtifactStore(root).close()
    index = root / "index.sqlite3"
    raw = sqlite3.connect(index)
    raw.execute("PRAGMA user_version=7")
    raw.close()
    with pytest.raises(ArtifactError, match=f"the artifact index {index} has schema version 7; "
                                            ".* Upgrade Distill to open it, or start this one "
                                            "with another --data-dir"):  # fmt: skip
        ArtifactStore(root)
    raw = sqlite3.connect(index)
    assert raw.execute("PRAGMA user_version").fetchone()[0] == 7
    raw.close()


def test_uploads_in_progress_are_bounded(store: ArtifactStore,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Begun, never finished: each a row and a file for an hour. Empty ones of made-up ids
    came at 535 a second with no bound (the quota charges nothing for them)."""
    import distill.broker.store.artifacts as A

    with pytest.raises(ArtifactError, match="cannot be empty"):
        store.begin_put("ab" * 32, 0, kind="audio", name="x.wav", job=None)
    assert store.begin_put(sha(b""), 0, kind="audio", name="empty.wav", job=None) == 0
    monkeypatch.setattr(A, "MAX_UPLOADS_IN_PROGRESS", 3)
    for i in range(2):
        store.begin_put(sha(bytes([i])), 1, kind="audio", name=f"{i}.wav", job=None)
    with pytest.raises(StoreFull, match="3 uploads are in progress"):
        store.begin_put(sha(b"more"), 4, kind="audio", name="more.wav", job=None)
    store.put_chunk(sha(b"\x00"), 0, b"\x00")
    store.finish_put(sha(b"\x00"))  # one finishes: room for another
    assert store.begin_put(sha(b"more"), 4, kind="audio", name="more.wav", job=None) == 0
