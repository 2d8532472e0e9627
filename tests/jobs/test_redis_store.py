"""The Redis job store on its own, against a real redis-server: leases, dead letters, cancel
against finish, hand-back. Two store objects stand for two replicas."""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tensorgate.server.errors import Internal, Unavailable
from tensorgate.server.jobs import redis_store
from tensorgate.server.jobs.job import Job, JobStatus
from tensorgate.server.jobs.redis_store import RedisJobStore
from tensorgate.server.records import Request
from tensorgate.server.tensors import TensorInput
from tests.redisproc import RedisProcess

X = np.arange(4, dtype=np.float32).reshape(1, 4)


def _job() -> Job:
    tensor = TensorInput("x", "FP32", [1, 4], X.tobytes())
    return Job(
        id=secrets.token_hex(16),
        model="m",
        request_id="r1",
        created_at=time.time(),
        payload=Request("m", [tensor], id="r1"),
    )


@pytest.fixture
async def replicas(redis_db: Callable[[], str]) -> AsyncIterator[Callable[..., Any]]:
    url = redis_db()
    opened: list[RedisJobStore] = []

    async def replica(**settings: Any) -> RedisJobStore:
        settings = {
            "max_pending": 100, "ttl_s": 60.0, "max_finished": 100, "max_attempts": 3,
            "lease_s": 30.0, **settings,
        }  # fmt: skip
        store = RedisJobStore(url, **settings)
        await store.open(["m"], lambda _: None, lambda _: None)
        opened.append(store)
        return store

    yield replica
    for store in opened:
        await store.close()


async def test_a_job_held_by_a_silent_replica_is_taken_over_then_dead_lettered(
    replicas: Callable[..., Any],
) -> None:
    a = await replicas(lease_s=0.2, max_attempts=2)
    b = await replicas(lease_s=0.2, max_attempts=2)
    job, _, _ = await a.add(_job())
    [first] = await a.take("m", 10, 0.1)  # a "dies" holding it: never finishes, never renews
    assert first.id == job.id and first.attempts == 1
    np.testing.assert_array_equal(
        np.frombuffer(first.payload.inputs[0].contents, np.float32), X.ravel()
    )
    assert await b.take("m", 10, 0.05) == []  # the lease has not expired yet
    taken: list[Job] = []
    deadline = time.monotonic() + 5
    while not taken and time.monotonic() < deadline:
        taken = await b.take("m", 10, 0.05)
    assert [j.id for j in taken] == [job.id] and taken[0].attempts == 2
    # b dies too; the next delivery finds the attempts used up.
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        assert await a.take("m", 10, 0.05) == []
        stored = await a.get(job.id)
        if stored is not None and stored.status is JobStatus.FAILED:
            break
    assert stored is not None and stored.status is JobStatus.FAILED
    assert stored.error is not None and "gave up after 2 attempts" in str(stored.error)
    assert [j.id for j in await b.find(JobStatus.FAILED, 10)] == [job.id]
    dead = await a._client.xrange("tg:dead")
    assert [fields[b"id"].decode() for _, fields in dead] == [job.id]


async def test_a_job_cancelled_before_it_is_taken_never_runs(
    replicas: Callable[..., Any],
) -> None:
    a = await replicas()
    b = await replicas()
    job, _, _ = await a.add(_job())
    cancelled = await b.cancel(job.id)
    assert cancelled is not None and cancelled.status is JobStatus.CANCELLED
    assert await a.take("m", 10, 0.1) == []
    assert await a._client.xlen("tg:q:m") == 0  # nothing left counting against the bound


async def test_a_result_arriving_after_a_cancel_elsewhere_is_discarded(
    replicas: Callable[..., Any],
) -> None:
    a = await replicas()
    b = await replicas()
    job, _, _ = await a.add(_job())
    [held] = await a.take("m", 10, 0.1)
    assert (await b.cancel(job.id)).status is JobStatus.CANCELLED  # type: ignore[union-attr]
    held.status, held.outputs, held.finished_at = JobStatus.SUCCEEDED, {"y": X * 2}, time.time()
    final = await a.finish(held)
    assert final.status is JobStatus.CANCELLED and final.outputs is None
    assert (await b.get(job.id)).status is JobStatus.CANCELLED  # type: ignore[union-attr]
    assert await a._client.xpending("tg:q:m", "tensorgate") == {
        "pending": 0, "min": None, "max": None, "consumers": []
    }  # fmt: skip


async def test_a_finished_job_keeps_its_outputs_and_error(replicas: Callable[..., Any]) -> None:
    a = await replicas()
    ok, _, _ = await a.add(_job())
    bad, _, _ = await a.add(_job())
    held = {j.id: j for j in await a.take("m", 10, 0.1)}
    held[ok.id].status, held[ok.id].outputs = JobStatus.SUCCEEDED, {"y": X * 2}
    held[bad.id].status, held[bad.id].error = JobStatus.FAILED, Internal("engine broke")
    for job in held.values():
        job.finished_at = time.time()
        await a.finish(job)
    succeeded, failed = await a.get(ok.id), await a.get(bad.id)
    assert succeeded is not None and succeeded.outputs is not None
    np.testing.assert_array_equal(succeeded.outputs["y"], X * 2)
    assert succeeded.request_id == "r1" and 59 < succeeded.expires_at - time.time() <= 60
    assert failed is not None and isinstance(failed.error, Internal)
    assert str(failed.error) == "engine broke"
    assert await a.get(ok.id, tenant="someone-else") is None


