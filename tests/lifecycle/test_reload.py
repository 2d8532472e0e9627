"""Models that change while the server runs: a new version loaded (explicit and poll) under
continuous load with no failed call, a broken version that leaves the old one serving, an unload
with calls, streams and jobs in flight, and versions released only once idle."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tensorgate.client import StreamItem, TensorgateClient
from tests.harness import ServerThread, wait_until
from tests.lifecycle.conftest import add_version, write_model

X = np.array([[1.0, 2.0, 3.0, 4.0]], np.float32)


class Callers:
    """Clients calling Predict in a loop: every answer's factor, and every error."""

    def __init__(self, target: str, model: str = "scaled", count: int = 32) -> None:
        self.factors: list[float] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._client = TensorgateClient(target, timeout_s=30)
        self._threads = [
            threading.Thread(target=self._call, args=(model,), daemon=True) for _ in range(count)
        ]

    def _call(self, model: str) -> None:
        while not self._stop.is_set():
            try:
                self.factors.append(float(self._client.predict(model, {"x": X})["y"][0, 0]))
            except grpc.RpcError as exc:
                self.errors.append(f"{exc.code().name}: {exc.details()}")

    def __enter__(self) -> Callers:
        for thread in self._threads:
            thread.start()
        wait_until(lambda: len(self.factors) >= 50, what="callers answered")
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)
        self._client.close()

    def switched_to(self, factor: float) -> Callable[[], bool]:
        return lambda: len(self.factors) > 20 and set(self.factors[-20:]) == {factor}


def _index(client: TensorgateClient) -> set[tuple[str, str, str]]:
    return {(e.name, e.version, e.state) for e in client.repository_index()}


def test_a_new_version_loaded_explicitly_takes_over_with_no_failed_call(
    lifecycle_server: Callable[..., ServerThread], tmp_path: Path
) -> None:
    folder = write_model(tmp_path / "engines", versions={"1": 1.0}, sleep_s=0.002)
    running = lifecycle_server(model_control="explicit")
    with TensorgateClient(running.target, timeout_s=60) as c, Callers(running.target) as load:
        add_version(folder, "2", 2.0, sleep_s=0.002)
        time.sleep(0.3)  # the server does not notice on its own (explicit)
        assert set(load.factors[-20:]) == {1.0}
        c.load_model("scaled")
        wait_until(load.switched_to(2.0), what="answers from version 2")
        wait_until(lambda: _index(c) == {("scaled", "2", "READY")}, what="version 1 released")
    assert load.errors == []
    assert load.factors[0] == 1.0 and load.factors[-1] == 2.0


def test_poll_notices_a_new_version_and_a_changed_config(
    lifecycle_server: Callable[..., ServerThread], tmp_path: Path
) -> None:
    folder = write_model(tmp_path / "engines", versions={"1": 1.0}, sleep_s=0.002)
    running = lifecycle_server(model_control="poll", repository_poll_s=0.2)
    with TensorgateClient(running.target, timeout_s=30) as c, Callers(running.target) as load:
        add_version(folder, "2", 2.0, sleep_s=0.002)
        wait_until(load.switched_to(2.0), what="version 2 picked up by the poll")
        # Both versions, 50/50: the config alone changes.
        write_model(
            tmp_path / "engines", versions={}, policy='"all"', traffic={"1": 50, "2": 50},
            sleep_s=0.002,
        )  # fmt: skip
        wait_until(lambda: c.list_models()[0].versions == ("1", "2"), what="both versions")
        since = len(load.factors)  # (answers from before may still come from a retiring 1)
        wait_until(lambda: {1.0, 2.0} <= set(load.factors[since:]), what="the 50/50 split")
        wait_until(
            lambda: 0.25 < load.factors[since:].count(1.0) / (len(load.factors) - since) < 0.75
            and len(load.factors) - since > 200,
            what="answers split about evenly",
        )  # fmt: skip
    assert load.errors == []


