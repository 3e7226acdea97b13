"""Training and inference with the model on an accelerator, on a machine without one: the
stand-in device of ``tests/fakedevice.py`` (CPU compute, a GPU's rules on where tensors live;
with ``no_float64``, MPS's rule on float64 too). An RVQ-VAE job on CUDA or MPS failed at its
first step (the PCA start multiplied a CPU matrix by the device's mean; MPS has no float64):
no test could see it here, where every test ran on the CPU."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from distill.shared.audio.dataset import Dataset, build_dataset
from distill.shared.audio.io import scan_folder
from distill.shared.audio.mel import MelConfig
from distill.shared.model import inference as inf
from distill.shared.model.modelfile import DistillModel
from distill.shared.model.prior import Prior
from distill.shared.model.sampling import SamplingParams
from distill.shared.model.vqvae import VQVAE, VQVAEConfig
from distill.shared.train.loop import NullHooks
from distill.shared.train.prior import PriorTrainConfig, encode_dataset, train_prior
from distill.shared.train.vqvae import TrainConfig, VQVAETrainer
from tests.conftest import percussion_dir
from tests.fakedevice import DeviceMisuse, OnDevice, fake_accelerator

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
    assert torch.cuda.is_available() == available  # the patches are put back


@pytest.mark.parametrize("no_float64", DEVICES)
def test_the_codec_starts_from_pca_on_the_device(dataset: Dataset, no_float64: bool) -> None:
    """The failing step itself: the same start as on the CPU (PCA runs on the CPU for both)."""
    mels = torch.from_numpy(dataset.mels)  # (N, M, T)
    torch.manual_seed(0)
    on_cpu = VQVAE(SMALL)
    on_cpu.set_normalisation_(mels.mean(dim=(0, 2)), mels.std().expand(mels.shape[1]))
    on_cpu.pca_init_(mels)
    with fake_accelerator(no_float64=no_float64):
        torch.manual_seed(0)
        model = VQVAE(SMALL).to("cuda")
        x = mels.to("cuda")
        model.set_normalisation_(x.mean(dim=(0, 2)), x.std().expand(x.shape[1]))
        model.pca_init_(x)
        got = {k: v.cpu() for k, v in model.state_dict().items()}
    for key, want in on_cpu.state_dict().items():
        assert torch.equal(got[key], want), key


@pytest.mark.slow  # trains two tiny models through the stand-in's dispatch (~35 s)
def test_train_and_generate_on_the_device(dataset: Dataset) -> None:
    """Both trainers and the inference operations with the model on the device, under the GPU
    rules and MPS's float64 rule at once."""
    train = TrainConfig(epochs=2, batch_size=4, lr=3e-3, warmup_steps=2, preview_every=1,
                        patience=0, checkpoint_every_s=0)  # fmt: skip
    with fake_accelerator(no_float64=True):
        vqvae = VQVAETrainer(dataset, SMALL, train, NullHooks(), device="cuda").run().model
        codes = encode_dataset(vqvae, dataset, vqvae_id="a" * 64, dataset_id="b" * 64,
                               device="cuda")  # fmt: skip
        prior_config = dataclasses.replace(PriorTrainConfig(), epochs=2, warmup_steps=2,
                                           patience=0, checkpoint_every_s=0)  # fmt: skip
        prior = train_prior(codes, {}, prior_config, NullHooks(), device="cuda").model
        assert isinstance(prior, Prior)
        model = DistillModel(mel_config=dataset.mel_config, vqvae=vqvae.eval(),
                             prior=prior.eval(), summary={})  # fmt: skip
        audio = torch.sin(torch.arange(24000) / 7.0) * torch.linspace(1, 0, 24000)  # (samples,)
        grid = inf.encode(model, audio, search=4)  # the code search, on the device
        sound, _ = inf.decode(model, grid, None, "fast")
        params = SamplingParams(seed=1)
        made = inf.generate(model, count=2, seconds=0.3, params=params, quality="fast")
        batch1 = inf.generate(model, count=1, seconds=0.3, params=params, quality="fast")
        again = inf.resample_variants(model, grid, 2, 10, params, "fast", count=2)
        continued = inf.generate(model, count=1, seconds=0.2, params=params, quality="fast",
                                 prime=grid[:, :10])  # fmt: skip
    for out in (sound, made.audio, batch1.audio, again.audio, continued.audio):
        assert isinstance(out, np.ndarray) and np.isfinite(out).all() and np.abs(out).max() > 0
    assert made.codes.shape[0] == 2 and again.codes.shape == (2, *grid.shape)
