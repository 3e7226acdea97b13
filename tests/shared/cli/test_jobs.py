"""``distill jobs show``, ``jobs retry`` and ``artifacts ls`` against a broker in a thread."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
from typer.testing import CliRunner

from distill.broker.access import Limits
from distill.broker.loop import BrokerConfig
from distill.broker.main import build_broker
from distill.broker.services.jobs import JobService
from distill.broker.store.settings import StorageSettings
from distill.shared.bus.artifacts import ArtifactClient
from distill.shared.bus.cache import ArtifactCache
from distill.shared.bus.client import Client
from distill.shared.cli.main import app
from distill.shared.errors import DistillError
from tests.conftest import free_port_block

pytestmark = pytest.mark.integration


def threaded_broker(tmp_path: Path, limits: Limits | None = None
                    ) -> Iterator[tuple[str, JobService]]:  # fmt: skip
    """A broker in a thread (its endpoint and jobs service) until the generator is closed."""
    port = free_port_block()
    config = BrokerConfig(port=port, data_dir=tmp_path / "broker",
                          **({} if limits is None else {"limits": limits}))  # fmt: skip
    b = build_broker(config, StorageSettings(min_free_bytes=0))
    assert isinstance(b.jobs, JobService)
    b.bind()
    stop = threading.Event()
    thread = threading.Thread(target=b.run, args=(stop,), daemon=True)
    thread.start()
    yield f"tcp://127.0.0.1:{port}", b.jobs
    stop.set()
    thread.join(5)


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[tuple[str, JobService]]:
    yield from threaded_broker(tmp_path)


def test_jobs_show_prints_the_metric_count_not_one_page(broker: tuple[str, JobService]) -> None:
    """Before: ``jobs show`` fetched every row and printed len(rows); the broker now sends at
    most one page with ``get``, so that count would read 1000."""
    endpoint, jobs = broker
    with Client(endpoint) as c:
        job_id = c.request("distill.jobs", {"op": "submit", "service": "s", "params": {}})["id"]
    with jobs.store.batch():
        for i in range(1_500):
            jobs.store.append_metrics(job_id, {"epoch": i})
    out = CliRunner().invoke(app, ["jobs", "show", job_id, "--broker", endpoint])
    assert out.exit_code == 0, out.output
    assert "metrics: 1500 rows" in out.output


def test_jobs_show_says_when_the_checkpoint_is_no_longer_stored(
    broker: tuple[str, JobService],
) -> None:
    """Before: a finished job showed the hash of a checkpoint the broker had already released,
    and `artifacts get` of it said only that there is no such artifact."""
    endpoint, jobs = broker
    shas = {}
    with Client(endpoint) as c:
        for which in ("running", "finished"):
            job_id = c.request("distill.jobs", {"op": "submit", "service": "s", "params": {}})["id"]
            sha = ArtifactClient(c).put_bytes(which.encode(), kind="checkpoint", name="c", job=job_id)
            jobs.store.mark_running(job_id, "w1")
            jobs.store.set_checkpoint(job_id, sha)
            shas[which] = (job_id, sha)
    jobs.store.mark_succeeded(shas["finished"][0], {})

    def show(which: str) -> str:
        out = CliRunner().invoke(app, ["jobs", "show", shas[which][0], "--broker", endpoint])
        assert out.exit_code == 0, out.output
        return next(line for line in out.output.splitlines() if "checkpoint:" in line)

    assert show("running").endswith(shas["running"][1])  # stored: as it was
    assert jobs.retention is not None
    jobs.retention.artifacts.delete_many([sha for _, sha in shas.values()], in_use=set())
    assert show("finished").endswith(f"{shas['finished'][1]} (released: the job has finished)")
    assert show("running").endswith(
        f"{shas['running'][1]} (no longer stored: its next attempt starts from scratch)")


def test_artifacts_ls_shows_what_holds_the_space(broker: tuple[str, JobService],
                                                 tmp_path: Path) -> None:
    endpoint, _ = broker
    with Client(endpoint) as c:
        store = ArtifactClient(c, ArtifactCache(tmp_path / "cache"))
        store.put_bytes(b"c" * 5000, kind="checkpoint", name="ckpt", job="j-1")
        store.put_bytes(b"m" * 300, kind="vqvae", name="vqvae.pt", job="j-1")
    out = CliRunner().invoke(app, ["artifacts", "ls", "--broker", endpoint])
    assert out.exit_code == 0, out.output
    assert "DISTILL_STORE_MAX_BYTES" in out.output
    usage_part = out.output.split("store:")[1]
    assert "checkpoint" in usage_part and "vqvae" in usage_part and "j-1" in usage_part


def test_jobs_ls_shows_the_last_attempts_reason_and_refuses_a_limit_below_one(
    broker: tuple[str, JobService],
) -> None:
    """Before: the error column was the error's first 50 characters, for a worker failure
    "failed after 1 attempt: attempt 1: attempt on vm:", no reason at all."""
    endpoint, jobs = broker
    with Client(endpoint) as c:
        job_id = c.request("distill.jobs", {"op": "submit", "service": "s", "params": {},
                                            "max_attempts": 1})["id"]  # fmt: skip
    jobs.store.mark_running(job_id, "w")
    jobs.store.fail_attempt(job_id, "attempt on vm: ValueError: the sound is 0 s long")
    out = CliRunner().invoke(app, ["jobs", "ls", "--broker", endpoint])
    assert out.exit_code == 0, out.output
    assert "attempt on vm: ValueError: the sound is 0 s long" in out.output, out.output
    out = CliRunner().invoke(app, ["jobs", "ls", "--limit", "0", "--broker", endpoint])
    assert out.exit_code == 2 and "--limit" in out.output, out.output


def test_dataset_show_of_a_preprocess_job_without_a_dataset_says_why(
    broker: tuple[str, JobService],
) -> None:
    """Before: "the preprocess job has not produced a dataset (yet)", also for a failed job."""
    endpoint, jobs = broker
    # straight into the job table: a submit through the broker checks a preprocess job's params
    job_id = jobs.store.submit("distill.preprocess", {}, max_attempts=1).id
    out = CliRunner().invoke(app, ["dataset", "show", job_id, "--broker", endpoint])
    assert out.exit_code == 1 and "the preprocess job has not finished" in out.output, out.output
    jobs.store.mark_running(job_id, "w")
    jobs.store.fail_attempt(job_id, "no audio among the 3 files")
    out = CliRunner().invoke(app, ["dataset", "show", job_id, "--broker", endpoint])
    assert out.exit_code == 1 and "the preprocess job failed, so there is no dataset" in out.output
    assert "no audio among the 3 files" in out.output and "(yet)" not in out.output


def test_a_prefix_shared_with_other_kinds_names_the_one_artifact_of_the_kind_asked_for() -> None:
    """Before: `distill dataset show e` was refused ("'e' matches 5 artifacts") when one
    dataset and four uploads or checkpoints began with e."""
    from distill.shared.cli.jobs import resolve_artifact
    from distill.shared.errors import ArtifactError

    class Store:
        def iter(self) -> Iterator[dict[str, str]]:
            yield from ({"sha256": "e1" + "0" * 62, "kind": "audio"},
                        {"sha256": "e2" + "0" * 62, "kind": "dataset"},
                        {"sha256": "e3" + "0" * 62, "kind": "checkpoint"},
                        {"sha256": "e4" + "0" * 62, "kind": "dataset"})  # fmt: skip

    assert resolve_artifact(Store(), "e2", kind="dataset") == "e2" + "0" * 62
    assert resolve_artifact(Store(), "e1", kind="dataset") == "e1" + "0" * 62  # caller: wrong kind
    with pytest.raises(ArtifactError, match="'e' matches 4 artifacts"):
        resolve_artifact(Store(), "e", kind="dataset")  # two datasets: still ambiguous
    with pytest.raises(ArtifactError, match="matches 4 artifacts"):
        resolve_artifact(Store(), "e")
    assert resolve_artifact(Store(), "e", kind="checkpoint") == "e3" + "0" * 62


def test_upload_folder_names_links_that_point_at_nothing(broker: tuple[str, JobService],
                                                         tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    """Before: a broken link was dropped without a word (it is in no manifest: no file)."""
    from distill.shared.cli.data import upload_folder

    endpoint, _ = broker
    folder = tmp_path / "sounds"
    folder.mkdir()
    (folder / "kick.wav").write_bytes(b"RIFF")
    (folder / "gone.flac").symlink_to(tmp_path / "moved" / "gone.flac")
    # a received pack's link to a secret out of the folder: never uploaded (it was, to the
    # broker's store); a link out of the folder to a sound is read, as a library's is
    (tmp_path / "id_rsa").write_text("-----BEGIN OPENSSH PRIVATE KEY-----\n")
    (folder / "hat.wav").symlink_to(tmp_path / "id_rsa")
    sf.write(tmp_path / "snare.wav", np.zeros(800, np.float32), 8000)
    (folder / "snare.wav").symlink_to(tmp_path / "snare.wav")
    os.mkfifo(folder / "pipe.wav")  # a FIFO: left out, said (it vanished without a word)
    (folder / "esc\x1b[2J.wav").write_bytes(b"RIFF")  # its artifact name is escaped, not refused
    with Client(endpoint) as c:
        files = upload_folder(ArtifactClient(c, ArtifactCache(tmp_path / "cache")), folder,
                              quiet=True)  # fmt: skip
        stored = {a["name"] for a in ArtifactClient(c).list()}
    assert [f["name"] for f in files] == ["esc\x1b[2J.wav", "kick.wav", "snare.wav"]
    assert "esc\\x1b[2J.wav" in stored
    err = capsys.readouterr().err
    assert "3 thing(s) in" in err and "gone.flac: a link that points at nothing" in err
    assert "hat.wav: a link out of the folder to a file that is not audio" in err
    assert "pipe.wav: not a file" in err and "\x1b" not in err


def test_dataset_show_prints_from_the_preprocess_jobs_result_without_downloading(
    broker: tuple[str, JobService], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Before: `dataset show` downloaded the whole dataset (46.7 MiB for 500 files, 11 s) to
    print a manifest its preprocess job's result holds. A job whose result predates
    ``check_chunks`` (or no job) still prints, from the dataset."""
    import dataclasses

    from distill.shared.audio.dataset import build_dataset
    from distill.shared.audio.mel import MelConfig
    from tests.shared.audio.test_dataset import good_files

    endpoint, jobs = broker
    ds = build_dataset(good_files(2), MelConfig())
    job_id = jobs.store.submit("distill.preprocess", {}).id  # (params unchecked: not the point)
    with Client(endpoint) as c:
        sha = ArtifactClient(c, ArtifactCache(tmp_path / "cache")).put_bytes(
            ds.to_bytes(), kind="dataset", name="dataset-2-files.npz", job=job_id)
    result = {"dataset": sha, "chunks": len(ds.mels), "check_chunks": len(ds.check_chunks),
              "manifest": [dataclasses.asdict(r) for r in ds.manifest],
              "mel_config": ds.mel_config.to_dict()}  # fmt: skip
    jobs.store.mark_running(job_id, "w")
    jobs.store.mark_succeeded(job_id, result)
    downloaded = CliRunner().invoke(app, ["dataset", "show", sha[:12], "--broker", endpoint])
    assert downloaded.exit_code == 0, downloaded.output

    def no_download(*a: object, **k: object) -> bytes:
        raise AssertionError("downloaded the dataset")

    monkeypatch.setattr(ArtifactClient, "get_bytes", no_download)
    for ref in (sha[:12], job_id):
        out = CliRunner().invoke(app, ["dataset", "show", ref, "--broker", endpoint])
        assert out.exit_code == 0, out.output
        assert out.output == downloaded.output
    assert "hit00.wav" in out.output and f"{len(ds.mels)} chunks of" in out.output
    old = {k: v for k, v in result.items() if k != "check_chunks"}  # an earlier worker's result
    earlier = jobs.store.submit("distill.preprocess", {}).id
    jobs.store.mark_running(earlier, "w")
    jobs.store.mark_succeeded(earlier, old)
    out = CliRunner().invoke(app, ["dataset", "show", earlier, "--broker", endpoint])
    assert out.exit_code == 1 and "downloaded the dataset" in str(out.exception), out.output


