"""Two `tensorgate serve` processes sharing one real redis-server: jobs outlive a replica, any
replica answers for any job, and Redis going away costs jobs only, never Predict."""

from __future__ import annotations

import asyncio
import secrets
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.serverproc import ServeProcess
from tensorgate.client import AsyncTensorgateClient, TensorgateClient
from tensorgate.server.jobs.job import Job
from tensorgate.server.jobs.redis_store import RedisJobStore
from tensorgate.server.records import Request
from tensorgate.server.tensors import TensorInput
from tests.harness import wait_until, write_sleepy_model
from tests.redisproc import RedisProcess

X = np.linspace(-1, 1, 256, dtype=np.float32).reshape(1, 256)


@pytest.fixture(scope="module")
def replica_repository(repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("replica-engines")
    shutil.copytree(repository / "mlp", root / "mlp")
    shutil.copytree(repository / "mlp_wide", root / "mlp_wide")
    # 20 ms a batch of at most 4 rows: a replica works through ~200 jobs a second, so a burst
    # is still running when a replica is killed or stopped.
    write_sleepy_model(
        root / "slow", 0.02, max_batch_size=4, max_queue_delay_ms=1.0, instance_count=1
    )
    # Batches that wait while the file `gate` exists: a test holds a replica's instance busy,
    # and so holds jobs queued behind it, for exactly as long as it needs.
    write_sleepy_model(
        root / "gated", 0.0, gate=root / "gate", max_batch_size=4, max_queue_delay_ms=1.0,
        instance_count=1,
    )  # fmt: skip
    # 400 ms a batch: a batch is still on its instance when a short grace period ends.
    write_sleepy_model(
        root / "slower", 0.4, max_batch_size=4, max_queue_delay_ms=1.0, instance_count=1
    )
    return root


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisProcess]:
    """A Redis of this test's own (tests here stop and restart it)."""
    running = RedisProcess(tmp_path / "redis").start()
    yield running
    running.kill()


class Replicas:
    def __init__(self, repository: Path, redis: RedisProcess) -> None:
        self.repository = repository
        self.redis = redis
        self.started: list[ServeProcess] = []

    def start(self, *flags: str) -> ServeProcess:
        replica = ServeProcess(
            self.repository,
            extra_args=["--job-store", self.redis.url, "--drain-delay-s", "0", *flags],
        )
        self.started.append(replica)
        return replica

    def stop_all(self) -> None:
        for replica in self.started:
            if replica.process.poll() is None:
                replica.kill()


@pytest.fixture
def replicas(replica_repository: Path, redis_server: RedisProcess) -> Iterator[Replicas]:
    group = Replicas(replica_repository, redis_server)
    yield group
    group.stop_all()


def _row(i: int) -> dict[str, np.ndarray]:
    return {"x": np.full((1, 4), float(i), np.float32)}


def test_a_job_submitted_to_one_replica_is_answered_by_another(replicas: Replicas) -> None:
    a, b = replicas.start(), replicas.start()
    with TensorgateClient(a.target, timeout_s=30) as on_a, TensorgateClient(b.target) as on_b:
        expected = on_a.predict("mlp_wide", {"input": X})
        submitted = on_a.submit("mlp_wide", {"input": X})  # held 300 ms for company
        started = time.monotonic()
        result = on_b.get_result(submitted.job_id, wait_timeout_s=30)
        waited_s = time.monotonic() - started
        assert result.status == "SUCCEEDED"
        assert result.outputs is not None
        for name, array in expected.items():
            np.testing.assert_array_equal(result.outputs[name], array)
        # Woken when the job finished (pub/sub), not by the long-poll's 5 s safety re-read.
        assert waited_s < 3.0, waited_s
        # ListJobs and CancelJob answer for it on either replica.
        assert submitted.job_id in [j.job_id for j in on_b.list_jobs("SUCCEEDED")]
        assert on_b.cancel(submitted.job_id) == "SUCCEEDED"


