"""Code grids and the edits a user makes on them, with undo, redo and a serialisable history.

A code grid is the RVQ-VAE's view of a sound: ``(Q, T)`` int64, level 0 the coarsest, each code
in ``[0, K)`` or :data:`NO_CODE` (-1: this level adds nothing at this step; the decoder skips
it). Everything here is numpy and pure: an edit takes a grid and returns a new one, so the CLI,
the terminal UI and the inference worker share one implementation. Edits that need a model
(blend, resampling with the prior) compute their codes elsewhere and are recorded here with
:class:`ReplaceRegion`.

Regions are half-open: levels ``[level0, level1)`` and steps ``[t0, t1)``.

What each edit does at the edges:

- :class:`Shift` rotates the region's steps by ``offset`` (positive: later in time). Steps pushed
  out of one end come back in at the other, so nothing is lost and outside the region nothing
  changes; ``Shift(region, -offset)`` is its inverse.
- :class:`Repeat` keeps the region and writes ``times - 1`` copies right after it, overwriting
  the steps there at the region's levels; copies that would run past the grid's end are an
  error (the grid never grows).
- :class:`KeepLevels` sets levels ``k..Q-1`` to -1 everywhere (the decoder then uses k levels).

:class:`EditSession` applies edits with undo and redo. Its history serialises to a plain dict of
ints, strings and lists (msgpack- and JSON-able: it also travels in an exported file's comment)
holding the starting grid and the edits; loading replays them, so a loaded session undoes
exactly as the original did.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from distill.shared.errors import DistillError

NO_CODE = -1
HISTORY_VERSION = 1  # the layout of EditSession.to_dict
MAX_LEVELS = 64  # far above any RVQ we train (2-8 levels); anything larger is corrupt input
MAX_CODEBOOK_SIZE = 1 << 16
MAX_STEPS = 1 << 22  # about 12 hours at 94 steps per second
# Edits an edit history may hold (done and undone each): replaying one keeps a copy of the
# region it changed, so a history is bounded in memory too (a 12-MB request of 20 whole-grid
# edits on a 3-hour grid took a worker 1.7 GB); hours of editing by hand stay far below it.
MAX_EDITS = 4096
# ... and the cells those copies hold, done and undone together: 4096 whole-grid edits of a
# 60-s grid (a 0.28-MB request) held 2.2 GB and took a worker to 5 GB. 2**25 cells (64 MiB as
# int16) is ~500 whole-grid edits of a 60-s, 12-level grid, or 50 000 edits of a bar.
MAX_HISTORY_CELLS = 1 << 25


class CodeGridError(DistillError):
    """A code grid, an edit's arguments or a serialised history is invalid; says which and why."""


