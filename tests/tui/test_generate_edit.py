"""The generate and code-editor screens against a real broker and infer worker, with a tiny
untrained model (plumbing, not quality): sounds come back, are drawn and exported; in the
editor an edited cell decodes to a different sound and undo restores the grid."""

from __future__ import annotations

import asyncio
import gc
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import typer
from textual.widgets import DataTable, Input
from typer.testing import CliRunner

from distill.shared.audio.export import read_export_metadata
from distill.shared.audio.io import read_audio
from distill.shared.bus.artifacts import ArtifactClient
from distill.shared.bus.cache import ArtifactCache
from distill.shared.cli import generate
from distill.shared.errors import DistillError
from distill.shared.model.modelfile import save_model
from distill.tui.app import DistillApp
from distill.tui.screens.editor import EditorScreen
from distill.tui.screens.generate import GenerateScreen
from distill.tui.widgets.codegrid import CodeGridView
from tests.conftest import Cluster
from tests.tui.conftest import notices, until
from tests.workers.test_infer import tiny_model

slow = pytest.mark.slow
cli_app = typer.Typer()
generate.register(cli_app)


@pytest.fixture(scope="module")
def cluster_with_model(module_cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Cluster:
    module_cluster.start_broker()
    module_cluster.start_worker("infer")
    tmp = tmp_path_factory.mktemp("model")
    path = tmp / "tiny.distill"
    save_model(path, tiny_model())
    with module_cluster.client(timeout_s=60) as c:
        ArtifactClient(c, cache=ArtifactCache(tmp / "cache")).put_file(path, kind="model", name=path.name)
    return module_cluster


@slow
async def test_generate_then_edit_a_generated_sound(cluster_with_model: Cluster, tmp_path: Path) -> None:
    app = DistillApp(cluster_with_model.endpoint)
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.press("g")
        gen = app.screen
        assert isinstance(gen, GenerateScreen)
        await until(pilot, lambda: gen.query_one("#model").value != gen.query_one("#model").BLANK,
                    30, what="the model listed")
        gen.query_one("#gen-count", Input).value = "2"
        gen.query_one("#gen-seconds", Input).value = "0.5"
        gen.query_one("#gen-trim", Input).value = "10"  # ended where they fade (regenerated below)
        gen.action_generate()
        results = gen.query_one("#results", DataTable)
        await until(pilot, lambda: results.row_count == 2, 120, what="two sounds")
        assert all(np.isfinite(s).all() and s.size > 0 for s in gen.sounds)
        assert any(c in str(results.get_row_at(0)[4]) for c in "▁▂▃▄▅▆▇█")  # a waveform thumbnail
        gen.query_one("#export-dir", Input).value = str(tmp_path / "out")
        gen.action_export()
        exported = await until(pilot, lambda: sorted((tmp_path / "out").glob("*.wav")), 30,
                               what="the export (written in a thread)")  # fmt: skip
        await until(pilot, lambda: any("exported 2 sounds" in m for m in notices(app)), 30,
                    what="the export's notice")  # fmt: skip
        assert len(exported) == 2 and read_audio(exported[0]).samples.size > 0
        assert read_export_metadata(exported[1]).data["threads"] == 1  # as the editor's (below)
        assert read_export_metadata(exported[1]).data["trim"] == 10.0

        await pilot.press("e")
        ed = app.screen
        assert isinstance(ed, EditorScreen)
        await until(pilot, lambda: isinstance(ed.query_one("#edit-model").value, str), 30,
                    what="the model in the editor")
        ed.query_one("#source", Input).value = "gen:0"
        ed.action_encode()
        grid = ed.query_one("#grid-a", CodeGridView)
        await until(pilot, lambda: ed.slots[0].audio is not None, 120, what="encoded and decoded")
        before_codes = ed.slots[0].codes.copy()
        before_audio = ed.slots[0].audio.copy()
        grid.focus()
        await pilot.press("right", "down")
        assert grid.cursor == (1, 1)
        await pilot.press("plus")
        await until(pilot, lambda: ed.slots[0].can_undo, 60, what="the edit applied")
        after = ed.slots[0].codes
        assert after[1, 1] == (before_codes[1, 1] + 1) % ed.codebook_size
        assert int((after != before_codes).sum()) == 1
        assert not np.array_equal(ed.slots[0].audio, before_audio)  # the edited cell decoded
        await pilot.press("u")
        await until(pilot, lambda: not ed.slots[0].can_undo, 60, what="undone")
        assert np.array_equal(ed.slots[0].codes, before_codes)
        assert np.array_equal(grid.codes, before_codes)  # the grid on screen too
        await pilot.press("r")
        await until(pilot, lambda: ed.slots[0].can_undo, 60, what="redone")
        assert np.array_equal(ed.slots[0].codes, after)

        # the export records the worker's thread count (--threads 1), which the last bits of the
        # decode depend on, so `distill regenerate` makes the same samples on another count
        ed.query_one("#edit-export", Input).value = str(tmp_path / "edits")
        ed.action_export()
        edited = await until(pilot, lambda: sorted((tmp_path / "edits").glob("*.wav")), 120,
                             what="the edit exported")  # fmt: skip
    meta = read_export_metadata(edited[0])
    assert meta.kind == "edit" and meta.data["threads"] == 1
    model_file = tmp_path / "tiny.distill"
    save_model(model_file, tiny_model())
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for made in (edited[0], exported[1]):
            result = CliRunner().invoke(cli_app, ["regenerate", str(made), "--model", str(model_file)])
            assert result.exit_code == 0 and "identical to" in result.output, result.output
    finally:
        torch.set_num_threads(before)


RATE = 22_050  # not the model's rate (48 kHz): blend must send the sounds' own


def _sounds(n: int) -> list[np.ndarray]:
    """Short, different sounds at RATE, as if generated (the editor encodes them as gen:N)."""
    t = np.arange(int(0.5 * RATE), dtype=np.float32) / RATE
    return [(np.sin(2 * np.pi * (110 + 90 * i) * t) * np.exp(-t * (4 + 3 * i))).astype(np.float32)
            for i in range(n)]


async def _editor(app: DistillApp, pilot: Any, sounds: int) -> EditorScreen:
    await pilot.press("e")
    ed = app.screen
    assert isinstance(ed, EditorScreen)
    await until(pilot, lambda: isinstance(ed.query_one("#edit-model").value, str), 30,
                what="the model in the editor")
    app.last_generated = (_sounds(sounds), RATE)
    return ed


async def _encode(ed: EditorScreen, pilot: Any, i: int, source: str) -> None:
    ed.query_one("#source", Input).value = source
    ed.grid(i).focus()
    await pilot.press("o")


@slow
async def test_edits_queue_in_order_and_a_key_never_cancels_an_encode(cluster_with_model: Cluster) -> None:
    """Before: each edit key cancelled the request in flight (an encode included, silently)
    and built its edit from the grid as it was before that request came back."""
    app = DistillApp(cluster_with_model.endpoint)
    async with app.run_test(size=(120, 40)) as pilot:
        ed = await _editor(app, pilot, 1)
        ed.query_one("#source", Input).value = "gen:0"
        ed.grid(0).focus()
        await pilot.pause()
        ed.action_encode()  # o, then u before the loop turns (the encode cannot be back yet)
        ed.action_undo()  # refused with a word; the encode goes on
        await until(pilot, lambda: any("being encoded" in m for m in notices(app)), 5,
                    what="the refusal")
        await until(pilot, lambda: ed.slots[0].audio is not None, 60, what="the encode")
        base = ed.slots[0].codes.copy()
        await pilot.press("plus", "right", "plus", "plus")  # sent before the first comes back
        await until(pilot, lambda: len(ed.slots[0].history) == 4, 60, what="three edits",
                    detail=lambda: repr(ed.slots[0].history))
        after, k = ed.slots[0].codes, ed.codebook_size
        assert after[0, 0] == (base[0, 0] + 1) % k and after[0, 1] == (base[0, 1] + 2) % k
        assert int((after != base).sum()) == 2
        assert np.array_equal(ed.grid(0).codes, after)
        await pilot.press("u", "u")  # each undo undoes one edit, in order
        await until(pilot, lambda: len(ed.slots[0].history) == 6, 60, what="two undos")
        assert ed.slots[0].codes[0, 1] == base[0, 1] and ed.slots[0].codes[0, 0] == after[0, 0]


@slow
async def test_a_swap_that_fails_halfway_changes_neither_grid(cluster_with_model: Cluster) -> None:
    """Before: the swap committed grid B's half as soon as it came back; a failure (or a
    cancel) before grid A's half left the two grids half swapped."""
    app = DistillApp(cluster_with_model.endpoint)
    async with app.run_test(size=(120, 40)) as pilot:
        ed = await _editor(app, pilot, 2)
        await _encode(ed, pilot, 0, "gen:0")
        await _encode(ed, pilot, 1, "gen:1")  # queued behind A's
        await until(pilot, lambda: all(s.audio is not None for s in ed.slots), 90, what="both encoded")
        before = [s.codes.copy() for s in ed.slots]
        real, calls = ed.infer, []

        async def second_fails(body: dict[str, Any], timeout_s: float = 60.0) -> dict[str, Any]:
            calls.append(body)
            if len(calls) == 2:
                raise DistillError("the broker went away")
            return await real(body, timeout_s)

        ed.infer = second_fails  # type: ignore[method-assign]
        ed.grid(0).focus()
        await pilot.press("shift+right", "shift+down", "w")
        status = ed.query_one("#edit-status")
        await until(pilot, lambda: "swap" in str(status.render()), 60, what="the swap's end")
        assert "went away" in str(status.render())
        assert len(calls) == 2
        assert all(np.array_equal(s.codes, b) for s, b in zip(ed.slots, before, strict=True))
        assert all(np.array_equal(ed.grid(i).codes, before[i]) for i in range(2))
        ed.infer = real  # type: ignore[method-assign]
        await pilot.press("w")  # and whole when nothing fails
        await until(pilot, lambda: not np.array_equal(ed.slots[0].codes, before[0]), 60, what="swapped")
        await until(pilot, lambda: not np.array_equal(ed.slots[1].codes, before[1]), 60, what="swapped")
        assert np.array_equal(ed.slots[0].codes[:2, :2], before[1][:2, :2])
        assert np.array_equal(ed.slots[1].codes[:2, :2], before[0][:2, :2])


@slow
async def test_blend_sends_the_sounds_at_their_own_rate(cluster_with_model: Cluster,
                                                       tmp_path: Path) -> None:
    """Before: the request said the model's rate (the preview's), so sounds read at 22.05 kHz
    were blended as if played 2.2 times fast (a grid of a fraction of the steps). B is a file
    at 16 kHz: the request has one rate, so B is brought to A's first."""
    import soundfile

    b_file = tmp_path / "b.wav"
    t = np.arange(8_000) / 16_000  # 0.5 s, as long as A
    soundfile.write(b_file, np.sin(2 * np.pi * 200 * t) * np.exp(-t * 7), 16_000)
    app = DistillApp(cluster_with_model.endpoint)
    async with app.run_test(size=(120, 40)) as pilot:
        ed = await _editor(app, pilot, 1)
        await _encode(ed, pilot, 0, "gen:0")
        await _encode(ed, pilot, 1, str(b_file))
        await until(pilot, lambda: all(s.audio is not None for s in ed.slots), 90, what="both encoded")
        assert ed.slots[0].sample_rate != RATE  # the previews are at the model's rate
        real, sent = ed.infer, []

        async def recording(body: dict[str, Any], timeout_s: float = 60.0) -> dict[str, Any]:
            sent.append(body)
            reply = await real(body, timeout_s)
            if body["op"] == "blend":
                sent.append(reply)
            return reply

        ed.infer = recording  # type: ignore[method-assign]
        ed.grid(0).focus()
        await pilot.press("b")
        await until(pilot, lambda: len(ed.slots[0].history) == 2, 60, what="the blend",
                    detail=lambda: str(ed.query_one("#edit-status").render()))
        blend = next(b for b in sent if b.get("op") == "blend")
        assert blend["sample_rate"] == RATE and len(blend["b"]) == len(blend["a"])  # both 0.5 s
        reply = sent[sent.index(blend) + 1]
        assert np.asarray(reply["codes"]).shape == ed.slots[0].codes.shape  # the same length


# --- without a worker -----------------------------------------------------------------------


@pytest.mark.parametrize("screen_key", ["g", "e", "s"])
async def test_a_status_lines_end_is_on_screen_at_80x24(screen_key: str) -> None:
    """Before: each screen's status line was one row: an error's end (often what to do about
    it) was cut at 80 columns."""
    from textual.widgets import Static

    from tests.tui.test_dashboard import screen_text

    said = ("generate failed: distill.infer: SamplingParams: move-t (change_temperature) must "
            "be > 0 (at least 1e-06) and <= 100 (1 = off), got 0.0: THE-END")  # fmt: skip
    app = DistillApp("tcp://gpu-box:5555", connect=False)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press(screen_key)
        line = {"g": "#gen-status", "e": "#edit-status", "s": "#dataset-status"}[screen_key]
        app.screen.query_one(line, Static).update(said)
        await pilot.pause()
        assert "THE-END" in screen_text(app)
        assert app.screen.query_one(line).region.height == 2


async def test_a_bad_number_is_refused_by_the_fields_label() -> None:
    """Before: "change_temperature: '1e' is not a number", where the form labels it move-t;
    the worker's own refusals named it so too."""
    from distill.tui.screens.generate import form_words

    app = DistillApp("tcp://gpu-box:5555", connect=False)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("g")
        gen = app.screen
        assert isinstance(gen, GenerateScreen)
        gen.set_models([("drums.distill", "ab" * 32)])
        gen.query_one("#gen-change_temperature", Input).value = "1e"
        gen.action_generate()
        await pilot.pause()
        assert any("move-t (change_temperature): '1e' is not a number" in m for m in notices(app))
    said = "distill.infer: SamplingParams: change_temperature must be > 0, got 0.0"
    assert form_words(said) == "distill.infer: SamplingParams: move-t (change_temperature) must be > 0, got 0.0"
    assert form_words("count must be 1..16; top_k and min_p") == "count must be 1..16; k (top_k) and min-p (min_p)"


async def test_a_sound_too_long_for_the_editor_is_refused_with_its_limit(tmp_path: Path) -> None:
    """Before: a 150-s file was decoded, then refused by the request's size, with advice that is
    not the UI's ("… or submit a job"). The limit is the worker's (and `distill encode`'s): 60 s
    once the sound's silence is trimmed."""
    import soundfile

    from distill.tui.screens.editor import file_audio

    rate = 8000
    tone = (0.5 * np.sin(np.arange(50 * rate) / 7.0)).astype(np.float32)
    soundfile.write(tmp_path / "long150.wav", np.tile(tone, 3), rate)  # over the header's bound
    soundfile.write(tmp_path / "tone80.wav", np.concatenate([tone, tone[: 30 * rate]]), rate)
    soundfile.write(tmp_path / "quiet70.wav", np.concatenate([np.zeros(20 * rate, np.float32), tone]), rate)
    app = DistillApp("tcp://gpu-box:5555", connect=False)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("e")
        ed = app.screen
        assert isinstance(ed, EditorScreen)
        ed.set_models([("drums.distill", "ab" * 32)])
        for name, seconds in (("long150.wav", "150.0 s long"), ("tone80.wav", "80.0 s once its silence is trimmed")):
            ed.query_one("#source", Input).value = str(tmp_path / name)
            ed.action_encode()
            await until(pilot, lambda: any(name in m for m in notices(app)), 10, what="the refusal",  # noqa: B023
                        detail=lambda: repr(notices(app)) + str(ed.query_one("#edit-status").render()))
            said = next(m for m in notices(app) if name in m)
            assert seconds in said and "at most 60 s of a sound once its silence is trimmed" in said
            assert "submit a job" not in said and not ed.encoding
    audio, got_rate, name = file_audio(tmp_path / "quiet70.wav")  # 70 s, 50 of them sound: encoded
    assert got_rate == rate and name == "quiet70.wav" and 50 <= audio.size / rate < 50.2
    # as `distill encode` prepares it: silence at a DC offset trimmed, the offset taken off
    hit = tone[: rate // 5] * np.exp(-np.arange(rate // 5) / 300.0).astype(np.float32)
    soundfile.write(tmp_path / "dc.wav", np.concatenate([hit, np.zeros(2 * rate, np.float32)]) + 0.05,
                    rate, subtype="FLOAT")  # fmt: skip
    audio, _, _ = file_audio(tmp_path / "dc.wav")
    assert audio.size < 0.25 * rate and abs(float(audio[-1])) < 1e-3


async def test_the_generate_screen_lists_several_sounds_at_80x24() -> None:
    """Before: the form's bordered fields took 9 rows and the results list (1fr under them)
    showed one sound at a time at 80x24."""
    sounds = np.stack([np.sin(np.arange(4800) / (3.0 + i)) * 0.5 for i in range(16)]).astype(np.float32)
    app = DistillApp("tcp://gpu-box:5555", connect=False)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("g")
        gen = app.screen
        assert isinstance(gen, GenerateScreen)
        gen.show_results({"audio": sounds, "sample_rate": 4800, "params": {"seed": 1}})
        await pilot.pause()
        results = gen.query_one("#results", DataTable)
        rows = results.region.height - 3  # its border and its header
        assert rows >= 8, results.region
        for selector in ("#gen-count", "#gen-change_temperature", "#wave", "#export-dir"):
            assert gen.query_one(selector).region.bottom <= 23  # the rest still on screen


class Stall:
    """The event loop's longest pause between two ticks of 10 ms, while it runs."""

    def __init__(self) -> None:
        self.longest = 0.0
        self.start = self.took = 0.0
        self.task: asyncio.Task[None] | None = None

    async def _tick(self, last: float) -> None:
        while True:
            await asyncio.sleep(0.01)
            now = time.monotonic()
            self.longest = max(self.longest, now - last - 0.01)
            last = now

    def __enter__(self) -> Stall:
        # no collection meanwhile: a full one after the tests before this one paused the loop
        # for 0.2 s now and then, which is not what is measured here
        gc.collect()
        gc.disable()
        # from now: what runs before the ticker's first turn is measured too
        self.start = time.monotonic()
        self.task = asyncio.get_running_loop().create_task(self._tick(self.start))
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.task is not None
        self.task.cancel()
        self.took = time.monotonic() - self.start  # the whole of what was measured
        gc.enable()


async def test_exporting_and_reading_a_long_file_leave_the_screen_responsive(tmp_path: Path) -> None:
    """Before: the generate screen's export (16 sounds of 5 s: 1.7 s on the audit's machine; of
    15 s here, 0.5 s) and the editor's read of a file (the first one imports torch; this one
    decodes for 0.4 s) ran on the event loop: the screen froze meanwhile. Both run in a thread
    now, their words in order."""
    import soundfile

    rate = 48_000
    sounds = (0.5 * np.sin(np.arange(15 * rate) / 9.0)).astype(np.float32)
    sounds = np.stack([sounds * (1 - i / 20) for i in range(16)])  # (16, 15 s)
    long = tmp_path / "long.flac"  # 96 kHz stereo, 115 s: decoded whole, then refused (over 60 s)
    soundfile.write(long, np.stack([np.tile(sounds[0], 16)[: 115 * 2 * rate]] * 2, axis=1), 2 * rate)
    app = DistillApp("tcp://gpu-box:5555", connect=False)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("g")
        gen = app.screen
        assert isinstance(gen, GenerateScreen)
        gen.show_results({"audio": sounds, "sample_rate": rate, "params": {"seed": 5}})
        gen.query_one("#export-dir", Input).value = str(tmp_path / "out")
        await pilot.pause()
        with Stall() as stall:
            gen.action_export()
            gen.action_export()  # twice: one after the other, each file name its own
            await until(pilot, lambda: sum("exported 16 sounds" in m for m in notices(app)) == 2, 60,
                        what="both exports", detail=lambda: repr(notices(app)))
        assert len(list((tmp_path / "out").glob("*.wav"))) == 32
        # on the loop, the export stalled it for as long as it took; a machine loaded by
        # others pauses the loop now and then too, but for a fraction of that
        assert stall.longest < max(0.15, stall.took / 3), f"the loop stalled {stall.longest:.2f} s of {stall.took:.2f}"

        await pilot.press("e")
        ed = app.screen
        assert isinstance(ed, EditorScreen)
        ed.set_models([("drums.distill", "ab" * 32)])
        ed.query_one("#source", Input).value = str(long)
        with Stall() as stall:
            ed.action_encode()
            await until(pilot, lambda: any("long.flac: 115.0 s" in m for m in notices(app)), 60,
                        what="the refusal", detail=lambda: repr(notices(app)))
        assert stall.longest < max(0.15, stall.took / 3), f"the loop stalled {stall.longest:.2f} s of {stall.took:.2f}"
        assert not ed.encoding and ed.pending == 0


async def test_refreshing_the_models_keeps_the_one_chosen() -> None:
    """Before: `m` (refresh) set the list again and chose its first model, whatever was chosen."""
    from textual.widgets import Select

    app = DistillApp("tcp://gpu-box:5555", connect=False)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("g")
        gen = app.screen
        assert isinstance(gen, GenerateScreen)
        models = [("drums.distill", "ab" * 32), ("pads.distill", "cd" * 32)]
        gen.set_models(models)
        select = gen.query_one("#model", Select)
        select.value = "cd" * 32
        gen.set_models([("new.distill", "ef" * 32), *models])  # refreshed: one more, first
        await pilot.pause()
        assert select.value == "cd" * 32
        gen.set_models([("new.distill", "ef" * 32)])  # gone: the first one listed
        await pilot.pause()
        assert select.value == "ef" * 32


async def test_enter_in_the_sound_field_encodes_into_the_grid_one_came_from() -> None:
    """Before: enter in the editor's sound field did nothing (the generate screen's fields take
    it); only `o` on a grid encoded."""
    app = DistillApp("tcp://127.0.0.1:1", connect=False)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("e")
        ed = app.screen
        assert isinstance(ed, EditorScreen)
        ed.set_models([("drums.distill", "ab" * 32)])
        app.last_generated = ([np.zeros(4800, dtype=np.float32)], 48_000)
        await pilot.press("tab")  # grid A (focused at first) to grid B
        assert app.focused is ed.grid(1)
        ed.query_one("#source", Input).focus()
        await pilot.press(*"gen:0", "enter")
        status = ed.query_one("#edit-status")
        await until(pilot, lambda: "encoding gen:0 into B" in str(status.render()), 10,
                    what="the encode", detail=lambda: str(status.render()))
