"""The Prometheus endpoint: counts match the requests sent, gauges show traffic while it is
queued, and the endpoint itself stays bounded."""

from __future__ import annotations

import asyncio
import socket
import threading
import urllib.request
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tensorgate.client import StreamItem, TensorgateClient, codec
from tests.harness import ServerThread, wait_until

X = np.ones((1, 256), np.float32)


def _scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def test_scraped_counts_match_the_traffic(start_server: Callable[..., ServerThread]) -> None:
    running = start_server(models=("mlp", "pair"), metrics_port=0)
    port = running.server.metrics_port
    assert port > 0
    with TensorgateClient(running.target, timeout_s=10) as c:
        for _ in range(5):
            c.predict("mlp", {"input": X})
        for bad in (np.ones((1, 3), np.float32), np.ones((1, 5), np.float32)):
            with pytest.raises(grpc.RpcError):
                c.predict("mlp", {"input": bad})
        with pytest.raises(grpc.RpcError):
            c.predict("no-such-model", {"input": X})
        jobs = [c.submit("mlp", {"input": X}).job_id for _ in range(3)]
        assert {c.get_result(j, wait_timeout_s=5).status for j in jobs} == {"SUCCEEDED"}
        items = [StreamItem(str(i), "mlp", {"input": X}) for i in range(4)]
        assert all(r.ok for r in c.stream(items))
        after = _scrape(port)

    def requests(model: str, kind: str, code: str, version: str = "1") -> float:
        key = (("code", code), ("kind", kind), ("model", model), ("version", version))
        return after.get(("tensorgate_requests_total", key), 0.0)

    assert requests("mlp", "unary", "OK") == 5
    assert requests("mlp", "unary", "INVALID_ARGUMENT") == 2
    assert (
        requests("_unknown", "unary", "NOT_FOUND", version="") == 1
    )  # unknown names do not become labels
    assert requests("mlp", "job", "OK") == 3
    assert requests("mlp", "stream", "OK") == 4
    assert (
        after[
            (
                "tensorgate_request_duration_seconds_count",
                (("kind", "unary"), ("model", "mlp"), ("version", "1")),
            )
        ]
        == 7
    )
    rows = after[("tensorgate_batch_size_rows_sum", (("model", "mlp"),))]
    assert rows == 5 + 3 + 4  # every accepted row ran in some batch
    batches = after[("tensorgate_batch_size_rows_count", (("model", "mlp"),))]
    assert after[("tensorgate_batch_compute_seconds_count", (("model", "mlp"),))] == batches
    assert after[("tensorgate_queue_wait_seconds_count", (("model", "mlp"),))] == 12
    assert after[("tensorgate_queue_depth", (("model", "mlp"),))] == 0
    assert after[("tensorgate_instances", (("model", "mlp"),))] == 2
    assert after[("tensorgate_jobs", (("status", "SUCCEEDED"),))] == 3
    assert after[("tensorgate_open_streams", ())] == 0
    busy = sum(
        value
        for (name, labels), value in after.items()
        if name == "tensorgate_instance_busy_seconds_total" and ("model", "mlp") in labels
    )
    assert busy > 0


def test_a_scrape_during_traffic_shows_it_queued_and_idle_instances_are_not_busy(
    start_server: Callable[..., ServerThread],
) -> None:
    running = start_server(models=("mlp", "mlp_wide"), metrics_port=0)
    port = running.server.metrics_port
    idle = _scrape(port)
    assert idle[("tensorgate_instances_busy", (("model", "mlp"),))] == 0
    assert idle[("tensorgate_instances_busy", (("model", "mlp_wide"),))] == 0
    with TensorgateClient(running.target, timeout_s=10) as c:
        request = codec.predict_request("mlp_wide", {"input": X})
        pending = [c._stub.Predict.future(request, timeout=10) for _ in range(3)]
        # mlp_wide waits 300 ms for company: the scrape sees the three queued, and its one
        # instance waiting for them is not counted as busy.
        during: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}

        def queued_seen() -> bool:
            during.update(_scrape(port))
            return during[("tensorgate_queue_depth", (("model", "mlp_wide"),))] == 3

        wait_until(queued_seen, what="three queued requests in a scrape")
        assert during[("tensorgate_instances_busy", (("model", "mlp_wide"),))] == 0
        assert all(len(f.result().outputs) == 2 for f in pending)