def _int(value: object, name: str, low: int, high: int) -> int:
    """``value`` as an int in ``[low, high]``; bools and floats are refused."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise CodeGridError(f"{name} must be an integer, got {value!r}")
    if not low <= int(value) <= high:
        raise CodeGridError(f"{name} must be in [{low}, {high}], got {int(value)}")
    return int(value)


@dataclass(frozen=True, eq=False)
class CodeGrid:
    """``codes`` (Q, T) int64 (a read-only copy of what was given) and the codebook size K."""

    codes: np.ndarray
    codebook_size: int

    def __post_init__(self) -> None:
        k = _int(self.codebook_size, "codebook_size", 1, MAX_CODEBOOK_SIZE)
        array = np.asarray(self.codes)
        if array.ndim != 2 or not 1 <= array.shape[0] <= MAX_LEVELS:
            raise CodeGridError(
                f"a code grid is (levels, steps) with 1..{MAX_LEVELS} levels, "
                f"got shape {array.shape}"
            )
        if not 1 <= array.shape[1] <= MAX_STEPS:
            raise CodeGridError(f"a code grid has 1..{MAX_STEPS} steps, got {array.shape[1]}")
        if not np.issubdtype(array.dtype, np.integer):
            raise CodeGridError(f"codes must be integers, got dtype {array.dtype}")
        bad = (array < NO_CODE) | (array >= k)
        if bad.any():
            q, t = (int(i) for i in np.argwhere(bad)[0])
            raise CodeGridError(
                f"code {int(array[q, t])} at level {q}, step {t} is outside "
                f"[0, {k}) and is not {NO_CODE}"
            )
        frozen = array.astype(np.int64, copy=True)
        frozen.flags.writeable = False
        object.__setattr__(self, "codes", frozen)
        object.__setattr__(self, "codebook_size", k)

    @property
    def levels(self) -> int:
        return int(self.codes.shape[0])

    @property
    def steps(self) -> int:
        return int(self.codes.shape[1])

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, CodeGrid):
            return NotImplemented
        return self.codebook_size == other.codebook_size and np.array_equal(self.codes, other.codes)

    # Unhashable: it holds an array, and equal grids would need equal hashes.
    __hash__ = None  # type: ignore[assignment]

    def with_codes(self, codes: np.ndarray) -> CodeGrid:
        return CodeGrid(codes, self.codebook_size)

    def to_dict(self) -> dict[str, Any]:
        return {"codebook_size": self.codebook_size, "codes": self.codes.tolist()}

    @classmethod
    def from_dict(cls, d: object) -> CodeGrid:
        if not isinstance(d, Mapping) or set(d) != {"codebook_size", "codes"}:
            raise CodeGridError(
                f"a code grid dict has exactly 'codebook_size' and 'codes', got "
                f"{sorted(d) if isinstance(d, Mapping) else type(d).__name__}"
            )
        return cls(_int_array(d["codes"], "codes", ndim=2), d["codebook_size"])


def _int_array(value: object, name: str, ndim: int) -> np.ndarray:
    """Nested lists of ints -> an int64 array with ``ndim`` dims, or a clear error."""
    if isinstance(value, np.ndarray):
        array = value
    else:
        try:
            array = np.array(value, dtype=object)
        except ValueError as e:  # ragged lists
            raise CodeGridError(f"{name} must be a rectangular list of integers: {e}") from e
    if array.ndim != ndim or array.size == 0:
        raise CodeGridError(
            f"{name} must be a rectangular {ndim}-d list of integers, got shape {array.shape}"
        )
    if not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in array.flat):
        raise CodeGridError(f"{name} must hold integers only")
    return array.astype(np.int64)


# --- regions and the edit functions --------------------------------------------------------------


@dataclass(frozen=True)
class Region:
    """Levels ``[level0, level1)`` x steps ``[t0, t1)``."""

    level0: int
    level1: int
    t0: int
    t1: int

    @classmethod
    def whole(cls, grid: CodeGrid) -> Region:
        return cls(0, grid.levels, 0, grid.steps)

    @property
    def levels(self) -> int:
        return self.level1 - self.level0

    @property
    def steps(self) -> int:
        return self.t1 - self.t0

    def index(self) -> tuple[slice, slice]:
        return slice(self.level0, self.level1), slice(self.t0, self.t1)

    def check(self, grid: CodeGrid, what: str = "region") -> Region:
        """The region, if it is non-empty and inside ``grid``; a clear error otherwise."""
        for name in ("level0", "level1", "t0", "t1"):
            _int(getattr(self, name), f"{what}.{name}", -MAX_STEPS, MAX_STEPS)
        if not (
            0 <= self.level0 < self.level1 <= grid.levels and 0 <= self.t0 < self.t1 <= grid.steps
        ):
            raise CodeGridError(
                f"{what} levels [{self.level0}, {self.level1}) x steps "
                f"[{self.t0}, {self.t1}) is empty or outside the "
                f"{grid.levels} x {grid.steps} grid"
            )
        return self

    def to_list(self) -> list[int]:
        return [self.level0, self.level1, self.t0, self.t1]

    @classmethod
    def from_list(cls, value: object) -> Region:
        if not isinstance(value, (list, tuple)) or len(value) != 4:
            raise CodeGridError(f"a region is [level0, level1, t0, t1], got {value!r}")
        names = ("level0", "level1", "t0", "t1")
        return cls(*(_int(v, f"region {name}", 0, MAX_LEVELS if name.startswith("level")
                                               else MAX_STEPS)
                     for name, v in zip(names, value, strict=True)))


def set_cell(grid: CodeGrid, level: int, t: int, code: int) -> CodeGrid:
    _int(level, "level", 0, grid.levels - 1)
    _int(t, "step", 0, grid.steps - 1)
    _int(code, "code", NO_CODE, grid.codebook_size - 1)
    codes = grid.codes.copy()
    codes[level, t] = code
    return grid.with_codes(codes)


def copy_region(grid: CodeGrid, region: Region) -> CodeGrid:
    """The region's codes as a clip: a small grid of its own."""
    return grid.with_codes(grid.codes[region.check(grid).index()])


