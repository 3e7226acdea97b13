"""Generation draws a silent sound again, deterministically, and leaves continuations alone."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from distill.shared.audio.mel import MelConfig, log_mel
from distill.shared.model import inference
from distill.shared.model.inference import BadInput, generate, generate_recipe, replay
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


def test_draws_far_under_the_loudest_are_drawn_again_and_old_recipes_replay_without_it(
) -> None:
    """A draw whose peak stays QUIET_UNDER_LOUDEST_DB under the loudest first draw of its
    request is drawn again (the demo's model once drew a 20-ms blip at -42 dBFS beside draws
    at 0 dBFS); a recipe written before the rule replays without it, the file as it was."""
    model, params = tiny_model(), SamplingParams(seed=5)
    plain = generate(model, count=8, seconds=0.1, params=params, quality="preview",
                     quiet_under_loudest_db=None)  # fmt: skip
    assert plain.redrawn == 0
    p = peaks(plain.audio)
    under = float(p.max() - np.median(p))  # the quieter half is this far under the loudest
    quiet = p < p.max() - under
    assert 0 < quiet.sum() < 8
    made = generate(model, count=8, seconds=0.1, params=params, quality="preview",
                    quiet_under_loudest_db=under)  # fmt: skip
    assert made.redrawn == int(quiet.sum())
    np.testing.assert_array_equal(made.codes[~quiet], plain.codes[~quiet])
    assert not np.array_equal(made.codes[quiet], plain.codes[quiet])
    # Each recipe replays what its file holds: with the rule (as recorded) and without it.
    i = int(np.flatnonzero(quiet)[0])
    recipe = generate_recipe(params, count=8, seconds=0.1, quality="preview", index=i,
                             render_frames=made.render_frames)  # fmt: skip
    assert recipe["quiet_under_loudest_db"] == inference.QUIET_UNDER_LOUDEST_DB
    recipe["quiet_under_loudest_db"] = under
    np.testing.assert_array_equal(replay(model, "generate", recipe), made.audio[i])
    del recipe["quiet_under_loudest_db"]
    np.testing.assert_array_equal(replay(model, "generate", recipe), plain.audio[i])
    with pytest.raises(BadInput, match="quiet_under_loudest_db"):
        replay(model, "generate", {**recipe, "quiet_under_loudest_db": "loud"})


def test_a_recipe_from_before_min_p_replays_as_it_was_drawn() -> None:
    """Files exported before min_p existed record no min_p: they were drawn with none, and a
    replay must not apply today's default (it would draw other sounds)."""
    model = tiny_model()
    assert model.prior is not None
    with torch.no_grad():  # peaked, as a trained prior is, so that the default cut bites
        model.prior.head_weight.mul_(30.0)
    params = SamplingParams(seed=4, min_p=0.0, change_temperature=1.0)  # as drawn then
    made = generate(model, count=16, seconds=1.0, params=params, quality="preview")
    recipe = inference.generate_recipe(params, count=16, seconds=1.0, quality="preview", index=1,
                                       render_frames=made.render_frames)  # fmt: skip
    del recipe["min_p"], recipe["change_temperature"]  # as an older Distill wrote it
    np.testing.assert_array_equal(inference.replay(model, "generate", recipe), made.audio[1])
    cut = generate(model, count=16, seconds=1.0, params=SamplingParams(seed=4, change_temperature=1.0),
                   quality="preview")  # fmt: skip
    assert not np.array_equal(cut.codes, made.codes)  # the default cut draws otherwise here


def test_a_recipe_replays_its_change_temperature_and_one_from_before_it_replays_off() -> None:
    """A recipe records the change temperature its file was drawn at and replays it; files
    exported before it existed record none: they were drawn without it (1)."""
    model = tiny_model()
    assert model.prior is not None
    files = {}
    for change in (1.0, 0.5):
        params = SamplingParams(seed=4, change_temperature=change)
        made = generate(model, count=16, seconds=1.0, params=params, quality="preview")
        recipe = inference.generate_recipe(params, count=16, seconds=1.0, quality="preview",
                                           index=1, render_frames=made.render_frames)  # fmt: skip
        np.testing.assert_array_equal(inference.replay(model, "generate", recipe), made.audio[1])
        files[change] = (made, recipe)
    made, recipe = files[1.0]
    del recipe["change_temperature"]  # as an older Distill wrote it
    np.testing.assert_array_equal(inference.replay(model, "generate", recipe), made.audio[1])
    assert not np.array_equal(files[0.5][0].codes, made.codes)  # apart draws otherwise


