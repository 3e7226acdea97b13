"""The drawing helpers and the training screen's bookkeeping, without a broker."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from distill.tui.app import DistillApp
from distill.tui.format import event_line, job_progress
from distill.tui.screens.dataset import complete_folder
from distill.tui.screens.training import TrainingScreen
from distill.tui.widgets.curves import curve_keys
from distill.tui.widgets.heatmap import bin_counts, heat_line
from distill.tui.widgets.waveform import column_peaks, thumbnail
from tests.tui.conftest import fed_training


def test_curves_pick_the_vqvae_losses_and_the_priors_bits_with_baselines() -> None:
    vqvae = [{"epoch": 1, "train_recon": 0.5, "val_recon": 0.6, "lr": 1e-3}]
    prior = [{"epoch": 1, "train_bits": 3.0, "val_bits": 3.4, "unigram_bits": 5.0, "bigram_bits": 4.2}]
    assert curve_keys(vqvae) == ["train_recon", "val_recon"]
    assert curve_keys(prior) == ["bigram_bits", "train_bits", "unigram_bits", "val_bits"]
    assert curve_keys([]) == []


def test_heatmap_bins_keep_every_count_and_mark_unused_codes() -> None:
    counts = list(range(10))
    binned = bin_counts(counts, 4)
    assert len(binned) == 4 and sum(binned) == sum(counts)
    assert bin_counts(counts, 50) == [float(c) for c in counts]  # never more columns than codes
    line = heat_line([0, 5, 0, 9], 4)
    assert line.plain == "·█·█"


def test_waveform_peaks_are_scaled_to_the_loudest_column() -> None:
    audio = np.concatenate([np.full(100, 0.5), np.zeros(100), np.full(100, -0.25)]).astype(np.float32)
    peaks = column_peaks(audio, 3)
    assert np.allclose(peaks, [1.0, 0.0, 0.5])
    assert thumbnail(audio, 3) == "█ ▄"
    assert thumbnail(np.zeros(10, dtype=np.float32), 4) == "    "  # silence draws nothing


def test_progress_cells_and_log_lines() -> None:
    assert job_progress({"status": "running", "progress": {"fraction": 0.25, "eta_s": 75}}) == ("25%", "1m15s")
    assert job_progress({"status": "succeeded", "progress": None}) == ("100%", "-")
    line = event_line({"seq": 9, "topic": "job.j-1", "type": "status", "status": "failed",
                       "attempts": 2, "error": "out of memory"})
    assert "failed (attempt 2) — out of memory" in line and "job.j-1" in line
    preview = {"seq": 10, "topic": "job.j-1", "type": "preview", "which": "reconstruction",
               "file": "loop.flac", "epoch": 25}
    assert event_line(preview).endswith("reconstruction of loop.flac (epoch 25)")
    later = event_line({**preview, "file_chunk": 2, "file_chunks": 9})
    assert later.endswith("reconstruction of loop.flac chunk 2 of 9 (epoch 25)")


async def test_a_resumed_attempt_replaces_the_epochs_it_repeats() -> None:
    app = DistillApp("tcp://127.0.0.1:1", connect=False)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("t")
        screen = app.screen
        assert isinstance(screen, TrainingScreen)
        for epoch in (1, 2, 3, 2, 3, 4):  # the worker died after epoch 3; resumed from epoch 1's checkpoint
            screen._add_row({"epoch": epoch, "train_recon": float(epoch)})
        assert [r["epoch"] for r in screen.rows] == [1, 2, 3, 4]


def test_folder_completion_offers_existing_folders_only(tmp_path: Path) -> None:
    (tmp_path / "drums").mkdir()
    (tmp_path / "drones").mkdir()
    (tmp_path / "dry.wav").write_bytes(b"")
    assert complete_folder(f"{tmp_path}/dru") == f"{tmp_path}/drums/"
    assert complete_folder(f"{tmp_path}/dro") == f"{tmp_path}/drones/"
    assert complete_folder(f"{tmp_path}/dry") is None  # a file, not a folder
    assert complete_folder(f"{tmp_path}/") == f"{tmp_path}/drones/"
    assert complete_folder(f"{tmp_path}/nowhere/x") is None


async def test_the_previews_table_shows_the_job_shown_not_the_one_before() -> None:
    """Before: the table was only redrawn when the number of previews changed, so a job with
    as many previews as the one before listed that job's, while ``p`` played this one's."""
    from textual.widgets import DataTable

    def previews(sha: str) -> list[dict[str, str]]:
        return [{"sha256": sha * 32, "name": f"epoch0010-{chunk}-reconstruction.wav"}
                for chunk in range(2)]

    app = DistillApp("tcp://gpu-box:5555", connect=False)
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.press("t")
        screen = app.screen
        assert isinstance(screen, TrainingScreen)
        table = screen.query_one("#previews", DataTable)
        for job, sha in (("j-aaaa", "aa"), ("j-bbbb", "bb")):
            screen.job_id = job  # as after a reload of the record: no show_job in between
            screen.apply_history({"id": job, "status": "succeeded", "metrics": []}, previews(sha))
            await pilot.pause()
            assert [str(table.get_row_at(i)[4]) for i in range(table.row_count)] == [sha * 6] * 2


async def test_the_editor_status_line_is_on_screen_at_80x24_with_tall_grids() -> None:
    """Before: two 12-level grids pushed the status line (every result and error of the
    editor) below the fold of its scroll, where the arrow keys never took it."""
    from distill.tui.screens.editor import EditorScreen

    app = DistillApp("tcp://gpu-box:5555", connect=False)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("e")
        screen = app.screen
        assert isinstance(screen, EditorScreen)
        codes = (np.arange(12 * 60).reshape(12, 60) * 7) % 64  # (Q, T)
        for i in range(2):
            screen.slots[i].codes = codes
            screen.grid(i).set_codes(codes, 64)
        screen.grid(1).focus()  # the lower grid: the scroll follows it
        screen.status("export: disk full")
        await pilot.pause()
        status = screen.query_one("#edit-status")
        assert status in screen._compositor.visible_widgets
        assert status.region.bottom <= 24 - 1  # above the footer


def test_exporting_twice_keeps_the_first_files(tmp_path: Path) -> None:
    """Before: the generate screen's export wrote gen-SEED-NNN.wav over an earlier export
    with the same seed (made with other settings) without a word."""
    from distill.tui.screens.generate import export_sounds

    reply = {"params": {"seed": 3, "temperature": 1.0}, "sample_rate": 48000, "model_id": "m"}
    first = export_sounds(tmp_path, [np.zeros(4800, dtype=np.float32)], reply)
    second = export_sounds(tmp_path, [np.full(4800, 0.1, dtype=np.float32)], reply)
    assert [p.name for p in first] == ["gen-3-000.wav"]
    assert [p.name for p in second] == ["gen-3-000-2.wav"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gen-3-000-2.wav", "gen-3-000.wav"]


@pytest.mark.slow  # ten screen switches (seconds)
async def test_switching_screens_leaves_no_old_footer_keys_alive() -> None:
    """Before: each switch kept the last screen's 18 footer keys alive through watchers that
    Textual's footer never drops (~0.44 MB a switch; 67 -> 245 MB over 400 switches)."""
    import gc

    from textual.widgets._footer import FooterKey

    def alive() -> int:
        gc.collect()
        return sum(type(o) is FooterKey for o in gc.get_objects())

    app = DistillApp("tcp://gpu-box:5555", connect=False)
    async with app.run_test(size=(120, 40)) as pilot:
        for key in "dgtsedg":  # every screen once, so each has built its footer
            await pilot.press(key)
            await pilot.pause()
        settled = alive()
        for _ in range(5):
            for key in "dg":
                await pilot.press(key)
                await pilot.pause()
        assert alive() <= settled + 20, (settled, alive())  # 10 switches: ~180 more before