async def test_handed_back_jobs_are_taken_at_once_without_counting_an_attempt(
    replicas: Callable[..., Any],
) -> None:
    a = await replicas()
    b = await replicas()
    job, _, _ = await a.add(_job())
    held = await a.take("m", 10, 0.1)
    await a.release(held, started=False)
    [again] = await b.take("m", 10, 0.1)  # no lease to wait out
    assert again.id == job.id and again.attempts == 1


async def test_claims_and_hand_backs_survive_a_redis_that_lost_its_scripts(
    replicas: Callable[..., Any], redis_process: Any
) -> None:
    """Claims and hand-backs go as plain EVALSHAs in one pipeline (no SCRIPT EXISTS round trip
    each time); a Redis whose script cache was emptied (a restart) gets the script again."""
    a = await replicas()
    b = await replicas()
    first, _, _ = await a.add(_job())
    with redis_process.client() as admin:
        admin.script_flush()
    [held] = await a.take("m", 10, 0.1)
    assert held.id == first.id and held.attempts == 1
    with redis_process.client() as admin:
        admin.script_flush()
    await a.release([held], started=False)
    [again] = await b.take("m", 10, 0.1)
    assert again.id == first.id and again.attempts == 1


async def test_the_pending_bound_holds_over_replicas(replicas: Callable[..., Any]) -> None:
    from tensorgate.server.errors import ResourceExhausted

    a = await replicas(max_pending=3)
    b = await replicas(max_pending=3)
    for store in (a, b, a):
        await store.add(_job())
    with pytest.raises(ResourceExhausted, match="3 jobs are pending, the limit is 3"):
        await b.add(_job())


async def test_pending_jobs_are_bounded_per_tenant_over_replicas(
    replicas: Callable[..., Any],
) -> None:
    from tensorgate.server.errors import ResourceExhausted

    a = await replicas(max_per_tenant=1)
    b = await replicas(max_per_tenant=1)

    def of(tenant: str) -> Job:
        job = _job()
        job.tenant = job.payload.tenant = tenant  # type: ignore[union-attr]
        return job

    first, _, _ = await a.add(of("team-a"))
    with pytest.raises(ResourceExhausted, match="tenant 'team-a' has 1 unfinished jobs"):
        await b.add(of("team-a"))
    await b.add(of("team-b"))  # another tenant is not held back
    cancelled = await a.cancel(first.id, "team-a")
    assert cancelled is not None and cancelled.status is JobStatus.CANCELLED
    await b.add(of("team-a"))  # a finished job no longer counts


async def test_a_loop_of_store_calls_ends_when_cancelled_even_where_redis_py_drops_it(
    replicas: Callable[..., Any],
) -> None:
    """On Python 3.11 redis-py returns normally from a command whose write was cancelled as it
    completed (asyncio.wait_for); the runner's sweeper then slept on, and shutdown hung. Every
    cancellation that lands in a store call must end the calling task."""
    store = await replicas()
    job, _, _ = await store.add(_job())

    async def loop() -> None:
        while True:
            await asyncio.sleep(0)
            await store.sweep()
            await store.get(job.id)

    stuck = 0
    for delay in np.linspace(0.0, 0.004, 150):  # cancellations land all through the calls
        task = asyncio.create_task(loop())
        await asyncio.sleep(float(delay))
        task.cancel()
        done, _ = await asyncio.wait([task], timeout=1.0)
        if not done:
            stuck += 1
            while not task.done():  # a second cancellation may be dropped as well
                task.cancel()
                await asyncio.wait([task], timeout=0.1)
    assert stuck == 0, f"{stuck} of 150 cancelled loops kept running"


async def test_a_redis_that_stops_answering_fails_the_call_in_time_and_is_used_again_after(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Redis that hangs (stopped, not gone: the connection stays open) fails a Submit as
    UNAVAILABLE once the call's time is up, instead of holding it; when Redis answers again
    the store works on."""
    monkeypatch.setattr(redis_store, "_CALL_TIMEOUT_S", 0.5)
    redis = RedisProcess(tmp_path / "redis").start()
    store = RedisJobStore(redis.url, 100, 60.0, 100, 3, 30.0)
    try:
        await store.open(["m"], lambda _: None, lambda _: None)
        await store.add(_job())  # the job path's connection is open and idle
        assert redis.process is not None
        os.kill(redis.process.pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            with pytest.raises(Unavailable, match="Redis"):
                await store.add(_job())
            assert time.monotonic() - started < 3.0
        finally:
            os.kill(redis.process.pid, signal.SIGCONT)
        job, deduplicated, _ = await store.add(_job())
        assert not deduplicated and (await store.get(job.id)) is not None
    finally:
        await store.close()
        redis.stop()
