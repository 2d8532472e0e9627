"""The data plane without a gRPC server: what every front end calls, over the model set and the
job service; its shutdown states."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest

from tensorgate.server.config import ServerConfig
from tensorgate.server.dataplane import DataPlane
from tensorgate.server.errors import Unavailable
from tensorgate.server.jobs.service import JobService
from tensorgate.server.jobs.store import MemoryJobStore
from tensorgate.server.model_config import ModelConfig
from tensorgate.server.models import ModelSet
from tensorgate.server.records import JobStatus, Request
from tensorgate.server.tensors import TensorInput
from tests.harness import MlpReference


@pytest.fixture
async def plane(repository: Path) -> AsyncIterator[DataPlane]:
    models = ModelSet([ModelConfig.load(repository / "mlp")])
    await models.load()
    jobs = JobService(models, MemoryJobStore(100, 60), ServerConfig(metrics_port=-1))
    await jobs.start(models.start(lambda name, ready: None))
    yield DataPlane(models, jobs)
    await jobs.stop()
    await models.stop(time.monotonic() + 5)


def _request(x: np.ndarray) -> Request:
    return Request("mlp", [TensorInput("input", "FP32", x.shape, x.tobytes())])


async def test_infer_and_a_job_take_one_path_to_the_same_answer(
    plane: DataPlane, reference: MlpReference
) -> None:
    x = np.random.default_rng(6).standard_normal((2, 256)).astype(np.float32)
    outputs = await plane.infer(_request(x))
    np.testing.assert_allclose(outputs["logits"], reference.logits(x), rtol=1e-4, atol=1e-4)
    submitted = await plane.submit(_request(x))
    job = await plane.job(submitted.job.id, wait_s=10)
    assert job.status is JobStatus.SUCCEEDED and job.outputs is not None
    np.testing.assert_array_equal(job.outputs["logits"], outputs["logits"])
    assert plane.inflight == 0


async def test_shutdown_states_readiness_and_refusals(plane: DataPlane) -> None:
    x = np.ones((1, 256), np.float32)
    assert plane.server_ready() and plane.model_ready("mlp") and plane.model_info("mlp").ready
    plane.draining = True  # SIGTERM: the drain delay begins
    assert not plane.server_ready() and not plane.model_ready("mlp")
    assert plane.model_info("mlp").reason == "the server is shutting down"
    assert (await plane.infer(_request(x)))["logits"].shape == (1, 16)  # still served
    with pytest.raises(Unavailable, match="takes no new jobs"):
        await plane.submit(_request(x))  # a memory store's job would not outlive the process
    plane.accepting = False
    with pytest.raises(Unavailable, match="takes no new requests"):
        await plane.infer(_request(x))
    assert await plane.drain(time.monotonic() + 2, quiet_s=0.0)
