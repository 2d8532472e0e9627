"""The request queue forgets a request the moment its caller gives up."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from tensorgate.server.batching.queue import RequestQueue
from tensorgate.server.batching.stats import BatcherStats
from tensorgate.server.errors import ResourceExhausted
from tensorgate.server.inference import InferenceRequest


def _request(rows: int = 1, priority: int = 0) -> InferenceRequest:
    future = asyncio.get_running_loop().create_future()
    x = np.zeros((rows, 2), np.float32)
    return InferenceRequest(
        inputs={"x": x}, rows=rows, output_names=("y",), future=future, priority=priority
    )


async def _settle() -> None:
    await asyncio.sleep(0)  # done-callbacks run on the next loop turn


async def test_a_cancelled_request_stops_counting_toward_capacity_rows_and_the_oldest() -> None:
    stats = BatcherStats()
    queue = RequestQueue("m", capacity=2, stats=stats)
    first, second = _request(3), _request(2)
    queue.put(first)
    queue.put(second)
    with pytest.raises(ResourceExhausted):
        queue.put(_request())
    first.future.cancel()
    await _settle()
    assert (queue.live, queue.rows, stats.dropped_cancelled) == (1, 2, 1)
    assert queue.oldest_enqueued_at() == second.enqueued_at  # the window is timed from second
    queue.put(_request())  # the freed place is usable at once
    assert queue.pop() is second


async def test_many_cancellations_do_not_pile_up_dead_entries() -> None:
    queue = RequestQueue("m", capacity=10_000, stats=BatcherStats())
    keeper = _request()
    queue.put(keeper)
    for _ in range(1000):
        gone = _request()
        queue.put(gone)
        gone.future.cancel()
        await _settle()
    assert queue.live == 1
    assert sum(map(len, queue._lines.values())) < 200  # compacted, not 1,001
    assert queue.pop() is keeper


async def test_higher_priority_goes_first_and_a_passed_over_request_waits_at_most_the_bound() -> (
    None
):
    queue = RequestQueue("m", capacity=100, stats=BatcherStats(), max_passed_over_s=0.05)
    low, normal, high = _request(priority=-1), _request(), _request(priority=5)
    for request in (low, normal, high):
        queue.put(request)
    assert queue.live == 3 and queue.oldest_enqueued_at() == low.enqueued_at
    assert queue.pop() is high
    assert queue.pop() is normal
    # Passed over for longer than the bound, the low one goes before a newer, higher one.
    queue.put(newer := _request(priority=3))
    assert queue.take(room=0) is None and queue.live == 2  # a row does not fit in none
    low.enqueued_at -= 1.0
    assert queue.take(room=1) is low
    assert queue.pop() is newer and queue.live == 0
