"""KServe v2 datatype names and their numpy equivalents (little-endian)."""

from __future__ import annotations

import numpy as np

# Element types that travel as raw bytes. BYTES (variable-length strings) and BF16 (no numpy
# type) are not served.
NUMPY_BY_DATATYPE: dict[str, np.dtype] = {
    name: np.dtype(code).newbyteorder("<")
    for name, code in {
        "BOOL": "?",
        "UINT8": "u1",
        "UINT16": "u2",
        "UINT32": "u4",
        "UINT64": "u8",
        "INT8": "i1",
        "INT16": "i2",
        "INT32": "i4",
        "INT64": "i8",
        "FP16": "f2",
        "FP32": "f4",
        "FP64": "f8",
    }.items()
}

DATATYPE_BY_NUMPY: dict[np.dtype, str] = {
    dtype.newbyteorder("="): name for name, dtype in NUMPY_BY_DATATYPE.items()
}


def to_wire(array: np.ndarray) -> tuple[str, bytes]:
    """An output array as (datatype, raw little-endian row-major bytes), for any front end."""
    if array.dtype.byteorder == ">":
        array = array.astype(array.dtype.newbyteorder("<"))
    return datatype_of(array.dtype), array.tobytes()


def datatype_of(dtype: np.dtype) -> str:
    """The KServe name of a numpy dtype; ValueError when it has none."""
    known = DATATYPE_BY_NUMPY.get(dtype)  # native byte order: the common case, no new dtype
    if known is not None:
        return known
    try:
        return DATATYPE_BY_NUMPY[dtype.newbyteorder("=")]
    except KeyError:
        raise ValueError(f"numpy dtype {dtype} has no tensor datatype") from None
