"""Bounded everything: full queues, too many pending jobs and oversize messages are refused with
RESOURCE_EXHAUSTED and a clear limit; a closed stream takes its queued requests with it; a burst
of 10,000 jobs loses none; the per-model default timeout applies when the caller set none."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import pytest

from tensorgate.client import AsyncTensorgateClient, StreamItem, TensorgateClient, codec
from tests.harness import ServerThread, wait_until, write_config

ROW = np.zeros((1, 256), np.float32)


def test_a_full_queue_refuses_with_resource_exhausted_and_a_retry_hint(
    client: TensorgateClient, server: ServerThread
) -> None:
    """mlp_tiny_queue holds 2 requests during its 2 s window; the third is refused."""
    request = codec.predict_request("mlp_tiny_queue", {"input": ROW})
    futures = [client._stub.Predict.future(request, timeout=20) for _ in range(2)]
    wait_until(lambda: server.queued("mlp_tiny_queue") == 2, what="both queued")
    with pytest.raises(grpc.RpcError) as refused:
        client._stub.Predict(request, timeout=10)
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "model 'mlp_tiny_queue' queue is full (2 requests waiting)" in refused.value.details()
    assert dict(refused.value.trailing_metadata())["retry-after-ms"] == "100"
    assert all(len(f.result().outputs) == 2 for f in futures)  # nothing accepted was lost


def test_an_oversize_message_is_refused_with_the_limit_in_the_message(
    start_server: Callable[..., ServerThread],
) -> None:
    running = start_server(models=("mlp",), max_message_bytes=64 * 1024)
    with TensorgateClient(running.target, timeout_s=10) as c:
        with pytest.raises(grpc.RpcError) as refused:
            c.predict(
                "mlp", {"input": np.zeros((64, 256), np.float32)}
            )  # 64 KiB of contents + framing
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "larger than max" in refused.value.details()
        assert "65536" in refused.value.details()
        assert c.predict("mlp", {"input": ROW})["logits"].shape == (1, 16)


def test_too_many_pending_jobs_are_refused_with_a_retry_hint(
    start_server: Callable[..., ServerThread],
) -> None:
    running = start_server(models=("mlp_tiny_queue",), max_pending_jobs=3)
    with TensorgateClient(running.target, timeout_s=10) as c:
        jobs = [c.submit("mlp_tiny_queue", {"input": ROW}) for _ in range(3)]
        with pytest.raises(grpc.RpcError) as refused:
            c.submit("mlp_tiny_queue", {"input": ROW})
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "3 jobs are pending, the limit is 3" in refused.value.details()
        assert dict(refused.value.trailing_metadata())["retry-after-ms"] == "1000"
        assert {c.get_result(j.job_id, wait_timeout_s=10).status for j in jobs} == {"SUCCEEDED"}


async def test_a_closed_stream_takes_its_queued_requests_with_it(server: ServerThread) -> None:
    """mlp_tiny_queue waits 2 s for a batch; the stream goes away before that."""
    before = server.stats("mlp_tiny_queue")

    async with AsyncTensorgateClient(server.target, timeout_s=30) as c:
        sent = asyncio.Event()

        async def items():  # type: ignore[no-untyped-def]
            for i in range(2):
                yield StreamItem(str(i), "mlp_tiny_queue", {"input": ROW})
            sent.set()
            await asyncio.sleep(30)  # keep the stream open until it is cancelled

        async def consume() -> None:
            async for _ in c.stream(items()):
                pass

        task = asyncio.create_task(consume())
        await asyncio.wait_for(sent.wait(), 5)
        await asyncio.to_thread(wait_until, lambda: server.queued("mlp_tiny_queue") == 2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    # Both leave the queue at once (the model's 2 s window is far from over), so neither can
    # reach an instance, and their places are free for others.
    await asyncio.to_thread(wait_until, lambda: server.queued("mlp_tiny_queue") == 0, 1.0)
    after = server.stats("mlp_tiny_queue")
    assert after.dropped_cancelled - before.dropped_cancelled == 2
    assert after.rows == before.rows


def test_a_burst_of_ten_thousand_jobs_loses_none(start_server: Callable[..., ServerThread]) -> None:
    running = start_server(models=("mlp",))

    async def burst() -> tuple[list[str], set[str]]:
        async with AsyncTensorgateClient(running.target, timeout_s=120) as c:
            limit = asyncio.Semaphore(256)

            async def submit(i: int) -> str:
                async with limit:
                    x = np.full((1, 256), i / 10_000, np.float32)
                    return (await c.submit("mlp", {"input": x}, request_id=str(i))).job_id

            ids = await asyncio.gather(*(submit(i) for i in range(10_000)))

            async def final(job_id: str) -> str:
                async with limit:
                    return (await c.get_result(job_id, wait_timeout_s=60)).status

            statuses = await asyncio.gather(*(final(job_id) for job_id in ids))
            return ids, set(statuses)

    ids, statuses = asyncio.run(burst())
    assert len(set(ids)) == 10_000
    assert statuses == {"SUCCEEDED"}
    stats = running.stats("mlp")
    assert stats.requests == 10_000  # each ran exactly once
    assert max(stats.batch_sizes) > 1


def test_the_models_default_timeout_applies_when_the_caller_set_none(
    repository: Path, tmp_path: Path, start_server: Callable[..., ServerThread]
) -> None:
    write_config(
        tmp_path / "slow_window",
        backend="onnxruntime",
        onnxruntime={"artifact": str(repository / "mlp" / "model.onnx")},
        max_queue_delay_ms=1000.0,
        batching="static",
        default_timeout_ms=200,
    )
    running = start_server(model_repository=tmp_path)
    with TensorgateClient(running.target) as c:  # no client deadline
        with pytest.raises(grpc.RpcError) as expired:
            c.predict("slow_window", {"input": ROW})
    assert expired.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "deadline passed after" in expired.value.details()
    assert running.stats("slow_window").dropped_expired == 1
