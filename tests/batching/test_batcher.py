"""The dynamic batcher, observed through a real server: batches form across unary, job and stream
callers; they go out when full or when the oldest request has waited max_queue_delay; requests
whose deadline passed or whose caller left are dropped before compute.

mlp_wide batches up to 8 rows with a 300 ms window on one instance (tests/harness.py).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from tensorgate.client import AsyncTensorgateClient, StreamItem, TensorgateClient, codec
from tensorgate.server.errors import DeadlineExceeded, Internal
from tensorgate.server.model import ServedModel
from tensorgate.server.model_config import ModelConfig
from tensorgate.server.records import Request, RequestKind
from tensorgate.server.tensors import TensorInput
from tests.harness import MlpReference, ServerThread, wait_until, write_config

WINDOW_S = 0.3


async def test_one_batch_is_formed_from_unary_job_and_stream_callers(
    server: ServerThread, reference: MlpReference, rng: np.random.Generator
) -> None:
    before = server.stats("mlp_wide")
    xs = [rng.standard_normal((1, 256)).astype(np.float32) for _ in range(8)]
    async with AsyncTensorgateClient(server.target, timeout_s=30) as unary, \
            AsyncTensorgateClient(server.target, timeout_s=30) as jobs, \
            AsyncTensorgateClient(server.target, timeout_s=30) as streams:  # fmt: skip

        async def via_job(x: np.ndarray) -> dict[str, np.ndarray]:
            submitted = await jobs.submit("mlp_wide", {"input": x})
            result = await jobs.get_result(submitted.job_id, wait_timeout_s=10)
            assert result.status == "SUCCEEDED", result
            assert result.outputs is not None
            return result.outputs

        async def via_stream(batch: list[np.ndarray]) -> list[dict[str, np.ndarray]]:
            items = [StreamItem(str(i), "mlp_wide", {"input": x}) for i, x in enumerate(batch)]
            answers = {r.id: r async for r in streams.stream(items)}
            return [answers[str(i)].outputs for i in range(len(batch))]  # type: ignore[misc]

        results = await asyncio.gather(
            unary.predict("mlp_wide", {"input": xs[0]}),
            unary.predict("mlp_wide", {"input": xs[1]}),
            unary.predict("mlp_wide", {"input": xs[2]}),
            via_job(xs[3]),
            via_job(xs[4]),
            via_stream(xs[5:8]),
        )
    outputs = [*results[:5], *results[5]]
    for x, out in zip(xs, outputs, strict=True):
        np.testing.assert_allclose(out["logits"], reference.logits(x), rtol=1e-4, atol=1e-4)
    after = server.stats("mlp_wide")
    # All 8 rows arrived within the 300 ms window of the first one: one full batch of 8.
    assert after.batch_sizes[8] == before.batch_sizes[8] + 1
    assert after.batches == before.batches + 1
    assert after.requests == before.requests + 8


async def test_batch_flushes_when_oldest_request_waited_max_delay(
    server: ServerThread, aclient: AsyncTensorgateClient
) -> None:
    before = server.stats("mlp_wide")
    started = time.monotonic()
    await aclient.predict("mlp_wide", {"input": np.ones((1, 256), np.float32)})
    elapsed = time.monotonic() - started
    after = server.stats("mlp_wide")
    assert elapsed >= WINDOW_S * 0.95  # it waited for company...
    assert elapsed < WINDOW_S + 5  # ...then went out alone
    assert after.batch_sizes[1] == before.batch_sizes[1] + 1


async def test_batch_goes_out_without_waiting_once_it_is_full(
    server: ServerThread, aclient: AsyncTensorgateClient
) -> None:
    """Two requests of 4 rows fill mlp_wide's max batch of 8, so nobody waits for the window."""
    before = server.stats("mlp_wide")
    x = np.ones((4, 256), np.float32)
    started = time.monotonic()
    await asyncio.gather(*(aclient.predict("mlp_wide", {"input": x}) for _ in range(2)))
    assert time.monotonic() - started < WINDOW_S
    assert server.stats("mlp_wide").batch_sizes[8] == before.batch_sizes[8] + 1


