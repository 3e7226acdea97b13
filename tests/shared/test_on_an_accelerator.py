"""Training and inference with the model on an accelerator, on a machine without one: the
stand-in device of ``tests/fakedevice.py`` (CPU compute, a GPU's rules on where tensors live;
with ``no_float64``, MPS's rule on float64 too), in this process and in worker processes. An
RVQ-VAE job on CUDA or MPS failed at its first step (the PCA start multiplied a CPU matrix by
the device's mean; MPS has no float64): no test could see it here, where every test ran on the
CPU."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from distill.shared.audio.dataset import Dataset, build_dataset
from distill.shared.audio.io import scan_folder
from distill.shared.audio.mel import MelConfig
from distill.shared.bus.artifacts import ArtifactClient
from distill.shared.bus.jobs import JobsClient
from distill.shared.devices import resolve_device
from distill.shared.model import inference as inf
from distill.shared.model.codes import CodeGrid, EditSession
from distill.shared.model.modelfile import DistillModel, load_model, save_model
from distill.shared.model.prior import Prior, PriorConfig
from distill.shared.model.sampling import SamplingParams
from distill.shared.model.vqvae import VQVAE, VQVAEConfig
from tests.conftest import Cluster, percussion_dir
from tests.fakedevice import DeviceMisuse, OnDevice, fake_accelerator, process_env

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

FILES = ["bd_808.flac", "bd_haus.flac", "sn_dub.flac", "hat_bdu.flac", "tabla_na.flac",
         "elec_blip.flac", "drum_tom_lo_hard.flac"]  # fmt: skip
# the linear path is on for every device's size (choose_size): its PCA start is the step that failed
SMALL = VQVAEConfig(channels=32, latent_dim=16, blocks=2, codebook_size=16, levels=3,
                    linear_path=True)  # fmt: skip
DEVICES = [pytest.param(False, id="cuda"), pytest.param(True, id="mps-float64-rule")]


@pytest.fixture(scope="module")
def dataset() -> Dataset:
    paths = [p for p in scan_folder(percussion_dir()) if p.name in FILES]
    return build_dataset([(p.name, p.read_bytes()) for p in paths], MelConfig(), seed=0)


def test_the_stand_in_refuses_what_a_gpu_refuses() -> None:
    available = torch.cuda.is_available()
    with fake_accelerator(no_float64=True):
        x = torch.ones(3, 4).to("cuda")
        assert isinstance(x, OnDevice) and torch.cuda.is_available()
        assert float((x * 2).sum()) == 24.0  # 0-dim CPU values mix, as on a GPU
        assert (x + torch.tensor(1.0)).sum().item() == 24.0
        with pytest.raises(DeviceMisuse, match="mixes"):
            x + torch.ones(3, 4)
        with pytest.raises(DeviceMisuse, match="numpy"):
            x.numpy()
        assert x.cpu().numpy().sum() == 12.0
        with pytest.raises(DeviceMisuse, match="generator"):
            torch.rand(3, device="cuda", generator=torch.Generator().manual_seed(0))
        assert torch.rand(3, device="cuda", generator=torch.Generator(device="cuda")).shape == (3,)
        with pytest.raises(DeviceMisuse, match="float64"):
            x.double()
        with pytest.raises(DeviceMisuse, match="float64"):
            torch.tensor([1.0], dtype=torch.float64, device="mps")
        with pytest.raises(DeviceMisuse, match="mixes"):  # a CPU scalar only element-wise
            torch.stack([x.sum(), torch.tensor(0.0)])
        rows = torch.tensor([0, 2])  # CPU indices into a device tensor: as on a GPU
        x[rows] = torch.tensor(5.0)
        with pytest.raises(DeviceMisuse, match="CPU values"):
            x[rows] = torch.ones(2, 4)
        with pytest.raises(DeviceMisuse, match="device generator for a CPU draw"):
            torch.randperm(5, generator=torch.Generator(device="cuda"))
        assert isinstance(x.new_tensor([1.0]), OnDevice)
    assert torch.cuda.is_available() == available  # the patches are put back


@pytest.mark.parametrize("spec", ["cuda", "cuda:0", "auto"])
def test_a_cuda_device_makes_cudnn_deterministic(spec: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A recipe replays the same samples on the same device: a CUDA worker or offline command
    must not let cuDNN's autotuner pick, nor use its non-deterministic algorithms; the CPU
    leaves the settings alone."""
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", False)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)
    assert resolve_device("cpu") == "cpu"
    assert not torch.backends.cudnn.deterministic and torch.backends.cudnn.benchmark
    with fake_accelerator():
        assert resolve_device(spec) == "cuda:0"
    assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark


