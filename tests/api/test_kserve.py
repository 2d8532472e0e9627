"""The KServe v2 / Open Inference Protocol front end, driven by the real `tritonclient` (sync,
async_infer, streaming, and the asyncio client), plus the typed-contents input path through our
own stubs of the same protocol."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import grpc
import numpy as np
import pytest

from tensorgate.kserve import grpc_service_pb2 as kpb
from tensorgate.kserve import grpc_service_pb2_grpc as kpb_grpc
from tests.harness import MlpReference, ServerThread

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def session(triton_python: Path, server: ServerThread) -> dict:  # type: ignore[type-arg]
    result = subprocess.run(
        [
            str(triton_python),
            str(ROOT / "tests" / "api" / "tritonclient_session.py"),
            server.target,
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)  # type: ignore[no-any-return]


def _close(got: object, x: list, reference: MlpReference) -> None:  # type: ignore[type-arg]
    np.testing.assert_allclose(
        np.array(got), reference.logits(np.array(x, np.float32)), rtol=1e-4, atol=1e-4
    )


def test_health_and_metadata_through_tritonclient(session: dict) -> None:  # type: ignore[type-arg]
    assert session["live"] and session["ready"] and session["model_ready"]
    assert session["server_metadata"]["name"] == "tensorgate"
    meta = session["model_metadata"]
    assert meta["platform"] == "onnxruntime_onnx"
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": ["-1", "256"]}]
    config = session["model_config"]["config"]
    assert config["max_batch_size"] == 64
    assert config["input"] == [{"name": "input", "data_type": "TYPE_FP32", "dims": ["256"]}]
    assert config["instance_group"][0]["count"] == 2
    assert config["dynamic_batching"]["max_queue_delay_microseconds"] == "2000"


def test_infer_with_numpy_inputs(session: dict, reference: MlpReference) -> None:  # type: ignore[type-arg]
    x = session["xs"][0]
    assert session["infer"]["id"] == "first"
    _close(session["infer"]["logits"], x, reference)
    np.testing.assert_allclose(
        session["infer"]["probabilities"],
        reference.probabilities(np.array(x, np.float32)),
        atol=1e-6,
    )
    assert session["requested_only"]["names"] == ["probabilities"]


def test_async_infer_and_streams_with_many_in_flight(
    session: dict,  # type: ignore[type-arg]
    reference: MlpReference,
) -> None:
    xs = session["xs"]
    for i, logits in session["async_infer"].items():
        _close(logits, xs[int(i)], reference)
    results = session["stream"]["results"]
    assert sorted(results) == sorted(f"s{i}" for i in range(50))
    for request_id, logits in results.items():
        _close(logits, xs[int(request_id[1:])], reference)
    aio = session["aio"]
    assert aio["live"] and len(aio["infer"]) == 20 and len(aio["stream"]) == 40
    for request_id, logits in aio["infer"].items():
        _close(logits, xs[int(request_id)], reference)
    for request_id, logits in aio["stream"].items():
        _close(logits, xs[int(request_id[1:])], reference)


def test_invalid_requests_raise_what_tritonclient_raises(session: dict) -> None:  # type: ignore[type-arg]
    assert session["bad_shape"] == {
        "status": "StatusCode.INVALID_ARGUMENT",
        "message": "input 'input' has shape [1,3], model expects [-1,256] (-1 = any size)",
    }
    assert session["unknown_model"]["status"] == "StatusCode.NOT_FOUND"
    # On a stream the error comes back for that request and the stream goes on.
    assert session["stream"]["errors"] == [
        "INVALID_ARGUMENT: input 'input' has shape [1,3], model expects [-1,256] (-1 = any size)"
    ]


def test_statistics_count_what_ran(session: dict) -> None:  # type: ignore[type-arg]
    [stats] = session["statistics"]["model_stats"]
    assert stats["name"] == "mlp"
    assert int(stats["inference_count"]) >= 100 and int(stats["execution_count"]) >= 1
    success = stats["inference_stats"]["success"]
    assert int(success["count"]) >= 62 and int(success["ns"]) > 0
    assert sum(int(b["compute_infer"]["count"]) for b in stats["batch_stats"]) == int(
        stats["execution_count"]
    )


# --- the typed `contents` path, through our own stubs of the same protocol -------------------


@pytest.fixture
def kserve(server: ServerThread) -> kpb_grpc.GRPCInferenceServiceStub:
    channel = grpc.insecure_channel(server.target)
    yield kpb_grpc.GRPCInferenceServiceStub(channel)
    channel.close()


def _typed(
    name: str, datatype: str, shape: list[int], **contents: list
) -> kpb.ModelInferRequest.InferInputTensor:  # type: ignore[type-arg]
    return kpb.ModelInferRequest.InferInputTensor(
        name=name, datatype=datatype, shape=shape, contents=kpb.InferTensorContents(**contents)
    )


def test_typed_contents_are_accepted(kserve: kpb_grpc.GRPCInferenceServiceStub) -> None:
    request = kpb.ModelInferRequest(
        model_name="pair",
        id="typed",
        inputs=[
            _typed("a", "FP32", [1, 4], fp32_contents=[1, 2, 3, 4]),
            _typed("b", "INT64", [1, 4], int64_contents=[10, 20, 30, 40]),
        ],
    )
    response = kserve.ModelInfer(request, timeout=10)
    assert response.id == "typed" and [o.name for o in response.outputs] == ["out"]
    out = np.frombuffer(response.raw_output_contents[0], np.float32).reshape(
        response.outputs[0].shape
    )
    assert out.tolist() == [[12.0, 24.0, 36.0, 48.0]]


@pytest.mark.parametrize(
    ("request_fields", "message"),
    [
        (
            {"inputs": [_typed("input", "FP32", [1, 256], fp32_contents=[0.0] * 255)]},
            "input 'input' has 255 values in contents.fp32_contents; shape [1,256] needs 256",
        ),
        (
            {
                "inputs": [_typed("input", "FP32", [1, 256], fp32_contents=[0.0] * 256)],
                "raw_input_contents": [b"\0" * 1024],
            },
            "input 'input' has both contents and raw_input_contents; use one",
        ),
        (
            {
                "inputs": [
                    kpb.ModelInferRequest.InferInputTensor(
                        name="input", datatype="FP32", shape=[1, 256]
                    )
                ],
                "raw_input_contents": [b"\0" * 1024, b"\0" * 1024],
            },
            "raw_input_contents has 2 entries for 1 inputs",
        ),
        (
            {"inputs": [_typed("input", "FP16", [1, 256])]},
            "FP16 data must use raw_input_contents",
        ),
    ],
)
def test_bad_kserve_inputs_are_refused(
    kserve: kpb_grpc.GRPCInferenceServiceStub,
    request_fields: dict,
    message: str,  # type: ignore[type-arg]
) -> None:
    with pytest.raises(grpc.RpcError) as refused:
        kserve.ModelInfer(kpb.ModelInferRequest(model_name="mlp", **request_fields), timeout=10)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in refused.value.details()


def test_int_values_out_of_range_are_refused(kserve: kpb_grpc.GRPCInferenceServiceStub) -> None:
    """An INT8 value arrives in int_contents (int32); 300 does not fit."""
    request = kpb.ModelInferRequest(
        model_name="pair", inputs=[_typed("b", "INT8", [1, 1], int_contents=[300])]
    )
    with pytest.raises(grpc.RpcError) as refused:
        kserve.ModelInfer(request, timeout=10)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "outside the range of INT8" in refused.value.details()
