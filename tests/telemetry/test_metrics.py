"""The Prometheus endpoint, scraped during traffic: counts match the requests sent."""

from __future__ import annotations

import urllib.request
from collections.abc import Callable

import grpc
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from client import StreamItem, TensorgateClient
from tests.harness import ServerThread

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
        during = _scrape(port)

    def requests(model: str, kind: str, code: str) -> float:
        key = (("code", code), ("kind", kind), ("model", model))
        return during.get(("tensorgate_requests_total", key), 0.0)

    assert requests("mlp", "unary", "OK") == 5
    assert requests("mlp", "unary", "INVALID_ARGUMENT") == 2
    assert requests("_unknown", "unary", "NOT_FOUND") == 1  # unknown names do not become labels
    assert requests("mlp", "job", "OK") == 3
    assert requests("mlp", "stream", "OK") == 4
    assert (
        during[("tensorgate_request_duration_seconds_count", (("kind", "unary"), ("model", "mlp")))]
        == 7
    )
    rows = during[("tensorgate_batch_size_rows_sum", (("model", "mlp"),))]
    assert rows == 5 + 3 + 4  # every accepted row ran in some batch
    batches = during[("tensorgate_batch_size_rows_count", (("model", "mlp"),))]
    assert during[("tensorgate_batch_compute_seconds_count", (("model", "mlp"),))] == batches
    assert during[("tensorgate_queue_wait_seconds_count", (("model", "mlp"),))] == 12
    assert during[("tensorgate_queue_depth", (("model", "mlp"),))] == 0
    assert during[("tensorgate_instances", (("model", "mlp"),))] == 2
    assert during[("tensorgate_jobs", (("status", "SUCCEEDED"),))] == 3
    assert during[("tensorgate_open_streams", ())] == 0
    busy = sum(
        value
        for (name, labels), value in during.items()
        if name == "tensorgate_instance_busy_seconds_total" and ("model", "mlp") in labels
    )
    assert busy > 0