@pytest.mark.parametrize("no_float64", DEVICES)
def test_the_codec_starts_from_pca_on_the_device(dataset: Dataset, no_float64: bool) -> None:
    """The failing step itself: the same start as on the CPU (PCA runs on the CPU for both)."""
    mels = torch.from_numpy(dataset.mels)  # (N, M, T)
    torch.manual_seed(0)
    on_cpu = VQVAE(SMALL)
    on_cpu.set_normalisation_(mels.mean(dim=(0, 2)), mels.std().expand(mels.shape[1]))
    on_cpu.pca_init_(mels, max_vectors=300)  # fewer than the frames: the subsample too
    with fake_accelerator(no_float64=no_float64):
        torch.manual_seed(0)
        model = VQVAE(SMALL).to("cuda")
        x = mels.to("cuda")
        model.set_normalisation_(x.mean(dim=(0, 2)), x.std().expand(x.shape[1]))
        model.pca_init_(x, max_vectors=300)
        got = {k: v.cpu() for k, v in model.state_dict().items()}
    for key, want in on_cpu.state_dict().items():
        assert torch.equal(got[key], want), key


def test_inference_with_the_model_on_the_device(tmp_path: Path) -> None:
    """A model file loaded onto the device, then every inference operation: the code search,
    decode, generate at batch 2 and 1 (each its own sampling loop), region resampling and a
    continuation, under the GPU and float64 rules at once; the same samples as on the CPU."""
    torch.manual_seed(0)
    vqvae = VQVAE(SMALL)
    prior = Prior(PriorConfig(levels=3, codebook_size=16, embed_dim=8, hidden=16))
    path = tmp_path / "tiny.distill"
    save_model(path, DistillModel(mel_config=MelConfig(), vqvae=vqvae.eval(), prior=prior.eval(),
                                  summary={}))  # fmt: skip
    audio = torch.sin(torch.arange(24000) / 7.0) * torch.linspace(1, 0, 24000)  # (samples,)
    params = SamplingParams(seed=1)

    def run(device: str) -> list[np.ndarray]:
        model = load_model(path, device)
        grid = inf.encode(model, audio, search=4)  # the code search, on the device
        return [grid, inf.decode(model, grid, None, "fast")[0],
                inf.generate(model, count=2, seconds=0.3, params=params, quality="fast").audio,
                inf.generate(model, count=1, seconds=0.3, params=params, quality="fast").audio,
                inf.resample_variants(model, grid, 2, 10, params, "fast", count=2).audio,
                inf.generate(model, count=1, seconds=0.2, params=params, quality="fast",
                             prime=grid[:, :10]).audio]  # fmt: skip

    with fake_accelerator(no_float64=True):
        got = run("cuda")
    for out, want in zip(got, run("cpu"), strict=True):
        assert isinstance(out, np.ndarray) and np.array_equal(out, want)
    assert np.abs(got[1]).max() > 0


