"""SIGTERM during sustained mixed load: health turns NOT_SERVING, new work is refused with
UNAVAILABLE, everything accepted is answered, every accepted job reaches a final status, and the
process exits 0."""

from __future__ import annotations

import asyncio
import collections
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

from tensorgate.client import AsyncTensorgateClient, StreamItem
from tests.harness import ServerThread

ROOT = Path(__file__).resolve().parents[2]
X = np.ones((1, 256), np.float32)
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE


def _start(repository: Path) -> tuple[subprocess.Popen[str], int, list[str]]:
    process = subprocess.Popen(
        [sys.executable, "-m", "tensorgate", "serve", "--host", "127.0.0.1", "--port", "0",
         "--metrics-port", "-1", "--model-repository", str(repository), "--models", "mlp",
         "--shutdown-grace-s", "10"],
        cwd=ROOT, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    assert process.stderr is not None
    log: list[str] = []
    port = 0
    while line := process.stderr.readline():
        log.append(line)
        if match := re.search(r"listening on 127\.0\.0\.1:(\d+)", line):
            port = int(match.group(1))
        if "serving mlp" in line:
            return process, port, log
    raise AssertionError("server did not start:\n" + "".join(log))


async def _until(condition: Callable[[], bool], timeout_s: float = 30.0) -> None:
    """Polls condition on the test's loop (the load runs meanwhile)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "the load did not get under way"
        await asyncio.sleep(0.01)


def test_sigterm_during_mixed_load_answers_everything_accepted(repository: Path) -> None:
    process, port, log = _start(repository)
    target = f"127.0.0.1:{port}"
    outcomes: collections.Counter[str] = collections.Counter()
    job_finals: dict[str, str] = {}
    unanswered_stream_requests: list[int] = []

    async def unary(c: AsyncTensorgateClient) -> None:
        while True:
            try:
                await c.predict("mlp", {"input": X})
                outcomes["unary OK"] += 1
            except grpc.aio.AioRpcError as exc:
                outcomes[f"unary {exc.code().name}"] += 1
                return

    async def jobs(c: AsyncTensorgateClient) -> None:
        while True:
            try:
                job = await c.submit("mlp", {"input": X})
            except grpc.aio.AioRpcError as exc:
                outcomes[f"submit {exc.code().name}"] += 1
                return
            result = await c.get_result(job.job_id, wait_timeout_s=30)
            job_finals[job.job_id] = result.status
            if result.status == "FAILED":
                assert result.error_code == UNAVAILABLE, result

    async def stream(c: AsyncTensorgateClient) -> None:
        refused = asyncio.Event()
        sent = 0

        async def items():  # type: ignore[no-untyped-def]
            nonlocal sent
            while not refused.is_set():
                yield StreamItem(str(sent), "mlp", {"input": X})
                sent += 1
                await asyncio.sleep(0.002)

        answered = 0
        async for result in c.stream(items()):
            answered += 1
            outcomes["stream OK" if result.ok else f"stream {result.error_code.name}"] += 1  # type: ignore[union-attr]
            if not result.ok:
                refused.set()
        unanswered_stream_requests.append(sent - answered)

    async def load() -> None:
        async with AsyncTensorgateClient(target, timeout_s=60) as c:
            workers = [unary(c) for _ in range(8)] + [jobs(c) for _ in range(8)]
            workers += [stream(c) for _ in range(2)]
            tasks = [asyncio.create_task(w) for w in workers]
            await _until(
                lambda: min(outcomes["unary OK"], outcomes["stream OK"], len(job_finals)) > 60
            )  # a load well under way on any machine, however slow
            process.send_signal(signal.SIGTERM)
            await asyncio.wait_for(asyncio.gather(*tasks), 30)

    asyncio.run(load())
    _, rest = process.communicate(timeout=30)
    full_log = "".join(log) + rest
    assert process.returncode == 0, full_log
    # Everything that ended did so with OK or a clean UNAVAILABLE refusal; nothing was CANCELLED.
    assert set(outcomes) <= {"unary OK", "unary UNAVAILABLE", "submit UNAVAILABLE",
                             "stream OK", "stream UNAVAILABLE"}, outcomes  # fmt: skip
    assert outcomes["unary OK"] > 50 and outcomes["stream OK"] > 50 and len(job_finals) > 50
    assert outcomes["unary UNAVAILABLE"] == 8 and outcomes["submit UNAVAILABLE"] == 8
    assert unanswered_stream_requests == [0, 0]  # every request sent on a stream was answered
    assert set(job_finals.values()) <= {"SUCCEEDED", "FAILED"}
    assert "SIGTERM: shutting down" in full_log and "stopped" in full_log


def test_a_grace_shorter_than_the_drain_delay_loses_no_job_and_takes_none_after_sigterm(
    start_server: Callable[..., ServerThread],
) -> None:
    """Memory store, grace 0.3 s against a 2 s drain delay: from the first moment of the stop no
    new job is accepted (UNAVAILABLE: the client tries another replica), while Predict is still
    served; every job accepted before it reaches a final status its long-poll sees."""
    running = start_server(models=("mlp",), drain_delay_s=2.0, shutdown_grace_s=0.3)
    target = running.target
    accepted: dict[str, str] = {}  # job id -> the final status its long-poll saw
    outcomes: collections.Counter[str] = collections.Counter()
    stop_began = 0.0

    async def jobs(c: AsyncTensorgateClient) -> None:
        while True:
            try:
                job = await c.submit("mlp", {"input": X})
            except grpc.aio.AioRpcError as exc:
                outcomes[f"submit {exc.code().name}"] += 1
                return
            accepted[job.job_id] = "?"
            try:
                result = await c.get_result(job.job_id, wait_timeout_s=30)
                accepted[job.job_id] = result.status
            except grpc.aio.AioRpcError as exc:
                accepted[job.job_id] = f"long-poll {exc.code().name}"

    async def unary(c: AsyncTensorgateClient) -> None:
        while True:
            try:
                await c.predict("mlp", {"input": X})
                outcomes["unary OK after stop" if stop_began else "unary OK"] += 1
            except grpc.aio.AioRpcError as exc:
                outcomes[f"unary {exc.code().name}"] += 1
                return

    async def load() -> None:
        nonlocal stop_began
        async with AsyncTensorgateClient(target, timeout_s=60) as c:
            tasks = [asyncio.create_task(jobs(c)) for _ in range(32)]
            tasks += [asyncio.create_task(unary(c)) for _ in range(4)]
            await _until(lambda: len(accepted) > 60 and outcomes["unary OK"] > 0)
            stop_began = time.time()
            stopping = asyncio.run_coroutine_threadsafe(running.server.stop(0.3), running.loop)
            await asyncio.wait_for(asyncio.gather(*tasks), 30)
            stopping.result(10)

    asyncio.run(load())
    assert len(accepted) > 50 and outcomes["submit UNAVAILABLE"] == 32, outcomes
    assert outcomes["unary OK after stop"] > 0, outcomes  # Predict still served meanwhile
    store = running.server._jobs.store  # type: ignore[union-attr]
    created = {job_id: running.call(store.get(job_id)).created_at for job_id in accepted}
    late = [job_id for job_id, at in created.items() if at > stop_began + 0.05]
    assert not late, f"{len(late)} job(s) accepted after the stop began"
    finals = collections.Counter(accepted.values())
    assert set(finals) <= {"SUCCEEDED", "FAILED"}, finals
