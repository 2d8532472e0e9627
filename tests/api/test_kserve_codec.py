"""KServe typed contents become exact raw bytes."""

from __future__ import annotations

import numpy as np
import pytest

from tensorgate.kserve import grpc_service_pb2 as kpb
from tensorgate.server.api import kserve_codec
from tensorgate.server.errors import InvalidArgument


def _request(datatype: str, field: str, values: list[int]) -> kpb.ModelInferRequest:
    request = kpb.ModelInferRequest(model_name="m")
    tensor = request.inputs.add(name="x", datatype=datatype, shape=[len(values)])
    getattr(tensor.contents, field).extend(values)
    return request


def test_uint64_contents_keep_every_bit() -> None:
    values = [2**64 - 1, 2**53 + 1, 0]
    [tensor] = kserve_codec.tensor_inputs(_request("UINT64", "uint64_contents", values))
    assert np.frombuffer(tensor.contents, np.uint64).tolist() == values


def test_int8_contents_out_of_range_are_refused() -> None:
    with pytest.raises(InvalidArgument, match="outside the range of INT8"):
        kserve_codec.tensor_inputs(_request("INT8", "int_contents", [127, 128]))