def paste(grid: CodeGrid, clip: CodeGrid, level: int, t: int) -> CodeGrid:
    """``clip`` written with its top-left cell at (level, t); it must fit inside the grid."""
    if clip.codebook_size != grid.codebook_size:
        raise CodeGridError(
            f"cannot paste a clip with {clip.codebook_size} codes per level into "
            f"a grid with {grid.codebook_size}"
        )
    _int(level, "level", 0, grid.levels - 1)
    _int(t, "step", 0, grid.steps - 1)
    target = Region(level, level + clip.levels, t, t + clip.steps).check(grid, "pasted clip")
    codes = grid.codes.copy()
    codes[target.index()] = clip.codes
    return grid.with_codes(codes)


def replace_region(grid: CodeGrid, level: int, t: int, codes: np.ndarray) -> CodeGrid:
    """Codes computed elsewhere (blend, prior resampling) written at (level, t)."""
    return paste(grid, grid.with_codes(codes), level, t)


def swap_regions(a: CodeGrid, b: CodeGrid, region: Region) -> tuple[CodeGrid, CodeGrid]:
    """The same region exchanged between two grids of the same codebook size."""
    clip_a, clip_b = copy_region(a, region), copy_region(b, region)
    return paste(a, clip_b, region.level0, region.t0), paste(b, clip_a, region.level0, region.t0)


def shift_region(grid: CodeGrid, region: Region, offset: int) -> CodeGrid:
    """The region's steps rotated by ``offset`` (see the module docstring for the edges)."""
    _int(offset, "offset", -MAX_STEPS, MAX_STEPS)
    codes = grid.codes.copy()
    index = region.check(grid).index()
    codes[index] = np.roll(codes[index], offset, axis=1)
    return grid.with_codes(codes)


def repeat_region(grid: CodeGrid, region: Region, times: int) -> CodeGrid:
    """The region followed by ``times - 1`` copies of itself, overwriting what came after."""
    region.check(grid)
    _int(times, "times", 1, MAX_STEPS)
    end = region.t0 + region.steps * times
    if end > grid.steps:
        fit = (grid.steps - region.t0) // region.steps
        raise CodeGridError(
            f"repeating {region.steps} steps {times} times from step "
            f"{region.t0} runs to step {end}, past the grid's {grid.steps}; "
            f"at most {fit} times fit"
        )
    codes = grid.codes.copy()
    levels = slice(region.level0, region.level1)
    codes[levels, region.t0 : end] = np.tile(codes[region.index()], (1, times))
    return grid.with_codes(codes)


def reverse_region(grid: CodeGrid, region: Region) -> CodeGrid:
    codes = grid.codes.copy()
    index = region.check(grid).index()
    codes[index] = codes[index][:, ::-1]
    return grid.with_codes(codes)