def test_dataset_ls_lists_each_dataset_with_its_jobs_counts(
    broker: tuple[str, JobService], tmp_path: Path,
) -> None:
    """Before: there was no `dataset ls` (`artifacts ls --kind dataset` gave ids and sizes)."""
    endpoint, jobs = broker
    out = CliRunner().invoke(app, ["dataset", "ls", "--broker", endpoint])
    assert out.exit_code == 0 and "no datasets yet: `distill dataset add FOLDER`" in out.output
    job_id = jobs.store.submit("distill.preprocess", {}).id  # (params unchecked: not the point)
    with Client(endpoint) as c:
        store = ArtifactClient(c, ArtifactCache(tmp_path / "cache"))
        made = store.put_bytes(b"d" * 3000, kind="dataset", name="dataset-7-files.npz", job=job_id)
        loose = store.put_bytes(b"e" * 100, kind="dataset", name="by-hand.npz")
        store.put_bytes(b"f" * 100, kind="audio", name="kick.wav", job=job_id)
    jobs.store.mark_running(job_id, "w")
    jobs.store.mark_succeeded(job_id, {"dataset": made, "files_ok": 7, "files_skipped": 2,
                                       "chunks": 31, "train_files": 6, "val_files": 1,
                                       "mel_config": {"sample_rate": 44100}})  # fmt: skip
    out = CliRunner().invoke(app, ["dataset", "ls", "--broker", endpoint])
    assert out.exit_code == 0, out.output
    lines = {line.split()[0]: line.split() for line in out.output.splitlines()[1:]}
    assert lines[made[:16]][1:6] == ["7", "2", "31", "6/1", "44100"], out.output
    assert lines[loose[:16]][1:6] == ["-", "-", "-", "-/-", "-"], out.output
    assert "kick" not in out.output
    # `artifacts ls --job`: the total of what it listed, not the whole store's usage
    out = CliRunner().invoke(app, ["artifacts", "ls", "--job", job_id, "--broker", endpoint])
    assert out.exit_code == 0, out.output
    assert "2 artifacts, 3.0 KiB" in out.output and "DISTILL_STORE_MAX_BYTES" not in out.output


