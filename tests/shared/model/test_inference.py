"""Generation draws a silent sound again, deterministically, and leaves continuations alone."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from distill.shared.audio.mel import MelConfig
from distill.shared.model import inference
from distill.shared.model.inference import generate
from distill.shared.model.modelfile import DistillModel
from distill.shared.model.prior import Prior, PriorConfig
from distill.shared.model.sampling import SamplingParams
from distill.shared.model.vqvae import VQVAE, VQVAEConfig

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def tiny_model() -> DistillModel:
    torch.manual_seed(0)
    q, k = 2, 16
    vqvae = VQVAE(VQVAEConfig(channels=16, latent_dim=8, blocks=1, codebook_size=k, levels=q))
    prior = Prior(PriorConfig(levels=q, codebook_size=k, embed_dim=8, hidden=16))
    return DistillModel(mel_config=MelConfig(), vqvae=vqvae.eval(), prior=prior.eval(),
                        summary={})  # fmt: skip


def peaks(audio: np.ndarray) -> np.ndarray:
    return 20 * np.log10(np.abs(audio).max(axis=-1))


def test_silent_draws_are_drawn_again_and_the_rest_stay(monkeypatch: pytest.MonkeyPatch) -> None:
    model, params = tiny_model(), SamplingParams(seed=3)
    plain = generate(model, count=8, seconds=0.1, params=params, quality="preview")
    assert plain.redrawn == 0  # a random model is loud enough: nothing is under -60 dBFS
    # Call the quieter half of these draws silent: they must be drawn again, the rest kept.
    floor = float(np.median(peaks(plain.audio)))
    monkeypatch.setattr(inference, "SILENT_PEAK_DB", floor)
    quiet = peaks(plain.audio) < floor
    first = generate(model, count=8, seconds=0.1, params=params, quality="preview")
    assert first.redrawn == int(quiet.sum()) > 0
    np.testing.assert_array_equal(first.codes[~quiet], plain.codes[~quiet])
    assert (peaks(first.audio) < floor).sum() < quiet.sum()  # redraws made louder sounds
    again = generate(model, count=8, seconds=0.1, params=params, quality="preview")
    np.testing.assert_array_equal(again.codes, first.codes)  # the same request, the same sounds
    np.testing.assert_array_equal(again.audio, first.audio)
    # A continuation may end in silence: it is not drawn again.
    prime = plain.codes[0][:, :2]  # (Q, 2)
    continued = generate(model, count=8, seconds=0.1, params=params, quality="preview",
                         prime=prime)  # fmt: skip
    assert continued.redrawn == 0


def test_a_recipe_from_before_min_p_replays_as_it_was_drawn() -> None:
    """Files exported before min_p existed record no min_p: they were drawn with none, and a
    replay must not apply today's default (it would draw other sounds)."""
    model = tiny_model()
    assert model.prior is not None
    with torch.no_grad():  # peaked, as a trained prior is, so that the default cut bites
        model.prior.head_weight.mul_(30.0)
    params = SamplingParams(seed=4, min_p=0.0)
    made = generate(model, count=16, seconds=1.0, params=params, quality="preview")
    recipe = inference.generate_recipe(params, count=16, seconds=1.0, quality="preview", index=1)
    del recipe["min_p"]  # as an older Distill wrote it
    np.testing.assert_array_equal(inference.replay(model, "generate", recipe), made.audio[1])
    cut = generate(model, count=16, seconds=1.0, params=SamplingParams(seed=4), quality="preview")
    assert not np.array_equal(cut.codes, made.codes)  # the default cut draws otherwise here
