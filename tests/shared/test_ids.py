"""sha256 ids and the file helpers of content addressing (distill.shared.ids)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from distill.shared.errors import ArtifactError
from distill.shared.ids import is_sha256, require_sha256, sha256_file

DATA = b"a drum hit, more or less" * 1000
DATA_SHA = hashlib.sha256(DATA).hexdigest()


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (DATA_SHA, True),
        ("0" * 64, True),
        (DATA_SHA.upper(), False),
        (DATA_SHA[:63], False),
        (DATA_SHA + "a", False),
        (DATA_SHA[:63] + "\n", False),
        (DATA_SHA + "\n", False),
        ("../../etc/passwd", False),
        ("g" * 64, False),
        ("", False),
        (None, False),
        (DATA_SHA.encode(), False),
        (int(DATA_SHA, 16), False),
    ],
    ids=repr,
)
def test_is_sha256(value: object, expected: bool) -> None:
    assert is_sha256(value) is expected


def test_require_sha256_names_the_bad_value() -> None:
    assert require_sha256(DATA_SHA) == DATA_SHA
    with pytest.raises(ArtifactError, match=r"checkpoint must be .*'\.\./x'"):
        require_sha256("../x", "checkpoint")


def test_sha256_file_streams_a_file_larger_than_one_block(tmp_path: Path) -> None:
    data = DATA * 100  # 2.4 MB: more than one 1 MiB read
    path = tmp_path / "big"
    path.write_bytes(data)
    assert sha256_file(path) == hashlib.sha256(data).hexdigest()