def test_a_change_temperature_left_out_is_the_models() -> None:
    """A request or option without a change temperature draws at the one chosen for the model
    when its prior was trained; one given wins; a model without a choice (or a damaged one)
    draws without it (1)."""
    chosen = dataclasses.replace(tiny_model(), summary={"sampling": {"change_temperature": 0.5}})
    assert inference.sampling_params({"seed": 1}, chosen).change_temperature == 0.5
    assert inference.sampling_params({"change_temperature": 2.0}, chosen).change_temperature == 2.0
    assert inference.sampling_params({}, tiny_model()).change_temperature == 1.0
    assert inference.sampling_params({}).change_temperature == 1.0
    for bad in ("0.5", True, -1.0, None):
        damaged = dataclasses.replace(tiny_model(), summary={"sampling": {"change_temperature": bad}})
        assert inference.sampling_params({}, damaged).change_temperature == 1.0


def test_the_change_temperature_is_chosen_by_the_shape_of_the_draws() -> None:
    """Each choice draws sounds whose envelopes are compared with the training sounds'; the
    one closer is chosen, the same each time; no sounds to compare with is refused."""
    model = tiny_model()
    rate = model.mel_config.sample_rate
    t = torch.arange(int(0.6 * rate)) / rate
    mels = [log_mel(0.5 * torch.sin(2 * math.pi * 110.0 * (i + 1) * t) * torch.exp(-4 * t),
                    model.mel_config) for i in range(3)]  # fmt: skip
    got = inference.choose_change_temperature(model, mels)
    assert got["change_temperature"] in inference.CHANGE_TEMPERATURE_CHOICES
    assert set(got["distances"]) == {"1", "0.5"} and got["files"] == 3
    best = min(got["distances"].values())
    assert got["distances"][f"{got['change_temperature']:g}"] == best
    assert inference.choose_change_temperature(model, mels) == got
    with pytest.raises(inference.BadInput, match="no training sounds"):
        inference.choose_change_temperature(model, [])


def coarse_prior_model() -> DistillModel:
    """An RVQ-VAE of 3 levels whose prior models only the first 2 (as PRIOR_LEVELS does for
    RVQ-VAEs of more than 8)."""
    torch.manual_seed(0)
    vqvae = VQVAE(VQVAEConfig(channels=16, latent_dim=8, blocks=1, codebook_size=16, levels=3))
    prior = Prior(PriorConfig(levels=2, codebook_size=16, embed_dim=8, hidden=16))
    return DistillModel(mel_config=MelConfig(), vqvae=vqvae.eval(), prior=prior.eval(),
                        summary={})  # fmt: skip