async def test_the_editor_follows_the_cursor_down_grid_b_at_80x24() -> None:
    """Before: at 80x24 grid B's cursor went below the fold (L12 of a 12-level grid was 4 rows
    under it), so an edit changed a cell nobody could see; the preview waveform sat under both
    grids, never on screen."""
    from distill.tui.screens.editor import EditorScreen
    from distill.tui.widgets.waveform import Waveform

    app = DistillApp("tcp://gpu-box:5555", connect=False)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("e")
        screen = app.screen
        assert isinstance(screen, EditorScreen)
        codes = (np.arange(12 * 90).reshape(12, 90) * 7) % 512  # (Q, T)
        screen.slots[0].codes = codes
        screen.grid(0).set_codes(codes, 512)
        grid, view = screen.grid(1), screen.query_one("VerticalScroll")
        screen.grid(0).focus()
        await pilot.press("tab")  # as a user goes to grid B (empty), then encodes into it
        assert app.focused is grid
        screen.slots[1].codes = codes
        grid.set_codes(codes, 512)
        screen.query_one("#edit-wave", Waveform).show(np.sin(np.arange(4800) / 9.0), "B: preview")
        await pilot.pause()
        for expected in [*range(1, 12), *range(10, -1, -1)]:  # down to L12, and back up to L1
            await pilot.press("down" if expected > grid.cursor[0] else "up")
            await pilot.pause()
            assert grid.cursor[0] == expected
            row = grid.region.y + grid.styles.gutter.top + expected  # the cursor's row on screen
            assert view.region.y <= row < view.region.bottom, (expected, row, view.region)
            info = grid.region.y + grid.styles.gutter.top + 12  # "L12 t0 = …" under the levels
            assert info < view.region.bottom
        await pilot.press(*["shift+right"] * 30)  # the steps scroll inside the grid
        assert grid.cursor[1] == 30 and grid.scroll_t > 0
        wave = screen.query_one("#edit-wave", Waveform)
        assert wave in screen._compositor.visible_widgets
        assert wave.region.height >= 3 and wave.region.bottom <= 24 - 2  # above status and footer


