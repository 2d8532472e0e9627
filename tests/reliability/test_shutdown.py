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
from pathlib import Path

import grpc
import numpy as np

from client import AsyncTensorgateClient, StreamItem

ROOT = Path(__file__).resolve().parents[2]
X = np.ones((1, 256), np.float32)
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE


def _start(repository: Path) -> tuple[subprocess.Popen[str], int, list[str]]:
    process = subprocess.Popen(
        [sys.executable, "-m", "tensorgate_cli", "serve", "--host", "127.0.0.1", "--port", "0",
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
            await asyncio.sleep(1.5)
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
