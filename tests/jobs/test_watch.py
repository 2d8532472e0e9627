"""WatchJob: the job's state now, then each change as it happens (a retry with its attempt and
error, the final state with the result), ending after the final event; on either store, and from
another replica than the one that took the job (Redis)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import pytest

from tensorgate.client import AsyncTensorgateClient, JobEvent, TensorgateClient
from tests.harness import ServerThread, wait_until, write_config

# Waits (in its one instance, a batch of one row at a time) until the file `open` exists in its
# folder; a row whose x[0] is -3 fails its first run (a retry follows).
GATED_MODEL = """
import os
import time

class Model:
    def load(self, config):
        self.gate = os.path.join(config["model_dir"], "open")
        self.seen = set()

    def execute(self, inputs, stream):
        x = inputs["x"]
        if x.any():  # the all-zero warm-up passes at once
            while not os.path.exists(self.gate):
                time.sleep(0.005)
        for key in x[x[:, 0] == -3, 1].tolist():
            if key not in self.seen:
                self.seen.add(key)
                raise RuntimeError(f"row {key} fails its first run")
        return {"y": x * 2}
"""


def _gated(root: Path) -> Path:
    folder = root / "gated"
    write_config(
        folder,
        backend="python",
        max_batch_size=1,
        max_queue_delay_ms=0.0,
        instance_count=1,
        python={
            "device": "cpu",
            "inputs": '[{ name = "x", datatype = "FP32", shape = [-1, 4] }]',
            "outputs": '[{ name = "y", datatype = "FP32", shape = [-1, 4] }]',
        },
    )
    (folder / "model.py").write_text(GATED_MODEL)
    (folder / "open").unlink(missing_ok=True)
    return folder


def _row(first: float, key: float = 0.0) -> np.ndarray:
    return np.array([[first, key, 1.0, 2.0]], np.float32)


def _watch_in_background(target: str, job_id: str) -> tuple[list[JobEvent], threading.Thread]:
    events: list[JobEvent] = []

    def follow() -> None:
        with TensorgateClient(target, timeout_s=30) as c:
            events.extend(c.watch(job_id))

    thread = threading.Thread(target=follow, daemon=True)
    thread.start()
    return events, thread


def _every_change(
    submit_to: ServerThread, watch_on: ServerThread, gate: Path, key: float, ahead: int = 2
) -> list[JobEvent]:
    """Jobs on the gated model: `ahead` of them fill what the servers hold (two jobs each), so
    the next stays PENDING; that one, whose first run fails, is watched from its submission to
    its end."""
    with TensorgateClient(submit_to.target, timeout_s=10) as c:
        for i in range(ahead):
            c.submit("gated", {"x": _row(1.0 + i)})
        third = c.submit("gated", {"x": _row(-3, key=key)})
        events, thread = _watch_in_background(watch_on.target, third.job_id)
        wait_until(lambda: len(events) >= 1, what="the watch's first event")
        gate.joinpath("open").touch()
        thread.join(30)
        assert not thread.is_alive(), "the watch did not end after the final event"
        result = c.get_result(third.job_id)
    assert result.status == "SUCCEEDED"
    np.testing.assert_array_equal(result.outputs["y"], _row(-3, key=key) * 2)
    return events


def _check_every_change(events: list[JobEvent]) -> None:
    seen = [(e.status, e.attempt, e.retry) for e in events]
    assert seen == [
        ("PENDING", 0, False),
        ("RUNNING", 1, False),
        ("RUNNING", 2, True),
        ("SUCCEEDED", 2, False),
    ], seen
    retry, final = events[2], events[3]
    assert retry.error_code == grpc.StatusCode.INTERNAL and "fails its first run" in (
        retry.error_message
    )
    assert final.final and final.outputs is not None and final.error_code is None
    times = [e.time for e in events]
    assert times == sorted(times) and times[0] > 0


def test_a_watch_sees_every_change_of_a_job_from_pending_to_its_result(
    start_server: Callable[..., ServerThread],
    repository: Path,
    tmp_path: Path,
    job_store: str,
) -> None:
    root = tmp_path / "engines"
    gate = _gated(root)
    running = start_server(model_repository=root, job_retry_base_s=0.02)
    _check_every_change(_every_change(running, running, gate, key=5.0))


def test_a_watch_on_another_replica_sees_every_change(
    start_server: Callable[..., ServerThread], tmp_path: Path, redis_db: Callable[[], str]
) -> None:
    """Two servers on one Redis: the job is submitted to one, watched on the other (which may or
    may not be the one running it)."""
    root = tmp_path / "engines"
    gate = _gated(root)
    url = redis_db()
    first = start_server(model_repository=root, job_store=url, job_retry_base_s=0.02)
    second = start_server(model_repository=root, job_store=url, job_retry_base_s=0.02)
    _check_every_change(_every_change(first, second, gate, key=6.0, ahead=4))


def test_a_finished_job_is_one_final_event_with_its_result(
    server: ServerThread, reference: object
) -> None:
    x = np.linspace(-1, 1, 256, dtype=np.float32).reshape(1, 256)
    with TensorgateClient(server.target, timeout_s=10) as c:
        job = c.submit("mlp", {"input": x})
        assert c.get_result(job.job_id, wait_timeout_s=10).status == "SUCCEEDED"
        events = list(c.watch(job.job_id))
        expected = c.predict("mlp", {"input": x})
    assert [e.status for e in events] == ["SUCCEEDED"]
    assert events[0].outputs is not None
    for name, array in expected.items():
        np.testing.assert_allclose(events[0].outputs[name], array, rtol=1e-6)


def test_an_unknown_or_malformed_job_id_is_refused_by_name(server: ServerThread) -> None:
    with TensorgateClient(server.target, timeout_s=10) as c:
        with pytest.raises(grpc.RpcError) as unknown:
            list(c.watch("0" * 32))
        assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
        assert "0" * 32 in unknown.value.details()
        with pytest.raises(grpc.RpcError) as malformed:
            list(c.watch("not-a-job"))
        assert malformed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "32 hex digits" in malformed.value.details()


def test_thousands_of_idle_watchers_cost_no_thread_each(
    start_server: Callable[..., ServerThread], tmp_path: Path, job_store: str
) -> None:
    """2,000 watches of two waiting jobs over one connection: the process's thread count does
    not grow with them, and every one sees the final event once the jobs run."""
    root = tmp_path / "engines"
    gate = _gated(root)
    running = start_server(model_repository=root, max_concurrent_rpcs=0)
    watchers = 2000

    async def scenario() -> tuple[int, int, list[str]]:
        async with AsyncTensorgateClient(running.target) as c:
            jobs = [(await c.submit("gated", {"x": _row(1.0 + i)})).job_id for i in range(2)]
            first_seen = 0
            first = asyncio.Event()

            async def watch(job_id: str) -> str:
                nonlocal first_seen
                last = ""
                async for event in c.watch(job_id):
                    if not last:
                        first_seen += 1
                        if first_seen == watchers:
                            first.set()
                    last = event.status
                return last

            tasks = [asyncio.create_task(watch(jobs[i % 2])) for i in range(watchers)]
            async with asyncio.timeout(60):
                await first.wait()
            threads = threading.active_count()
            gate.joinpath("open").touch()
            async with asyncio.timeout(60):
                finals = await asyncio.gather(*tasks)
            return threads, first_seen, finals

    before = threading.active_count()
    threads, first_seen, finals = asyncio.run(scenario())
    assert first_seen == watchers
    assert threads - before < 20, f"{threads - before} more threads for {watchers} watchers"
    assert finals == ["SUCCEEDED"] * watchers


def test_a_watch_open_at_shutdown_ends_with_the_jobs_fate_or_unavailable(
    start_server: Callable[..., ServerThread], tmp_path: Path, job_store: str
) -> None:
    """The server stops while a job waits: with the memory store the job fails at the end of
    the grace period and the watch sees that final event; with Redis the job goes back to the
    store for other replicas, and the watch ends UNAVAILABLE (watch again elsewhere)."""
    root = tmp_path / "engines"
    _gated(root)  # never opened: the jobs wait
    running = start_server(model_repository=root)
    with TensorgateClient(running.target, timeout_s=10) as c:
        for i in range(2):
            c.submit("gated", {"x": _row(1.0 + i)})
        waiting = c.submit("gated", {"x": _row(5.0)})
    outcome: list[object] = []

    def follow() -> None:
        with TensorgateClient(running.target, timeout_s=30) as c:
            try:
                outcome.extend(e.status for e in c.watch(waiting.job_id))
            except grpc.RpcError as exc:
                outcome.append(exc.code())

    thread = threading.Thread(target=follow, daemon=True)
    thread.start()
    wait_until(lambda: running.server.frontend.calls >= 1, what="the watch open")
    running.stop(grace_s=0.5)
    thread.join(30)
    if job_store == "memory":
        assert outcome[-1] == "FAILED", outcome
    else:
        assert outcome[-1] == grpc.StatusCode.UNAVAILABLE, outcome
