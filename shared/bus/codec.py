"""msgpack bodies with numpy arrays (and torch tensors) as an ext type. Never pickle.

An array travels as ext type 1 holding a msgpack array ``[dtype, shape, raw bytes]`` (the dtype's
numpy name, e.g. ``"float32"``; the bytes little-endian, C order); only the
dtypes in ``ALLOWED_DTYPES`` decode, so a peer cannot make us build object arrays. Every decode
failure is a :class:`DecodeError` naming what was wrong.
"""

from __future__ import annotations

import math
from typing import Any

import msgpack
import numpy as np

from distill.shared.bus.protocol import MAX_MESSAGE_BYTES
from distill.shared.errors import DecodeError

NDARRAY_EXT = 1
ALLOWED_DTYPES = frozenset(
    {
        "bool",
        "uint8",
        "int8",
        "uint16",
        "int16",
        "uint32",
        "int32",
        "uint64",
        "int64",
        "float16",
        "float32",
        "float64",
        "complex64",
        "complex128",
    }
)
MAX_ARRAY_DIMS = 8


def _default(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        return _pack_array(obj)
    if isinstance(obj, np.generic):
        return obj.item()
    if type(obj).__module__.startswith("torch") and hasattr(obj, "detach"):
        return _pack_array(obj.detach().cpu().numpy())
    if isinstance(obj, (set, frozenset, tuple)):
        return list(obj)
    if isinstance(obj, int):  # msgpack hands back the ints it cannot hold
        raise TypeError(f"cannot encode the integer {obj}: integers in a Distill message are "
                        "within -2**63..2**64-1")  # fmt: skip
    raise TypeError(f"cannot encode {type(obj).__name__} in a Distill message")


def _pack_array(arr: np.ndarray) -> msgpack.ExtType:
    dtype = arr.dtype.name
    if dtype not in ALLOWED_DTYPES:
        raise TypeError(f"array dtype {dtype!r} is not allowed on the wire")
    # the wire is little-endian whatever the array's own order (a '>f4' array is named
    # float32 too: its bytes as they are would be read back as other numbers)
    arr = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<"))
    payload = msgpack.packb([dtype, list(arr.shape), arr.tobytes()], use_bin_type=True)
    return msgpack.ExtType(NDARRAY_EXT, payload)


def _ext_hook(code: int, data: bytes) -> Any:
    if code != NDARRAY_EXT:
        raise DecodeError(f"unknown msgpack ext type {code}")
    try:
        dtype, shape, raw = msgpack.unpackb(data, raw=False)
    except Exception as e:
        raise DecodeError(f"malformed array ext: {e}") from e
    if not isinstance(dtype, str) or dtype not in ALLOWED_DTYPES:
        raise DecodeError(f"array dtype {dtype!r} is not allowed")
    if (
        not isinstance(shape, list)
        or len(shape) > MAX_ARRAY_DIMS
        or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape)
    ):
        raise DecodeError(f"malformed array shape {shape!r}")
    if not isinstance(raw, bytes):
        raise DecodeError("array payload is not bytes")
    expected = math.prod(shape) * np.dtype(dtype).itemsize  # Python ints: no int64 overflow
    if expected != len(raw):
        raise DecodeError(f"array of {dtype}{tuple(shape)} needs {expected} bytes, got {len(raw)}")
    wire = np.dtype(dtype).newbyteorder("<")
    return np.frombuffer(raw, dtype=wire).reshape(shape).astype(np.dtype(dtype))  # native order


def pack(obj: Any) -> bytes:
    """Encode a body (maps, lists, str, bytes, numbers, arrays) to msgpack bytes."""
    return msgpack.packb(obj, default=_default, use_bin_type=True)


# what msgpack's errors without a message mean
_UNSAID = {"FormatError": "a byte that begins no msgpack value", "StackError": "nested too deep"}


def unpack(data: bytes, max_bytes: int = MAX_MESSAGE_BYTES) -> Any:
    """Decode msgpack bytes; any malformation raises :class:`DecodeError`."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise DecodeError(f"body must be bytes, got {type(data).__name__}")
    if len(data) > max_bytes:
        raise DecodeError(f"body of {len(data)} bytes exceeds the limit of {max_bytes}")
    try:
        return msgpack.unpackb(
            data,
            raw=False,
            ext_hook=_ext_hook,
            strict_map_key=False,
        )
    except DecodeError:
        raise
    except Exception as e:  # msgpack raises several unrelated types on garbage, some unsaid
        reason = str(e) or _UNSAID.get(type(e).__name__, type(e).__name__)
        raise DecodeError(f"body is not valid msgpack: {reason}") from e


def unpack_map(data: bytes, what: str = "body") -> dict[str, Any]:
    """Decode a body that must be a msgpack map with string keys."""
    obj = unpack(data)
    if not isinstance(obj, dict):
        raise DecodeError(f"{what} must be a map, got {type(obj).__name__}")
    if not all(isinstance(k, str) for k in obj):
        raise DecodeError(f"{what} keys must be strings")
    return obj