def keep_levels(grid: CodeGrid, k: int) -> CodeGrid:
    """Levels k..Q-1 set to -1: the decoder then hears the first k levels only."""
    _int(k, "levels to keep", 1, grid.levels)
    codes = grid.codes.copy()
    codes[k:] = NO_CODE
    return grid.with_codes(codes)


# --- edits as values (for the session and its history) -------------------------------------------


@dataclass(frozen=True)
class Edit:
    """One edit as a value: what it changes (``affected``), how (``apply``), and its dict."""

    op: ClassVar[str]

    def apply(self, grid: CodeGrid) -> CodeGrid:
        raise NotImplementedError

    def affected(self, grid: CodeGrid) -> Region:
        """The cells this edit may change; undo restores exactly these."""
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        raise NotImplementedError


@dataclass(frozen=True)
class SetCell(Edit):
    op: ClassVar[str] = "set_cell"
    level: int
    t: int
    code: int

    def apply(self, grid: CodeGrid) -> CodeGrid:
        return set_cell(grid, self.level, self.t, self.code)

    def affected(self, grid: CodeGrid) -> Region:
        return Region(self.level, self.level + 1, self.t, self.t + 1)

    def to_dict(self) -> dict[str, Any]:
        return {"op": self.op, "level": self.level, "t": self.t, "code": self.code}


@dataclass(frozen=True)
class ReplaceRegion(Edit):
    """Codes written at (level, t): a paste, a swap's incoming half, a blend, a resampling."""

    op: ClassVar[str] = "replace"
    level: int
    t: int
    codes: tuple[tuple[int, ...], ...]
    source: str = "paste"  # what made the codes: paste, swap, blend, resample, ...

    @classmethod
    def of(cls, level: int, t: int, codes: np.ndarray | CodeGrid, source: str) -> ReplaceRegion:
        array = codes.codes if isinstance(codes, CodeGrid) else _int_array(codes, "codes", 2)
        return cls(level, t, tuple(tuple(int(c) for c in row) for row in array.tolist()), source)

    def apply(self, grid: CodeGrid) -> CodeGrid:
        return replace_region(grid, self.level, self.t, np.array(self.codes, dtype=np.int64))

    def affected(self, grid: CodeGrid) -> Region:
        return Region(self.level, self.level + len(self.codes), self.t, self.t + len(self.codes[0]))

    def to_dict(self) -> dict[str, Any]:
        return {
            "op": self.op,
            "level": self.level,
            "t": self.t,
            "codes": [list(row) for row in self.codes],
            "source": self.source,
        }


@dataclass(frozen=True)
class Shift(Edit):
    op: ClassVar[str] = "shift"
    region: Region
    offset: int

    def apply(self, grid: CodeGrid) -> CodeGrid:
        return shift_region(grid, self.region, self.offset)

    def affected(self, grid: CodeGrid) -> Region:
        return self.region

    def to_dict(self) -> dict[str, Any]:
        return {"op": self.op, "region": self.region.to_list(), "offset": self.offset}


@dataclass(frozen=True)
class Repeat(Edit):
    op: ClassVar[str] = "repeat"
    region: Region
    times: int

    def apply(self, grid: CodeGrid) -> CodeGrid:
        return repeat_region(grid, self.region, self.times)

    def affected(self, grid: CodeGrid) -> Region:
        r = self.region
        return Region(r.level0, r.level1, r.t0, r.t0 + r.steps * self.times)

    def to_dict(self) -> dict[str, Any]:
        return {"op": self.op, "region": self.region.to_list(), "times": self.times}


@dataclass(frozen=True)
class Reverse(Edit):
    op: ClassVar[str] = "reverse"
    region: Region

    def apply(self, grid: CodeGrid) -> CodeGrid:
        return reverse_region(grid, self.region)

    def affected(self, grid: CodeGrid) -> Region:
        return self.region

    def to_dict(self) -> dict[str, Any]:
        return {"op": self.op, "region": self.region.to_list()}


