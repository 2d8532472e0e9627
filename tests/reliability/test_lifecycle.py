"""Start-up, shutdown and health at their edges: a stop during start-up, a model left without
instances, one source of truth for readiness, the drain delay, and bounded exits."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tensorgate.client import TensorgateClient, codec
from tensorgate.kserve import grpc_service_pb2 as kpb
from tensorgate.kserve import grpc_service_pb2_grpc as kpb_grpc
from tensorgate.server.config import ServerConfig
from tests.harness import ServerThread, wait_until

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def _rows(first: float) -> np.ndarray:
    x = np.ones((1, 4), np.float32)
    x[0, 0] = first
    return x


def _health(target: str, service: str) -> int:
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status


def _kserve_ready(target: str, model: str) -> bool:
    with grpc.insecure_channel(target) as channel:
        stub = kpb_grpc.GRPCInferenceServiceStub(channel)
        return stub.ModelReady(kpb.ModelReadyRequest(name=model), timeout=5).ready


def test_a_stop_during_start_up_leaves_nothing_running(fault_repository: Path) -> None:
    config = ServerConfig(
        host="127.0.0.1",
        port=0,
        model_repository=fault_repository,
        models=("slow_load",),
        drain_delay_s=0,
        metrics_port=-1,
    )
    running = ServerThread(config)
    running._thread.start()
    starting: Future[None] = asyncio.run_coroutine_threadsafe(running.server.start(), running.loop)
    try:
        wait_until(lambda: "slow_load" in running.server.models, what="loading to begin")
        running.call(running.server.stop(1.0))
        starting.result(10)  # start gives up instead of serving
        model = running.server.models["slow_load"]
        assert not model.ready and model._task is None and model._instances == []

        async def tasks() -> list[str]:
            return [t.get_name() for t in asyncio.all_tasks() if not t.done()]

        leftover = [n for n in running.call(tasks()) if n.startswith(("scheduler-", "job-"))]
        assert leftover == []
    finally:
        running.loop.call_soon_threadsafe(running.loop.stop)
        running._thread.join(10)


def test_a_model_left_without_instances_fails_queued_work_and_both_health_views_agree(
    fault_repository: Path, tmp_path: Path, start_server: Callable[..., ServerThread]
) -> None:
    shutil.copytree(fault_repository / "faulty", tmp_path / "faulty")
    running = start_server(model_repository=tmp_path, job_retry_base_s=0.02)
    target = running.target
    assert _health(target, "faulty") == SERVING and _kserve_ready(target, "faulty")
    (tmp_path / "faulty" / "no-more-loads").touch()  # the replacement instance cannot load
    with TensorgateClient(target, timeout_s=20) as c:
        hung = c._stub.Predict.future(codec.predict_request("faulty", {"x": _rows(-4)}))
        wait_until(lambda: running.server.models["faulty"].busy_instances == 1)
        queued = c._stub.Predict.future(codec.predict_request("faulty", {"x": _rows(1)}))
        with pytest.raises(grpc.RpcError) as watchdog:
            hung.result()
        assert watchdog.value.code() == grpc.StatusCode.UNAVAILABLE
        with pytest.raises(grpc.RpcError) as left:
            queued.result()
        assert left.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "no working instance" in left.value.details()
    wait_until(lambda: _health(target, "faulty") == NOT_SERVING, what="NOT_SERVING")
    assert _kserve_ready(target, "faulty") is False
    started = time.monotonic()
    running.call(running.server.stop(0.5))
    assert time.monotonic() - started < 0.5 + 3  # grace plus teardown, with a thread hung


def test_a_scheduler_that_keeps_dying_backs_off_not_serving_in_both_views_then_recovers(
    fault_server: Callable[..., ServerThread],
) -> None:
    running = fault_server(models=("faulty", "mlp"))
    scheduler = running.server.models["faulty"].scheduler
    real_next_batch = scheduler._next_batch  # type: ignore[attr-defined]

    async def broken_next_batch() -> None:
        raise RuntimeError("scheduler bug")

    scheduler._next_batch = broken_next_batch  # type: ignore[attr-defined]
    with TensorgateClient(running.target, timeout_s=10) as c:
        # Each call meets the bug: a retryable UNAVAILABLE, and a restart. Past a few restarts
        # in a row they back off, and meanwhile both views say the model is down.
        for _ in range(7):
            with pytest.raises(grpc.RpcError) as failed:
                c.predict("faulty", {"x": _rows(1)})
            assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "scheduler failed (RuntimeError) and is restarting" in failed.value.details()
        wait_until(
            lambda: (
                _health(running.target, "faulty") == NOT_SERVING
                and _kserve_ready(running.target, "faulty") is False
            ),
            what="NOT_SERVING in both views during the backoff",
        )
        assert _health(running.target, "mlp") == SERVING and _kserve_ready(running.target, "mlp")
        scheduler._next_batch = real_next_batch  # type: ignore[attr-defined]
        wait_until(
            lambda: (
                _health(running.target, "faulty") == SERVING
                and _kserve_ready(running.target, "faulty") is True
            ),
            what="SERVING again in both views",
        )
        np.testing.assert_array_equal(c.predict("faulty", {"x": _rows(1)})["y"], _rows(1) * 2)


def test_health_says_not_serving_for_the_drain_delay_while_calls_are_still_served(
    start_server: Callable[..., ServerThread],
) -> None:
    running = start_server(models=("mlp",), drain_delay_s=1.5)
    stopping = asyncio.run_coroutine_threadsafe(running.server.stop(5.0), running.loop)
    wait_until(lambda: _health(running.target, "") == NOT_SERVING, what="NOT_SERVING")
    # KServe's readiness answers from the same state: not ready from the first moment.
    assert _kserve_ready(running.target, "mlp") is False
    with grpc.insecure_channel(running.target) as channel:
        stub = kpb_grpc.GRPCInferenceServiceStub(channel)
        assert stub.ServerReady(kpb.ServerReadyRequest(), timeout=5).ready is False
        assert stub.ServerLive(kpb.ServerLiveRequest(), timeout=5).live is True
    with TensorgateClient(running.target, timeout_s=5) as c:
        out = c.predict("mlp", {"input": np.ones((1, 256), np.float32)})  # still served
    assert out["logits"].shape == (1, 16)
    assert not stopping.done()
    stopping.result(10)


def _serve(repository: Path, *flags: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "tensorgate", "serve", "--host", "127.0.0.1", "--port", "0",
         "--metrics-port", "-1", "--model-repository", str(repository), *flags],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip


def _port(process: subprocess.Popen[str], lines: list[str]) -> int:
    assert process.stdout is not None
    for line in process.stdout:
        lines.append(line)
        if "serving " in line and " on port " in line:
            return int(line.rsplit(" ", 1)[1])
    raise AssertionError("".join(lines))


def test_the_process_exits_soon_after_sigterm_with_an_engine_call_hung_forever(
    fault_repository: Path,
) -> None:
    process = _serve(
        fault_repository, "--models", "faulty", "--shutdown-grace-s", "1", "--drain-delay-s", "0"
    )
    lines: list[str] = []
    try:
        port = _port(process, lines)
        with TensorgateClient(f"127.0.0.1:{port}", timeout_s=20) as c:
            with pytest.raises(grpc.RpcError) as hung:
                c.predict("faulty", {"x": _rows(-4)})  # the watchdog abandons the thread
            assert hung.value.code() == grpc.StatusCode.UNAVAILABLE
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
        took_s = time.monotonic() - started
        assert process.stdout is not None
        log = "".join(lines) + process.stdout.read()
        assert took_s < 1 + 5, log  # not the 60 s the engine call takes
    finally:
        process.kill()


def test_sighup_drains_like_sigterm(fault_repository: Path) -> None:
    process = _serve(fault_repository, "--models", "mlp", "--drain-delay-s", "0")
    lines: list[str] = []
    try:
        _port(process, lines)
        process.send_signal(signal.SIGHUP)
        assert process.wait(timeout=30) == 0
        assert process.stdout is not None
        output = "".join(lines) + process.stdout.read()
        assert "SIGHUP: shutting down" in output and "stopped" in output
    finally:
        process.kill()
