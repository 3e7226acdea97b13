"""`distill train DIR` end to end through a real broker and preprocess, RVQ-VAE and prior worker
processes: files in, a `.distill` file out that loads and samples; a failed stage and the
stages it takes down; Ctrl-C detaches and the jobs go on; `distill model pull`."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from distill.shared.bus.jobs import JobsClient
from distill.shared.model.modelfile import load_model
from distill.shared.model.sampling import SamplingParams, sample
from tests.conftest import Cluster, percussion_dir, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]

torch.set_num_threads(1)

FILES = ["bd_808.flac", "bd_haus.flac", "sn_dub.flac", "hat_bdu.flac", "drum_cymbal_open.flac",
         "tabla_na.flac", "elec_blip.flac", "perc_bell.flac"]  # fmt: skip
TINY = ["--vqvae-opt", "channels=32", "--vqvae-opt", "latent_dim=16", "--vqvae-opt", "blocks=1",
        "--codebook-size", "16", "--levels", "2",
        "--prior-opt", "hidden=32", "--prior-opt", "embed_dim=16",
        "--epochs", "2", "--batch-size", "8",
        "--train-opt", "patience=0", "--train-opt", "warmup_steps=4",
        "--train-opt", "minutes=0", "--train-opt", "vqvae.preview_every=0"]  # fmt: skip


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = Cluster(tmp_path_factory.mktemp("cluster"))
    try:
        c.start_broker()
        for service in ("preprocess", "vqvae", "prior"):
            c.start_worker(service)
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="module")
def drums(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("sounds") / "drums"
    folder.mkdir()
    for name in FILES:
        shutil.copy(percussion_dir() / name, folder / name)
    return folder


def distill(cluster: Cluster, cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DISTILL_BROKER": cluster.endpoint}
    return subprocess.run([sys.executable, "-m", "distill.shared.cli", *args], capture_output=True,
                          text=True, env=env, cwd=cwd, timeout=240)  # fmt: skip


def test_folder_to_a_model_that_loads_and_samples(cluster: Cluster, drums: Path,
                                                   tmp_path: Path) -> None:  # fmt: skip
    out = distill(cluster, tmp_path, "train", str(drums), *TINY)
    assert out.returncode == 0, out.stderr
    for stage in ("[1/3] preprocess", "[2/3] vqvae", "[3/3] prior"):
        assert stage in out.stderr
    assert "epoch 2/2" in out.stderr and "util" in out.stderr  # the RVQ-VAE's live line
    # eight one-shots hold too little sound to hold any out (MIN_VAL_CHUNKS)
    assert "best training loss" in out.stderr and "(no files held out)" in out.stderr
    assert "x the Griffin-Lim floor: " in out.stderr
    assert "codebooks refined" in out.stderr or "codebooks refinement undone" in out.stderr
    assert "codes in use on the training files" in out.stderr
    assert "unigram" in out.stderr and "bigram" in out.stderr and "bits/code" in out.stderr
    path = tmp_path / "drums.distill"  # NAME from the folder, in the current folder
    assert f"wrote {path}" in out.stdout and "vqvae+prior" in out.stdout

    model = load_model(path)
    assert model.prior is not None and model.vqvae.config.levels == 2
    assert model.prior.config.hidden == 32
    codes = sample(model.prior, batch=2, steps=30, params=SamplingParams(seed=1))  # (2, 2, 30)
    assert codes.shape == (2, 2, 30) and int(codes.max()) < 16
    assert torch.equal(codes, sample(model.prior, batch=2, steps=30, params=SamplingParams(seed=1)))
    mel = model.vqvae.decode_codes(codes)  # (2, 128, 30 * downsample): jobs pick downsample 1
    frames = 30 * model.vqvae.config.downsample
    assert mel.shape == (2, model.mel_config.n_mels, frames) and torch.isfinite(mel).all()

    shown = distill(cluster, tmp_path, "model", "show", "drums.distill")
    assert shown.returncode == 0 and "bd_808.flac" in shown.stdout, shown.stderr
    prior_job = out.stdout.split("prior ")[1].split()[0]  # "jobs: ... -> prior j-..."
    pulled = distill(cluster, tmp_path, "model", "pull", prior_job, "-o", "again.distill")
    assert pulled.returncode == 0, pulled.stderr
    assert (tmp_path / "again.distill").read_bytes() == path.read_bytes()


def test_a_failed_stage_prints_its_reason_and_the_cascade(cluster: Cluster, tmp_path: Path) -> None:
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "readme.txt").write_text("not a sound")
    out = distill(cluster, tmp_path, "train", str(notes), *TINY)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert "error: stage preprocess (job j-" in out.stderr and "no usable audio" in out.stderr
    cascade = [line.strip() for line in out.stderr.splitlines() if line.startswith("  then ")]
    assert [line.split()[1] for line in cascade] == ["vqvae", "prior"], out.stderr
    assert all(" cancelled: dependency j-" in line for line in cascade), out.stderr
    assert all(line.endswith("failed (the reason above)") for line in cascade), out.stderr
    assert out.stderr.count("no usable audio") == 1, out.stderr  # said once, not per stage
    assert not (tmp_path / "notes.distill").exists()


def test_a_source_that_is_no_folder_nor_dataset_says_what_it_is(cluster: Cluster,
                                                                 tmp_path: Path) -> None:
    (tmp_path / "take1.wav").write_bytes(b"RIFF")
    audio = distill(cluster, tmp_path, "artifacts", "put", "take1.wav")
    assert audio.returncode == 0, audio.stderr
    for source, says in (
        (str(tmp_path / "gone"), "gone: no such folder, and not a dataset id"),
        ("take1.wav", "take1.wav: a file, not a folder of sounds"),
        ("0123456789abcdef0123", "'0123456789abcdef0123' matches no artifact"),
    ):
        out = distill(cluster, tmp_path, "train", source, *TINY)
        assert out.returncode == 1 and says in out.stderr and "Traceback" not in out.stderr, out.stderr
    # a wrong --vqvae is refused before the folder is uploaded and a preprocess job submitted
    sounds = tmp_path / "sounds"
    sounds.mkdir()
    (sounds / "take1.wav").write_bytes(b"RIFF")
    with cluster.client() as c:
        jobs_before = len(JobsClient(c).list())
    out = distill(cluster, tmp_path, "train", str(sounds), "--stage", "prior", "--vqvae",
                  "0123456789abcdef0123", "-o", "p.distill")  # fmt: skip
    assert out.returncode == 1 and "matches no" in out.stderr, out.stderr
    assert "uploading" not in out.stderr
    with cluster.client() as c:
        assert len(JobsClient(c).list()) == jobs_before  # no preprocess job submitted
    sha = audio.stdout.split()[0]  # an artifact, but not a dataset
    out = distill(cluster, tmp_path, "dataset", "show", sha[:12])
    assert out.returncode == 1 and "is of kind 'file', not a dataset" in out.stderr, out.stderr
    out = distill(cluster, tmp_path, "dataset", "show", str(tmp_path))  # a folder
    assert out.returncode == 1 and "a folder, not a dataset id: `distill dataset add" in out.stderr
    assert "submitted" not in out.stderr and not list(tmp_path.glob("*.distill"))


def _sigint_as_from_a_terminal() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_detaches_and_the_jobs_go_on(cluster: Cluster, drums: Path, tmp_path: Path) -> None:
    env = {**os.environ, "DISTILL_BROKER": cluster.endpoint}
    # as from a terminal: a child inherits an ignored SIGINT (some test before this one can
    # leave the pytest process ignoring it, and Python then keeps ignoring it in the child)
    proc = subprocess.Popen([sys.executable, "-m", "distill.shared.cli", "train", str(drums),
                             *TINY, "-o", "later.distill"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path,
                            preexec_fn=_sigint_as_from_a_terminal)  # fmt: skip
    assert proc.stdout is not None and proc.stderr is not None
    jobs_line = proc.stdout.readline()  # printed once every job is submitted
    assert jobs_line.startswith("jobs: preprocess j-"), jobs_line
    proc.send_signal(signal.SIGINT)
    assert proc.wait(60) == 130
    told = proc.stderr.read()
    prep, vqvae, prior = (part.split()[1] for part in jobs_line[len("jobs: ") :].split(" -> "))
    assert f"distill jobs watch {vqvae}" in told and f"distill jobs cancel {prep}" in told
    assert f"distill model pull {prior} -o later.distill" in told

    with cluster.client(timeout_s=30) as c:
        early = distill(cluster, tmp_path, "model", "pull", vqvae)
        if JobsClient(c).get(prior, metrics=False)["status"] != "succeeded":
            assert early.returncode == 1 and "the model is not made yet" in early.stderr
        wait_until(lambda: JobsClient(c).get(prior, metrics=False)["status"] == "succeeded",
                   180, interval_s=0.5, what="the detached pipeline to finish")  # fmt: skip
    pulled = distill(cluster, tmp_path, "model", "pull", vqvae, "-o", "later.distill")
    assert pulled.returncode == 0, pulled.stderr
    assert load_model(tmp_path / "later.distill").prior is not None

    # a second prior on the same RVQ-VAE: --stage prior takes the weights and the dataset from
    # the finished RVQ-VAE job
    again = distill(cluster, tmp_path, "train", "--stage", "prior", "--vqvae", vqvae, "-o",
                    "second.distill", "--prior-opt", "hidden=16", "--epochs", "1",
                    "--train-opt", "minutes=0")  # fmt: skip
    assert again.returncode == 0, again.stderr
    assert "[1/1] prior" in again.stderr and "jobs: prior j-" in again.stdout
    first, second = load_model(tmp_path / "later.distill"), load_model(tmp_path / "second.distill")
    assert second.prior is not None and second.prior.config.hidden == 16
    for name, weight in first.vqvae.state_dict().items():
        assert torch.equal(second.vqvae.state_dict()[name], weight), name
