"""Async jobs: Submit, long-poll GetResult, CancelJob, TTL expiry, idempotency keys."""

from __future__ import annotations

import asyncio
import random
import re
import time
from collections.abc import Callable

import grpc
import numpy as np
import pytest

from tensorgate.client import AsyncTensorgateClient, TensorgateClient
from tests.harness import MlpReference, ServerThread, wait_until

X = np.linspace(-1, 1, 256, dtype=np.float32).reshape(1, 256)


def test_submit_then_long_poll_returns_the_result_as_soon_as_it_is_ready(
    client: TensorgateClient, reference: MlpReference
) -> None:
    submitted = client.submit("mlp_wide", {"input": X})
    assert submitted.status == "PENDING" and not submitted.deduplicated
    assert re.fullmatch("[0-9a-f]{32}", submitted.job_id)  # 128 bits, hex
    started = time.monotonic()
    result = client.get_result(submitted.job_id, wait_timeout_s=20)
    assert time.monotonic() - started < 10  # returned when the job finished, not at 20 s
    assert result.status == "SUCCEEDED" and result.finished
    assert result.outputs is not None
    np.testing.assert_allclose(result.outputs["logits"], reference.logits(X), rtol=1e-4, atol=1e-4)
    assert 0 < result.expires_in_s <= 600


def test_get_result_without_waiting_reports_pending(client: TensorgateClient) -> None:
    """mlp_wide holds a lone request for its 300 ms window."""
    submitted = client.submit("mlp_wide", {"input": X})
    assert client.get_result(submitted.job_id).status in ("PENDING", "RUNNING")
    assert client.get_result(submitted.job_id, wait_timeout_s=10).status == "SUCCEEDED"


def test_long_poll_ends_at_its_timeout_when_the_job_is_unfinished(
    client: TensorgateClient,
) -> None:
    submitted = client.submit("mlp_tiny_queue", {"input": X})  # 2 s window
    started = time.monotonic()
    result = client.get_result(submitted.job_id, wait_timeout_s=0.2)
    assert result.status in ("PENDING", "RUNNING") and result.outputs is None
    assert 0.15 <= time.monotonic() - started < 1.5
    assert client.get_result(submitted.job_id, wait_timeout_s=10).status == "SUCCEEDED"


def test_cancelled_job_is_never_computed(client: TensorgateClient, server: ServerThread) -> None:
    before = server.stats("mlp_tiny_queue")
    submitted = client.submit("mlp_tiny_queue", {"input": X})
    assert client.cancel(submitted.job_id) == "CANCELLED"
    result = client.get_result(submitted.job_id)
    assert result.status == "CANCELLED"
    assert result.error_code == grpc.StatusCode.CANCELLED
    time.sleep(2.3)  # past the model's 2 s window
    assert server.stats("mlp_tiny_queue").rows == before.rows
    # Cancelling a finished job keeps its final status.
    assert client.cancel(submitted.job_id) == "CANCELLED"


def test_cancel_after_success_keeps_succeeded(client: TensorgateClient) -> None:
    submitted = client.submit("mlp", {"input": X})
    assert client.get_result(submitted.job_id, wait_timeout_s=10).status == "SUCCEEDED"
    assert client.cancel(submitted.job_id) == "SUCCEEDED"


def test_same_idempotency_key_returns_the_same_job(client: TensorgateClient) -> None:
    first = client.submit("mlp", {"input": X}, idempotency_key="order-17")
    again = client.submit("mlp", {"input": X}, idempotency_key="order-17")
    other = client.submit("mlp", {"input": X}, idempotency_key="order-18")
    assert again.job_id == first.job_id and again.deduplicated
    assert other.job_id != first.job_id and not other.deduplicated


@pytest.mark.parametrize(
    ("job_id", "code", "message"),
    [
        ("not-a-job", grpc.StatusCode.INVALID_ARGUMENT, "is malformed: expected 32 hex digits"),
        ("", grpc.StatusCode.INVALID_ARGUMENT, "is malformed"),
        ("0" * 32, grpc.StatusCode.NOT_FOUND, "is unknown or its result has expired"),
    ],
)
def test_unknown_or_malformed_job_ids(
    client: TensorgateClient, job_id: str, code: grpc.StatusCode, message: str
) -> None:
    for call in (client.get_result, client.cancel):
        with pytest.raises(grpc.RpcError) as failed:
            call(job_id)
        assert failed.value.code() == code and message in failed.value.details()