async def test_the_codebooks_tab_scrolls_to_every_level_at_80x24() -> None:
    """Before: the tab held the levels table and the heatmap in a plain Vertical: at 80x24 a
    12-level heatmap showed 5 levels, and nothing scrolled to the rest."""
    from textual.widget import Widget
    from textual.widgets import TabbedContent

    from distill.tui.widgets.heatmap import CodebookHeatmap
    from tests.tui.test_snapshots import metric_rows

    app = DistillApp("tcp://gpu-box:5555", connect=False)
    async with app.run_test(size=(80, 24)) as pilot:
        screen = await fed_training(app, {"id": "j-1", "service": "distill.train.vqvae", "status": "running",
                                          "metrics": metric_rows(epochs=3, levels=12, codes=512)})
        screen.query_one(TabbedContent).active = "tab-codebooks"
        await pilot.pause(0.2)
        heatmap = screen.query_one(CodebookHeatmap)
        view = heatmap.parent
        assert isinstance(view, Widget)

        def shown() -> int:  # the heatmap's rows on screen
            return heatmap.region.intersection(view.region).height

        assert heatmap.region.height == 13 and shown() < 13  # L1..L12 and the line under them
        view.focus()
        await pilot.press("end")  # the keyboard takes it to the bottom
        await pilot.pause(0.2)
        assert shown() == 13


