"""Code grids: every edit, its undo and redo, the serialised history, and bad arguments."""

from __future__ import annotations

import json
from typing import Any

import msgpack
import numpy as np
import pytest

from distill.shared.model.codes import (
    NO_CODE,
    CodeGrid,
    CodeGridError,
    Edit,
    EditSession,
    KeepLevels,
    Region,
    Repeat,
    ReplaceRegion,
    Reverse,
    SetCell,
    Shift,
    copy_region,
    edit_from_dict,
    keep_levels,
    paste,
    repeat_region,
    replace_region,
    reverse_region,
    set_cell,
    shift_region,
    swap_between,
    swap_regions,
)

K = 16


def grid(seed: int = 0, levels: int = 3, steps: int = 10) -> CodeGrid:
    return CodeGrid(np.random.default_rng(seed).integers(0, K, (levels, steps)), K)


def test_grid_is_a_frozen_validated_copy() -> None:
    codes = np.zeros((2, 4), dtype=np.int32)
    g = CodeGrid(codes, K)
    codes[0, 0] = 5
    assert g.codes[0, 0] == 0 and g.codes.dtype == np.int64  # copied, widened
    with pytest.raises(ValueError):
        g.codes[0, 0] = 1  # read-only
    assert (g.levels, g.steps) == (2, 4)
    assert g == CodeGrid(np.zeros((2, 4), dtype=np.int64), K) and g != CodeGrid(codes, K)


@pytest.mark.parametrize(("codes", "k", "match"), [
    (np.full((2, 3), K), K, r"code 16 at level 0, step 0 is outside \[0, 16\)"),
    (np.full((2, 3), -2), K, "is not -1"),
    (np.zeros(3, dtype=np.int64), K, "shape"),
    (np.zeros((2, 0), dtype=np.int64), K, "steps"),
    (np.zeros((2, 3)), K, "integers"),
    (np.zeros((2, 3), dtype=np.int64), 0, "codebook_size"),
    (np.zeros((2, 3), dtype=np.int64), True, "codebook_size"),
])  # fmt: skip
def test_bad_grids(codes: np.ndarray, k: Any, match: str) -> None:
    with pytest.raises(CodeGridError, match=match):
        CodeGrid(codes, k)


def test_set_cell() -> None:
    g = grid()
    out = set_cell(g, 1, 4, 7)
    assert out.codes[1, 4] == 7
    diff = out.codes != g.codes
    diff[1, 4] = False
    assert not diff.any()
    assert set_cell(g, 2, 0, NO_CODE).codes[2, 0] == NO_CODE


def test_copy_and_paste() -> None:
    a, b = grid(0), grid(1)
    clip = copy_region(a, Region(0, 2, 3, 6))
    assert clip.codes.shape == (2, 3) and np.array_equal(clip.codes, a.codes[0:2, 3:6])
    out = paste(b, clip, 1, 7)
    assert np.array_equal(out.codes[1:3, 7:10], clip.codes)
    assert np.array_equal(out.codes[0], b.codes[0]) and np.array_equal(
        out.codes[:, :7], b.codes[:, :7]
    )


def test_swap_regions_exchanges_exactly_the_region() -> None:
    a, b = grid(0), grid(1)
    r = Region(1, 3, 2, 5)
    a2, b2 = swap_regions(a, b, r)
    assert np.array_equal(a2.codes[1:3, 2:5], b.codes[1:3, 2:5])
    assert np.array_equal(b2.codes[1:3, 2:5], a.codes[1:3, 2:5])
    outside = np.ones_like(a.codes, dtype=bool)
    outside[1:3, 2:5] = False
    assert np.array_equal(a2.codes[outside], a.codes[outside])


def test_shift_rotates_inside_the_region() -> None:
    g = CodeGrid(np.arange(20).reshape(2, 10) % K, K)
    out = shift_region(g, Region(0, 1, 2, 6), 1)
    # steps 2..5 held 2 3 4 5; shifted later by one, 5 comes back in at step 2
    assert out.codes[0].tolist() == [0, 1, 5, 2, 3, 4, 6, 7, 8, 9]
    assert np.array_equal(out.codes[1], g.codes[1])
    assert shift_region(out, Region(0, 1, 2, 6), -1) == g


