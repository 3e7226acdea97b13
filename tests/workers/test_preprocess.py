"""The preprocess worker through a real broker: files in as artifacts, a dataset out."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from distill.shared.audio.dataset import Dataset
from distill.shared.bus.artifacts import ArtifactClient
from distill.shared.bus.cache import ArtifactCache
from distill.shared.bus.jobs import JobsClient
from tests.conftest import Cluster

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def small_folder(percussion: Path, dest: Path) -> Path:
    dest.mkdir()
    for name in ["bd_808.flac", "bd_haus.flac", "sn_dub.flac", "hat_bdu.flac", "drum_cymbal_open.flac",
                 "tabla_na.flac"]:
        shutil.copy(percussion / name, dest / name)
    (dest / "notes.wav").write_text("this is not audio\n")
    (dest / "empty.flac").write_bytes(b"")
    return dest


def test_dataset_job_accounts_for_every_file(cluster: Cluster, percussion: Path, tmp_path: Path) -> None:
    cluster.start_broker()
    cluster.start_worker("preprocess")
    folder = small_folder(percussion, tmp_path / "sounds")
    with cluster.client(timeout_s=30) as c:
        ac = ArtifactClient(c, cache=ArtifactCache(tmp_path / "cache"))
        files = [{"name": p.name, "sha256": ac.put_file(p, kind="audio", name=p.name)}
                 for p in sorted(folder.iterdir())]
        job = JobsClient(c).submit("distill.preprocess", {"files": files, "seed": 1})
        record = JobsClient(c).wait(job["id"], timeout_s=120)
        assert record["status"] == "succeeded", record["error"]
        result = record["result"]
        ds = Dataset.from_bytes(ac.get_bytes(result["dataset"]))
    rows = {r["name"]: r for r in result["manifest"]}
    assert set(rows) == {f["name"] for f in files}
    assert rows["notes.wav"]["status"] == "skipped" and "not audio" in rows["notes.wav"]["reason"]
    assert rows["empty.flac"]["status"] == "skipped" and "empty" in rows["empty.flac"]["reason"]
    # six one-shots (a cymbal of 3 chunks the longest): too little sound to hold one out
    assert result["files_ok"] == 6 and result["val_files"] == 0
    assert ds.mels.shape[1:] == (128, 94) and len(ds.mels) == result["chunks"]
    assert set(ds.train_indices()).isdisjoint(ds.val_indices())


def test_cli_dataset_add_and_show(cluster: Cluster, percussion: Path, tmp_path: Path) -> None:
    cluster.start_broker()
    cluster.start_worker("preprocess")
    folder = small_folder(percussion, tmp_path / "sounds")
    env = {**os.environ, "DISTILL_BROKER": cluster.endpoint, "DISTILL_CACHE": str(tmp_path / "c")}
    run = lambda *a: subprocess.run([sys.executable, "-m", "distill.shared.cli", *a],  # noqa: E731
                                    capture_output=True, text=True, env=env, timeout=120)
    added = run("dataset", "add", str(folder))
    assert added.returncode == 0, added.stderr
    assert "6 of 8 files used, 2 skipped" in added.stdout
    dataset_id = added.stdout.strip().splitlines()[-1].split()[1]
    shown = run("dataset", "show", dataset_id[:12])
    assert shown.returncode == 0, shown.stderr
    assert "notes.wav" in shown.stdout and "not audio" in shown.stdout and "bd_808.flac" in shown.stdout
    assert "kept for the RVQ-VAE's audio check" in shown.stdout
    bad = run("dataset", "add", str(tmp_path / "nowhere"))
    assert bad.returncode != 0


def test_dataset_with_no_usable_file_fails_naming_each(cluster: Cluster, tmp_path: Path) -> None:
    cluster.start_broker()
    cluster.start_worker("preprocess")
    with cluster.client(timeout_s=30) as c:
        ac = ArtifactClient(c, cache=ArtifactCache(tmp_path / "cache"))
        files = [{"name": "a.wav", "sha256": ac.put_bytes(b"hello", kind="audio", name="a.wav")},
                 {"name": "b.wav", "sha256": ac.put_bytes(b"", kind="audio", name="b.wav")}]
        job = JobsClient(c).submit("distill.preprocess", {"files": files}, max_attempts=1)
        record = JobsClient(c).wait(job["id"], timeout_s=60)
    assert record["status"] == "failed"
    assert "a.wav" in record["error"] and "b.wav" in record["error"]