@dataclass(frozen=True)
class KeepLevels(Edit):
    op: ClassVar[str] = "keep_levels"
    k: int

    def apply(self, grid: CodeGrid) -> CodeGrid:
        return keep_levels(grid, self.k)

    def affected(self, grid: CodeGrid) -> Region:
        return Region(0, grid.levels, 0, grid.steps)

    def to_dict(self) -> dict[str, Any]:
        return {"op": self.op, "k": self.k}


_FIELDS: dict[str, tuple[type[Edit], dict[str, str]]] = {
    "set_cell": (SetCell, {"level": "int", "t": "int", "code": "int"}),
    "replace": (ReplaceRegion, {"level": "int", "t": "int", "codes": "codes", "source": "str"}),
    "shift": (Shift, {"region": "region", "offset": "int"}),
    "repeat": (Repeat, {"region": "region", "times": "int"}),
    "reverse": (Reverse, {"region": "region"}),
    "keep_levels": (KeepLevels, {"k": "int"}),
}


_INT_FIELDS: dict[str, tuple[int, int]] = {  # bounds no grid goes past
    "code": (NO_CODE, MAX_CODEBOOK_SIZE - 1),
    "level": (0, MAX_LEVELS - 1),
    "k": (0, MAX_LEVELS),
    "t": (0, MAX_STEPS - 1),
    "times": (1, MAX_STEPS),
}


def edit_from_dict(d: object) -> Edit:
    """An :class:`Edit` from its dict; types are checked here, ranges when it is applied."""
    if not isinstance(d, Mapping) or not isinstance(d.get("op"), str) or d["op"] not in _FIELDS:
        raise CodeGridError(f"not an edit (an 'op' out of {sorted(_FIELDS)} is needed): {d!r}")
    cls, spec = _FIELDS[d["op"]]
    if set(d) != {"op", *spec}:
        raise CodeGridError(
            f"edit '{d['op']}' takes fields {sorted(spec)}, got {sorted(k for k in d if k != 'op')}"
        )
    kwargs: dict[str, Any] = {}
    for name, kind in spec.items():
        value = d[name]
        if kind == "int":  # each field's widest sense here; the grid's own range when applied
            low, high = _INT_FIELDS.get(name, (-MAX_STEPS, MAX_STEPS))
            kwargs[name] = _int(value, f"{d['op']}.{name}", low, high)
        elif kind == "region":
            kwargs[name] = Region.from_list(value)
        elif kind == "codes":
            array = _int_array(value, f"{d['op']}.codes", ndim=2)
            kwargs[name] = tuple(tuple(int(c) for c in row) for row in array.tolist())
        elif not isinstance(value, str):
            raise CodeGridError(f"{d['op']}.{name} must be a string, got {value!r}")
        else:
            kwargs[name] = value
    return cls(**kwargs)


# --- the session: apply, undo, redo ---------------------------------------------------------------


@dataclass
class _Applied:
    edit: Edit
    region: Region
    before: np.ndarray  # the region's codes before the edit