def test_a_replica_killed_mid_burst_loses_no_accepted_job(replicas: Replicas) -> None:
    """1,000 jobs sent to A, A killed with SIGKILL mid-burst: every job A accepted finishes on B
    within the lease plus a few seconds. Execution is at least once: jobs A was running when it
    died run again on B, and are counted."""
    lease_s = 2.0
    a = replicas.start("--job-lease-s", str(lease_s))
    b = replicas.start("--job-lease-s", str(lease_s))
    accepted: list[str] = []

    async def burst() -> None:
        async with AsyncTensorgateClient(a.target, timeout_s=10) as client:
            queue: asyncio.Queue[int] = asyncio.Queue()
            for i in range(1000):
                queue.put_nowait(i)

            async def sender() -> None:
                while not queue.empty():
                    i = queue.get_nowait()
                    try:
                        accepted.append((await client.submit("slow", _row(i))).job_id)
                    except grpc.RpcError:
                        return  # A is gone: this job was never accepted
                    if len(accepted) == 500:
                        a.kill()

            await asyncio.gather(*(sender() for _ in range(32)))

    asyncio.run(burst())
    assert a.process.poll() is not None  # it was killed mid-burst
    assert len(accepted) >= 500
    killed_at = time.monotonic()
    with TensorgateClient(b.target, timeout_s=30) as on_b:
        for job_id in accepted:
            left_s = lease_s + 20 - (time.monotonic() - killed_at)
            result = on_b.get_result(job_id, wait_timeout_s=max(left_s, 0.1))
            assert result.status == "SUCCEEDED", (job_id, result)
    with replicas.redis.client() as redis:
        attempts = [int(redis.hget(f"tg:job:{job_id}", "attempts")) for job_id in accepted]
        discarded = int(redis.hget("tg:stats", "duplicate_runs") or 0)
    reruns = sum(n - 1 for n in attempts)
    print(f"{len(accepted)} accepted; {reruns} ran again on B; {discarded} duplicate results")
    assert all(n >= 1 for n in attempts)
    # A held at most a few batches ahead (2 x max batch 4 x 1 instance): only those run twice.
    assert reruns <= 8


def test_one_idempotency_key_names_one_job_across_replicas(replicas: Replicas) -> None:
    a, b = replicas.start(), replicas.start()

    async def submit_100() -> set[str]:
        async with (
            AsyncTensorgateClient(a.target, timeout_s=30) as on_a,
            AsyncTensorgateClient(b.target, timeout_s=30) as on_b,
        ):
            calls = [
                (on_a if i % 2 else on_b).submit("mlp", {"input": X}, idempotency_key="order-42")
                for i in range(100)
            ]
            return {submitted.job_id for submitted in await asyncio.gather(*calls)}

    ids = asyncio.run(submit_100())
    assert len(ids) == 1
    with TensorgateClient(b.target, timeout_s=30) as on_b:
        assert on_b.get_result(ids.pop(), wait_timeout_s=10).status == "SUCCEEDED"


def test_sigterm_hands_unstarted_jobs_to_other_replicas_instead_of_failing_them(
    replicas: Replicas, replica_repository: Path
) -> None:
    """At SIGTERM a replica hands the jobs it holds but has not started back to Redis at once,
    and finishes the batch it is running: every job runs once."""
    a = replicas.start("--shutdown-grace-s", "10")
    b = replicas.start()
    gate = replica_repository / "gate"
    gate.touch()  # batches wait: each replica holds a batch on its instance and one queued
    try:
        with TensorgateClient(a.target, timeout_s=30) as on_a:
            ids = [on_a.submit("gated", _row(i)).job_id for i in range(40)]
            # Both replicas' lanes full: two batches' worth each, claimed (RUNNING).
            wait_until(
                lambda: len(on_a.list_jobs("RUNNING", limit=100)) >= 16,
                what="both replicas holding jobs",
            )
        assert a.process.pid
        a.process.terminate()  # SIGTERM; A's running batch waits at the gate meanwhile
        try:
            wait_until(lambda: "handed" in "".join(a.log), timeout_s=10, what="jobs handed back")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; A's log ends: {''.join(a.log)[-3000:]}") from None
    finally:
        gate.unlink(missing_ok=True)
    assert a.process.wait(60) == 0  # A's running batch finished within its grace period
    with TensorgateClient(b.target, timeout_s=30) as on_b:
        statuses = [on_b.get_result(job_id, wait_timeout_s=60).status for job_id in ids]
    assert statuses.count("SUCCEEDED") == len(ids), {s: statuses.count(s) for s in set(statuses)}
    # A graceful hand-off runs each job once: handed back only if it had not started (or it
    # finished here first), never both; no result was recorded twice.
    with replicas.redis.client() as redis:
        attempts = [int(redis.hget(f"tg:job:{job_id}", "attempts")) for job_id in ids]
        stats = redis.hgetall("tg:stats")
    twice = [job_id for job_id, n in zip(ids, attempts, strict=True) if n != 1]
    assert not twice, f"{len(twice)} job(s) ran on both replicas: {twice[:5]}"
    assert int(stats.get(b"duplicate_runs", 0)) == 0, stats