def test_dataset_add_checks_its_settings_before_uploading(tmp_path: Path) -> None:
    """`--silence-db -150` was refused by the broker only after every file was uploaded."""
    folder = tmp_path / "sounds"
    folder.mkdir()
    (folder / "kick.wav").write_bytes(b"RIFF")
    result = CliRunner().invoke(app, ["dataset", "add", str(folder), "--silence-db", "-150",
                                      "--broker", "tcp://127.0.0.1:1"])  # no broker: not reached
    assert result.exit_code == 1
    assert "silence_threshold_db" in result.output and "-120" in result.output
    assert "connection refused" not in result.output


# --- jobs rm and jobs prune ---------------------------------------------------------------------


@pytest.fixture
def quota_broker(tmp_path: Path) -> Iterator[tuple[str, JobService]]:
    """A broker in a thread whose artifact quota is 8 000 bytes (one account without CURVE)."""
    yield from threaded_broker(tmp_path, Limits(artifact_quota_bytes=8_000))


def _cli(endpoint: str, *args: str) -> Any:
    return CliRunner().invoke(app, [*args, "--broker", endpoint])


def test_jobs_rm_removes_finished_jobs_and_releases_their_checkpoints_and_quota(
    quota_broker: tuple[str, JobService], tmp_path: Path
) -> None:
    endpoint, jobs = quota_broker
    with Client(endpoint) as c:
        submit = lambda **kw: c.request("distill.jobs", {"op": "submit", "service": "s",  # noqa: E731
                                                         "params": {}, **kw})["id"]  # fmt: skip
        done, running = submit(), submit()
        after = submit(depends_on=[done])
        store = ArtifactClient(c, ArtifactCache(tmp_path / "cache"))
        store.put_bytes(b"p" * 5_000, kind="preview", name="epoch0001-a.wav", job=done)
        model = store.put_bytes(b"m" * 300, kind="vqvae", name="vqvae.pt", job=done)
        with pytest.raises(DistillError, match="artifact quota exceeded"):
            store.put_bytes(b"x" * 5_000, kind="audio", name="x.wav")
    for job_id in (done, running):
        jobs.store.mark_running(job_id, "w")
    jobs.store.mark_succeeded(done, {"model": model})

    out = _cli(endpoint, "jobs", "rm", done)
    assert out.exit_code == 1, out.output
    assert out.output.strip().endswith(f"cannot remove job {done}: queued job {after} depends on "
                                       "it (it reads this job's result when an attempt starts)")  # fmt: skip
    out = _cli(endpoint, "jobs", "rm", running, "j-nothere")
    assert out.exit_code == 1 and len(out.output.strip().splitlines()) == 1, out.output
    assert f"job {running}: it is running" in out.output and "j-nothere: no such job" in out.output
    assert _cli(endpoint, "jobs", "cancel", after).exit_code == 0

    out = _cli(endpoint, "jobs", "rm", done, "--dry-run")
    assert out.exit_code == 0 and "would remove 1 job (1 succeeded)" in out.output, out.output
    assert jobs.store.get(done).status == "succeeded"
    out = _cli(endpoint, "jobs", "rm", done)
    assert out.exit_code == 0, out.output
    assert f"removed 1 job: {done} (1 succeeded)" in out.output
    assert "released 1 artifact, 4.9 KiB (checkpoints and previews)" in out.output
    assert "kept their 1 result, 300 B (models, sounds, datasets): --artifacts" in out.output
    with Client(endpoint) as c:  # the checkpoint's quota is free again
        store = ArtifactClient(c, ArtifactCache(tmp_path / "cache"))
        store.put_bytes(b"x" * 5_000, kind="audio", name="x.wav")
        assert store.stat(model)["job"] == done
        store.put_bytes(b"y" * 100, kind="audio", name="y.wav", job=after)
    out = _cli(endpoint, "jobs", "show", after)
    assert out.exit_code == 0 and f"depends_on: {done} (removed)" in out.output, out.output
    # the kept model names the job that made it, marked removed (before: the bare id)
    out = _cli(endpoint, "artifacts", "ls")
    listed, usage = out.output.split("store:")
    model_row = next(line for line in listed.splitlines() if line.startswith(model[:16]))
    assert f"{done} (removed)" in model_row, out.output
    assert f"{done} (removed)" in usage and f"{after} (removed)" not in out.output, out.output
    assert after in next(line for line in listed.splitlines() if "y.wav" in line)
    out = _cli(endpoint, "jobs", "retry", after)
    assert out.exit_code == 1 and f"dependency {done} was removed" in out.output, out.output
    out = _cli(endpoint, "jobs", "rm", done)
    assert out.exit_code == 1 and f"job {done}: no such job" in out.output, out.output


