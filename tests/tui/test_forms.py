"""The training form: what it refuses before anything is sent (a bad number, an unknown
setting), which dataset it offers, and what it submits (settings for every stage, as
``distill train`` sends them)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from textual.widgets import Input

from distill.shared.bus import protocol as P
from distill.tui.app import DistillApp
from distill.tui.screens.training import TrainingScreen
from tests.conftest import Cluster
from tests.tui.conftest import notices, until


@pytest.fixture(scope="module")
def broker(module_cluster: Cluster) -> Cluster:
    """A broker and no workers: the jobs the form submits wait in the queue to be read."""
    module_cluster.start_broker()
    return module_cluster


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import soundfile

    path = tmp_path_factory.mktemp("sounds")
    t = np.arange(12_000) / 24_000
    soundfile.write(path / "ping.wav", np.sin(2 * np.pi * 440 * t) * np.exp(-t * 9), 24_000)
    return path


def _jobs(cluster: Cluster) -> list[dict[str, Any]]:
    with cluster.client() as c:
        return list(c.request(P.SERVICE_JOBS, {"op": "list"}).get("jobs") or [])


async def _form(app: DistillApp, pilot: Any) -> TrainingScreen:
    await pilot.press("t")
    screen = app.screen
    assert isinstance(screen, TrainingScreen)
    return screen


@pytest.mark.parametrize(("field", "label", "raw"), [("#epochs", "epochs", "-"),
                                                     ("#codebook-size", "codes", "+"),
                                                     ("#levels-opt", "levels", "1_")])
async def test_a_half_typed_number_is_refused_by_name_not_a_crash(field: str, label: str,
                                                                  raw: str) -> None:
    """Before: ``int('-')`` raised in the key handler and the app exited. The integer fields
    let a lone sign (and ``1_``) through while one types."""
    app = DistillApp("tcp://gpu-box:5555", connect=False)
    async with app.run_test(size=(80, 24)) as pilot:
        screen = await _form(app, pilot)
        screen.query_one("#dataset", Input).value = "ab" * 32
        box = screen.query_one(field, Input)
        box.focus()
        await pilot.press(*raw, "escape", "n")
        assert box.value == raw  # the field took it
        await until(pilot, lambda: any(f"{label}: {raw!r} is not a number" in m for m in notices(app)),
                    5, what="the refusal", detail=lambda: repr(notices(app)))
        assert screen.job_id is None


async def test_the_form_follows_each_new_upload_unless_one_typed_a_dataset() -> None:
    """Before: the field took the first upload's dataset and kept it; ``n`` trained that one."""
    app = DistillApp("tcp://gpu-box:5555", connect=False)
    async with app.run_test(size=(80, 24)) as pilot:
        app.last_dataset = "aa" * 32
        screen = await _form(app, pilot)
        box = screen.query_one("#dataset", Input)
        assert box.value == "aa" * 32
        await pilot.press("d")
        app.last_dataset = "bb" * 32  # a second upload
        await pilot.press("t")
        assert box.value == "bb" * 32
        box.value = "j-0123456789"  # typed here: kept
        await pilot.press("d")
        app.last_dataset = "cc" * 32
        await pilot.press("t")
        assert box.value == "j-0123456789"


@pytest.mark.slow
async def test_epochs_and_train_settings_reach_the_prior_stage_too(broker: Cluster,
                                                                  folder: Path) -> None:
    """Before: the prior job got no training settings at all (it ran its own defaults, e.g.
    3 minutes where the form said minutes=0.5), and prior.KEY=VALUE went to the RVQ-VAE."""
    app = DistillApp(broker.endpoint)
    async with app.run_test(size=(80, 24)) as pilot:
        screen = await _form(app, pilot)
        screen.query_one("#dataset", Input).value = str(folder)
        screen.query_one("#epochs", Input).value = "3"
        screen.query_one("#train-opts", Input).value = "minutes=0.5 prior.patience=4 vqvae.lr=0.002"
        await pilot.press("n")
        await until(pilot, lambda: len(screen.pipeline) == 3, 30, what="the pipeline submitted",
                    detail=lambda: repr(notices(app)))
    with broker.client() as c:
        params = [c.request(P.SERVICE_JOBS, {"op": "get", "id": j, "metrics": False})["params"]
                  for j in screen.pipeline[1:]]
    assert params[0]["train"] == {"minutes": 0.5, "epochs": 3, "lr": 0.002}  # the RVQ-VAE
    assert params[1]["train"] == {"minutes": 0.5, "epochs": 3, "patience": 4}  # the prior


