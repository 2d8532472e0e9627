"""Batched: the calls to one service that share round trips (the Redis store's Submits and
outcomes)."""

from __future__ import annotations

import asyncio
import time

import pytest

from tensorgate.server.jobs.batched import Batched


class Service:
    """Answers each item doubled after a short round trip; records the batches it was sent."""

    def __init__(self, fail: bool = False) -> None:
        self.batches: list[list[int]] = []
        self.fail = fail

    async def send(self, items: list[int]) -> list[int]:
        self.batches.append(items)
        await asyncio.sleep(0.001)
        if self.fail:
            raise ConnectionError("the service is down")
        return [item * 2 for item in items]


async def test_each_caller_gets_its_own_answer_and_concurrent_calls_share_a_batch() -> None:
    service = Service()
    batched = Batched(service.send)
    answers = await asyncio.gather(*(batched.call(i) for i in range(10)))
    assert answers == [i * 2 for i in range(10)]
    assert service.batches[0] == list(range(10))  # made in one loop turn: one batch


async def test_a_failed_send_fails_every_caller_of_its_batch() -> None:
    batched = Batched(Service(fail=True).send)
    results = await asyncio.gather(*(batched.call(i) for i in range(3)), return_exceptions=True)
    assert all(isinstance(r, ConnectionError) for r in results), results


async def test_one_caller_at_a_time_never_lingers() -> None:
    service = Service()
    batched = Batched(service.send, linger_s=0.5)
    started = time.monotonic()
    for i in range(20):
        assert await batched.call(i) == i * 2
    assert time.monotonic() - started < 0.5  # twenty calls, no 0.5 s wait among them
    assert all(len(batch) == 1 for batch in service.batches)


async def test_under_load_calls_linger_into_fewer_fuller_batches() -> None:
    async def load(linger_s: float) -> int:
        service = Service()
        batched = Batched(service.send, linger_s)

        async def caller(first: int) -> None:
            for i in range(first, first + 20):
                assert await batched.call(i) == i * 2
                await asyncio.sleep(0.0005 * (first % 3))  # callers out of step

        await asyncio.gather(*(caller(n * 100) for n in range(8)))
        return len(service.batches)

    without, lingering = await load(0.0), await load(0.005)
    assert lingering < without, (lingering, without)


@pytest.mark.parametrize("linger_s", [0.0, 0.005])
async def test_a_caller_that_goes_away_does_not_lose_the_others_answers(linger_s: float) -> None:
    batched = Batched(Service().send, linger_s)
    gone = asyncio.ensure_future(batched.call(1))
    staying = asyncio.ensure_future(batched.call(2))
    await asyncio.sleep(0)
    gone.cancel()
    assert await staying == 4
    assert gone.cancelled()