def test_request_whose_deadline_passes_in_the_queue_fails_before_compute(
    repository: Path, tmp_path: Path, start_server: Callable[..., ServerThread]
) -> None:
    """The server's own deadline (default_timeout_ms 100) passes during a 300 ms window: the
    batcher drops the request with DEADLINE_EXCEEDED instead of running it."""
    write_config(
        tmp_path / "slow",
        backend="onnxruntime",
        onnxruntime={"artifact": str(repository / "mlp" / "model.onnx")},
        max_queue_delay_ms=300.0,
        batching="static",
        default_timeout_ms=100,
        instance_count=1,
    )
    running = start_server(model_repository=tmp_path)
    with TensorgateClient(running.target, timeout_s=10) as c:
        request = codec.predict_request("slow", {"input": np.ones((1, 256), np.float32)})
        with pytest.raises(grpc.RpcError) as late:
            c._stub.Predict(request)  # no deadline of the caller's: the model's applies
    assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "deadline passed after" in late.value.details()  # the server's words, not gRPC's
    stats = running.stats("slow")
    assert (stats.dropped_expired, stats.dropped_cancelled, stats.rows) == (1, 0, 0)


async def test_a_cancelled_caller_leaves_the_queue_at_once(
    server: ServerThread, aclient: AsyncTensorgateClient
) -> None:
    before = server.stats("mlp_wide")
    request = codec.predict_request("mlp_wide", {"input": np.ones((1, 256), np.float32)})
    call = aclient._stub.Predict(request)
    await asyncio.to_thread(wait_until, lambda: server.queued("mlp_wide") == 1)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    # Gone from the queue well before the 300 ms window closes, and never run.
    await asyncio.to_thread(wait_until, lambda: server.queued("mlp_wide") == 0, 0.2)
    after = server.stats("mlp_wide")
    assert after.dropped_cancelled == before.dropped_cancelled + 1
    assert after.rows == before.rows


def test_eager_dispatch_skips_the_window_while_another_instance_is_idle(
    repository: Path, tmp_path: Path, start_server: Callable[..., ServerThread]
) -> None:
    for name, eager in (("patient", False), ("eager", True)):
        write_config(
            tmp_path / name,
            backend="onnxruntime",
            onnxruntime={"artifact": str(repository / "mlp" / "model.onnx")},
            max_queue_delay_ms=500.0,
            batching="static",
            instance_count=2,
            eager_dispatch=eager,
        )
    running = start_server(model_repository=tmp_path)
    x = np.ones((1, 256), np.float32)
    with TensorgateClient(running.target, timeout_s=10) as c:
        timings = {}
        for name in ("patient", "eager"):
            started = time.monotonic()
            c.predict(name, {"input": x})
            timings[name] = time.monotonic() - started
    assert timings["patient"] >= 0.45  # waited for company
    assert timings["eager"] < 0.3  # went at once: the other instance was idle


@pytest.mark.parametrize("batching", ["adaptive", "static"])
async def test_a_lone_request_at_an_idle_batcher_starts_its_engine_call_from_put(
    repository: Path, reference: MlpReference, rng: np.random.Generator, batching: str
) -> None:
    """With nothing queued and an instance free, a request the policy sends at once (adaptive,
    at low load) is on its instance when put() returns, not a loop iteration later; the static
    window still holds it for company."""
    config = ModelConfig.load(repository / "mlp")
    config.batching = batching
    model = ServedModel(config)
    await asyncio.to_thread(model.load)
    model.start()
    try:
        x = rng.standard_normal((1, 256)).astype(np.float32)
        for first in (True, False):  # the first goes through the batcher's task, which parks
            while model.busy_instances:  # the previous batch is winding up
                await asyncio.sleep(0.001)
            # The load shape, not a wait for something: arrivals 20 ms apart are the light load
            # whose requests the adaptive policy sends at once (two calls back to back, ~1 ms
            # apart, would look like a load worth batching).
            await asyncio.sleep(0.02)
            tensor = TensorInput("input", "FP32", x.shape, x.tobytes())
            request = model.admit(Request("mlp", [tensor]), RequestKind.UNARY)
            model.scheduler.put(request)
            if not first:
                assert model.busy_instances == (1 if batching == "adaptive" else 0)
            outputs = await request.future
            np.testing.assert_allclose(outputs["logits"], reference.logits(x), rtol=1e-4, atol=1e-4)
    finally:
        await model.stop(time.monotonic() + 5)
        model.close()


