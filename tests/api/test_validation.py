"""Bad requests are refused before they are queued, with a code and a message naming the problem;
the server keeps serving afterwards."""

from __future__ import annotations

import time
from collections.abc import Callable

import grpc
import numpy as np
import pytest
from tensorgate.v1 import inference_pb2 as pb

from client import TensorgateClient


def _tensor(name: str, array: np.ndarray, datatype: str | None = None) -> pb.Tensor:
    dtype_names = {"f": "FP32", "i": "INT64"}
    return pb.Tensor(
        name=name,
        datatype=datatype or dtype_names[array.dtype.kind],
        shape=array.shape,
        contents=array.tobytes(),
    )


def _mlp(*tensors: pb.Tensor, **fields: object) -> pb.PredictRequest:
    fields.setdefault("model", "mlp")
    return pb.PredictRequest(inputs=tensors, **fields)


ROW = np.zeros((1, 256), np.float32)

CASES: dict[str, tuple[Callable[[], pb.PredictRequest], grpc.StatusCode, str]] = {
    "unknown model": (
        lambda: pb.PredictRequest(model="nope", inputs=[_tensor("input", ROW)]),
        grpc.StatusCode.NOT_FOUND,
        "model 'nope' is not served",
    ),
    "unknown input": (
        lambda: _mlp(_tensor("inputs", ROW)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "model 'mlp' has no input 'inputs'; its inputs are: input",
    ),
    "no inputs": (
        lambda: _mlp(),
        grpc.StatusCode.INVALID_ARGUMENT,
        "missing input 'input' (FP32 [-1,256])",
    ),
    "missing one of two inputs": (
        lambda: pb.PredictRequest(
            model="pair", inputs=[_tensor("a", np.zeros((1, 4), np.float32))]
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "missing input 'b' (INT64 [-1,4])",
    ),
    "duplicate input": (
        lambda: _mlp(_tensor("input", ROW), _tensor("input", ROW)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "input 'input' is given more than once",
    ),
    "wrong datatype": (
        lambda: _mlp(_tensor("input", np.zeros((1, 256), np.float64), "FP64")),
        grpc.StatusCode.INVALID_ARGUMENT,
        "input 'input' has datatype FP64, model expects FP32",
    ),
    "unknown datatype": (
        lambda: _mlp(_tensor("input", ROW, "FP33")),
        grpc.StatusCode.INVALID_ARGUMENT,
        "unsupported datatype 'FP33'",
    ),
    "wrong rank": (
        lambda: _mlp(_tensor("input", np.zeros((256,), np.float32))),
        grpc.StatusCode.INVALID_ARGUMENT,
        "input 'input' has shape [256], model expects [-1,256]",
    ),
    "wrong feature size": (
        lambda: _mlp(_tensor("input", np.zeros((1, 255), np.float32))),
        grpc.StatusCode.INVALID_ARGUMENT,
        "has shape [1,255], model expects [-1,256]",
    ),
    "negative dimension": (
        lambda: _mlp(pb.Tensor(name="input", datatype="FP32", shape=[-1, 256], contents=b"")),
        grpc.StatusCode.INVALID_ARGUMENT,
        "shape [-1,256] with a negative dimension",
    ),
    "empty batch": (
        lambda: _mlp(pb.Tensor(name="input", datatype="FP32", shape=[0, 256], contents=b"")),
        grpc.StatusCode.INVALID_ARGUMENT,
        "empty batch",
    ),
    "too few bytes": (
        lambda: _mlp(
            pb.Tensor(name="input", datatype="FP32", shape=[1, 256], contents=b"\0" * 1020)
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "has 1020 bytes of contents; shape [1,256] of FP32 needs 1024",
    ),
    "too many bytes": (
        lambda: _mlp(
            pb.Tensor(name="input", datatype="FP32", shape=[1, 256], contents=b"\0" * 2048)
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "has 2048 bytes of contents",
    ),
    "shape product overflows int64": (
        lambda: _mlp(
            pb.Tensor(name="input", datatype="FP32", shape=[2**62, 256], contents=ROW.tobytes())
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "bytes of contents; shape [4611686018427387904,256] of FP32 needs",
    ),
    "batch over max_batch_size": (
        lambda: _mlp(_tensor("input", np.zeros((65, 256), np.float32))),
        grpc.StatusCode.INVALID_ARGUMENT,
        "batch of 65 rows exceeds model 'mlp' max_batch_size 64",
    ),
    "inputs disagree on batch size": (
        lambda: pb.PredictRequest(
            model="pair",
            inputs=[
                _tensor("a", np.zeros((2, 4), np.float32)),
                _tensor("b", np.zeros((3, 4), np.int64)),
            ],
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "input 'b' has batch size 3 but input 'a' has 2",
    ),
    "unknown requested output": (
        lambda: _mlp(_tensor("input", ROW), requested_outputs=["scores"]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "model 'mlp' has no output 'scores'; its outputs are: logits, probabilities",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_request_is_refused_with_a_precise_status(client: TensorgateClient, case: str) -> None:
    make, code, message = CASES[case]
    with pytest.raises(grpc.RpcError) as refused:
        client._stub.Predict(make(), timeout=10)
    assert refused.value.code() == code
    assert message in refused.value.details()
    # The server keeps serving.
    assert client.predict("mlp", {"input": ROW})["logits"].shape == (1, 16)


@pytest.mark.parametrize("case", ["unknown model", "wrong feature size", "too few bytes"])
def test_bad_job_is_refused_at_submit(client: TensorgateClient, case: str) -> None:
    make, code, message = CASES[case]
    with pytest.raises(grpc.RpcError) as refused:
        client._stub.Submit(pb.SubmitRequest(request=make()), timeout=10)
    assert refused.value.code() == code and message in refused.value.details()


def test_a_full_queue_refuses_with_resource_exhausted_and_a_retry_hint(
    client: TensorgateClient,
) -> None:
    """mlp_tiny_queue holds 2 requests during its 2 s window; the third is refused."""
    futures = [
        client._stub.Predict.future(_mlp(_tensor("input", ROW), model="mlp_tiny_queue"), timeout=20)
        for _ in range(2)
    ]
    time.sleep(0.3)  # both are queued, waiting for the window
    with pytest.raises(grpc.RpcError) as refused:
        client._stub.Predict(_mlp(_tensor("input", ROW), model="mlp_tiny_queue"), timeout=10)
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "model 'mlp_tiny_queue' queue is full (2 requests waiting)" in refused.value.details()
    assert dict(refused.value.trailing_metadata())["retry-after-ms"] == "100"
    assert all(len(f.result().outputs) == 2 for f in futures)  # nothing accepted was lost
