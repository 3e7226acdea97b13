"""SVG snapshots of each screen at 80×24 and 160×48, from fixed data (no broker, no clock,
no ports): the layout at the smallest supported terminal and a roomy one."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
from textual.pilot import Pilot
from textual.widgets import Input, TabbedContent

from distill.tui.app import DistillApp
from distill.tui.screens.dataset import DatasetScreen
from distill.tui.screens.editor import EditorScreen
from distill.tui.screens.generate import GenerateScreen
from distill.tui.widgets.waveform import Waveform
from tests.tui.conftest import fed_training

SIZES = [(80, 24), (160, 48)]
ENDPOINT = "tcp://gpu-box:5555"

WORKERS = [
    {"id": "w-1", "service": "distill.preprocess", "host": "laptop", "device": "cpu", "state": "idle",
     "current_job": None, "last_heartbeat_age_s": 0.4},
    {"id": "w-2", "service": "distill.train.vqvae", "host": "gpu-box", "device": "cuda:0",
     "state": "busy", "current_job": "j-7f3a", "last_heartbeat_age_s": 1.2},
    {"id": "w-3", "service": "echo", "host": "gpu-box", "device": "cpu", "state": "idle",
     "current_job": None, "last_heartbeat_age_s": 2.0},
]
JOBS = [
    {"id": "j-7f3a", "service": "distill.train.vqvae", "status": "running",
     "progress": {"fraction": 0.4, "eta_s": 95.0}},
    {"id": "j-51c0", "service": "distill.preprocess", "status": "succeeded", "progress": {"fraction": 1.0}},
    {"id": "j-0aa2", "service": "distill.train.vqvae", "status": "failed", "progress": None},
]
EVENTS = [
    {"seq": 101, "topic": "worker.w-2", "type": "ready", "service": "distill.train.vqvae",
     "host": "gpu-box", "device": "cuda:0"},
    {"seq": 102, "topic": "job.j-7f3a", "type": "status", "status": "running", "attempts": 1},
    {"seq": 103, "topic": "job.j-7f3a", "type": "metrics", "row": {"epoch": 1}},
    {"seq": 104, "topic": "job.j-7f3a", "type": "progress", "fraction": 0.4, "epoch": 4},
]
MANIFEST = [
    {"name": "bd_808.flac", "status": "ok", "split": "train", "duration_s": 0.61, "chunks": 1, "reason": None},
    {"name": "sn_dub.flac", "status": "ok", "split": "val", "duration_s": 0.42, "chunks": 1, "reason": None},
    {"name": "hat_bdu.flac", "status": "ok", "split": "train", "duration_s": 1.9, "chunks": 2, "reason": None},
    {"name": "README.txt", "status": "skipped", "split": None, "duration_s": 0.0, "chunks": 0,
     "reason": "not audio: it is a text file"},
    {"name": "click.wav", "status": "skipped", "split": None, "duration_s": 0.0004, "chunks": 0,
     "reason": "shorter than 1 ms"},
]


def metric_rows(epochs: int = 8, levels: int = 3, codes: int = 64) -> list[dict[str, Any]]:
    rows = []
    for e in range(1, epochs + 1):
        usage = [[float((c * (q + 3) + e * 7) % 23) if c % (q + 2) else 0.0 for c in range(codes)]
                 for q in range(levels)]
        rows.append({"epoch": e, "epochs": 20, "train_recon": 1.0 / math.sqrt(e), "val_recon": 1.1 / math.sqrt(e) + 0.05,
                     "utilisation": [sum(v > 0 for v in u) / codes for u in usage],
                     "perplexity": [40.0 - q * 6 + e for q in range(levels)], "dead_codes": [q * 3 for q in range(levels)],
                     "usage": usage, "eta_s": 12.0 * (20 - e)})
        if e % 5 == 0:  # the decoded-audio check's epochs: codes the model uses, every level
            rows[-1]["codes_in_use"] = [1.0 - 0.03 * q for q in range(levels)]
    return rows


async def settle(pilot: Pilot[None]) -> None:
    """Two refreshes: tables size their auto-width columns on the frame after new rows."""
    await pilot.pause()
    await pilot.pause()


def offline_app() -> DistillApp:
    return DistillApp(ENDPOINT, connect=False)


async def feed_dashboard(pilot: Pilot[None]) -> None:
    app = pilot.app
    assert isinstance(app, DistillApp)
    app.set_connection(True)
    app.set_cluster(WORKERS, {"distill.preprocess": 0}, JOBS)
    app.deliver_events(EVENTS)
    await settle(pilot)


async def feed_dataset(pilot: Pilot[None]) -> None:
    await pilot.press("s")
    screen = pilot.app.screen
    assert isinstance(screen, DatasetScreen)
    screen.query_one("#folder", Input).value = "~/sounds/drums"
    screen.show_step("preprocess job j-51c0: succeeded", 1.0)
    screen.show_manifest(MANIFEST, {"dataset": "ab" * 32})
    await settle(pilot)


async def feed_training(pilot: Pilot[None], tab: str) -> None:
    app = pilot.app
    assert isinstance(app, DistillApp)
    screen = await fed_training(app, {"id": "j-7f3a", "service": "distill.train.vqvae", "status": "running",
                                      "progress": {"fraction": 0.4, "eta_s": 144.0}, "metrics": metric_rows()},
                                [{"sha256": "cd" * 32, "name": "epoch0004-0-original.wav"},
                                 {"sha256": "ef" * 32, "name": "epoch0004-0-reconstruction.wav"}])  # fmt: skip
    screen.query_one(TabbedContent).active = tab
    await settle(pilot)


@pytest.mark.parametrize("size", SIZES)
def test_dashboard(snap_compare: Any, size: tuple[int, int]) -> None:
    assert snap_compare(offline_app(), terminal_size=size, run_before=feed_dashboard)


@pytest.mark.parametrize("size", SIZES)
def test_dashboard_disconnected(snap_compare: Any, size: tuple[int, int]) -> None:
    async def run_before(pilot: Pilot[None]) -> None:
        await feed_dashboard(pilot)
        app = pilot.app
        assert isinstance(app, DistillApp)
        app.set_connection(False, "no broker answered")
        await settle(pilot)

    assert snap_compare(offline_app(), terminal_size=size, run_before=run_before)


@pytest.mark.parametrize("size", SIZES)
def test_dataset(snap_compare: Any, size: tuple[int, int]) -> None:
    assert snap_compare(offline_app(), terminal_size=size, run_before=feed_dataset)


@pytest.mark.parametrize("tab", ["tab-curves", "tab-codebooks", "tab-previews", "tab-start"])
@pytest.mark.parametrize("size", SIZES)
def test_training(snap_compare: Any, size: tuple[int, int], tab: str) -> None:
    async def run_before(pilot: Pilot[None]) -> None:
        await feed_training(pilot, tab)

    assert snap_compare(offline_app(), terminal_size=size, run_before=run_before)


def fixed_sounds() -> np.ndarray:
    t = np.linspace(0.0, 1.0, 4800, dtype=np.float32)
    return np.stack([np.sin(2 * np.pi * 30 * t) * np.exp(-t * (2 + 3 * i)) for i in range(3)])  # (3, 4800)


async def feed_generate(pilot: Pilot[None]) -> None:
    await pilot.press("g")
    screen = pilot.app.screen
    assert isinstance(screen, GenerateScreen)
    screen.set_models([("drums.distill", "ab" * 32)])
    screen.show_results({"audio": fixed_sounds(), "sample_rate": 4800, "params": {"seed": 7},
                         "model_id": "m"})
    await settle(pilot)


async def feed_editor(pilot: Pilot[None]) -> None:
    await pilot.press("e")
    screen = pilot.app.screen
    assert isinstance(screen, EditorScreen)
    screen.set_models([("drums.distill", "ab" * 32)])
    screen.codebook_size = 64
    codes = (np.arange(4 * 40).reshape(4, 40) * 7) % 64  # (Q, T)
    for i, grid in enumerate((codes, codes[:, ::-1].copy())):
        screen.slots[i].codes = grid
        screen.grid(i).set_codes(grid, 64)
    screen.query_one("#edit-wave", Waveform).show(fixed_sounds()[0], "A: bd_808.flac — encoded")
    grid_a = screen.grid(0)
    grid_a.focus()
    await pilot.press("right", "right", "shift+right", "shift+down")
    await settle(pilot)


@pytest.mark.parametrize("size", SIZES)
def test_generate(snap_compare: Any, size: tuple[int, int]) -> None:
    assert snap_compare(offline_app(), terminal_size=size, run_before=feed_generate)


@pytest.mark.parametrize("size", SIZES)
def test_editor(snap_compare: Any, size: tuple[int, int]) -> None:
    assert snap_compare(offline_app(), terminal_size=size, run_before=feed_editor)


@pytest.mark.parametrize("size", SIZES)
def test_help(snap_compare: Any, size: tuple[int, int]) -> None:
    assert snap_compare(offline_app(), terminal_size=size, press=["question_mark"])
