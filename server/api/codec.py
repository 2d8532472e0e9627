"""tensorgate.v1 messages <-> transport-neutral tensors."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from tensorgate.server.datatypes import to_wire
from tensorgate.server.errors import InvalidArgument
from tensorgate.server.limits import MAX_TENSORS
from tensorgate.server.tensors import TensorInput
from tensorgate.v1 import inference_pb2 as pb


def tensor_inputs(tensors: Sequence[pb.Tensor]) -> list[TensorInput]:
    check_tensor_count(len(tensors))
    return [TensorInput(t.name, t.datatype, t.shape, t.contents) for t in tensors]


def check_tensor_count(count: int) -> None:
    """Refuses a request naming more tensors than any model takes, before decoding any."""
    if count > MAX_TENSORS:
        raise InvalidArgument(f"request has {count} input tensors; at most {MAX_TENSORS}")


def add_tensors(into: Any, arrays: Mapping[str, np.ndarray]) -> None:
    """Appends the arrays to a repeated Tensor field, built in place (a message passed to a
    constructor or appended would be copied whole, contents included)."""
    add = into.add
    for name, array in arrays.items():
        datatype, contents = to_wire(array)
        add(name=name, datatype=datatype, shape=array.shape, contents=contents)


def parameters(params: Mapping[str, Any], oneof: str = "choice") -> dict[str, Any]:
    """A map of parameter messages (a oneof of bool/int/string/double) as plain values."""
    return {
        key: getattr(value, value.WhichOneof(oneof) or "string_param")
        for key, value in params.items()
    }