def test_a_prior_over_the_first_levels_leaves_the_finer_ones_empty() -> None:
    model, params = coarse_prior_model(), SamplingParams(seed=4)
    made = generate(model, count=2, seconds=0.3, params=params, quality="preview")
    assert made.codes.shape[1] == 3 and (made.codes[:, 2] == -1).all()
    assert (made.codes[:, :2] >= 0).all() and np.isfinite(made.audio).all()
    # the drawn levels are the prior's own draw, as sampling gives them
    from distill.shared.model.sampling import sample

    steps = made.codes.shape[2]
    assert np.array_equal(made.codes[:, :2], sample(model.prior, batch=2, steps=steps,
                                                    params=params).numpy())  # fmt: skip
    # a continuation keeps every level of its prime and leaves the new steps' finer level empty
    prime = np.arange(3 * 6).reshape(3, 6) % 16
    cont = generate(model, count=1, seconds=0.2, params=params, quality="preview", prime=prime)
    assert np.array_equal(cont.codes[0, :, :6], prime) and (cont.codes[0, 2, 6:] == -1).all()
    # a prime whose finer level is empty is fine; one with a gap in the prior's levels is not
    holes = prime.copy()
    holes[2] = -1
    generate(model, count=1, seconds=0.1, params=params, quality="preview", prime=holes)
    holes[1, 3] = -1
    with pytest.raises(inference.BadInput, match="first 2 levels"):
        generate(model, count=1, seconds=0.1, params=params, quality="preview", prime=holes)
    # a region drawn again: its finer codes are cleared, everything outside it is kept
    grid = np.arange(3 * 12).reshape(3, 12) % 16
    again = inference.resample_variants(model, grid, 4, 8, params, "preview", count=2).codes
    assert np.array_equal(again[:, :, :4], np.broadcast_to(grid[:, :4], (2, 3, 4)))
    assert np.array_equal(again[:, :, 8:], np.broadcast_to(grid[:, 8:], (2, 3, 4)))
    assert (again[:, 2, 4:8] == -1).all() and (again[:, :2, 4:8] >= 0).all()
    assert not np.array_equal(again[0, :2, 4:8], grid[:2, 4:8])


def test_a_recipe_with_codes_that_are_not_whole_numbers_is_refused() -> None:
    """Before: 1.5 was read as code 1 (numpy's int64 cast), a grid the file never held."""
    model = tiny_model()
    codes = [[1, 2, 3], [4, 5, 6]]
    assert inference.replay(model, "decode", {"codes": codes, "levels": None,
                                              "quality": "preview"}).ndim == 1  # fmt: skip
    for bad, says in (([[1.5, 2, 3], [4, 5, 6]], "float64"), ([[True, False], [True, True]], "bool"),
                      ([[2**64 - 1, 1], [1, 1]], "not an integer grid")):  # fmt: skip
        with pytest.raises(BadInput, match=says):
            inference.replay(model, "decode", {"codes": bad, "levels": None, "quality": "preview"})


def test_an_edit_session_is_checked_against_the_model_before_its_edits_replay() -> None:
    """Before: a 3-hour base grid with 20 whole-grid edits was replayed (1.7 GB) before the
    60-s bound refused it; an edit history is bounded too."""
    from distill.shared.model.codes import MAX_EDITS, CodeGrid, EditSession, SetCell

    model = tiny_model()
    long = EditSession(CodeGrid(np.zeros((2, 200_000), dtype=np.int64), 16)).to_dict()
    long["edits"] = [{"bad": "never replayed"}]  # would fail as an edit if it were replayed
    with pytest.raises(BadInput, match="the session's grid has 200000 steps"):
        inference.edit_session(model, long, "none", None)
    small = EditSession(CodeGrid(np.zeros((2, 30), dtype=np.int64), 16))
    small.apply(SetCell(level=0, t=0, code=3))
    many = small.to_dict()
    many["edits"] = many["edits"] * (MAX_EDITS + 1)
    with pytest.raises(BadInput, match=f"holds {MAX_EDITS + 1} edits; at most {MAX_EDITS}"):
        inference.edit_session(model, many, "none", None)
    assert inference.edit_session(model, small.to_dict(), "none", None).grid.codes[0, 0] == 3


def test_malformed_values_are_bad_input_naming_the_field_not_internal_errors() -> None:
    """Before: a ragged code list, a list as quality and an unhashable edit op raised
    Python's own errors (answered `internal`), and (samples, channels) audio was read as
    thousands of channels of two samples."""
    from distill.shared.model.codes import CodeGridError, edit_from_dict

    model = tiny_model()
    with pytest.raises(BadInput, match="codes must be an integer grid"):
        inference.check_grid(model, [[1, 2, 3], [4, 5]])
    with pytest.raises(BadInput, match="quality must be one of"):
        inference.check_quality(["best"])
    with pytest.raises(CodeGridError, match="not an edit"):
        edit_from_dict({"op": ["reverse"]})
    stereo = np.zeros((4800, 2), dtype=np.float32)  # soundfile's layout, not (channels, samples)
    with pytest.raises(BadInput, match="is it \\(samples, channels\\)"):
        inference.model_audio(model, stereo, 48000)
    assert inference.model_audio(model, stereo.T.copy(), 48000).shape == (4800,)
    # a recipe's trim, before any of its work (this one lacks the rest: that error would come later)
    for bad, why in ((5, "must be in \\[10, 120\\]"), ("60", "must be a finite number"),
                     (True, "must be a finite number")):  # fmt: skip
        with pytest.raises(BadInput, match=f"trim {why}"):
            inference.replay(model, "generate", {"trim": bad})


