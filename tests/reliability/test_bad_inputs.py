# ruff: noqa: E501  (the case table keeps one case per line)
"""Bad input of every kind is refused before it is queued, with the documented status code and a
message naming what was wrong, and the server keeps serving after each."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
import numpy as np
import pytest

from tensorgate.client import TensorgateClient
from tensorgate.server.errors import InvalidArgument
from tensorgate.server.tensors import TensorInput, TensorSpec, decode_inputs
from tensorgate.v1 import inference_pb2 as pb
from tests.harness import ServerThread

INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND

ROW = np.zeros((1, 256), np.float32)


def _tensor(name: str, array: np.ndarray, datatype: str | None = None) -> pb.Tensor:
    names = {"f": "FP32", "i": "INT64", "u": "UINT8"}
    return pb.Tensor(
        name=name,
        datatype=datatype or names[array.dtype.kind],
        shape=array.shape,
        contents=array.tobytes(),
    )


def _raw(name: str, datatype: str, shape: list[int], nbytes: int) -> pb.Tensor:
    return pb.Tensor(name=name, datatype=datatype, shape=shape, contents=b"\0" * nbytes)


def _mlp(*tensors: pb.Tensor, **fields: Any) -> pb.PredictRequest:
    fields.setdefault("model", "mlp")
    return pb.PredictRequest(inputs=tensors, **fields)


def _pair(a: np.ndarray, b: np.ndarray, **kinds: str) -> pb.PredictRequest:
    return pb.PredictRequest(
        model="pair", inputs=[_tensor("a", a, kinds.get("a")), _tensor("b", b, kinds.get("b"))]
    )


A = np.zeros((1, 4), np.float32)
B = np.zeros((1, 4), np.int64)

# name -> (method, request factory, code, what the message must contain)
Case = tuple[str, Callable[[], Any], grpc.StatusCode, str]
CASES: dict[str, Case] = {
    "unknown model": ("Predict", lambda: _mlp(_tensor("input", ROW), model="nope"), NOT_FOUND, "model 'nope' is not served; served models: mlp"),
    "empty model name": ("Predict", lambda: _mlp(_tensor("input", ROW), model=""), NOT_FOUND, "model '' is not served"),
    "unknown input": ("Predict", lambda: _mlp(_tensor("inputs", ROW)), INVALID, "model 'mlp' has no input 'inputs'; its inputs are: input"),
    "unnamed input": ("Predict", lambda: _mlp(_tensor("", ROW)), INVALID, "model 'mlp' has no input ''"),
    "no inputs at all": ("Predict", lambda: _mlp(), INVALID, "missing input 'input' (FP32 [-1,256])"),
    "missing one of two inputs": ("Predict", lambda: pb.PredictRequest(model="pair", inputs=[_tensor("a", A)]), INVALID, "missing input 'b' (INT64 [-1,4])"),
    "duplicate input": ("Predict", lambda: _mlp(_tensor("input", ROW), _tensor("input", ROW)), INVALID, "input 'input' is given more than once"),
    "FP64 for FP32": ("Predict", lambda: _mlp(_tensor("input", ROW.astype(np.float64), "FP64")), INVALID, "input 'input' has datatype FP64, model expects FP32"),
    "INT32 for FP32": ("Predict", lambda: _mlp(_tensor("input", ROW.astype(np.int32), "INT32")), INVALID, "has datatype INT32, model expects FP32"),
    "UINT8 for INT64": ("Predict", lambda: _pair(A, B.astype(np.uint8)), INVALID, "input 'b' has datatype UINT8, model expects INT64"),
    "unknown datatype": ("Predict", lambda: _mlp(_tensor("input", ROW, "FP33")), INVALID, "input 'input' has unsupported datatype 'FP33'"),
    "BYTES datatype": ("Predict", lambda: _mlp(_raw("input", "BYTES", [1, 256], 256)), INVALID, "unsupported datatype 'BYTES'"),
    "BF16 datatype": ("Predict", lambda: _mlp(_raw("input", "BF16", [1, 256], 512)), INVALID, "unsupported datatype 'BF16'"),
    "rank too low": ("Predict", lambda: _mlp(_tensor("input", np.zeros(256, np.float32))), INVALID, "input 'input' has shape [256], model expects [-1,256]"),
    "rank too high": ("Predict", lambda: _mlp(_tensor("input", np.zeros((1, 1, 256), np.float32))), INVALID, "has shape [1,1,256], model expects [-1,256]"),
    "wrong feature size": ("Predict", lambda: _mlp(_tensor("input", np.zeros((1, 255), np.float32))), INVALID, "has shape [1,255], model expects [-1,256]"),
    "negative dimension": ("Predict", lambda: _mlp(_raw("input", "FP32", [-1, 256], 0)), INVALID, "shape [-1,256] with a negative dimension"),
    "empty batch": ("Predict", lambda: _mlp(_raw("input", "FP32", [0, 256], 0)), INVALID, "input 'input' has an empty batch"),
    "contents shorter than shape": ("Predict", lambda: _mlp(_raw("input", "FP32", [1, 256], 1020)), INVALID, "has 1020 bytes of contents; shape [1,256] of FP32 needs 1024"),
    "contents longer than shape": ("Predict", lambda: _mlp(_raw("input", "FP32", [1, 256], 2048)), INVALID, "has 2048 bytes of contents; shape [1,256] of FP32 needs 1024"),
    "shape without contents": ("Predict", lambda: _mlp(_raw("input", "FP32", [2, 256], 0)), INVALID, "has 0 bytes of contents; shape [2,256] of FP32 needs 2048"),
    "shape product overflows int64": ("Predict", lambda: _mlp(_raw("input", "FP32", [2**62, 256], 1024)), INVALID, "shape [4611686018427387904,256] of FP32 needs"),
    "batch over max_batch_size": ("Predict", lambda: _mlp(_tensor("input", np.zeros((65, 256), np.float32))), INVALID, "batch of 65 rows exceeds model 'mlp' max_batch_size 64; split the request"),
    "huge batch": ("Predict", lambda: _mlp(_tensor("input", np.zeros((10_000, 256), np.float32))), INVALID, "batch of 10000 rows exceeds model 'mlp' max_batch_size 64"),
    "inputs disagree on batch": ("Predict", lambda: _pair(np.zeros((2, 4), np.float32), np.zeros((3, 4), np.int64)), INVALID, "input 'b' has batch size 3 but input 'a' has 2"),
    "unknown requested output": ("Predict", lambda: _mlp(_tensor("input", ROW), requested_outputs=["scores"]), INVALID, "model 'mlp' has no output 'scores'; its outputs are: logits, probabilities"),
    "submit without a request": ("Submit", lambda: pb.SubmitRequest(), NOT_FOUND, "model '' is not served"),
    "submit with a bad shape": ("Submit", lambda: pb.SubmitRequest(request=_mlp(_tensor("input", np.zeros((1, 3), np.float32)))), INVALID, "has shape [1,3], model expects [-1,256]"),
    "submit with short contents": ("Submit", lambda: pb.SubmitRequest(request=_mlp(_raw("input", "FP32", [1, 256], 4))), INVALID, "has 4 bytes of contents"),
    "malformed job id": ("GetResult", lambda: pb.GetResultRequest(job_id="not-a-job"), INVALID, "job id 'not-a-job' is malformed: expected 32 hex digits"),
    "empty job id": ("GetResult", lambda: pb.GetResultRequest(job_id=""), INVALID, "job id '' is malformed"),
    "upper-case job id": ("GetResult", lambda: pb.GetResultRequest(job_id="A" * 32), INVALID, "is malformed: expected 32 hex digits"),
    "very long job id": ("GetResult", lambda: pb.GetResultRequest(job_id="f" * 5000), INVALID, "job id '" + "f" * 64 + "' is malformed"),
    "unknown job id": ("GetResult", lambda: pb.GetResultRequest(job_id="0" * 32), NOT_FOUND, "job '" + "0" * 32 + "' is unknown or its result has expired"),
    "cancel malformed job id": ("CancelJob", lambda: pb.CancelJobRequest(job_id="xyz"), INVALID, "job id 'xyz' is malformed"),
    "cancel unknown job id": ("CancelJob", lambda: pb.CancelJobRequest(job_id="1" * 32), NOT_FOUND, "is unknown or its result has expired"),
    "metadata of unknown model": ("GetModelMetadata", lambda: pb.GetModelMetadataRequest(model="nope"), NOT_FOUND, "model 'nope' is not served"),
    "list too many jobs": ("ListJobs", lambda: pb.ListJobsRequest(limit=5000), INVALID, "limit must be between 0 and 1000"),
    "list an unknown job status": ("ListJobs", lambda: pb.ListJobsRequest(status=99), INVALID, "status 99 is not a job status; use one of"),
    "300 input tensors": ("Predict", lambda: _mlp(*[_tensor(f"i{n}", ROW) for n in range(300)]), INVALID, "request has 300 input tensors; at most 256"),
    "a million-dimension shape": ("Predict", lambda: _mlp(_raw("input", "FP32", [1] * 1_000_000, 4)), INVALID, "has shape [1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,…(1000000 dims)], model expects [-1,256]"),
    "a 1 MB input name": ("Predict", lambda: _mlp(_tensor("x" * 1_000_000, ROW)), INVALID, "has no input '" + "x" * 200 + "…(1000000 chars)'"),
    "a 1 MB model name": ("Predict", lambda: _mlp(_tensor("input", ROW), model="m" * 1_000_000), INVALID, "model name has 1000000 characters; at most 256"),
    "a 1 MB request id": ("Predict", lambda: _mlp(_tensor("input", ROW), id="r" * 1_000_000), INVALID, "request id has 1000000 characters; at most 256"),
    "a 4 MB parameter": ("Submit", lambda: pb.SubmitRequest(request=_mlp(_tensor("input", ROW), parameters={"p": pb.Parameter(string_param="v" * 4_000_000)})), INVALID, "parameter 'p' is too long"),
    "too many parameters": ("Predict", lambda: _mlp(_tensor("input", ROW), parameters={f"p{n}": pb.Parameter(bool_param=True) for n in range(65)}), INVALID, "request has 65 parameters; at most 64"),
    "a 1 MB idempotency key": ("Submit", lambda: pb.SubmitRequest(request=_mlp(_tensor("input", ROW)), idempotency_key="k" * 1_000_000), INVALID, "idempotency key has 1000000 characters; at most 256"),
}  # fmt: skip


def test_there_are_at_least_thirty_kinds_of_bad_input() -> None:
    assert len(CASES) >= 30


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_gets_its_code_and_a_precise_message(client: TensorgateClient, case: str) -> None:
    method, make, code, message = CASES[case]
    with pytest.raises(grpc.RpcError) as refused:
        getattr(client._stub, method)(make(), timeout=10)
    assert refused.value.code() == code
    assert message in refused.value.details()
    assert client.predict("mlp", {"input": ROW})["logits"].shape == (1, 16)


def test_nan_and_inf_are_valid_floats_and_flow_through(client: TensorgateClient) -> None:
    x = np.zeros((2, 256), np.float32)
    x[0, 0] = np.nan
    x[1, 0] = np.inf
    out = client.predict("mlp", {"input": x})
    assert out["logits"].shape == (2, 16)
    assert np.isnan(out["logits"][0]).any()  # the model's arithmetic, not a refusal


def test_bytes_that_are_not_a_message_get_invalid_argument_on_both_front_ends(
    client: TensorgateClient, server: ServerThread
) -> None:
    channel = client._channel
    for method, message in (
        ("/tensorgate.v1.Inference/Predict", "tensorgate.v1.PredictRequest"),
        ("/inference.GRPCInferenceService/ModelInfer", "inference.ModelInferRequest"),
    ):
        call = channel.unary_unary(method)  # bytes in, bytes out: no serializer
        with pytest.raises(grpc.RpcError) as refused:
            call(b"\xff\xff\xff", timeout=10)
        assert refused.value.code() == INVALID
        assert f"the request is not a valid {message} message" in refused.value.details()
    # In a stream the bad message fails alone and the stream goes on.
    stream = channel.stream_stream(
        "/tensorgate.v1.Inference/StreamPredict",
        response_deserializer=pb.StreamPredictResponse.FromString,
    )
    good = _mlp(_tensor("input", ROW), id="good").SerializeToString()
    answers = list(stream(iter([b"\xff\xff\xff", good]), timeout=10))
    assert len(answers) == 2
    failed = next(a for a in answers if a.HasField("error"))
    assert failed.error.code == INVALID.value[0]
    assert "not a valid tensorgate.v1.PredictRequest" in failed.error.message
    assert next(a for a in answers if a.id == "good").response.outputs
    assert client.predict("mlp", {"input": ROW})["logits"].shape == (1, 16)


def test_a_request_naming_a_million_tensors_is_refused_cheaply(
    client: TensorgateClient,
) -> None:
    # ~20 MB, serialized by hand (field 3 repeated) so the test builds no million objects.
    one = pb.Tensor(name="input", datatype="FP32", shape=[1, 256]).SerializeToString()
    entry = bytes([3 << 3 | 2]) + _varint(len(one)) + one
    request = bytes([1 << 3 | 2, 3]) + b"mlp" + entry * 1_000_000  # model = "mlp"
    call = client._channel.unary_unary("/tensorgate.v1.Inference/Predict")
    with pytest.raises(grpc.RpcError) as refused:
        call(request, timeout=30)
    assert refused.value.code() == INVALID
    assert "request has 1000000 input tensors; at most 256" in refused.value.details()
    assert client.predict("mlp", {"input": ROW})["logits"].shape == (1, 16)


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def test_bool_inputs_must_be_zeros_and_ones() -> None:
    spec = TensorSpec("flag", "BOOL", (-1, 2))
    ok, _ = decode_inputs("m", [spec], [TensorInput("flag", "BOOL", [1, 2], b"\x00\x01")], 8)
    assert ok["flag"].tolist() == [[False, True]]
    with pytest.raises(InvalidArgument, match="is BOOL but has bytes other than 0 and 1"):
        decode_inputs("m", [spec], [TensorInput("flag", "BOOL", [1, 2], b"\x00\x02")], 8)
