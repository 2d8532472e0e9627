"""The model set without a gRPC server: a request is admitted (checked and decoded) once, queued
on its model and answered through its future; a job's stored request is rebuilt without a second
check; the estimates and limits the job service asks for."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest

from tensorgate.server.errors import InvalidArgument, NotFound, Unavailable
from tensorgate.server.model_config import ModelConfig
from tensorgate.server.models import ModelSet
from tensorgate.server.records import Request, RequestKind
from tensorgate.server.tensors import TensorInput
from tests.harness import MlpReference


def _request(x: np.ndarray, model: str = "mlp", **fields: object) -> Request:
    return Request(model, [TensorInput("input", "FP32", x.shape, x.tobytes())], **fields)  # type: ignore[arg-type]


@pytest.fixture
async def models(repository: Path) -> AsyncIterator[ModelSet]:
    served = ModelSet([ModelConfig.load(repository / "mlp"), ModelConfig.load(repository / "pair")])
    await served.load()
    changes: list[tuple[str, bool]] = []
    assert served.start(lambda name, ready: changes.append((name, ready))) == ["mlp", "pair"]
    assert sorted(changes) == [("mlp", True), ("pair", True)]
    yield served
    await served.stop(time.monotonic() + 5)


async def test_an_admitted_request_is_queued_and_answered_through_its_future(
    models: ModelSet, reference: MlpReference
) -> None:
    x = np.random.default_rng(3).standard_normal((3, 256)).astype(np.float32)
    queued = models.admit(_request(x, id="r-1"), RequestKind.UNARY)
    assert queued.rows == 3 and queued.id == "r-1" and not queued.future.done()
    models.enqueue(queued, "mlp")
    outputs = await queued.future
    np.testing.assert_allclose(outputs["logits"], reference.logits(x), rtol=1e-4, atol=1e-4)
    assert models.statistics("mlp")[0].requests == 1


async def test_admission_names_what_is_wrong_before_anything_is_queued(models: ModelSet) -> None:
    with pytest.raises(NotFound, match="model 'nope' is not served; served models: mlp, pair"):
        models.admit(_request(np.ones((1, 256), np.float32), "nope"), RequestKind.UNARY)
    with pytest.raises(InvalidArgument, match=r"input 'input' has shape \[1,3\]"):
        models.admit(_request(np.ones((1, 3), np.float32)), RequestKind.UNARY)
    with pytest.raises(InvalidArgument, match="has no output 'nope'"):
        models.admit(
            _request(np.ones((1, 256), np.float32), requested_outputs=["nope"]),
            RequestKind.UNARY,
        )
    assert models.load_now()["mlp"].queued_requests == 0


async def test_a_jobs_stored_request_is_rebuilt_without_a_second_check(
    models: ModelSet, reference: MlpReference
) -> None:
    x = np.random.default_rng(4).standard_normal((2, 256)).astype(np.float32)
    payload = _request(x, requested_outputs=["logits"])
    admitted = models.admit(payload, RequestKind.JOB)
    stored = models.admit_stored(payload)
    assert stored.priority == admitted.priority == -1  # a job's default: below interactive calls
    assert stored.deadline is None  # nobody waits on a job's call
    models.enqueue(stored, "mlp")
    outputs = await stored.future
    assert set(outputs) == {"logits"}
    np.testing.assert_allclose(outputs["logits"], reference.logits(x), rtol=1e-4, atol=1e-4)


async def test_what_the_job_service_asks_of_a_model(models: ModelSet) -> None:
    assert models.takes_jobs("mlp")
    assert models.job_capacity("mlp") == 2 * 64 * 2  # two batches ahead of both instances
    assert models.wait_estimate_s("mlp", 1000) == 0.0  # no batch has run: no rate known yet
    ran = models.admit(_request(np.ones((4, 256), np.float32)), RequestKind.UNARY)
    models.enqueue(ran, "mlp")
    await ran.future
    # Once a batch ran, the estimate grows with the rows ahead.
    assert 0.0 < models.wait_estimate_s("mlp", 1000) < models.wait_estimate_s("mlp", 2000)
    assert models.wait_estimate_s("nope") == 0.0
    assert models.metric_label("nope") == "_unknown" and models.metric_label("mlp") == "mlp"
    info = models.info("mlp")
    assert info.ready and info.max_batch_size == 64 and info.inputs[0].name == "input"


async def test_a_stopped_model_takes_no_request(repository: Path) -> None:
    served = ModelSet([ModelConfig.load(repository / "mlp")])
    await served.load()
    served.start(lambda name, ready: None)
    await served.stop(time.monotonic() + 5)
    with pytest.raises(Unavailable, match="model 'mlp' is stopped"):
        served.admit(_request(np.ones((1, 256), np.float32)), RequestKind.UNARY)