@pytest.mark.parametrize("seconds", [0.05, 0.1, 1.0, 2.0, 2.5])
def test_a_new_sound_is_exactly_as_long_as_asked_and_old_recipes_replay_a_hop_short(
    seconds: float,
) -> None:
    """Before: T code steps render as (T - 1) x hop samples, so `--seconds 2` made 1.995 s
    (95744 samples, not 96000). A continuation is its prime's (T0 - 1) x hop samples and then
    exactly the seconds asked. A recipe from before replays as its file was made."""
    model, params = tiny_model(), SamplingParams(seed=2)
    rate, hop = model.mel_config.sample_rate, model.mel_config.hop_length
    made = generate(model, count=2, seconds=seconds, params=params, quality="preview")
    assert made.audio.shape == (2, round(seconds * rate))
    assert (made.codes.shape[2] - 2) * hop < made.audio.shape[1] <= (made.codes.shape[2] - 1) * hop
    prime = made.codes[0][:, :5]
    cont = generate(model, count=1, seconds=seconds, params=params, quality="preview",
                    prime=prime)  # fmt: skip
    assert cont.audio.shape == (1, 4 * hop + round(seconds * rate))
    np.testing.assert_array_equal(cont.codes[0][:, :5], prime)
    recipe = generate_recipe(params, count=2, seconds=seconds, quality="preview", index=1,
                             render_frames=made.render_frames)  # fmt: skip
    np.testing.assert_array_equal(replay(model, "generate", recipe), made.audio[1])
    del recipe["exact_length"]  # as an older Distill wrote it
    before = generate(model, count=2, seconds=seconds, params=params, quality="preview",
                      exact_length=False)  # fmt: skip
    assert before.audio.shape[1] == (inference.steps_for(model, seconds) - 1) * hop
    np.testing.assert_array_equal(replay(model, "generate", recipe), before.audio[1])


def test_long_sounds_decode_in_fewer_per_batch_and_old_recipes_replay_sixteen_at_a_time() -> None:
    """Before: sounds decoded 16 at a time whatever their length (16 sounds of 60 s peaked at
    5.8 GB; 2 at a time, 1.7 GB). A batch now holds at most RENDER_FRAMES mel frames; a recipe
    records the budget, and one from before replays 16 at a time, as its file was made."""
    model = tiny_model()
    batch = inference.render_batch
    assert batch(model, 189, inference.RENDER_FRAMES) == 16  # 2 s: as before
    assert batch(model, 704, inference.RENDER_FRAMES) == 16  # 7.5 s: as before
    assert batch(model, 5627, inference.RENDER_FRAMES) == 2  # 60 s
    assert batch(model, 5627, None) == 16 and batch(model, 10**6, 100) == 1
    # on a CPU two sounds of 2 s a batch (Griffin-Lim over 16 at once was up to 2x slower)
    assert batch(model, 188, inference.CPU_RENDER_FRAMES) == 2
    assert batch(model, 94, inference.CPU_RENDER_FRAMES) == 4
    assert inference.render_frames_for(model) == inference.CPU_RENDER_FRAMES
    params = SamplingParams(seed=6)
    one_by_one = generate(model, count=3, seconds=0.3, params=params, quality="fast",
                          render_frames=30)  # fmt: skip
    recipe = generate_recipe(params, count=3, seconds=0.3, quality="fast", index=2,
                             render_frames=generate(model, count=3, seconds=0.3, params=params,
                                                    quality="fast").render_frames)  # fmt: skip
    assert recipe["render_frames"] == inference.CPU_RENDER_FRAMES  # the model is on the CPU
    np.testing.assert_array_equal(replay(model, "generate", {**recipe, "render_frames": 30}),
                                  one_by_one.audio[2])  # fmt: skip
    del recipe["render_frames"]  # as an older Distill wrote it
    before = generate(model, count=3, seconds=0.3, params=params, quality="fast",
                      render_frames=None)  # fmt: skip
    np.testing.assert_array_equal(replay(model, "generate", recipe), before.audio[2])
    np.testing.assert_array_equal(one_by_one.codes, before.codes)  # the same draws
    with pytest.raises(BadInput, match="render_frames"):
        replay(model, "generate", {**recipe, "render_frames": 0})


