"""The standard health service and server reflection, as probes and grpcurl use them."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from google.protobuf import descriptor_pool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from tensorgate.client import codec
from tests.harness import ServerThread, write_config

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def _check(target: str, service: str) -> int:
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status


@pytest.mark.parametrize("service", ["", "tensorgate.v1.Inference", "mlp", "pair"])
def test_health_reports_serving_once_models_are_loaded(server: ServerThread, service: str) -> None:
    assert _check(server.target, service) == SERVING


def test_health_of_an_unknown_service_is_not_found(server: ServerThread) -> None:
    with pytest.raises(grpc.RpcError) as failed:
        _check(server.target, "no.such.Service")
    assert failed.value.code() == grpc.StatusCode.NOT_FOUND


def test_reflection_lists_and_describes_the_services(server: ServerThread) -> None:
    with grpc.insecure_channel(server.target) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        services = set(database.get_services())
        pool = descriptor_pool.DescriptorPool(database)
        predict = pool.FindServiceByName("tensorgate.v1.Inference").methods_by_name["Predict"]
        request = pool.FindMessageTypeByName("tensorgate.v1.PredictRequest")
    assert {"tensorgate.v1.Inference", "grpc.health.v1.Health"} <= services
    assert predict.input_type.full_name == "tensorgate.v1.PredictRequest"
    assert {"model", "id", "inputs", "requested_outputs", "parameters"} <= set(
        request.fields_by_name
    )


def test_a_model_that_fails_to_load_is_reported_while_the_others_serve(
    repository: Path, tmp_path: Path, start_server: Callable[..., ServerThread]
) -> None:
    import shutil

    shutil.copytree(repository / "pair", tmp_path / "pair")
    write_config(tmp_path / "broken", backend="onnxruntime")  # no model.onnx
    running = start_server(model_repository=tmp_path)
    assert _check(running.target, "") == SERVING
    assert _check(running.target, "pair") == SERVING
    assert _check(running.target, "broken") == NOT_SERVING
    from tensorgate.client import TensorgateClient

    with TensorgateClient(running.target, timeout_s=5) as c:
        ready = {m.name: m.ready for m in c.list_models()}
        assert ready == {"broken": False, "pair": True}
        with pytest.raises(grpc.RpcError) as failed:
            c._stub.Predict(codec.predict_request("broken", {}), timeout=5)
    assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "model 'broken' failed to load" in failed.value.details()
    assert "model.onnx does not exist; put the ONNX file there" in failed.value.details()
