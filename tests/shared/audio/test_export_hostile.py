"""Exported files from someone else: metadata that is a zlib bomb, points to itself, nests
deep or states a chunk larger than any recipe is refused with one clear error naming the file
(each case built here, small)."""

from __future__ import annotations

import base64
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from distill.shared.audio.export import (
    COMPRESSED_PREFIX,
    MAX_RECIPE_BYTES,
    MAX_RECIPE_CONTAINERS,
    MAX_RECIPE_DEPTH,
    ExportError,
    read_export_metadata,
)

SR = 48_000
RECIPE = {"distill_export": 1, "kind": "generate", "model": "ab" * 32,
          "data": {"seed": 0, "count": 1, "index": 0}}  # fmt: skip
STUB = json.dumps({"distill_export": 1, "kind": "generate", "model": "ab" * 32, "chunk": "dstl"})


def _sound(path: Path, comment: str, chunk: bytes | None = None, size: int | None = None) -> Path:
    """A short sound whose comment tag is ``comment``, with a ``dstl`` chunk holding ``chunk``
    after its audio (its stated size ``size``: the payload's unless given)."""
    fmt = "FLAC" if path.suffix == ".flac" else "WAV"
    with sf.SoundFile(path, "w", SR, 1, subtype="PCM_16", format=fmt) as f:
        f.comment = comment
        f.write(0.3 * np.sin(np.arange(2400) / 10))
    if chunk is not None:
        with open(path, "r+b") as f:
            f.seek(0, 2)
            f.write(b"dstl" + struct.pack("<I", len(chunk) if size is None else size) + chunk)
            if len(chunk) % 2:
                f.write(b"\0")
            end = f.tell()
            f.seek(4)
            f.write(struct.pack("<I", end - 8))
    return path


def _bomb() -> str:
    """A real recipe padded with spaces to just past MAX_RECIPE_BYTES, compressed: ~33 kB."""
    text = json.dumps(RECIPE)
    inner = (text[:-1] + " " * MAX_RECIPE_BYTES + "}").encode()
    return COMPRESSED_PREFIX + base64.b64encode(zlib.compress(inner, 9)).decode()


def test_a_compressed_recipe_is_inflated_no_further_than_its_bound(tmp_path: Path) -> None:
    """Before: a 1.4-MB WAV whose chunk inflated to 1 GiB took regenerate to 2.7 GB (a 0.96-MB
    FLAC comment to 2.1 GB) and was then read as a recipe."""
    bomb = _bomb()
    assert len(bomb) < MAX_RECIPE_BYTES // 500
    for path in (_sound(tmp_path / "bomb.wav", STUB, bomb.encode()),
                 _sound(tmp_path / "bomb.flac", bomb)):  # fmt: skip
        with pytest.raises(ExportError, match=f"{path.name}: its Distill metadata inflates to "
                                              f"over {MAX_RECIPE_BYTES} bytes") as e:  # fmt: skip
            read_export_metadata(path)
        assert e.value.reason == "too_large"
    # a real recipe compressed the same way still reads
    small = COMPRESSED_PREFIX + base64.b64encode(zlib.compress(json.dumps(RECIPE).encode())).decode()
    assert read_export_metadata(_sound(tmp_path / "ok.flac", small)).data == RECIPE["data"]


def test_a_chunk_larger_than_any_recipe_is_refused_before_it_is_read(tmp_path: Path) -> None:
    """Before: the whole file was read, and a chunk stating more than the file holds was
    'missing or cut short'; a chunk stating 4 GB is now refused for its size."""
    path = _sound(tmp_path / "huge.wav", STUB, b"{}", size=0xFFFFFFF0)
    with pytest.raises(ExportError, match="huge.wav: its 'dstl' chunk is 4294967280 bytes") as e:
        read_export_metadata(path)
    assert e.value.reason == "too_large"


def _nested(depth: int) -> bytes:
    data = "[" * depth + "]" * depth
    return ('{"distill_export":1,"kind":"decode","model":"m","data":{"x":' + data + "}}").encode()


@pytest.mark.parametrize(("chunk", "says"), [
    (STUB.encode(), "its 'dstl' chunk points to a chunk again"),  # was: RecursionError
    (b"[" * 100_000 + b"]" * 100_000, f"nests lists and maps over {MAX_RECIPE_DEPTH} deep"),
    (_nested(MAX_RECIPE_DEPTH + 8), f"nests lists and maps over {MAX_RECIPE_DEPTH} deep"),
    (b'{"distill_export":1,"kind":"decode","model":"m","data":{"n":' + b"7" * 5000 + b"}}",
     "Exceeds the limit"),  # was: ValueError (Python's 4300-digit limit)
    # 3 MB of empty maps (64 MB of them parsed into 1.5 GB)
    (b"[" + b"{}," * MAX_RECIPE_CONTAINERS + b"{}]", f"holds over {MAX_RECIPE_CONTAINERS}"),
], ids=["chunk-points-to-itself", "100k-brackets", "too-deep", "5000-digits", "many-maps"])  # fmt: skip
def test_a_recipe_that_points_to_itself_or_nests_deep_is_malformed(
    tmp_path: Path, chunk: bytes, says: str
) -> None:
    path = _sound(tmp_path / "self.wav", STUB, chunk)
    with pytest.raises(ExportError, match="self.wav: Distill metadata is malformed") as e:
        read_export_metadata(path)
    assert says in str(e.value) and e.value.reason == "malformed"


def test_a_recipe_nesting_as_deep_as_a_real_one_reads(tmp_path: Path) -> None:
    path = _sound(tmp_path / "ok.wav", STUB, _nested(MAX_RECIPE_DEPTH - 3))
    assert read_export_metadata(path).kind == "decode"