def test_generate_each_hands_out_what_generate_keeps_a_batch_at_a_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """What a generate job stores as it goes: the first draws in order, a batch at a time (at
    most render_batch sounds), then the quiet ones drawn again, each replacing its first
    draw; assembled, generate's sounds and codes, bit for bit (a prime's steps included)."""
    model, params = coarse_prior_model(), SamplingParams(seed=7)
    plain = generate(model, count=7, seconds=1.0, params=params, quality="preview")
    monkeypatch.setattr(inference, "SILENT_PEAK_DB", float(np.median(peaks(plain.audio))))
    kept = generate(model, count=7, seconds=1.0, params=params, quality="preview")
    assert kept.redrawn >= 2
    handed: list[tuple[list[int], np.ndarray]] = []
    drawn = inference.generate_each(model, lambda i, a: handed.append((i.tolist(), a.copy())),
                                    count=7, seconds=1.0, params=params, quality="preview")  # fmt: skip
    size = inference.render_batch(model, kept.codes.shape[2], inference.CPU_RENDER_FRAMES)
    assert size == 3 and all(len(i) <= size for i, _ in handed)
    first = [n for i, _ in handed[:3] for n in i]
    assert first == list(range(7)) and len(handed) > 3  # then the draws made again
    audio = np.empty_like(kept.audio)
    for i, a in handed:
        audio[i] = a
    np.testing.assert_array_equal(audio, kept.audio)
    np.testing.assert_array_equal(drawn.grids(), kept.codes)
    assert drawn.redrawn == kept.redrawn and drawn.render_frames == kept.render_frames
    prime = kept.codes[0][:, :5]
    cont = generate(model, count=2, seconds=0.2, params=params, quality="preview", prime=prime)
    each = inference.generate_each(model, lambda i, a: None, count=2, seconds=0.2, params=params,
                                   quality="preview", prime=prime)  # fmt: skip
    np.testing.assert_array_equal(each.grids(), cont.codes)


def test_trim_never_cuts_into_a_prime_or_a_resampled_region() -> None:
    """A loud kept part and a quiet drawn one (a loud prime, then a continuation 50 dB down):
    the sound's peak is the prime's, and the cut by it alone fell inside the prime, the draw
    cut away. The prime (and a resampled region up to t1) stays whole."""
    model = tiny_model()
    hop = model.mel_config.hop_length * model.vqvae.config.downsample
    rate = model.mel_config.sample_rate
    t = np.arange(rate) / rate
    tone = np.sin(2 * np.pi * 200 * t)  # 1 s: a hit decaying 40 dB in 0.15 s, then a tone 50 dB down
    sound = np.where(t < 0.5, 0.9 * tone * np.exp(-30 * t), 0.9 * 10 ** (-50 / 20) * tone)
    sound = sound.astype(np.float32)
    margin = round(0.010 * rate)
    cut = inference.finish(model, {"trim": 40.0}, sound)  # a new sound: by its peak alone
    assert len(cut) < rate // 4
    prime = np.zeros((2, 30), dtype=np.int64)  # a continuation of 30 kept steps
    kept = inference.finish(model, {"trim": 40.0, "prime": prime.tolist()}, sound)
    assert len(kept) == 29 * hop + margin and np.array_equal(kept[: 29 * hop], sound[: 29 * hop])
    region = inference.finish(model, {"trim": 40.0, "t0": 5, "t1": 40}, sound)  # resampled to t1
    assert len(region) == 40 * hop + margin
    assert np.array_equal(inference.finish(model, {}, sound), sound)  # no trim: as made