def test_jobs_prune_removes_old_jobs_by_rule_and_says_what_went(
    broker: tuple[str, JobService], tmp_path: Path
) -> None:
    endpoint, jobs = broker
    ids = [jobs.store.submit("s", {}).id for _ in range(4)]
    for job_id in ids:
        jobs.store.mark_running(job_id, "w")
    jobs.store.mark_succeeded(ids[0], {})
    for job_id in ids[1:3]:
        jobs.store.fail_attempt(job_id, "boom", final=True)
    with Client(endpoint) as c:
        store = ArtifactClient(c, ArtifactCache(tmp_path / "cache"))
        for i, job_id in enumerate(ids[:3]):
            store.put_bytes(f"epoch {i}".encode(), kind="preview", name=f"epoch{i:04d}-a.wav",
                            job=job_id)  # fmt: skip
            store.put_bytes(f"sound {i}".encode(), kind="audio", name="a.wav", job=job_id)

    for bad, said in [("30", "--older-than '30' is not a duration"), ("-1d", "not a duration"),
                      ("1y", "give a number and a unit, s, m, h, d or w")]:  # fmt: skip
        out = _cli(endpoint, "jobs", "prune", "--older-than", bad)
        assert out.exit_code == 1 and said in out.output, out.output
        assert len(out.output.strip().splitlines()) == 1
    out = _cli(endpoint, "jobs", "prune", "--older-than", "1d", "--status", "running")
    assert out.exit_code == 1 and "--status 'running': only finished jobs" in out.output
    out = _cli(endpoint, "jobs", "prune", "--older-than", "30d")
    assert out.exit_code == 0, out.output
    assert out.output.strip() == "nothing to remove: no job finished 30 days ago or more"

    out = _cli(endpoint, "jobs", "prune", "--older-than", "0s", "--status", "failed", "--dry-run")
    assert out.exit_code == 0, out.output
    assert ids[1] in out.output and ids[2] in out.output and ids[0] not in out.output
    assert "would remove 2 jobs (2 failed)" in out.output
    assert "would release 2 artifacts" in out.output and "would keep their 2 results" in out.output
    assert len(jobs.store.list()) == 4
    out = _cli(endpoint, "jobs", "prune", "--older-than", "0s", "--status", "failed", "--artifacts")
    assert out.exit_code == 0, out.output
    assert "removed 2 jobs" in out.output
    assert "released 4 artifacts, 28 B (checkpoints, previews and results)" in out.output
    assert {j.id for j in jobs.store.list()} == {ids[0], ids[3]}
    out = _cli(endpoint, "jobs", "prune", "--older-than", "0m")
    assert out.exit_code == 0 and f"removed 1 job: {ids[0]} (1 succeeded)" in out.output
    assert [j.id for j in jobs.store.list()] == [ids[3]]  # running: never a prune's