async def test_a_request_cancelled_in_the_loop_turn_its_batch_forms_is_skipped_not_settled_again(
    repository: Path, tmp_path: Path, reference: MlpReference, rng: np.random.Generator
) -> None:
    """The caller's cancellation reaches the queue a loop iteration later (done-callbacks run
    through call_soon): a batch formed in between must skip that request, not settle it again
    (which once raised InvalidStateError and killed the model's scheduler)."""
    write_config(
        tmp_path / "mlp",
        backend="onnxruntime",
        onnxruntime={"artifact": str(repository / "mlp" / "model.onnx")},
        max_batch_size=8,
        instance_count=1,
        batching="static",
        max_queue_delay_ms=10_000.0,
    )
    model = ServedModel(ModelConfig.load(tmp_path / "mlp"))
    await asyncio.to_thread(model.load)
    model.start()
    try:
        xs = [rng.standard_normal((1, 256)).astype(np.float32) for _ in range(3)]
        requests = []
        for i, x in enumerate(xs):
            tensor = TensorInput("input", "FP32", x.shape, x.tobytes())
            requests.append(model.admit(Request("mlp", [tensor], id=f"r{i}"), RequestKind.UNARY))
            model.scheduler.put(requests[-1])
        expired = model.admit(
            Request("mlp", [TensorInput("input", "FP32", xs[0].shape, xs[0].tobytes())]),
            RequestKind.UNARY,
        )
        expired.deadline = time.monotonic() - 1  # passed while it waited
        model.scheduler.put(expired)
        requests[1].future.cancel()  # in this very loop iteration, then the batch forms
        batch = model.scheduler._take(8)  # type: ignore[attr-defined]
        assert batch is not None
        assert [r.id for r in batch.requests] == [requests[0].id, requests[2].id]
        assert isinstance(expired.future.exception(), DeadlineExceeded)
        instance = model._pool.try_acquire()  # type: ignore[union-attr]
        model.scheduler._dispatch(instance, batch)  # type: ignore[attr-defined]
        for request, x in ((requests[0], xs[0]), (requests[2], xs[2])):
            outputs = await request.future
            np.testing.assert_allclose(outputs["logits"], reference.logits(x), rtol=1e-4, atol=1e-4)
        assert model.ready
    finally:
        await model.stop(time.monotonic() + 5)
        model.close()


async def test_a_failure_while_settling_a_batch_answers_its_callers_and_the_model_goes_on(
    repository: Path, reference: MlpReference, rng: np.random.Generator
) -> None:
    """A defect in what settles a batch (here a request's keep hook that raises) must not leave
    the batch's callers waiting or hold its instance: they get INTERNAL, and the next request
    runs."""
    model = ServedModel(ModelConfig.load(repository / "mlp"))
    await asyncio.to_thread(model.load)
    model.start()
    try:
        x = rng.standard_normal((1, 256)).astype(np.float32)

        def admitted() -> Any:
            tensor = TensorInput("input", "FP32", x.shape, x.tobytes())
            return model.admit(Request("mlp", [tensor]), RequestKind.UNARY)

        def broken(outputs: Any) -> Any:
            raise RuntimeError("keep failed")

        doomed = admitted()
        doomed.keep = broken
        model.scheduler.put(doomed)
        with pytest.raises(Internal, match="keep failed"):
            await asyncio.wait_for(doomed.future, 10)
        while model.busy_instances:  # the instance goes back as the batch is settled
            await asyncio.sleep(0.001)
        fine = admitted()
        model.scheduler.put(fine)
        outputs = await asyncio.wait_for(fine.future, 10)
        np.testing.assert_allclose(outputs["logits"], reference.logits(x), rtol=1e-4, atol=1e-4)
    finally:
        await model.stop(time.monotonic() + 5)
        model.close()
