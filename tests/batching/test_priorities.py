"""Priorities over real gRPC: a higher-priority request overtakes queued lower ones, jobs queue
below interactive calls by default, and KServe's `priority` parameter maps as Triton's does."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc
import numpy as np
import pytest

from tensorgate.client import codec
from tensorgate.kserve import grpc_service_pb2 as kpb
from tensorgate.kserve import grpc_service_pb2_grpc as kpb_grpc
from tensorgate.v1 import inference_pb2_grpc as pb_grpc
from tests.harness import ServerThread, wait_until, write_sleepy_model


@pytest.fixture
def gate(tmp_path: Path) -> Path:
    """While this file exists, the serial model's one instance holds the batch it runs."""
    return tmp_path / "gate"


@pytest.fixture
def serial(tmp_path: Path, gate: Path, start_server: Callable[..., ServerThread]) -> ServerThread:
    # One row at a time, 30 ms each: a queue forms behind the first request.
    write_sleepy_model(
        tmp_path / "serial", 0.03, gate, max_batch_size=1, instance_count=1,
        priority_aging_ms=10_000,
    )  # fmt: skip
    return start_server(model_repository=tmp_path, models=("serial",))


async def _queue_behind_a_busy_instance(
    serial: ServerThread, gate: Path, call: Callable[[int, int], Awaitable[None]]
) -> list[asyncio.Task[None]]:
    """Call 0 holds the instance; 1..5 (priority -1) queue in that order; then 99 (priority 5)
    arrives. Each step waits for the server to show it, so arrival order is the test's."""
    gate.touch()

    async def until(condition: Callable[[], bool], what: str) -> None:
        await asyncio.to_thread(wait_until, condition, 30, what)

    tasks = [asyncio.create_task(call(0, 0))]
    await until(lambda: serial.busy("serial") == 1, "call 0 running")
    for tag in range(1, 6):
        tasks.append(asyncio.create_task(call(tag, -1)))
        await until(lambda n=tag: serial.queued("serial") == n, f"call {tag} queued")
    tasks.append(asyncio.create_task(call(99, 5)))
    await until(lambda: serial.queued("serial") == 6, "call 99 queued")
    gate.unlink()
    return tasks


def _request(tag: int, priority: int = 0) -> object:
    request = codec.predict_request("serial", {"x": np.full((1, 4), tag, np.float32)}, (), str(tag))
    request.priority = priority
    return request


async def test_a_high_priority_request_overtakes_the_queue(
    serial: ServerThread, gate: Path
) -> None:
    finished: list[str] = []
    async with grpc.aio.insecure_channel(serial.target) as channel:
        stub = pb_grpc.InferenceStub(channel)

        async def call(tag: int, priority: int) -> None:
            response = await stub.Predict(_request(tag, priority), timeout=30)
            finished.append(response.id)

        await asyncio.gather(*await _queue_behind_a_busy_instance(serial, gate, call))
    assert finished[0] == "0"
    assert finished[1] == "99", finished  # before the five that were queued first
    assert finished[2:] == ["1", "2", "3", "4", "5"]


async def test_kserve_priority_parameter_follows_triton_levels(serial: ServerThread) -> None:
    async with grpc.aio.insecure_channel(serial.target) as channel:
        stub = kpb_grpc.GRPCInferenceServiceStub(channel)

        def infer(priority: object) -> kpb.ModelInferRequest:
            request = kpb.ModelInferRequest(model_name="serial")
            request.inputs.add(name="x", datatype="FP32", shape=[1, 4])
            request.raw_input_contents.append(np.ones((1, 4), np.float32).tobytes())
            if isinstance(priority, int):
                request.parameters["priority"].int64_param = priority
            else:
                request.parameters["priority"].string_param = str(priority)
            return request

        assert (await stub.ModelInfer(infer(1), timeout=30)).outputs[0].shape == [1, 4]
        with pytest.raises(grpc.aio.AioRpcError) as bad:
            await stub.ModelInfer(infer("urgent"), timeout=30)
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "parameter 'priority' must be an integer >= 0" in (bad.value.details() or "")


def test_jobs_queue_below_interactive_calls_by_default(serial: ServerThread) -> None:
    from tensorgate.client import TensorgateClient

    with TensorgateClient(serial.target, timeout_s=30) as client:
        x = {"x": np.ones((1, 4), np.float32)}
        jobs = [client.submit("serial", x).job_id for _ in range(6)]
        client.predict("serial", x)  # overtakes the jobs queued before it
        unfinished = [j for j in jobs if not client.get_result(j).finished]
        assert len(unfinished) >= 4, unfinished
        assert {client.get_result(j, wait_timeout_s=10).status for j in jobs} == {"SUCCEEDED"}


async def test_the_clients_priority_argument_overtakes_the_queue(
    serial: ServerThread, gate: Path
) -> None:
    """The same as above through the public asyncio client's `priority=`."""
    from tensorgate.client import AsyncTensorgateClient

    finished: list[str] = []
    async with AsyncTensorgateClient(serial.target, timeout_s=30) as client:

        async def call(tag: int, priority: int) -> None:
            x = np.full((1, 4), tag, np.float32)
            await client.predict("serial", {"x": x}, priority=priority)
            finished.append(str(tag))

        await asyncio.gather(*await _queue_behind_a_busy_instance(serial, gate, call))
    assert finished[:2] == ["0", "99"], finished
