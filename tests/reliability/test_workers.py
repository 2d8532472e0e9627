"""--workers: several serving processes behind one port, one server to the outside."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.serverproc import ROOT, ServeProcess
from tensorgate.client import TensorgateClient, codec
from tensorgate.server.telemetry.combined import merge
from tensorgate.v1 import inference_pb2_grpc as pb_grpc
from tests.harness import wait_until

X = np.zeros((1, 256), np.float32)
SERVING = health_pb2.HealthCheckResponse.SERVING


@pytest.fixture
def workers(repository: Path, redis_db: Callable[[], str]) -> Iterator[Callable[..., ServeProcess]]:
    started: list[ServeProcess] = []

    def start(*flags: str) -> ServeProcess:
        server = ServeProcess(
            repository,
            models=("mlp",),
            extra_args=[
                "--workers", "2", "--job-store", redis_db(), "--drain-delay-s", "0",
                "--metrics-port", "0", *flags,
            ],
        )  # fmt: skip
        started.append(server)
        return server

    yield start
    for server in started:
        if server.process.poll() is None:
            server.stop()  # SIGTERM: the supervisor drains and stops its workers


def _channel(target: str) -> grpc.Channel:
    # A connection of its own (gRPC shares connections between channels by default).
    return grpc.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])


def _predict(channel: grpc.Channel) -> None:
    pb_grpc.InferenceStub(channel).Predict(codec.predict_request("mlp", {"input": X}), timeout=10)


def _worker_of(channel: grpc.Channel) -> int:
    """Which worker this channel's connection reached: each answers only its own health name."""
    stub = health_pb2_grpc.HealthStub(channel)
    for index in range(2):
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=f"tensorgate.worker.{index}"))
            if reply.status == SERVING:
                return index
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.NOT_FOUND
    raise AssertionError("no worker answered for itself")


