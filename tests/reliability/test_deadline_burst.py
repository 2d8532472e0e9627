"""Nothing a caller sends can take a model down: a burst of calls whose deadlines pass while
they wait (their futures cancelled a loop iteration before the batcher reaches them) leaves the
model serving, and a scheduler that dies of an unexpected error is restarted."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tensorgate.client import AsyncTensorgateClient, TensorgateClient
from tensorgate.client.codec import predict_request
from tensorgate.kserve import grpc_service_pb2 as kpb
from tensorgate.kserve import grpc_service_pb2_grpc as kpb_grpc
from tensorgate.v1 import inference_pb2_grpc as pb_grpc
from tests.harness import MlpReference, ServerThread, wait_until

CALLS = 1000
IN_FLIGHT = 300
ROUNDS = 3
FINE = {grpc.StatusCode.OK, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED}


def _kserve_request(x: np.ndarray) -> kpb.ModelInferRequest:
    request = kpb.ModelInferRequest(model_name="mlp")
    request.inputs.add(name="input", datatype="FP32", shape=list(x.shape))
    request.raw_input_contents.append(x.tobytes())
    return request


async def _burst(target: str, front_end: str) -> Counter[grpc.StatusCode]:
    x = np.ones((1, 256), np.float32)
    codes: Counter[grpc.StatusCode] = Counter()
    gate = asyncio.Semaphore(IN_FLIGHT)
    async with grpc.aio.insecure_channel(target) as channel:
        if front_end == "kserve":
            call = kpb_grpc.GRPCInferenceServiceStub(channel).ModelInfer
            request = _kserve_request(x)
        else:
            call = pb_grpc.InferenceStub(channel).Predict
            request = predict_request("mlp", {"input": x})

        await call(request, timeout=10)  # connected first, so the burst reaches the server

        async def one(i: int) -> None:
            async with gate:
                try:
                    # 1 to 3 ms: deadlines that pass while the calls queue, at every stage.
                    await call(request, timeout=0.001 * (1 + i % 3))
                    codes[grpc.StatusCode.OK] += 1
                except grpc.aio.AioRpcError as exc:
                    codes[exc.code()] += 1

        await asyncio.gather(*(one(i) for i in range(CALLS)))
    return codes


def _health(target: str, service: str) -> int:
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status


def test_a_burst_of_one_millisecond_deadlines_leaves_the_model_serving_on_both_front_ends(
    start_server: Callable[..., ServerThread], reference: MlpReference
) -> None:
    running = start_server(models=("mlp",))
    for front_end in ("kserve", "v1") * ROUNDS:
        codes = asyncio.run(_burst(running.target, front_end))
        assert set(codes) <= FINE, f"{front_end}: {codes}"
        assert _health(running.target, "mlp") == health_pb2.HealthCheckResponse.SERVING
        x = np.random.default_rng(7).standard_normal((3, 256)).astype(np.float32)
        with TensorgateClient(running.target, timeout_s=10) as client:
            got = client.predict("mlp", {"input": x})
        np.testing.assert_allclose(got["logits"], reference.logits(x), rtol=1e-4, atol=1e-4)
    restarts = running.call(_restarts(running, "mlp"))
    assert restarts == 0


async def _restarts(running: ServerThread, model: str) -> float:
    assert running.server.telemetry is not None
    counter = running.server.telemetry.metrics.scheduler_restarts.labels(model)
    return float(counter._value.get())


def test_a_scheduler_that_dies_of_an_unexpected_error_is_restarted_and_the_model_serves(
    start_server: Callable[..., ServerThread], reference: MlpReference
) -> None:
    running = start_server(models=("mlp",))
    batcher = running.server.models["mlp"].scheduler
    real_next_batch = batcher._next_batch  # type: ignore[attr-defined]
    faults = {"left": 1}

    async def faulty_next_batch() -> object:
        if faults["left"]:
            faults["left"] -= 1
            raise RuntimeError("injected scheduler fault")
        return await real_next_batch()

    async def inject() -> None:
        batcher._next_batch = faulty_next_batch  # type: ignore[attr-defined]

    running.call(inject())
    x = np.ones((2, 256), np.float32)

    async def burst() -> list[object]:
        # Concurrent calls, so some queue and reach the batcher's task (a lone call at an idle
        # model may go straight from put() to an instance).
        async with AsyncTensorgateClient(running.target, timeout_s=10) as c:
            return await asyncio.gather(
                *(c.predict("mlp", {"input": x}) for _ in range(16)), return_exceptions=True
            )

    outcomes: list[object] = []
    for _ in range(5):
        outcomes += asyncio.run(burst())
        if not faults["left"]:
            break
    assert faults["left"] == 0, "the fault was never reached"
    for outcome in outcomes:  # answered, or told to retry: never lost, never INTERNAL
        if isinstance(outcome, grpc.aio.AioRpcError):
            assert outcome.code() == grpc.StatusCode.UNAVAILABLE, outcome
            assert "scheduler failed (RuntimeError) and is restarting" in (outcome.details() or "")
        else:
            assert isinstance(outcome, dict), outcome
    with TensorgateClient(running.target, timeout_s=10) as client:
        wait_until(lambda: running.call(_restarts(running, "mlp")) == 1, what="one restart")
        wait_until(
            lambda: _health(running.target, "mlp") == health_pb2.HealthCheckResponse.SERVING,
            what="mlp SERVING again",
        )
        got = client.predict("mlp", {"input": x})
    np.testing.assert_allclose(got["logits"], reference.logits(x), rtol=1e-4, atol=1e-4)
    assert any(isinstance(o, dict) for o in outcomes)