def test_a_broken_version_leaves_the_old_one_serving_and_the_load_says_why(
    lifecycle_server: Callable[..., ServerThread], tmp_path: Path
) -> None:
    folder = write_model(tmp_path / "engines", versions={"1": 1.0})
    running = lifecycle_server(model_control="explicit")
    with TensorgateClient(running.target, timeout_s=60) as c, Callers(running.target) as load:
        add_version(folder, "2", 2.0, broken=True)
        with pytest.raises(grpc.RpcError) as refused:
            c.load_model("scaled")
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "version 2 is broken: its weights do not load" in refused.value.details()
        assert "keep serving" in refused.value.details()
        (folder / "config.toml").write_text("backend = \n")  # and now a bad file
        with pytest.raises(grpc.RpcError) as bad:
            c.load_model("scaled")
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "config.toml" in bad.value.details()
        time.sleep(0.2)
        assert set(load.factors[-20:]) == {1.0}
        [entry] = [e for e in c.repository_index() if e.version == "1"]
        assert entry.state == "READY"
    assert load.errors == []


def test_a_broken_version_on_disk_is_logged_by_poll_and_the_old_one_serves(
    lifecycle_server: Callable[..., ServerThread], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = write_model(tmp_path / "engines", versions={"1": 1.0})
    running = lifecycle_server(model_control="poll", repository_poll_s=0.1)
    with Callers(running.target) as load:
        add_version(folder, "2", 2.0, broken=True)
        wait_until(lambda: "version 2 is broken" in caplog.text, what="the failed load logged")
        time.sleep(0.5)  # several polls: it is not tried again until its files change
        assert caplog.text.count("version 2 is broken: its weights do not load;") <= 2
        add_version(folder, "2", 3.0)  # fixed
        wait_until(load.switched_to(3.0), what="the fixed version 2")
    assert load.errors == []


def test_unload_finishes_calls_streams_and_jobs_in_flight(
    lifecycle_server: Callable[..., ServerThread], tmp_path: Path
) -> None:
    write_model(tmp_path / "engines", versions={"1": 1.0}, sleep_s=0.5, max_batch_size=4)
    running = lifecycle_server(model_control="explicit")
    results: dict[str, object] = {}
    with TensorgateClient(running.target, timeout_s=60) as c:
        jobs = [c.submit("scaled", {"x": X}).job_id for _ in range(3)]

        def call(key: str) -> None:
            try:
                results[key] = float(c.predict("scaled", {"x": X})["y"][0, 0])
            except grpc.RpcError as exc:
                results[key] = exc.code().name

        def stream() -> None:
            items = [StreamItem(str(i), "scaled", {"x": X}) for i in range(3)]
            results["stream"] = sorted(r.ok for r in c.stream(items))

        threads = [threading.Thread(target=call, args=(f"call-{i}",)) for i in range(4)]
        threads.append(threading.Thread(target=stream))
        for thread in threads:
            thread.start()
        # All admitted to version 1 (3 jobs, 4 calls, 3 stream items), most still queued.
        version = running.server.models["scaled"]
        scheduler = version.scheduler
        wait_until(
            lambda: scheduler.queued_requests + scheduler.running_requests >= 10,
            what="everything queued or running on version 1",
        )
        c.unload_model("scaled")
        with pytest.raises(grpc.RpcError) as gone:
            c.predict("scaled", {"x": X})
        assert gone.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.RpcError) as refused:
            c.submit("scaled", {"x": X})
        assert refused.value.code() == grpc.StatusCode.NOT_FOUND
        with grpc.insecure_channel(running.target) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            status = health.Check(health_pb2.HealthCheckRequest(service="scaled")).status
            assert status == health_pb2.HealthCheckResponse.NOT_SERVING
        for thread in threads:
            thread.join(60)
        assert {results[f"call-{i}"] for i in range(4)} == {1.0}
        assert results["stream"] == [True, True, True]
        # Jobs the server held finished; any still queued wait for the model to come back.
        statuses = {c.get_result(j).status for j in jobs}
        assert statuses <= {"SUCCEEDED", "PENDING"}
        c.load_model("scaled")
        assert {c.get_result(j, wait_timeout_s=30).status for j in jobs} == {"SUCCEEDED"}
        wait_until(lambda: _index(c) == {("scaled", "1", "READY")}, what="index after reload")