def test_repeat_overwrites_what_follows() -> None:
    g = CodeGrid(np.arange(10)[None, :].repeat(2, axis=0), K)
    out = repeat_region(g, Region(0, 1, 1, 3), 3)
    assert out.codes[0].tolist() == [0, 1, 2, 1, 2, 1, 2, 7, 8, 9]
    assert np.array_equal(out.codes[1], g.codes[1])
    assert repeat_region(g, Region(0, 2, 1, 3), 1) == g
    with pytest.raises(CodeGridError, match="at most 4 times fit"):
        repeat_region(g, Region(0, 1, 1, 3), 5)


def test_reverse_and_keep_levels() -> None:
    g = CodeGrid(np.arange(10)[None, :].repeat(3, axis=0), K)
    assert reverse_region(g, Region(1, 2, 0, 4)).codes[1].tolist() == [3, 2, 1, 0, 4, 5, 6, 7, 8, 9]
    kept = keep_levels(g, 1)
    assert np.array_equal(kept.codes[0], g.codes[0]) and (kept.codes[1:] == NO_CODE).all()
    assert keep_levels(g, 3) == g


def test_replace_region_records_outside_codes() -> None:
    g = grid()
    out = replace_region(g, 0, 8, np.array([[1, 2]]))
    assert out.codes[0, 8:].tolist() == [1, 2]


@pytest.mark.parametrize(("call", "match"), [
    (lambda g: set_cell(g, 3, 0, 1), "level"),
    (lambda g: set_cell(g, 0, 10, 1), "step"),
    (lambda g: set_cell(g, 0, 0, K), "code"),
    (lambda g: set_cell(g, 0, 0, -2), "code"),
    (lambda g: set_cell(g, 0, 0, 1.0), "integer"),
    (lambda g: copy_region(g, Region(0, 4, 0, 2)), "outside"),
    (lambda g: copy_region(g, Region(0, 1, 5, 5)), "empty"),
    (lambda g: copy_region(g, Region(0, 1, -1, 2)), "outside"),
    (lambda g: paste(g, grid(1, 2, 4), 2, 0), "pasted clip"),
    (lambda g: paste(g, grid(1, 1, 4), 0, 8), "pasted clip"),
    (lambda g: paste(g, CodeGrid(np.zeros((1, 1), dtype=np.int64), 8), 0, 0), "8 codes"),
    (lambda g: replace_region(g, 0, 0, np.array([[K]])), "outside"),
    (lambda g: shift_region(g, Region(0, 1, 0, 11), 1), "outside"),
    (lambda g: repeat_region(g, Region(0, 1, 0, 2), 0), "times"),
    (lambda g: keep_levels(g, 0), "levels to keep"),
    (lambda g: keep_levels(g, 4), "levels to keep"),
    (lambda g: swap_regions(g, grid(1, 2, 10), Region(0, 3, 0, 1)), "outside"),
])  # fmt: skip
def test_bad_arguments(call: Any, match: str) -> None:
    with pytest.raises(CodeGridError, match=match):
        call(grid())


EDITS: list[Edit] = [
    SetCell(1, 4, 7),
    ReplaceRegion.of(0, 2, np.array([[1, 2, 3], [4, 5, 6]]), "blend"),
    Shift(Region(0, 3, 1, 9), 3),
    Shift(Region(1, 2, 0, 10), -4),
    Repeat(Region(0, 2, 2, 4), 4),
    Reverse(Region(0, 3, 0, 10)),
    KeepLevels(1),
]


@pytest.mark.parametrize("edit", EDITS, ids=lambda e: e.op)
def test_each_edit_undoes_and_redoes_exactly(edit: Edit) -> None:
    session = EditSession(grid())
    applied = session.apply(edit)
    assert applied == edit.apply(grid()) and applied != grid()
    assert session.undo() == grid()
    assert session.history == [] and session.redo_stack == [edit]
    assert session.redo() == applied
    assert session.history == [edit] and session.redo_stack == []


def test_sequence_undo_redo_and_new_edit_clears_redo() -> None:
    session = EditSession(grid())
    states = [session.grid]
    for edit in EDITS:
        states.append(session.apply(edit))
    for expected in reversed(states[:-1]):
        assert session.undo() == expected
    with pytest.raises(CodeGridError, match="nothing to undo"):
        session.undo()
    for expected in states[1:4]:
        assert session.redo() == expected
    session.apply(SetCell(0, 0, 0))
    assert session.redo_stack == []
    with pytest.raises(CodeGridError, match="nothing to redo"):
        session.redo()


def test_invalid_edit_changes_nothing() -> None:
    session = EditSession(grid())
    session.apply(SetCell(0, 0, 1))
    session.undo()
    with pytest.raises(CodeGridError):
        session.apply(Repeat(Region(0, 1, 5, 9), 3))
    assert session.grid == grid() and session.history == [] and len(session.redo_stack) == 1


