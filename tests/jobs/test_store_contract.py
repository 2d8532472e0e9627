"""The JobStore contract, one set of tests run against both stores (memory, and a real
redis-server): what the job service relies on, without a server around them."""

from __future__ import annotations

import secrets
import time
from collections.abc import AsyncIterator

import numpy as np
import pytest

from tensorgate.server.errors import ResourceExhausted
from tensorgate.server.jobs.job import Job, JobStatus
from tensorgate.server.jobs.redis_store import RedisJobStore
from tensorgate.server.jobs.store import JobStore, MemoryJobStore
from tensorgate.server.records import Request
from tensorgate.server.tensors import TensorInput

MAX_PENDING = 3


def _store(job_store: str) -> JobStore:
    if job_store == "memory":
        return MemoryJobStore(max_pending=MAX_PENDING, ttl_s=60)
    return RedisJobStore(
        job_store, max_pending=MAX_PENDING, ttl_s=60, max_finished=100, max_attempts=3, lease_s=30
    )


@pytest.fixture
async def store(job_store: str) -> AsyncIterator[JobStore]:
    opened = _store(job_store)
    await opened.open(["mlp"], lambda available: None, lambda job_id: None)
    yield opened
    await opened.close()


def _job(tenant: str = "", key: str = "") -> Job:
    x = np.arange(4, dtype=np.float32).reshape(1, 4)
    return Job(
        id=secrets.token_hex(16),
        model="mlp",
        tenant=tenant,
        idempotency_key=key,
        created_at=time.time(),
        payload=Request("mlp", [TensorInput("x", "FP32", [1, 4], x.tobytes())], tenant=tenant),
    )


async def test_a_job_is_added_taken_finished_and_read_back(store: JobStore) -> None:
    job = _job()
    stored, deduplicated, ahead = await store.add(job)
    assert stored.id == job.id and not deduplicated and ahead == 0
    [taken] = await store.take("mlp", 10, 1.0)
    assert taken.id == job.id and taken.status is JobStatus.RUNNING and taken.attempts == 1
    assert taken.payload is not None and taken.payload.inputs[0].name == "x"
    taken.status = JobStatus.SUCCEEDED
    taken.outputs = {"y": np.ones((1, 4), np.float32)}
    taken.finished_at = time.time()
    final = await store.finish(taken)
    assert final.status is JobStatus.SUCCEEDED
    read = await store.wait(job.id, "", 1.0)
    assert read is not None and read.status is JobStatus.SUCCEEDED and read.outputs is not None
    np.testing.assert_array_equal(read.outputs["y"], np.ones((1, 4), np.float32))
    assert [j.id for j in await store.find(JobStatus.SUCCEEDED, 10)] == [job.id]


async def test_pending_jobs_are_bounded(store: JobStore) -> None:
    for _ in range(MAX_PENDING):
        await store.add(_job())
    with pytest.raises(ResourceExhausted, match="pending"):
        await store.add(_job())


async def test_a_cancelled_queued_job_never_runs_and_cancel_wins(store: JobStore) -> None:
    job = _job()
    await store.add(job)
    cancelled = await store.cancel(job.id)
    assert cancelled is not None and cancelled.status is JobStatus.CANCELLED
    assert await store.take("mlp", 10, 0.2) == []
    read = await store.get(job.id)
    assert read is not None and read.status is JobStatus.CANCELLED


async def test_one_idempotency_key_names_one_job_per_tenant(store: JobStore) -> None:
    first, _, _ = await store.add(_job("a", "order-1"))
    again, deduplicated, _ = await store.add(_job("a", "order-1"))
    other, other_deduplicated, _ = await store.add(_job("b", "order-1"))
    assert deduplicated and again.id == first.id
    assert not other_deduplicated and other.id != first.id


async def test_another_tenants_job_reads_as_unknown(store: JobStore) -> None:
    job = _job("a")
    await store.add(job)
    assert await store.get(job.id, "b") is None
    assert await store.cancel(job.id, "b") is None
    assert (await store.get(job.id, "a")) is not None
