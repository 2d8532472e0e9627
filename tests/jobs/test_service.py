"""The job service without a gRPC server, on both stores: a job admitted by the model set runs
through the lanes and its outcome reaches the store (long-poll included); cancel, list and a
model that takes no jobs."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest

from tensorgate.server.config import ServerConfig
from tensorgate.server.errors import InvalidArgument, NotFound
from tensorgate.server.jobs.job import JobStatus
from tensorgate.server.jobs.redis_store import RedisJobStore
from tensorgate.server.jobs.service import JobService
from tensorgate.server.jobs.store import JobStore, MemoryJobStore
from tensorgate.server.model_config import ModelConfig
from tensorgate.server.models import ModelSet
from tensorgate.server.records import Request, RequestKind
from tensorgate.server.tensors import TensorInput
from tests.harness import MlpReference


def _store(job_store: str) -> JobStore:
    if job_store == "memory":
        return MemoryJobStore(max_pending=100, ttl_s=60)
    return RedisJobStore(
        job_store, max_pending=100, ttl_s=60, max_finished=100, max_attempts=3, lease_s=30
    )


@pytest.fixture
async def service(repository: Path, job_store: str) -> AsyncIterator[tuple[ModelSet, JobService]]:
    models = ModelSet([ModelConfig.load(repository / "mlp")])
    await models.load()
    jobs = JobService(models, _store(job_store), ServerConfig(metrics_port=-1))
    await jobs.start(models.start(lambda name, ready: None))
    yield models, jobs
    await jobs.stop()
    await models.stop(time.monotonic() + 5)


def _payload(x: np.ndarray) -> Request:
    return Request("mlp", [TensorInput("input", "FP32", x.shape, x.tobytes())], id="job-1")


async def test_a_submitted_job_runs_and_its_waiter_sees_the_result(
    service: tuple[ModelSet, JobService], reference: MlpReference
) -> None:
    models, jobs = service
    x = np.random.default_rng(5).standard_normal((2, 256)).astype(np.float32)
    payload = _payload(x)
    job, deduplicated, estimate_s = await jobs.submit(
        payload, models.admit(payload, RequestKind.JOB)
    )
    assert not deduplicated and estimate_s >= 0.0 and job.status is JobStatus.PENDING
    done = await jobs.get(job.id, wait_s=10)
    assert done.status is JobStatus.SUCCEEDED and done.outputs is not None
    np.testing.assert_allclose(done.outputs["logits"], reference.logits(x), rtol=1e-4, atol=1e-4)
    view = jobs.view(done)
    assert view.request_id == "job-1" and view.attempts == 1 and view.expires_in_s
    assert [j.id for j in await jobs.find(JobStatus.SUCCEEDED)] == [job.id]
    assert jobs.unfinished == 0


async def test_an_idempotency_key_names_one_job(service: tuple[ModelSet, JobService]) -> None:
    models, jobs = service
    payload = _payload(np.ones((1, 256), np.float32))
    first, _, _ = await jobs.submit(payload, models.admit(payload, RequestKind.JOB), "key-1")
    again, deduplicated, _ = await jobs.submit(
        payload, models.admit(payload, RequestKind.JOB), "key-1"
    )
    assert deduplicated and again.id == first.id


async def test_unknown_and_malformed_ids_and_another_tenants_job(
    service: tuple[ModelSet, JobService],
) -> None:
    models, jobs = service
    payload = _payload(np.ones((1, 256), np.float32))
    job, _, _ = await jobs.submit(payload, models.admit(payload, RequestKind.JOB))
    with pytest.raises(InvalidArgument, match="malformed"):
        await jobs.get("not-hex")
    with pytest.raises(NotFound, match="unknown or its result has expired"):
        await jobs.get("0" * 32)
    with pytest.raises(NotFound):
        await jobs.get(job.id, tenant="someone-else")
