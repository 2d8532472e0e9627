"""tensorgate.v1 messages <-> transport-neutral tensors."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from server.datatypes import to_wire
from server.tensors import TensorInput
from tensorgate.v1 import inference_pb2 as pb


def tensor_inputs(tensors: Iterable[pb.Tensor]) -> list[TensorInput]:
    return [TensorInput(t.name, t.datatype, t.shape, t.contents) for t in tensors]


def encode_tensors(arrays: Mapping[str, np.ndarray]) -> list[pb.Tensor]:
    tensors = []
    for name, array in arrays.items():
        datatype, contents = to_wire(array)
        tensors.append(
            pb.Tensor(name=name, datatype=datatype, shape=array.shape, contents=contents)
        )
    return tensors


def parameters(params: Mapping[str, Any], oneof: str = "choice") -> dict[str, Any]:
    """A map of parameter messages (a oneof of bool/int/string/double) as plain values."""
    return {
        key: getattr(value, value.WhichOneof(oneof) or "string_param")
        for key, value in params.items()
    }
