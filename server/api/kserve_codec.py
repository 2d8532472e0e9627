"""KServe v2 (Open Inference Protocol) messages <-> transport-neutral tensors.

Inputs come either as raw_input_contents (one bytes entry per input, in order) or in the typed
`contents` fields; outputs always go back as raw_output_contents.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from tensorgate.kserve import grpc_service_pb2 as kpb
from tensorgate.server.api import codec as v1_codec
from tensorgate.server.datatypes import NUMPY_BY_DATATYPE, to_wire
from tensorgate.server.errors import InvalidArgument
from tensorgate.server.tensors import TensorInput, format_shape

# datatype -> the typed contents field that carries it
_CONTENTS_FIELD = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
}

# datatype -> model_config.proto DataType
CONFIG_DATATYPE = {name: getattr(kpb, f"TYPE_{name}") for name in NUMPY_BY_DATATYPE}

Input = kpb.ModelInferRequest.InferInputTensor


def tensor_inputs(request: kpb.ModelInferRequest) -> list[TensorInput]:
    v1_codec.check_tensor_count(len(request.inputs))
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise InvalidArgument(
            f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs; "
            "give one per input, in the order of inputs"
        )
    tensors = []
    for index, tensor in enumerate(request.inputs):
        if raw:
            if tensor.HasField("contents") and tensor.contents.ByteSize():
                raise InvalidArgument(
                    f"input '{tensor.name}' has both contents and raw_input_contents; use one"
                )
            data: bytes | memoryview = raw[index]
        else:
            data = _typed_contents(tensor)
        tensors.append(TensorInput(tensor.name, tensor.datatype, tensor.shape, data))
    return tensors


def _typed_contents(tensor: Input) -> bytes | memoryview:
    """The typed contents of an input as raw bytes of its datatype (a view of one converted
    array: no second copy of what may be tens of megabytes)."""
    field = _CONTENTS_FIELD.get(tensor.datatype)
    if field is None:
        if tensor.datatype == "FP16":
            raise InvalidArgument(f"input '{tensor.name}': FP16 data must use raw_input_contents")
        return b""  # the datatype check names what is wrong
    values = getattr(tensor.contents, field)
    dtype = NUMPY_BY_DATATYPE[tensor.datatype]
    expected = 1
    for dim in tensor.shape:
        expected *= max(dim, 0)
    if len(values) != expected:
        raise InvalidArgument(
            f"input '{tensor.name}' has {len(values)} values in contents.{field}; shape "
            f"{format_shape(tensor.shape)} needs {expected}"
        )
    if dtype.kind in "iu":
        # Exact: uint64 values through uint64 (float64 would round above 2**53), the others
        # through int64, then checked against the datatype's range.
        wide = np.uint64 if dtype.kind == "u" else np.int64
        array = np.asarray(values, dtype=wide)
        info = np.iinfo(dtype)
        if array.size and (array.min() < info.min or array.max() > info.max):
            raise InvalidArgument(
                f"input '{tensor.name}' has values outside the range of {tensor.datatype}"
            )
        return _raw(array.astype(dtype, copy=False))
    return _raw(np.asarray(values, dtype=dtype))


def _raw(array: np.ndarray) -> memoryview:
    return np.ascontiguousarray(array).reshape(-1).view(np.uint8).data


def parameters(params: Mapping[str, kpb.InferParameter]) -> dict[str, Any]:
    return v1_codec.parameters(params, oneof="parameter_choice")


def infer_response(
    model: str,
    request_id: str,
    outputs: Mapping[str, np.ndarray],
    version: str = "1",
    into: kpb.ModelInferResponse | None = None,
) -> kpb.ModelInferResponse:
    """The response; `into`: a ModelInferResponse field of a larger message (a stream's), filled
    in place (no copy of the outputs)."""
    response = kpb.ModelInferResponse() if into is None else into
    response.model_name = model
    response.model_version = version
    response.id = request_id
    for name, array in outputs.items():
        datatype, contents = to_wire(array)
        response.outputs.add(name=name, datatype=datatype, shape=array.shape)
        response.raw_output_contents.append(contents)
    return response