async def test_a_failed_jobs_reason_is_shown_whole_on_the_training_and_dataset_screens() -> None:
    """Before: the training screen's one-row job line kept the first 80 characters of the
    reason, and the dataset screen's status line cut it at 80 columns."""
    from distill.tui.screens.dataset import DatasetScreen
    from tests.tui.test_dashboard import LONG_ERROR, screen_text

    app = DistillApp("tcp://gpu-box:5555", connect=False)
    async with app.run_test(size=(80, 24)) as pilot:
        screen = await fed_training(app, {"id": "j-1", "service": "distill.sleep", "status": "failed",
                                          "error": LONG_ERROR, "metrics": []})
        await pilot.pause()
        reason = screen.query_one("#job-error")
        assert reason.region.height == 5  # wrapped over a few rows
        assert "[red]boom[/red]" in screen_text(app)
        reason.scroll_end(animate=False)  # and the rest a scroll away (tab reaches it)
        await pilot.pause()
        assert "THE-REASON-ENDS" in screen_text(app)
        screen.apply_history({"id": "j-1", "service": "distill.sleep", "status": "running",
                              "metrics": []}, [])  # retried: no reason any more
        await pilot.pause()
        assert not reason.display

        await pilot.press("s")
        dataset = app.screen
        assert isinstance(dataset, DatasetScreen)
        dataset.show_event("j-2", {"type": "progress", "done": 3, "total": 3, "fraction": 1.0})
        dataset.show_record({"id": "j-2", "status": "failed", "error": "no audio: " + "x" * 100
                             + " THE-END"})  # fmt: skip
        await pilot.pause()
        assert "THE-END" in screen_text(app)
        assert "100%" not in screen_text(app)  # every file read, then failed: not shown done
        dataset.show_step("uploading 1/2: a.wav", 0.0)  # the next upload shows its bar again
        await pilot.pause()
        assert "0%" in screen_text(app)


def test_a_sound_not_played_is_kept_where_the_notice_says_until_exit(tmp_path: Path) -> None:
    """Before: "no audio player …; file at /tmp/distill-play-…/sound.wav" named a file in a
    TemporaryDirectory already deleted when the notice was shown. A process of its own with no
    player on its PATH: the files it names are there while it runs, and gone once it exits."""
    import json
    import os
    import subprocess
    import sys

    code = """if True:
        import json, re, sys
        import numpy as np
        from distill.shared.audio.io import read_audio
        from distill.tui.playback import play_audio, player_name
        if player_name() is not None:
            print(json.dumps({"player": player_name()}))
            sys.exit(0)
        said = [play_audio(np.sin(np.arange(4800) / 5.0).astype(np.float32), 48000),
                play_audio(np.zeros(480, dtype=np.float32), 48000)]
        paths = [re.search(r"file at (\\S+)", s).group(1) for s in said]
        print(json.dumps({"said": said, "paths": paths,
                          "frames": [read_audio(p).frames for p in paths]}))
    """
    env = {**os.environ, "PATH": str(tmp_path)}  # no system player on its PATH
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=120, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    if "player" in out:
        pytest.skip(f"this machine plays sound ({out['player']})")
    assert all("kept until the UI exits" in s for s in out["said"])
    assert out["frames"] == [4800, 480]  # each there, whole, while the process ran
    paths = [Path(p) for p in out["paths"]]
    assert paths[0] != paths[1]
    assert not any(p.exists() for p in paths) and not paths[0].parent.exists()  # gone at exit


def test_a_failed_job_is_not_shown_done_and_log_lines_stay_one_line() -> None:
    """Before: a job that failed after reporting all its work showed "failed 100%"; a `busy`
    event read "distill.sleep on ? (?)" (it names the job, not the host); an error holding a
    newline broke the event log's layout (and an ESC reached the terminal)."""
    assert job_progress({"status": "failed", "progress": {"fraction": 1.0}}) == ("-", "-")
    assert job_progress({"status": "cancelled", "progress": {"fraction": 0.14}}) == ("14%", "-")
    busy = {"seq": 3, "topic": "worker.w-1", "type": "busy", "service": "distill.sleep",
            "job": "j-0042", "request": "r-1"}
    assert event_line(busy).endswith("distill.sleep with job j-0042") and "?" not in event_line(busy)
    failed = {"seq": 4, "topic": "job.j-0042", "type": "status", "status": "failed", "attempts": 1,
              "error": "boom\nsecond line \x1b[31mred"}
    line = event_line(failed)
    assert "\n" not in line and "\x1b" not in line
    assert line.endswith("failed (attempt 1) — boom\\nsecond line \\x1b[31mred")


