from __future__ import annotations

import msgpack
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from distill.shared.bus.codec import ALLOWED_DTYPES, NDARRAY_EXT, pack, unpack, unpack_map
from distill.shared.errors import DecodeError


@pytest.mark.parametrize("dtype", sorted(ALLOWED_DTYPES))
def test_arrays_round_trip_with_dtype_and_shape(dtype: str) -> None:
    arr = (np.arange(24) % 2).astype(dtype).reshape(2, 3, 4)
    out = unpack(pack({"a": arr}))["a"]
    assert out.dtype == arr.dtype and out.shape == (2, 3, 4)
    np.testing.assert_array_equal(out, arr)
    assert out.flags.writeable


@pytest.mark.parametrize("dtype", ["float32", "int64", "complex64", "uint16"])
def test_arrays_of_either_byte_order_arrive_as_the_same_numbers(dtype: str) -> None:
    """The wire is little-endian: a big-endian array (also named float32) is sent as the
    numbers it holds, and a peer in any language writes the documented layout."""
    arr = (np.arange(12) * 3 - 5).astype(dtype).reshape(3, 4)
    big = arr.astype(arr.dtype.newbyteorder(">"))
    out = unpack(pack({"a": big}))["a"]
    assert out.dtype == np.dtype(dtype) and out.dtype.isnative
    np.testing.assert_array_equal(out, arr)
    ext = msgpack.unpackb(pack(big), raw=False, ext_hook=lambda code, data: (code, data))
    assert ext[0] == NDARRAY_EXT
    assert msgpack.unpackb(ext[1], raw=False) == [dtype, [3, 4], arr.astype(f"<{arr.dtype.str[1:]}").tobytes()]


def test_torch_tensors_travel_as_arrays() -> None:
    t = torch.randn(3, 5)
    out = unpack(pack([t]))[0]
    np.testing.assert_allclose(out, t.numpy())


def test_non_contiguous_and_empty_arrays() -> None:
    arr = np.arange(20, dtype=np.int32).reshape(4, 5).T
    np.testing.assert_array_equal(unpack(pack(arr)), arr)
    assert unpack(pack(np.zeros((0, 3), np.float32))).shape == (0, 3)


def test_object_arrays_and_unknown_types_refuse_to_encode() -> None:
    with pytest.raises(TypeError, match="not allowed"):
        pack(np.array([object()]))
    with pytest.raises(TypeError, match="cannot encode"):
        pack({"f": lambda: 0})
    with pytest.raises(TypeError, match=r"the integer 18446744073709551616: .* -2\*\*63"):
        pack({"start": 2**64})


def _ext(dtype: object, shape: object, raw: object) -> bytes:
    payload = msgpack.packb([dtype, shape, raw], use_bin_type=True)
    return msgpack.packb(msgpack.ExtType(NDARRAY_EXT, payload), use_bin_type=True)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (_ext("object", [1], b"\x00" * 8), "not allowed"),
        (_ext("float32", [2], b"\x00" * 4), "needs 8 bytes"),
        (_ext("float32", [-1], b""), "malformed array shape"),
        (_ext("float32", "2", b"\x00" * 8), "malformed array shape"),
        (msgpack.packb(msgpack.ExtType(42, b"x")), "unknown msgpack ext type 42"),
        (b"\xc1", "not valid msgpack: a byte that begins no msgpack value"),
        (b"\x91" * 100_000, "not valid msgpack: nested too deep"),
        (b"\x92\x01", "not valid msgpack"),
    ],
)
def test_malformed_bodies_raise_decode_error(data: bytes, reason: str) -> None:
    with pytest.raises(DecodeError, match=reason):
        unpack(data)


def test_size_limit_and_map_schema() -> None:
    with pytest.raises(DecodeError, match="exceeds the limit"):
        unpack(pack(b"x" * 100), max_bytes=50)
    with pytest.raises(DecodeError, match="must be a map"):
        unpack_map(pack([1, 2]))
    with pytest.raises(DecodeError, match="keys must be strings"):
        unpack_map(pack({1: 2}))


@settings(max_examples=2000)
@given(st.binary(max_size=200))
def test_random_bytes_decode_or_raise_decode_error(data: bytes) -> None:
    try:
        unpack(data)
    except DecodeError:
        pass