@pytest.mark.integration
@pytest.mark.slow  # a pipeline through worker processes on the stand-in (~1 min)
def test_a_pipeline_and_a_generate_job_with_the_workers_on_the_device(
        cluster: Cluster, tmp_path: Path) -> None:  # fmt: skip
    """`distill train` with the RVQ-VAE, prior and inference workers on `--device mps`, `cuda`
    and `mps` (the stand-in in each worker process and its threads, MPS's float64 rule on
    all): the workers' own steps on the device (previews, the decoded-audio figure, codebook
    health, the prior's encoding of the dataset and its draws for the change temperature), a
    generate job and the inference worker's other operations (the UI's editor's among them)."""
    on_device = process_env(no_float64=True)
    cluster.start_broker()
    cluster.start_worker("preprocess")
    for service, device in (("vqvae", "mps"), ("prior", "cuda"), ("infer", "mps")):
        cluster.start_worker(service, device=device, env=on_device)
    listed = {w["service"]: w["device"] for w in cluster.worker_list()}
    assert listed["distill.train.vqvae"] == "mps" and listed["distill.train.prior"] == "cuda:0"
    sounds = tmp_path / "sounds"
    sounds.mkdir()
    for name in FILES:
        shutil.copy(percussion_dir() / name, sounds / name)
    tiny = ["--vqvae-opt", "channels=32", "--vqvae-opt", "latent_dim=16", "--vqvae-opt",
            "blocks=1", "--codebook-size", "16", "--levels", "2", "--prior-opt", "hidden=32",
            "--prior-opt", "embed_dim=16", "--epochs", "3", "--batch-size", "8",
            "--train-opt", "patience=0", "--train-opt", "warmup_steps=2",
            "--train-opt", "minutes=0", "--train-opt", "vqvae.preview_every=1"]  # fmt: skip
    env = {**os.environ, "DISTILL_BROKER": cluster.endpoint}
    out = subprocess.run([sys.executable, "-m", "distill.shared.cli", "train", str(sounds),
                          *tiny], capture_output=True, text=True, env=env, cwd=tmp_path,
                         timeout=240)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert "preview at epoch 1" in out.stderr and "x the Griffin-Lim floor: " in out.stderr
    assert "codes in use on the training files" in out.stderr and "bits/code" in out.stderr
    with cluster.client(timeout_s=60) as c:
        model = ArtifactClient(c).put_file(tmp_path / "sounds.distill", kind="model",
                                           name="sounds.distill")  # fmt: skip
        jobs = JobsClient(c)
        job = jobs.submit("distill.infer", {"op": "generate", "model": model, "count": 2,
                                            "seconds": 0.5, "seed": 1, "trim": 60})  # fmt: skip
        record = jobs.follow(job["id"], lambda event: None)
        assert record["status"] == "succeeded", record.get("error")
        assert len(record["result"]["sounds"]) == 2
        sound = np.sin(np.arange(12000) / 5.0) * np.linspace(0.5, 0, 12000)

        def infer(op: str, **body: object) -> dict[str, Any]:
            reply = c.request("distill.infer", {"op": op, "model": model, **body})
            assert np.isfinite(reply["audio"]).all() and np.abs(reply["audio"]).max() > 0, op
            return dict(reply)

        codes = c.request("distill.infer", {"op": "encode", "model": model, "audio": sound,
                                            "sample_rate": 48000})["codes"]  # fmt: skip
        infer("decode", codes=codes)
        infer("progressive", audio=sound, sample_rate=48000)
        infer("blend", a=sound, b=sound[::-1].copy(), sample_rate=48000, amount=0.3)
        infer("resample_region", codes=codes, t0=2, t1=10, seed=1)
        session = EditSession(CodeGrid(np.asarray(codes), 16)).to_dict()
        edited = infer("edit", session=session, action="apply",
                       edit={"op": "reverse", "region": [0, 2, 2, 12]})  # fmt: skip
        assert edited["can_undo"]
        preprocess = out.stdout.split("preprocess ")[1].split()[0]  # "jobs: preprocess j-…"
        dataset = jobs.get(preprocess)["result"]["dataset"]
        usage = c.request("distill.infer", {"op": "codebook", "model": model, "dataset": dataset})
        assert usage["codes_counted"] > 0 and all(level["used"] > 0 for level in usage["levels"])
