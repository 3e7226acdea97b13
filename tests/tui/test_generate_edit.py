"""The generate and code-editor screens against a real broker and infer worker, with a tiny
untrained model (plumbing, not quality): sounds come back, are drawn and exported; in the
editor an edited cell decodes to a different sound and undo restores the grid."""

from __future__ import annotations

from pathlib import Path

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
from distill.shared.model.modelfile import save_model
from distill.tui.app import DistillApp
from distill.tui.screens.editor import EditorScreen
from distill.tui.screens.generate import GenerateScreen
from distill.tui.widgets.codegrid import CodeGridView
from tests.conftest import Cluster
from tests.tui.conftest import until
from tests.workers.test_infer import tiny_model

pytestmark = [pytest.mark.slow]
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
        gen.action_generate()
        results = gen.query_one("#results", DataTable)
        await until(pilot, lambda: results.row_count == 2, 120, what="two sounds")
        assert all(np.isfinite(s).all() and s.size > 0 for s in gen.sounds)
        assert any(c in str(results.get_row_at(0)[4]) for c in "▁▂▃▄▅▆▇█")  # a waveform thumbnail
        gen.query_one("#export-dir", Input).value = str(tmp_path / "out")
        gen.action_export()
        exported = sorted((tmp_path / "out").glob("*.wav"))
        assert len(exported) == 2 and read_audio(exported[0]).samples.size > 0

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
        result = CliRunner().invoke(cli_app, ["regenerate", str(edited[0]), "--model", str(model_file)])
    finally:
        torch.set_num_threads(before)
    assert result.exit_code == 0 and "identical to" in result.output, result.output
