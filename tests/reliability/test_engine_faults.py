"""Engine faults stay with the requests that cause them: a failing batch is re-run in halves so
only the poisoned request fails; a hung engine call is caught by the watchdog and its instance
replaced; failed jobs are retried with backoff, then kept as dead letters; a model whose engine
always fails reports NOT_SERVING under its own name."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tensorgate.client import AsyncTensorgateClient, TensorgateClient
from tests.harness import ServerThread, wait_until


def _rows(first: float, count: int = 1, key: float = 0.0) -> np.ndarray:
    x = np.ones((count, 4), np.float32)
    x[:, 0] = first
    x[:, 1] = key
    return x


def test_only_the_poisoned_request_of_a_batch_fails(
    fault_server: Callable[..., ServerThread],
) -> None:
    running = fault_server()

    async def burst() -> list[object]:
        async with AsyncTensorgateClient(running.target, timeout_s=20) as c:
            xs = [_rows(-1 if i == 5 else i + 1) for i in range(12)]
            return await asyncio.gather(
                *(c.predict("faulty", {"x": x}) for x in xs), return_exceptions=True
            )

    results = asyncio.run(burst())
    failed = [i for i, r in enumerate(results) if isinstance(r, Exception)]
    assert failed == [5]
    error = results[5]
    assert isinstance(error, grpc.aio.AioRpcError)
    assert error.code() == grpc.StatusCode.INTERNAL
    assert "failed on this request: RuntimeError: poisoned row (x[0] == -1)" in error.details()
    for i, result in enumerate(results):
        if i != 5:
            assert isinstance(result, dict)
            np.testing.assert_array_equal(result["y"], _rows(i + 1) * 2)
    stats = running.stats("faulty")
    assert stats.isolation_retries >= 1  # the batch of 12 was split to find the culprit


def test_a_hung_engine_call_is_cut_off_and_the_instance_replaced(
    fault_server: Callable[..., ServerThread],
) -> None:
    running = fault_server()
    with TensorgateClient(running.target, timeout_s=20) as c:
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as hung:
            c.predict("faulty", {"x": _rows(-2)})
        assert time.monotonic() - started < 2.5  # the 0.5 s watchdog, not the 3 s hang
        assert hung.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "did not finish within 0.5 s (watchdog)" in hung.value.details()
        # The model keeps serving on a fresh instance while the old one is still stuck.
        deadline = time.monotonic() + 10
        while True:
            try:
                out = c.predict("faulty", {"x": _rows(3)})
                break
            except grpc.RpcError:
                assert time.monotonic() < deadline
                time.sleep(0.05)
        np.testing.assert_array_equal(out["y"], _rows(3) * 2)
    assert running.stats("faulty").watchdog_timeouts == 1
    assert len(running.server.models["faulty"]._pool.instances) == 1


def test_a_failed_job_is_retried_and_succeeds(
    fault_server: Callable[..., ServerThread], job_store: str
) -> None:
    running = fault_server(job_store=job_store)
    with TensorgateClient(running.target, timeout_s=20) as c:
        job = c.submit("faulty", {"x": _rows(-3, key=42)})
        result = c.get_result(job.job_id, wait_timeout_s=10)
        assert result.status == "SUCCEEDED"
        np.testing.assert_array_equal(result.outputs["y"], _rows(-3, key=42) * 2)  # type: ignore[index]
        [summary] = [j for j in c.list_jobs() if j.job_id == job.job_id]
        assert summary.attempts == 2


def test_a_job_that_keeps_failing_becomes_a_dead_letter(
    fault_server: Callable[..., ServerThread], job_store: str
) -> None:
    running = fault_server(job_max_attempts=3, job_store=job_store)
    with TensorgateClient(running.target, timeout_s=20) as c:
        ok = c.submit("faulty", {"x": _rows(1)})
        bad = c.submit("faulty", {"x": _rows(-1)})
        result = c.get_result(bad.job_id, wait_timeout_s=10)
        assert result.status == "FAILED"
        assert result.error_code == grpc.StatusCode.INTERNAL
        assert "poisoned row" in result.error_message
        assert c.get_result(ok.job_id, wait_timeout_s=10).status == "SUCCEEDED"
        dead = c.list_jobs("FAILED")
    assert [(j.job_id, j.attempts) for j in dead] == [(bad.job_id, 3)]
    assert (
        dead[0].error_code == grpc.StatusCode.INTERNAL and "poisoned row" in dead[0].error_message
    )


def test_a_model_whose_engine_always_fails_is_not_serving_while_others_serve(
    fault_server: Callable[..., ServerThread],
) -> None:
    running = fault_server(models=("broken", "mlp"))
    with TensorgateClient(running.target, timeout_s=20) as c:
        for _ in range(6):
            with pytest.raises(grpc.RpcError) as failed:
                c.predict("broken", {"x": _rows(1)})
            assert failed.value.code() == grpc.StatusCode.INTERNAL
            assert "this engine is broken" in failed.value.details()
        assert c.predict("mlp", {"input": np.ones((1, 256), np.float32)})["logits"].shape == (1, 16)
    with grpc.insecure_channel(running.target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)

        def status(service: str) -> int:
            return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status

        wait_until(lambda: status("broken") == health_pb2.HealthCheckResponse.NOT_SERVING)
        assert status("broken") == health_pb2.HealthCheckResponse.NOT_SERVING
        assert status("mlp") == health_pb2.HealthCheckResponse.SERVING
        assert status("") == health_pb2.HealthCheckResponse.SERVING


def test_json_logs_are_one_object_a_line_with_the_request_id(fault_repository: Path) -> None:
    """--log-format json: what log pipelines expect; the poisoned request's failure is logged
    with the id its caller gave it."""
    served = subprocess.Popen(
        [sys.executable, "-m", "tensorgate", "serve", "--host", "127.0.0.1", "--port", "0",
         "--metrics-port", "-1", "--drain-delay-s", "0", "--log-format", "json",
         "--model-repository", str(fault_repository), "--models", "faulty"],
        stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    assert served.stderr is not None
    lines: list[str] = []
    port = 0
    for line in served.stderr:
        lines.append(line)
        message = json.loads(line)["message"]
        if match := re.search(r"listening on 127\.0\.0\.1:(\d+)", message):
            port = int(match.group(1))
        if message.startswith("serving "):
            break
    assert port, lines
    with TensorgateClient(f"127.0.0.1:{port}", timeout_s=10) as c:
        with pytest.raises(grpc.RpcError):
            c.predict("faulty", {"x": _rows(-1)}, request_id="poison-7")
    served.send_signal(signal.SIGTERM)
    _, rest = served.communicate(timeout=30)
    records = [json.loads(line) for line in [*lines, *rest.splitlines()] if line.strip()]
    assert all({"time", "level", "logger", "message"} <= set(r) for r in records)
    [failure] = [r for r in records if "failed on request" in r["message"]]
    assert failure["request_id"] == "poison-7" and failure["level"] == "WARNING"
    assert served.returncode == 0
