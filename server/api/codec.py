"""tensorgate.v1 messages <-> transport-neutral tensors."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from server.datatypes import datatype_of
from server.tensors import TensorInput
from tensorgate.v1 import inference_pb2 as pb


def tensor_inputs(tensors: Iterable[pb.Tensor]) -> list[TensorInput]:
    return [TensorInput(t.name, t.datatype, t.shape, t.contents) for t in tensors]


def encode_tensors(arrays: Mapping[str, np.ndarray]) -> list[pb.Tensor]:
    tensors = []
    for name, array in arrays.items():
        if array.dtype.byteorder == ">":
            array = array.astype(array.dtype.newbyteorder("<"))
        tensors.append(
            pb.Tensor(
                name=name,
                datatype=datatype_of(array.dtype),
                shape=array.shape,
                contents=array.tobytes(),
            )
        )
    return tensors


def parameters(params: Mapping[str, pb.Parameter]) -> dict[str, Any]:
    return {
        key: getattr(value, value.WhichOneof("choice") or "string_param")
        for key, value in params.items()
    }