def test_swap_between_sessions_is_one_undoable_edit_each() -> None:
    a, b = EditSession(grid(0)), EditSession(grid(1))
    swap_between(a, b, Region(0, 2, 3, 7))
    assert (a.grid, b.grid) == swap_regions(grid(0), grid(1), Region(0, 2, 3, 7))
    assert a.undo() == grid(0) and b.undo() == grid(1)


def _edited_session() -> EditSession:
    session = EditSession(grid())
    for edit in EDITS:
        session.apply(edit)
    session.undo()
    session.undo()
    return session


@pytest.mark.parametrize("codec", ["msgpack", "json"])
def test_history_round_trips_through_msgpack_and_json(codec: str) -> None:
    session = _edited_session()
    d = session.to_dict()
    if codec == "msgpack":
        blob = msgpack.unpackb(msgpack.packb(d))
    else:
        blob = json.loads(json.dumps(d))
    loaded = EditSession.from_dict(blob)
    assert loaded.grid == session.grid and loaded.base == session.base
    assert loaded.history == session.history and loaded.redo_stack == session.redo_stack
    assert loaded.to_dict() == d
    # the loaded session undoes and redoes exactly like the original
    assert loaded.undo() == session.undo()
    assert loaded.redo() == session.redo() and loaded.redo() == session.redo()


def _history() -> dict[str, Any]:
    session = EditSession(grid())
    session.apply(SetCell(1, 4, 7))
    session.apply(Reverse(Region(0, 3, 0, 10)))
    session.undo()
    return session.to_dict()


def _with(path: tuple[Any, ...], value: Any) -> dict[str, Any]:
    d = json.loads(json.dumps(_history()))
    target = d
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return d


@pytest.mark.parametrize(("bad", "match"), [
    ([1, 2], "exactly"),
    ({"version": 1}, "exactly"),
    (_with(("version",), 2), "newer Distill"),
    (_with(("base", "codes"), [[1, 2], [3]]), "rectangular"),
    (_with(("base", "codes"), [[1, "x"]]), "integers only"),
    (_with(("base", "codebook_size"), "16"), "codebook_size"),
    (_with(("edits",), "set_cell"), "must be a list"),
    (_with(("edits", 0, "op"), "explode"), "not an edit"),
    (_with(("edits", 0, "level"), 9), "edit 0 cannot be replayed"),
    (_with(("edits", 0, "code"), True), "integer"),
    (_with(("edits", 0, "extra"), 1), "takes fields"),
    (_with(("undone", 0, "region"), [0, 9, 0, 10]), "undone edit cannot be redone"),
    (_with(("undone", 0, "region"), [0, 1]), "region is"),
])  # fmt: skip
def test_bad_history_gets_clear_error(bad: Any, match: str) -> None:
    with pytest.raises(CodeGridError, match=match):
        EditSession.from_dict(bad)


def test_edit_dicts_round_trip() -> None:
    for edit in EDITS:
        assert edit_from_dict(edit.to_dict()) == edit


def test_an_edit_history_is_bounded_by_the_cells_it_keeps() -> None:
    """4096 whole-grid edits of a 60-s grid (a 0.28-MB request) kept 2.2 GB of undo copies
    and took a worker to 5 GB: the cells kept are bounded, done and undone together, and kept
    as int16."""
    import distill.shared.model.codes as C

    grid = CodeGrid(np.zeros((12, 5625), dtype=np.int64), 512)
    whole = {"op": "reverse", "region": [0, 12, 0, 5625]}
    fits = C.MAX_HISTORY_CELLS // grid.codes.size
    history = {"version": C.HISTORY_VERSION, "base": grid.to_dict(),
               "edits": [whole] * (fits - 1), "undone": [whole]}
    session = EditSession.from_dict(history)  # the most that fits, redo stack included
    assert session._done[0].before.dtype == np.int16
    with pytest.raises(CodeGridError, match="the edit history already holds"):
        EditSession.from_dict({**history, "edits": [whole] * fits})
    session.apply(edit_from_dict(whole))  # the last that fits
    with pytest.raises(CodeGridError, match="cells to undo"):
        session.apply(edit_from_dict(whole))
    session.undo()
    session.apply(edit_from_dict({"op": "set_cell", "level": 0, "t": 0, "code": 3}))
    assert session.grid.codes[0, 0] == 3