def test_a_call_whose_deadline_passes_is_counted_as_deadline_exceeded(
    start_server: Callable[..., ServerThread],
) -> None:
    running = start_server(models=("mlp_wide",), metrics_port=0)
    with TensorgateClient(running.target, timeout_s=10) as c:
        with pytest.raises(grpc.RpcError) as late:
            # 150 ms: time to reach the handler, and well short of the 300 ms batch window.
            c._stub.Predict(codec.predict_request("mlp_wide", {"input": X}), timeout=0.15)
        assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED

    def counted(code: str) -> float:
        key = (("code", code), ("kind", "unary"), ("model", "mlp_wide"), ("version", "1"))
        return _scrape(running.server.metrics_port).get(("tensorgate_requests_total", key), 0.0)

    wait_until(lambda: counted("DEADLINE_EXCEEDED") == 1, what="DEADLINE_EXCEEDED counted")
    assert counted("CANCELLED") == 0


def test_idle_connections_to_the_metrics_port_do_not_grow_threads(
    start_server: Callable[..., ServerThread],
) -> None:
    running = start_server(models=("mlp",), metrics_port=0)
    port = running.server.metrics_port
    assert running.server.telemetry.metrics._server.server_address[0] == "127.0.0.1"  # type: ignore[union-attr]

    def scrape_threads() -> int:
        # Counted by name: the process's other threads come and go with other tests' servers.
        return sum(thread.name == "metrics" for thread in threading.enumerate())

    before = scrape_threads()
    idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(100)]
    try:
        wait_until(lambda: scrape_threads() >= before + 8, what="handler threads")
        assert scrape_threads() <= before + 8
    finally:
        for connection in idle:
            connection.close()
    wait_until(lambda: _try_scrape(port), timeout_s=15, what="scrapes answered again")


def _try_scrape(port: int) -> bool:
    try:
        return bool(_scrape(port))
    except OSError:
        return False


def test_a_taken_metrics_port_fails_the_start_before_the_grpc_port_is_bound(
    repository: Path,
) -> None:
    from tensorgate.server.app import TensorgateServer
    from tensorgate.server.config import ConfigError, ServerConfig

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        config = ServerConfig(
            host="127.0.0.1", port=0, model_repository=repository, models=("mlp",),
            metrics_port=taken.getsockname()[1],
        )  # fmt: skip
        server = TensorgateServer(config)
        with pytest.raises(ConfigError, match="choose another with --metrics-port"):
            asyncio.run(server.start())
    assert server.port == 0  # the gRPC port was never bound, so no client could reach it


def test_a_loop_kept_histogram_exposes_prometheus_buckets_and_sums() -> None:
    """The request path's histograms are plain numbers until scraped: a value on a bucket's
    bound counts in that bucket (le is <=), buckets are cumulative, count and sum agree."""
    from prometheus_client import CollectorRegistry, Histogram, generate_latest

    from tensorgate.server.telemetry.metrics import Metrics

    metrics = Metrics()
    reference_registry = CollectorRegistry()
    reference = Histogram(
        "tensorgate_queue_wait_seconds", "reference", ["model"],
        buckets=metrics.queue_seconds.bounds[:-1], registry=reference_registry,
    ).labels("mlp")  # fmt: skip
    ours = metrics.queue_seconds.labels("mlp")
    for value in (0.0, 0.0005, 0.0007, 0.002, 0.3, 10.0, 11.0, 1e9):
        ours.observe(value)
        reference.observe(value)

    def samples(text: bytes, name: str) -> dict[tuple[str, ...], float]:
        found = {}
        for family in text_string_to_metric_families(text.decode()):
            for sample in family.samples:
                if sample.name.startswith(name) and not sample.name.endswith("_created"):
                    found[(sample.name, sample.labels.get("le", ""))] = sample.value
        return found

    name = "tensorgate_queue_wait_seconds"
    got = samples(generate_latest(metrics.registry), name)
    assert got == samples(generate_latest(reference_registry), name)
    assert got[(f"{name}_bucket", "0.0005")] == 2 and got[(f"{name}_count", "")] == 8
    metrics.calls.labels("Predict", "OK").inc()
    assert "tensorgate_calls_total{" in generate_latest(metrics.registry).decode()