@pytest.mark.slow
@pytest.mark.parametrize(("epochs", "train", "said"), [
    ("", "batchsize=8", "train (vqvae stage): unknown keys ['batchsize']"),
    ("-3", "", "epochs must be >= 1"),
    ("", "channels=64", "give it as model channels=VALUE"),
])
async def test_settings_are_checked_before_anything_is_uploaded_or_submitted(
        broker: Cluster, folder: Path, epochs: str, train: str, said: str) -> None:
    """Before: the form submitted (uploading the folder and preprocessing it first), and the
    RVQ-VAE job failed on its worker with the unknown key."""
    before = len(_jobs(broker))
    app = DistillApp(broker.endpoint)
    async with app.run_test(size=(80, 24)) as pilot:
        screen = await _form(app, pilot)
        screen.query_one("#dataset", Input).value = str(folder)
        screen.query_one("#epochs", Input).value = epochs
        screen.query_one("#train-opts", Input).value = train
        await pilot.press("n")
        await until(pilot, lambda: any(said in m for m in notices(app)), 30, what="the refusal",
                    detail=lambda: repr(notices(app)))
        assert screen.pipeline == []
    assert len(_jobs(broker)) == before


@pytest.mark.parametrize("name", ["[/red].wav", "[link=https://evil.example]drums[/link]/kick.wav",
                                  "[reverse blink]kick[/reverse blink].wav", "esc\x1b[2J.wav"])
async def test_a_file_name_is_shown_as_it_is_not_read_as_markup(name: str) -> None:
    """A folder's names were Rich markup on the dataset screen: "[/red].wav" crashed it
    (MarkupError), "[reverse blink]" styled the name."""
    from textual.widgets import DataTable, Static

    from distill.tui.screens.dataset import DatasetScreen

    app = DistillApp("tcp://127.0.0.1:1", connect=False)
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.press("s")
        screen = app.screen
        assert isinstance(screen, DatasetScreen)
        screen.show_step(f"uploading 1/2: {name}", 0.5)
        row = {"name": name, "status": "ok", "split": "train", "duration_s": 1.0, "chunks": 1,
               "reason": ""}  # fmt: skip
        screen.show_manifest([row], {"dataset": "ab" * 32})
        await pilot.pause(0.1)
        status = str(screen.query_one("#dataset-status", Static).render())
        cell = screen.query_one("#manifest", DataTable).get_cell_at((0, 0))
        literal = name.replace("\x1b", "\\x1b")[:32]
        assert name.replace("\x1b", "\\x1b") in status  # as the table shows it: ESC written out
        assert str(cell) == literal and not getattr(cell, "spans", None)


async def test_model_names_and_errors_are_shown_as_they_are() -> None:
    """A model named "[/red]" crashed the generate screen as it listed models (any user of a
    shared cluster could do it to everyone); an error quoting "[link=https:]x.wav" crashed the
    app from its notice."""
    from textual.widgets import Select

    from distill.tui.screens.generate import GenerateScreen

    app = DistillApp("tcp://127.0.0.1:1", connect=False)
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.press("g")
        screen = app.screen
        assert isinstance(screen, GenerateScreen)
        screen.set_models([("[/red]", "ab" * 32), ("[link=https:]x", "cd" * 32)])
        screen.notify_error("encode", "[link=https:]x.wav: not audio: it is a text file")
        await pilot.pause(0.2)
        assert screen.query_one("#model", Select).value == "ab" * 32
        assert any("[link=https:]x.wav" in str(n.message) for n in app._notifications)


@pytest.mark.parametrize("name", ["[/red]evil.distill", "kit [v2].distill", "esc\x1b[2J.distill"])
async def test_the_editors_model_list_shows_names_as_they_are(name: str) -> None:
    """Before: the editor listed models as markup ("[/red]evil.distill" crashed the app with a
    MarkupError, "kit [v2].distill" showed as "kit .distill"); the generate screen escaped."""
    from textual.widgets import Select, Static

    from distill.tui.screens.editor import EditorScreen

    app = DistillApp("tcp://127.0.0.1:1", connect=False)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("e")
        screen = app.screen
        assert isinstance(screen, EditorScreen)
        screen.set_models([(name, "ab" * 32), ("drums.distill", "cd" * 32)])
        await pilot.pause()
        select = screen.query_one("#edit-model", Select)
        shown = name.replace("\x1b", "\\x1b")  # an ESC written out, not sent to the terminal
        assert str(select.query_one("#label", Static).render()) == f"{shown}  {'ab' * 6}"
        select.focus()
        await pilot.press("enter", "down", "enter")  # the list drawn, the second one picked
        await pilot.pause(0.2)
        assert app.is_running and select.value == "cd" * 32
