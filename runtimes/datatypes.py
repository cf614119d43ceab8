"""KServe v2 tensor datatypes and their numpy equivalents."""

from __future__ import annotations

import numpy as np

# BYTES tensors are numpy object arrays of `bytes`.
_TO_NUMPY: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    "BYTES": np.dtype(object),
}
_FROM_NUMPY: dict[np.dtype, str] = {v: k for k, v in _TO_NUMPY.items() if k != "BYTES"}

_TO_NUMPY_LE: dict[str, np.dtype] = {k: v.newbyteorder("<") for k, v in _TO_NUMPY.items()}

DATATYPES: frozenset[str] = frozenset(_TO_NUMPY)


def to_numpy(datatype: str) -> np.dtype:
    """The numpy dtype for a KServe datatype name; KeyError if unknown."""
    return _TO_NUMPY[datatype]


def from_numpy(dtype: np.dtype) -> str:
    """The KServe datatype name for a numpy dtype (object and bytes/str arrays are BYTES)."""
    found = _FROM_NUMPY.get(dtype)  # an array's own dtype: no conversion (per response)
    if found is not None:
        return found
    dtype = np.dtype(dtype)
    if dtype.kind in "OSU":
        return "BYTES"
    try:
        return _FROM_NUMPY[dtype]
    except KeyError:
        raise ValueError(f"numpy dtype {dtype} has no KServe datatype") from None


def to_numpy_le(datatype: str) -> np.dtype:
    """The little-endian numpy dtype of a datatype's raw (binary) encoding; KeyError if unknown."""
    return _TO_NUMPY_LE[datatype]


def element_size(datatype: str) -> int:
    """Bytes per element in the raw (binary) encoding; 0 for BYTES (length-prefixed)."""
    return 0 if datatype == "BYTES" else _TO_NUMPY[datatype].itemsize