def _metrics(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        text: str = reply.read().decode()
    return text


def _value(text: str, sample: str) -> float:
    match = re.search(rf"^{re.escape(sample)} (\S+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


def _worker_pids(server: ServeProcess) -> dict[int, int]:
    pids: dict[int, int] = {}
    for line in server.log:
        if match := re.search(r"\[worker (\d+) pid (\d+)\] tensorgate\.server\.app: serving", line):
            pids[int(match.group(1))] = int(match.group(2))
    return pids


def test_two_workers_answer_on_one_port_and_metrics_add_up(
    workers: Callable[..., ServeProcess],
) -> None:
    server = workers()
    assert len(_worker_pids(server)) == 2
    served = {0: 0, 1: 0}
    for _ in range(200):  # fresh connections until both workers have answered
        with _channel(server.target) as channel:
            served[_worker_of(channel)] += 1
            _predict(channel)
        if min(served.values()) >= 3:
            break
    assert min(served.values()) >= 3, served
    text = _metrics(server.metrics_port)
    ok = 'tensorgate_requests_total{code="OK",kind="unary",model="mlp",version="1"}'
    assert _value(text, ok) == sum(served.values())
    assert _value(text, "tensorgate_workers") == 2
    assert _value(text, 'tensorgate_instances{model="mlp"}') == 4  # 2 instances each
    for line in server.log:  # every line says which process wrote it
        if " INFO " in line:
            assert re.search(r"\[(worker \d+|supervisor) pid \d+\]", line), line


def test_a_killed_worker_is_replaced_and_the_others_calls_never_fail(
    workers: Callable[..., ServeProcess],
) -> None:
    server = workers()
    channels = [_channel(server.target) for _ in range(16)]
    owner = [_worker_of(channel) for channel in channels]
    assert set(owner) == {0, 1}, owner
    failures = [0] * len(channels)
    successes = [0] * len(channels)
    stop = threading.Event()

    def call(i: int) -> None:
        while not stop.is_set():
            try:
                _predict(channels[i])
                successes[i] += 1
            except grpc.RpcError:
                failures[i] += 1

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(channels))]
    for thread in threads:
        thread.start()
    wait_until(lambda: min(successes) > 0, what="every connection answered")
    victim = _worker_pids(server)[0]
    subprocess.run(["kill", "-9", str(victim)], check=True)
    wait_until(
        lambda: any(f"worker 0 (pid {victim}) exited" in line for line in server.log),
        what="the supervisor saw the worker die",
    )
    wait_until(
        lambda: any("worker 0" in line and "serving again" in line for line in server.log),
        timeout_s=30,
        what="a new worker 0 serving",
    )
    before = list(successes)
    wait_until(lambda: all(s > b for s, b in zip(successes, before, strict=True)), what="load")
    stop.set()
    for thread in threads:
        thread.join()
    survivors = [i for i, w in enumerate(owner) if w == 1]
    assert all(failures[i] == 0 for i in survivors), (owner, failures)
    # The kill did cut live connections: their calls in flight failed, and they reconnected.
    assert any(failures[i] for i, w in enumerate(owner) if w == 0), (owner, failures)
    with _channel(server.target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        assert health.Check(health_pb2.HealthCheckRequest()).status == SERVING
    assert _value(_metrics(server.metrics_port), "tensorgate_workers") == 2
    for channel in channels:
        channel.close()


def test_workers_stop_when_the_supervisor_is_killed(
    workers: Callable[..., ServeProcess],
) -> None:
    server = workers()
    pids = list(_worker_pids(server).values())
    server.kill()  # SIGKILL: the supervisor cannot pass anything on

    def gone(pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return Path(f"/proc/{pid}/status").read_text().find("State:\tZ") >= 0

    try:
        wait_until(lambda: all(gone(pid) for pid in pids), timeout_s=20, what="orphans gone")
    except AssertionError:
        alive = [pid for pid in pids if not gone(pid)]
        states = {pid: Path(f"/proc/{pid}/status").read_text().splitlines()[2] for pid in alive}
        for pid in alive:
            os.kill(pid, 9)
        raise AssertionError(f"{states}\n{''.join(server.log[-15:])}") from None


def test_sigterm_drains_every_worker_with_exit_code_0(
    workers: Callable[..., ServeProcess],
) -> None:
    server = workers()
    with TensorgateClient(server.target) as client:
        client.predict("mlp", {"input": X})
    server.process.send_signal(signal.SIGTERM)
    assert server.process.wait(30) == 0
    stopped = [line for line in server.log if "server.app: stopped" in line]
    assert len(stopped) == 2
    assert "exit codes [0, 0]" in "".join(server.log)


@pytest.mark.parametrize(
    ("flags", "code", "message"),
    [
        (["--workers", "2"], 1, "--workers 2 needs a job store the workers share"),
        (["--workers", "0"], 2, "argument --workers: expected a number >= 1 or auto, got '0'"),
    ],
)
def test_worker_mistakes_get_one_line(flags: list[str], code: int, message: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "tensorgate", "serve", "--port", "0", *flags],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == code
    assert message in done.stderr
    assert "Traceback" not in done.stderr


def test_merged_metrics_add_counters_and_histograms_and_keep_shared_gauges_once() -> None:
    one = (
        "# TYPE tensorgate_requests counter\n"
        'tensorgate_requests_total{model="mlp"} 3\n'
        'tensorgate_requests_created{model="mlp"} 1.7e9\n'
        "# TYPE tensorgate_batch_size_rows histogram\n"
        'tensorgate_batch_size_rows_bucket{le="1.0",model="mlp"} 2\n'
        'tensorgate_batch_size_rows_count{model="mlp"} 2\n'
        "# TYPE tensorgate_jobs gauge\n"
        'tensorgate_jobs{status="PENDING"} 7\n'
    )
    two = one.replace(" 3\n", " 4\n").replace(" 2\n", " 5\n").replace(" 7\n", " 6\n")
    merged = merge([one, two])
    assert _value(merged, 'tensorgate_requests_total{model="mlp"}') == 7
    assert _value(merged, 'tensorgate_batch_size_rows_bucket{le="1.0",model="mlp"}') == 7
    assert _value(merged, 'tensorgate_jobs{status="PENDING"}') == 7  # max, not 13
    assert "_created" not in merged