def test_a_job_running_when_the_grace_ends_finishes_on_its_replica_and_runs_once(
    replicas: Replicas,
) -> None:
    """The grace period ends while a batch of jobs is on A's instance: those jobs finish on A
    (given a moment more) instead of being handed back to run again on B; the jobs A had not
    started go to B. Every job runs exactly once."""
    a = replicas.start("--shutdown-grace-s", "0.1", "--models", "slower")
    with TensorgateClient(a.target, timeout_s=30) as on_a:
        ids = [on_a.submit("slower", _row(i)).job_id for i in range(24)]
        wait_until(
            lambda: any(j.status == "RUNNING" for j in on_a.list_jobs("RUNNING")),
            what="a batch on A's instance",
        )
    b = replicas.start("--models", "slower")
    assert a.stop() == 0
    with TensorgateClient(b.target, timeout_s=30) as on_b:
        statuses = [on_b.get_result(job_id, wait_timeout_s=60).status for job_id in ids]
    assert statuses.count("SUCCEEDED") == len(ids), statuses
    with replicas.redis.client() as redis:
        attempts = [int(redis.hget(f"tg:job:{job_id}", "attempts")) for job_id in ids]
        stats = redis.hgetall("tg:stats")
    assert attempts == [1] * len(ids), attempts
    assert int(stats.get(b"duplicate_runs", 0)) == 0, stats


async def _accept_directly(url: str, count: int) -> list[str]:
    """Jobs accepted into Redis by a store of this test's own (as a replica would)."""
    store = RedisJobStore(
        url, max_pending=10_000, ttl_s=600, max_finished=10_000, max_attempts=3, lease_s=30
    )
    await store.open(["slow"], lambda _: None, lambda _: None)
    ids = []
    for i in range(count):
        tensor = TensorInput("x", "FP32", [1, 4], _row(i)["x"].tobytes())
        job = Job(
            id=secrets.token_hex(16),
            model="slow",
            created_at=time.time(),
            payload=Request("slow", [tensor]),
        )
        stored, _, _ = await store.add(job)
        ids.append(stored.id)
    await store.close()
    return ids


def test_results_and_accepted_jobs_survive_a_redis_restart(replicas: Replicas) -> None:
    a = replicas.start()
    with TensorgateClient(a.target, timeout_s=30) as on_a:
        done = [on_a.submit("slow", _row(i)).job_id for i in range(20)]
        results = [on_a.get_result(job_id, wait_timeout_s=10) for job_id in done]
        assert {r.status for r in results} == {"SUCCEEDED"}
    a.stop()
    pending = asyncio.run(_accept_directly(replicas.redis.url, 50))  # nobody is running them
    replicas.redis.stop()
    replicas.redis.start()  # same folder, same port: replays its AOF
    b = replicas.start()
    with TensorgateClient(b.target, timeout_s=30) as on_b:
        for job_id, before in zip(done, results, strict=True):
            after = on_b.get_result(job_id)
            assert after.status == "SUCCEEDED" and after.outputs is not None
            assert before.outputs is not None
            np.testing.assert_array_equal(after.outputs["y"], before.outputs["y"])
        for i, job_id in enumerate(pending):
            result = on_b.get_result(job_id, wait_timeout_s=20)
            assert result.status == "SUCCEEDED" and result.outputs is not None
            np.testing.assert_array_equal(result.outputs["y"], _row(i)["x"] * 2)


