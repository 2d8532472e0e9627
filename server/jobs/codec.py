"""Job payloads as bytes, for stores that keep jobs outside this process (Redis).

A blob is a 4-byte little-endian header length, a JSON header describing the tensors, then each
tensor's raw bytes in header order: the inputs go in as the caller sent them and are validated
again by whichever replica runs the job; outputs come back as numpy arrays of the same dtype and
shape. No pickle: a shared store is not trusted to hold code.
"""

from __future__ import annotations

import json
import struct
from typing import Any

import numpy as np

from tensorgate.server import errors
from tensorgate.server.errors import Internal, TensorgateError
from tensorgate.server.records import Request
from tensorgate.server.tensors import Outputs, TensorInput

_LENGTH = struct.Struct("<I")
_header = json.JSONEncoder(separators=(",", ":"), default=str).encode

_ERRORS: dict[str, type[TensorgateError]] = {
    cls.code: cls
    for cls in (
        errors.InvalidArgument,
        errors.NotFound,
        errors.ResourceExhausted,
        errors.DeadlineExceeded,
        errors.Cancelled,
        errors.Unavailable,
        errors.Internal,
    )
}


def encode_request(request: Request) -> bytes:
    """The model's inputs, requested outputs, id, parameters and priority of a job."""
    header = {
        "id": request.id,
        "outputs": list(request.requested_outputs),
        "parameters": dict(request.parameters),
        "priority": request.priority,
        "version": request.model_version,
        "tensors": [[t.name, t.datatype, list(t.shape), len(t.contents)] for t in request.inputs],
    }
    return _pack(header, [t.contents for t in request.inputs])


def decode_request(model: str, tenant: str, blob: bytes) -> Request:
    header, body = _unpack(blob)
    inputs, offset = [], 0
    for name, datatype, shape, size in header["tensors"]:
        inputs.append(TensorInput(name, datatype, shape, body[offset : offset + size]))
        offset += size
    return Request(
        model=model,
        inputs=inputs,
        requested_outputs=tuple(header["outputs"]),
        id=header["id"],
        parameters=header["parameters"],
        priority=header["priority"],
        tenant=tenant,
        model_version=header.get("version", ""),
    )


def encode_outputs(outputs: Outputs) -> bytes:
    arrays = [np.ascontiguousarray(array) for array in outputs.values()]
    header = {
        "tensors": [
            [name, array.dtype.str, list(array.shape)]
            for name, array in zip(outputs, arrays, strict=True)
        ]
    }
    return _pack(header, [array.tobytes() for array in arrays])


def decode_outputs(blob: bytes) -> Outputs:
    header, body = _unpack(blob)
    outputs: Outputs = {}
    offset = 0
    for name, dtype_str, shape in header["tensors"]:
        dtype = np.dtype(dtype_str)
        size = dtype.itemsize * int(np.prod(shape, dtype=np.int64))
        outputs[name] = np.frombuffer(body, dtype, count=size // dtype.itemsize, offset=offset)
        outputs[name] = outputs[name].reshape(shape)
        offset += size
    return outputs


def error_from(code: str, message: str) -> TensorgateError:
    """The domain error a stored (code, message) pair stands for."""
    return _ERRORS.get(code, Internal)(message)


def _pack(header: dict[str, Any], parts: list[bytes | memoryview]) -> bytes:
    encoded = _header(header).encode()
    return b"".join([_LENGTH.pack(len(encoded)), encoded, *parts])


def _unpack(blob: bytes) -> tuple[dict[str, Any], memoryview]:
    view = memoryview(blob)
    (length,) = _LENGTH.unpack_from(view)
    end = _LENGTH.size + length
    return json.loads(bytes(view[_LENGTH.size : end])), view[end:]
