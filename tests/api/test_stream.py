"""StreamPredict: many requests in flight on one stream, per-request errors, half-close, and the
per-stream in-flight cap."""

from __future__ import annotations

from collections.abc import Callable

import grpc
import numpy as np

from tensorgate.client import AsyncTensorgateClient, StreamItem, TensorgateClient
from tests.harness import MlpReference, ServerThread


def test_every_request_on_a_stream_gets_its_own_answer(
    client: TensorgateClient, reference: MlpReference, rng: np.random.Generator
) -> None:
    """300 requests (more than the 128 in-flight cap), each with its own input."""
    inputs = {f"r{i}": rng.standard_normal((1 + i % 4, 256)).astype(np.float32) for i in range(300)}
    items = [StreamItem(rid, "mlp", {"input": x}, ["logits"]) for rid, x in inputs.items()]
    results = list(client.stream(items))
    assert sorted(r.id for r in results) == sorted(inputs)  # half-close: all answered, then end
    for result in results:
        assert result.ok and result.outputs is not None
        np.testing.assert_allclose(
            result.outputs["logits"], reference.logits(inputs[result.id]), rtol=1e-4, atol=1e-4
        )


def test_a_bad_request_fails_alone_and_the_stream_goes_on(client: TensorgateClient) -> None:
    good = np.ones((1, 256), np.float32)
    items = [
        StreamItem("ok-1", "mlp", {"input": good}),
        StreamItem("bad-shape", "mlp", {"input": np.ones((1, 3), np.float32)}),
        StreamItem("ok-2", "mlp", {"input": good}),
        StreamItem("bad-model", "nope", {"input": good}),
        StreamItem("bad-output", "mlp", {"input": good}, ["nothing"]),
        StreamItem("ok-3", "mlp", {"input": good}),
    ]
    results = {r.id: r for r in client.stream(items)}
    assert set(results) == {item.id for item in items}
    assert all(results[i].ok for i in ("ok-1", "ok-2", "ok-3"))
    assert results["bad-shape"].error_code == grpc.StatusCode.INVALID_ARGUMENT
    assert (
        "input 'input' has shape [1,3], model expects [-1,256]"
        in results["bad-shape"].error_message
    )
    assert results["bad-model"].error_code == grpc.StatusCode.NOT_FOUND
    assert results["bad-output"].error_code == grpc.StatusCode.INVALID_ARGUMENT


def test_an_empty_stream_closes_cleanly(client: TensorgateClient) -> None:
    assert list(client.stream([])) == []


async def test_stream_answers_come_as_they_finish_while_the_client_keeps_sending(
    aclient: AsyncTensorgateClient,
) -> None:
    """The client sends its second request only after the first answer arrived."""
    import asyncio

    first_answered = asyncio.Event()

    async def items():  # type: ignore[no-untyped-def]
        yield StreamItem("first", "mlp", {"input": np.ones((1, 256), np.float32)})
        await asyncio.wait_for(first_answered.wait(), 10)
        yield StreamItem("second", "mlp", {"input": np.ones((1, 256), np.float32)})

    seen = []
    async for result in aclient.stream(items()):
        seen.append(result.id)
        first_answered.set()
    assert seen == ["first", "second"]


def test_in_flight_requests_per_stream_are_capped(
    start_server: Callable[..., ServerThread],
) -> None:
    """With a cap of 4, the server holds at most 4 of the stream's requests at once, so no batch
    of mlp_wide (max 8 rows, 300 ms window) can hold more than 4 rows."""
    running = start_server(max_inflight_per_stream=4, models=("mlp_wide",))
    x = np.ones((1, 256), np.float32)
    with TensorgateClient(running.target, timeout_s=30) as c:
        results = list(c.stream(StreamItem(str(i), "mlp_wide", {"input": x}) for i in range(12)))
    assert len(results) == 12 and all(r.ok for r in results)
    sizes = running.stats("mlp_wide").batch_sizes
    assert sum(size * count for size, count in sizes.items()) == 12
    assert max(sizes) == 4