def _jobs_health(target: str) -> int:
    with grpc.insecure_channel(target) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="tensorgate.jobs"), timeout=5
        )
        return int(reply.status)


def test_without_redis_submit_is_unavailable_predict_serves_and_jobs_recover(
    replicas: Replicas,
) -> None:
    a = replicas.start()
    serving = health_pb2.HealthCheckResponse.SERVING
    assert _jobs_health(a.target) == serving
    replicas.redis.stop()
    with TensorgateClient(a.target, timeout_s=30) as client:
        with pytest.raises(grpc.RpcError) as refused:
            client.submit("mlp", {"input": X})
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "Redis at 127.0.0.1" in refused.value.details()
        assert client.predict("mlp", {"input": X})["logits"].shape == (1, 16)
        wait_until(lambda: _jobs_health(a.target) != serving, what="jobs health NOT_SERVING")
        assert _jobs_health(a.target) == health_pb2.HealthCheckResponse.NOT_SERVING

        replicas.redis.start()  # back on the same port, no restart of tensorgate
        wait_until(lambda: _jobs_health(a.target) == serving, what="jobs health SERVING again")
        job = client.submit("mlp", {"input": X})
        assert client.get_result(job.job_id, wait_timeout_s=10).status == "SUCCEEDED"


def test_redis_unreachable_at_start_up_is_logged_and_predict_serves(
    replica_repository: Path,
) -> None:
    import socket

    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        url = f"redis://127.0.0.1:{probe.getsockname()[1]}/0"
    replica = ServeProcess(replica_repository, ("mlp",), extra_args=["--job-store", url])
    try:
        log = "".join(replica.log)
        assert f"Redis at 127.0.0.1:{url.split(':')[2].split('/')[0]}" in log, log
        assert "is unreachable at start-up" in log and "Submit answers UNAVAILABLE" in log, log
        with TensorgateClient(replica.target, timeout_s=10) as client:
            assert client.predict("mlp", {"input": X})["logits"].shape == (1, 16)
    finally:
        assert replica.stop() == 0


def test_webhooks_due_on_a_replica_killed_mid_delivery_are_delivered_by_another(
    replicas: Replicas, tmp_path: Path
) -> None:
    """A delivers webhooks to a receiver that holds every request; A is killed with SIGKILL with
    deliveries in flight and due; B, started after, delivers every one (at least once: the
    deliveries belong to Redis, not to A)."""
    from tests.receiver import Receiver, new_secret

    secrets_file = tmp_path / "webhook-secrets"
    secrets_file.write_text(f"* {new_secret()}\n")
    flags = (
        "--job-lease-s", "2", "--webhook-allow", "127.0.0.1", "--webhook-secrets",
        str(secrets_file), "--webhook-timeout-s", "1", "--webhook-retry-base-s", "0.1",
    )  # fmt: skip
    with Receiver() as receiver:
        receiver.hold.set()
        a = replicas.start(*flags)
        with TensorgateClient(a.target, timeout_s=10) as on_a:
            ids = [
                on_a.submit("mlp", {"input": X}, callback_url=receiver.url).job_id
                for _ in range(100)
            ]
        wait_until(lambda: len(receiver.received) >= 5, what="A delivering (held)")
        a.kill()
        receiver.release()
        b = replicas.start(*flags)
        wanted = {f"msg_{job_id}" for job_id in ids}
        wait_until(
            lambda: wanted <= {r.webhook_id for r in receiver.delivered()},
            timeout_s=40,
            what="every webhook delivered by B",
        )
        with TensorgateClient(b.target, timeout_s=10) as on_b:
            for job_id in ids:
                result = on_b.get_result(job_id)
                assert result.status == "SUCCEEDED"
                wait_until(
                    lambda job_id=job_id: (
                        on_b.get_result(job_id).delivery.state == "DELIVERY_DELIVERED"
                    ),
                    what=f"{job_id} recorded as delivered",
                )