def test_model_control_none_refuses_load_and_unload_by_flag(server: ServerThread) -> None:
    with TensorgateClient(server.target, timeout_s=10) as c:
        for action in (c.load_model, c.unload_model):
            with pytest.raises(grpc.RpcError) as refused:
                action("mlp")
            assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "--model-control" in refused.value.details()
        index = _index(c)
    assert ("mlp", "1", "READY") in index


def test_under_two_workers_one_load_and_one_unload_reach_both(
    tmp_path: Path, redis_db: Callable[[], str]
) -> None:
    from bench.serverproc import ServeProcess
    from tensorgate.client import codec
    from tensorgate.v1 import inference_pb2_grpc as pb_grpc
    from tests.reliability.test_workers import _channel, _worker_of

    folder = write_model(tmp_path / "engines", versions={"1": 1.0})
    server = ServeProcess(
        tmp_path / "engines",
        extra_args=[
            "--workers", "2", "--job-store", redis_db(), "--drain-delay-s", "0",
            "--model-control", "explicit",
        ],
    )  # fmt: skip

    def answers_by_worker() -> dict[int, set[str]]:
        """What each worker answers now (fresh connections until both have been reached)."""
        seen: dict[int, set[str]] = {}
        for _ in range(200):
            with _channel(server.target) as channel:
                worker = _worker_of(channel)
                stub = pb_grpc.InferenceStub(channel)
                request = codec.predict_request("scaled", {"x": X})
                try:
                    reply = stub.Predict(request, timeout=10)
                    answer = str(codec.decode_all(reply.outputs)["y"][0, 0])
                except grpc.RpcError as exc:
                    answer = exc.code().name
                seen.setdefault(worker, set()).add(answer)
            if len(seen) == 2:
                return seen
        raise AssertionError(f"only workers {sorted(seen)} answered")

    try:
        assert answers_by_worker() == {0: {"1.0"}, 1: {"1.0"}}
        add_version(folder, "2", 2.0)
        with TensorgateClient(server.target, timeout_s=60) as c:
            c.load_model("scaled")  # reaches one worker
        wait_until(
            lambda: answers_by_worker() == {0: {"2.0"}, 1: {"2.0"}},
            what="both workers on version 2",
        )
        with TensorgateClient(server.target, timeout_s=60) as c:
            c.unload_model("scaled")
        wait_until(
            lambda: answers_by_worker() == {0: {"NOT_FOUND"}, 1: {"NOT_FOUND"}},
            what="both workers without the model",
        )
    finally:
        server.stop()


def test_a_change_of_weights_alone_moves_traffic_without_reloading_a_version(
    lifecycle_server: Callable[..., ServerThread], tmp_path: Path
) -> None:
    engines = tmp_path / "engines"
    write_model(engines, versions={"1": 1.0, "2": 2.0}, policy='"all"', traffic={"1": 100, "2": 0})
    running = lifecycle_server(model_control="poll", repository_poll_s=0.1)
    first = {v: running.server.models.get("scaled", v) for v in ("1", "2")}
    with Callers(running.target) as load:
        assert set(load.factors) == {1.0}
        config = engines / "scaled" / "config.toml"
        config.write_text(config.read_text().replace('"1" = 100, "2" = 0', '"1" = 0, "2" = 100'))
        wait_until(load.switched_to(2.0), what="the weights moved to version 2")
    assert load.errors == []
    # The same loaded versions: only the route changed.
    assert {v: running.server.models.get("scaled", v) for v in ("1", "2")} == first