def test_results_expire_after_the_ttl(start_server: Callable[..., ServerThread]) -> None:
    running = start_server(job_ttl_s=0.5, models=("mlp",))
    with TensorgateClient(running.target, timeout_s=10) as c:
        submitted = c.submit("mlp", {"input": X}, idempotency_key="k")
        assert c.get_result(submitted.job_id, wait_timeout_s=5).status == "SUCCEEDED"
        time.sleep(0.7)
        with pytest.raises(grpc.RpcError) as expired:
            c.get_result(submitted.job_id)
        assert expired.value.code() == grpc.StatusCode.NOT_FOUND
        # An expired key no longer deduplicates.
        assert c.submit("mlp", {"input": X}, idempotency_key="k").job_id != submitted.job_id


def test_estimated_wait_grows_with_the_queue(client: TensorgateClient) -> None:
    client.predict("mlp_tiny_queue", {"input": X})  # the model has a service rate now
    first = client.submit("mlp_tiny_queue", {"input": np.zeros((32, 256), np.float32)})
    second = client.submit("mlp_tiny_queue", {"input": np.zeros((32, 256), np.float32)})
    assert 0 < first.estimated_wait_s < second.estimated_wait_s
    for job in (first, second):
        assert client.get_result(job.job_id, wait_timeout_s=10).status == "SUCCEEDED"


def test_many_jobs_all_finish(client: TensorgateClient) -> None:
    jobs = [client.submit("mlp", {"input": X}).job_id for _ in range(300)]
    statuses = {client.get_result(job_id, wait_timeout_s=20).status for job_id in jobs}
    assert statuses == {"SUCCEEDED"}


def test_finished_results_are_bounded_oldest_evicted_first(
    start_server: Callable[..., ServerThread],
) -> None:
    running = start_server(models=("mlp",), max_finished_jobs=5)
    with TensorgateClient(running.target, timeout_s=10) as c:
        ids = []
        for _ in range(8):
            job = c.submit("mlp", {"input": X})
            assert c.get_result(job.job_id, wait_timeout_s=5).status == "SUCCEEDED"
            ids.append(job.job_id)
        for old in ids[:3]:
            with pytest.raises(grpc.RpcError) as evicted:
                c.get_result(old)
            assert evicted.value.code() == grpc.StatusCode.NOT_FOUND
        assert all(c.get_result(kept).status == "SUCCEEDED" for kept in ids[3:])
    store = running.server._jobs.store  # type: ignore[union-attr]
    kept = running.call(store.find(None, 100))
    assert len(kept) == 5
    assert all(job.payload is None and job.run is None for job in kept)  # inputs released


async def test_cancel_job_answers_with_the_jobs_final_word_even_racing_completion(
    server: ServerThread,
) -> None:
    async with AsyncTensorgateClient(server.target, timeout_s=30) as c:

        async def race() -> tuple[str, str]:
            job = await c.submit("mlp", {"input": X})
            await asyncio.sleep(random.uniform(0, 0.004))  # sometimes mid-batch, sometimes not
            said = await c.cancel(job.job_id)
            final = await c.get_result(job.job_id, wait_timeout_s=10)
            return said, final.status

        outcomes = await asyncio.gather(*(race() for _ in range(300)))
    assert all(said == final for said, final in outcomes), [o for o in outcomes if o[0] != o[1]]
    assert {said for said, _ in outcomes} <= {"CANCELLED", "SUCCEEDED"}


def test_a_version_stops_counting_jobs_once_they_are_stored_or_done(
    start_server: Callable[..., ServerThread],
) -> None:
    """The version that admitted a Submit counts it until it settles (a retiring version waits
    for what it counts): finished, deduplicated, or handed to a shared store, whose taker admits
    it again. Nothing is left counted, so a reload can release the old version."""
    running = start_server(models=("mlp",))
    version = running.server.models["mlp"]
    with TensorgateClient(running.target, timeout_s=10) as c:
        jobs = [c.submit("mlp", {"input": X}).job_id for _ in range(3)]
        jobs.append(c.submit("mlp", {"input": X}, idempotency_key="same").job_id)
        assert c.submit("mlp", {"input": X}, idempotency_key="same").job_id == jobs[-1]
        for job_id in jobs:
            assert c.get_result(job_id, wait_timeout_s=10).status == "SUCCEEDED"
    wait_until(lambda: running.call(_admitted(version)) == 0, what="nothing left counted")


async def _admitted(version: object) -> int:
    return int(version.admitted)  # type: ignore[attr-defined]
