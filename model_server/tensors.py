"""KServe v2 tensor datatypes and their conversions to and from numpy arrays.

One place for the wire forms a tensor takes: JSON `data` lists, the little-endian row-major bytes
of the binary extension and of gRPC `raw_*_contents`, and gRPC's typed `contents` fields.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from mecbench.kserve import inference_pb2

Array = npt.NDArray[Any]


class TensorError(ValueError):
    """A tensor in a request is malformed: wrong type, shape or size. The message names it."""


# Every dtype is spelled little-endian: the protocol's raw form is little-endian whatever the host.
NUMPY_DTYPES: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
    # Strings travel as length-prefixed bytes; ONNX Runtime takes them as str objects (it would
    # str() a bytes object into "b'...'"), so elements are decoded as UTF-8 on the way in.
    "BYTES": np.dtype(np.object_),
}

ONNX_TO_KSERVE: dict[str, str] = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(string)": "BYTES",
    "tensor(bfloat16)": "BF16",
}

# The field of InferTensorContents that carries each datatype; FP16 and BF16 travel only raw.
CONTENTS_FIELDS: dict[str, str] = {
    "BOOL": "bool_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}

_LENGTH_PREFIX = struct.Struct("<I")


@dataclass(frozen=True)
class TensorSpec:
    """A model input or output as the protocol describes it; -1 marks a dimension of any size."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


def numpy_dtype(datatype: str) -> np.dtype[Any]:
    try:
        return NUMPY_DTYPES[datatype]
    except KeyError:
        raise TensorError(f"unsupported datatype {datatype!r}") from None


def datatype_of(array: Array) -> str:
    """The KServe datatype of an array ONNX Runtime returned."""
    if array.dtype.kind in "OUS":
        return "BYTES"
    for datatype, dtype in NUMPY_DTYPES.items():
        if dtype.kind == array.dtype.kind and dtype.itemsize == array.dtype.itemsize:
            return datatype
    raise TensorError(f"no KServe datatype for numpy dtype {array.dtype}")


def checked_shape(name: str, shape: Sequence[Any]) -> tuple[int, ...]:
    if not all(isinstance(dim, int) and not isinstance(dim, bool) and dim >= 0 for dim in shape):
        raise TensorError(f"input {name!r}: shape must be a list of non-negative integers, got {list(shape)}")
    return tuple(int(dim) for dim in shape)


def element_count(shape: Sequence[int]) -> int:
    return math.prod(shape)


def from_json_data(name: str, datatype: str, shape: tuple[int, ...], data: Any) -> Array:
    """An input given as JSON `data`: a flat row-major list, or the same values nested."""
    dtype = numpy_dtype(datatype)
    if not isinstance(data, list):
        raise TensorError(f"input {name!r}: data must be a list")
    try:
        if datatype == "BYTES":
            array = np.array([_string_element(name, item) for item in _flatten(data)], dtype=np.object_)
        else:
            array = np.asarray(data, dtype=dtype)
    except (TypeError, ValueError, OverflowError) as exc:
        raise TensorError(f"input {name!r}: data does not fit datatype {datatype}: {exc}") from None
    if array.size != element_count(shape):
        raise TensorError(
            f"input {name!r}: shape {list(shape)} needs {element_count(shape)} elements, got {array.size}"
        )
    return array.reshape(shape)


def to_json_data(array: Array) -> list[Any]:
    """An output as a flat row-major JSON list."""
    if array.dtype.kind in "OUS":
        return [item.decode("utf-8", errors="replace") if isinstance(item, bytes) else str(item) for item in array.flat]
    flat: list[Any] = array.ravel().tolist()
    return flat


def from_raw(name: str, datatype: str, shape: tuple[int, ...], raw: bytes | memoryview) -> Array:
    """An input given as little-endian row-major bytes (binary extension, gRPC raw contents)."""
    count = element_count(shape)
    if datatype == "BYTES":
        return np.array(_split_length_prefixed(name, raw, count), dtype=np.object_).reshape(shape)
    dtype = numpy_dtype(datatype)
    if len(raw) != count * dtype.itemsize:
        raise TensorError(
            f"input {name!r}: shape {list(shape)} of {datatype} needs {count * dtype.itemsize} bytes, got {len(raw)}"
        )
    return np.frombuffer(raw, dtype=dtype).reshape(shape)


def to_raw(array: Array) -> bytes:
    """An output as little-endian row-major bytes; BYTES elements carry a 4-byte length prefix."""
    if array.dtype.kind in "OUS":
        parts: list[bytes] = []
        for item in array.flat:
            encoded = item if isinstance(item, bytes) else str(item).encode()
            parts += [_LENGTH_PREFIX.pack(len(encoded)), encoded]
        return b"".join(parts)
    dtype = NUMPY_DTYPES[datatype_of(array)]
    return np.ascontiguousarray(array, dtype=dtype).tobytes()


def from_contents(
    name: str, datatype: str, shape: tuple[int, ...], contents: inference_pb2.InferTensorContents
) -> Array:
    """An input given in gRPC's typed `contents` field for its datatype."""
    field_name = CONTENTS_FIELDS.get(datatype)
    if field_name is None:
        raise TensorError(f"input {name!r}: datatype {datatype} travels only in raw_input_contents")
    values = getattr(contents, field_name)
    if datatype == "BYTES":
        array = np.array([value.decode("utf-8", errors="replace") for value in values], dtype=np.object_)
    else:
        try:
            array = np.asarray(values, dtype=numpy_dtype(datatype))
        except OverflowError as exc:
            raise TensorError(f"input {name!r}: {exc}") from None
    if array.size != element_count(shape):
        raise TensorError(
            f"input {name!r}: shape {list(shape)} needs {element_count(shape)} elements, got {array.size}"
        )
    return array.reshape(shape)


def _flatten(data: list[Any]) -> list[Any]:
    flat: list[Any] = []
    stack = [iter(data)]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                stack.append(iter(item))
                break
            flat.append(item)
        else:
            stack.pop()
    return flat


def _string_element(name: str, item: Any) -> str:
    if not isinstance(item, str):
        raise TensorError(f"input {name!r}: BYTES data must be strings")
    return item


def _split_length_prefixed(name: str, raw: bytes | memoryview, count: int) -> list[str]:
    view = memoryview(raw)
    items: list[str] = []
    offset = 0
    while offset < len(view):
        if offset + _LENGTH_PREFIX.size > len(view):
            raise TensorError(f"input {name!r}: truncated BYTES element length")
        (length,) = _LENGTH_PREFIX.unpack_from(view, offset)
        offset += _LENGTH_PREFIX.size
        if offset + length > len(view):
            raise TensorError(f"input {name!r}: truncated BYTES element")
        items.append(bytes(view[offset : offset + length]).decode("utf-8", errors="replace"))
        offset += length
    if len(items) != count:
        raise TensorError(f"input {name!r}: shape needs {count} BYTES elements, got {len(items)}")
    return items