@dataclass
class EditSession:
    """A grid under editing: ``grid`` is the current state, ``base`` where editing began."""

    base: CodeGrid
    grid: CodeGrid = field(init=False)
    _done: list[_Applied] = field(default_factory=list, init=False)
    _undone: list[Edit] = field(default_factory=list, init=False)
    _held: int = field(default=0, init=False)  # cells in the copies of _done's regions

    def __post_init__(self) -> None:
        self.grid = self.base

    @property
    def history(self) -> list[Edit]:
        return [a.edit for a in self._done]

    @property
    def redo_stack(self) -> list[Edit]:
        """Undone edits, the next to redo last."""
        return list(self._undone)

    def apply(self, edit: Edit) -> CodeGrid:
        """Applies ``edit`` (invalid arguments raise and change nothing); clears the redo stack."""
        self._apply(edit)
        self._undone.clear()
        return self.grid

    def _apply(self, edit: Edit) -> None:
        new = edit.apply(self.grid)  # validates before anything is recorded
        region = edit.affected(self.grid)
        before = self.grid.codes[region.index()]
        if self._held + before.size > MAX_HISTORY_CELLS:
            raise CodeGridError(
                f"the edit history already holds {self._held} cells to undo, and this edit "
                f"would add {before.size} (at most {MAX_HISTORY_CELLS}): export the sound, or "
                "start a new session from the current codes")  # fmt: skip
        # int16 holds every code (codebooks are at most 8192) in a quarter of the space
        small = before.astype(np.int16) if self.grid.codebook_size <= 1 << 15 else before.copy()
        self._done.append(_Applied(edit, region, small))
        self._held += before.size
        self.grid = new

    def undo(self) -> CodeGrid:
        if not self._done:
            raise CodeGridError("nothing to undo")
        applied = self._done.pop()
        self._held -= applied.before.size
        codes = self.grid.codes.copy()
        codes[applied.region.index()] = applied.before
        self.grid = self.grid.with_codes(codes)
        self._undone.append(applied.edit)
        return self.grid

    def redo(self) -> CodeGrid:
        if not self._undone:
            raise CodeGridError("nothing to redo")
        self._apply(self._undone[-1])  # popped only once it applied
        self._undone.pop()
        return self.grid

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": HISTORY_VERSION,
            "base": self.base.to_dict(),
            "edits": [e.to_dict() for e in self.history],
            "undone": [e.to_dict() for e in self._undone],
        }

    @classmethod
    def from_dict(cls, d: object) -> EditSession:
        """Rebuilds a session by replaying its edits on its base grid; bad input -> error."""
        keys = {"version", "base", "edits", "undone"}
        if not isinstance(d, Mapping) or set(d) != keys:
            got = sorted(d) if isinstance(d, Mapping) else type(d).__name__
            raise CodeGridError(f"an edit history has exactly {sorted(keys)}, got {got}")
        version = d["version"]
        if version != HISTORY_VERSION:
            raise CodeGridError(
                f"edit history version {version!r} is not the one this Distill "
                f"reads ({HISTORY_VERSION}); a newer Distill may be needed"
            )
        session = cls(CodeGrid.from_dict(d["base"]))
        for name in ("edits", "undone"):
            if not isinstance(d[name], Sequence) or isinstance(d[name], (str, bytes)):
                raise CodeGridError(f"edit history '{name}' must be a list")
            if len(d[name]) > MAX_EDITS:
                raise CodeGridError(f"edit history '{name}' holds {len(d[name])} edits; at "
                                    f"most {MAX_EDITS}")  # fmt: skip
        for i, item in enumerate(d["edits"]):
            try:
                session._apply(edit_from_dict(item))
            except CodeGridError as e:
                raise CodeGridError(f"edit history: edit {i} cannot be replayed: {e}") from e
        session._undone = [edit_from_dict(item) for item in d["undone"]]
        try:  # the redo stack must replay too: redo it all, then undo it all (exact)
            for _ in range(len(session._undone)):
                session.redo()
        except CodeGridError as e:
            raise CodeGridError(f"edit history: an undone edit cannot be redone: {e}") from e
        for _ in range(len(d["undone"])):
            session.undo()
        return session


def swap_between(a: EditSession, b: EditSession, region: Region) -> None:
    """Swaps ``region`` between two sessions: one undoable edit in each."""
    clip_a, clip_b = copy_region(a.grid, region), copy_region(b.grid, region)
    if clip_a.codebook_size != clip_b.codebook_size:
        raise CodeGridError(
            f"cannot swap between grids with {clip_a.codebook_size} and "
            f"{clip_b.codebook_size} codes per level"
        )
    a.apply(ReplaceRegion.of(region.level0, region.t0, clip_b, "swap"))
    b.apply(ReplaceRegion.of(region.level0, region.t0, clip_a, "swap"))
