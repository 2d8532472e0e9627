"""Admission: calls beyond the server's limit are refused with RESOURCE_EXHAUSTED and a retry
hint, never CANCELLED, and health probes answer however busy the server is."""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tensorgate.client import AsyncTensorgateClient, TensorgateClient
from tensorgate.v1 import inference_pb2 as pb
from tensorgate.v1 import inference_pb2_grpc as pb_grpc
from tests.harness import ServerThread, wait_until

ROW = np.zeros((1, 256), np.float32)


async def test_health_answers_and_calls_get_a_retry_hint_when_streams_fill_the_limit(
    start_server: Callable[..., ServerThread],
) -> None:
    running = start_server(models=("mlp",), max_concurrent_rpcs=20)
    async with grpc.aio.insecure_channel(running.target) as channel:
        stub = pb_grpc.InferenceStub(channel)
        hold = asyncio.Event()

        async def nothing():  # type: ignore[no-untyped-def]
            await hold.wait()
            return
            yield  # an async generator that sends nothing until released

        streams = [stub.StreamPredict(nothing()) for _ in range(20)]
        await asyncio.to_thread(wait_until, lambda: running.server_calls() == 20)
        health = health_pb2_grpc.HealthStub(channel)
        answer = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.Predict(pb.PredictRequest(model="mlp"), timeout=5)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "limit of 20 concurrent calls and streams" in refused.value.details()
        trailing = dict(refused.value.trailing_metadata() or ())
        assert trailing["retry-after-ms"] == "50"
        hold.set()
        for stream in streams:
            assert [r async for r in stream] == []
    with TensorgateClient(running.target, timeout_s=10) as c:
        assert c.predict("mlp", {"input": ROW})["logits"].shape == (1, 16)


async def test_a_burst_of_two_thousand_calls_sees_no_cancelled(server: ServerThread) -> None:
    async with AsyncTensorgateClient(server.target, timeout_s=60) as c:

        async def one() -> str:
            try:
                await c.predict("mlp", {"input": ROW})
                return "OK"
            except grpc.aio.AioRpcError as exc:
                return exc.code().name

        codes = collections.Counter(await asyncio.gather(*(one() for _ in range(2000))))
    assert codes["CANCELLED"] == 0, codes
    assert codes["OK"] + codes["RESOURCE_EXHAUSTED"] == 2000, codes