async def test_the_disconnected_banner_says_the_whole_reason_at_80x24() -> None:
    """Before: the reason was cut at 160 characters, mid-word ("… or point --broker (or
    DISTILL_)")."""
    from tests.tui.test_dashboard import screen_text

    why = ("nothing accepts connections there (connection refused): is the broker running? "
           "Start one with `distill up` (or `distill broker`), or point --broker (or "
           "DISTILL_BROKER) at it")  # fmt: skip
    app = DistillApp("tcp://127.0.0.1:18790", connect=False)
    async with app.run_test(size=(80, 24)) as pilot:
        app.set_connection(False, why)
        await pilot.pause()
        assert "(or DISTILL_BROKER) at it)" in screen_text(app)


async def test_a_prior_job_says_why_it_has_no_codebooks_and_plots_bits() -> None:
    """Before: a prior job's Codebooks tab said usage "comes with each epoch's metrics" (it never
    does: a prior has no codebooks), and its curves of bits per code were titled "loss"."""
    from distill.tui.widgets.curves import curve_title
    from distill.tui.widgets.heatmap import CodebookHeatmap

    assert curve_title(["train_bits", "val_bits", "unigram_bits"]) == "bits per code per epoch"
    assert curve_title(["train_recon", "val_recon"]) == "reconstruction loss per epoch"
    app = DistillApp("tcp://gpu-box:5555", connect=False)
    async with app.run_test(size=(80, 24)) as pilot:
        rows = [{"epoch": e, "train_bits": 5.0 - e / 4, "val_bits": 5.2 - e / 5} for e in (1, 2, 3)]
        screen = await fed_training(app, {"id": "j-prior", "service": "distill.train.prior",
                                          "status": "running", "metrics": rows})
        await pilot.pause()
        heatmap = screen.query_one(CodebookHeatmap)
        assert "a prior has no codebooks of its own" in str(heatmap.render())
        screen.apply_history({"id": "j-prior", "service": "distill.train.vqvae", "status": "running",
                              "metrics": []}, [])
        await pilot.pause()
        assert "it comes with each epoch's metrics" in str(heatmap.render())


def test_the_help_lists_every_key_of_the_editor_and_its_grid() -> None:
    """The editor's footer shows the first of its keys at 80 columns; `?` must list them all
    (it lacked home and end, and enter in the sound field)."""
    from textual.binding import Binding

    from distill.tui.screens.editor import EditorScreen
    from distill.tui.screens.help import HELP
    from distill.tui.widgets.codegrid import CodeGridView

    rows = " ".join(line for line in HELP.splitlines() if "editor" in line)
    for binding in [*EditorScreen.BINDINGS, *CodeGridView.BINDINGS]:
        assert isinstance(binding, Binding)
        key = binding.key.split(",")[0].removeprefix("shift+")
        if key in ("left", "right", "up", "down"):
            assert "arrows / shift+arrows" in rows
        elif key != "question_mark":  # `?` opens this help
            shown = {"plus": "+", "minus": "-"}.get(key, key)
            assert f"`{shown}`" in rows, key
    rows = [line for line in HELP.splitlines() if "editor" in line]
    assert any("`enter`" in r for r in rows)


async def test_every_screens_notices_are_plain_text() -> None:
    """Notices quote file and model names, job errors and the broker's words: each call
    passed markup=False, and one that did not crashed the app on a name holding "[/red]".
    Every screen's notice is now plain text unless it asks for markup."""
    from tests.tui.conftest import notices

    app = DistillApp("tcp://gpu-box:5555", connect=False)
    async with app.run_test(size=(100, 30)) as pilot:
        for key in ("g", "e", "s", "t"):
            await pilot.press(key)
            app.screen.notify(f"{key}: kit [/red]evil.distill [b]x[/b]")
            await pilot.pause()
            assert f"{key}: kit [/red]evil.distill [b]x[/b]" in notices(app)
        assert not any(n.markup for n in app._notifications)  # shown as written, never parsed
