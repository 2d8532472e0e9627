"""Span trees for each RPC kind, checked with the SDK's in-memory exporter: the stages are there
and in time order, parents and batch links are right, the caller's trace continues, and failures
carry the error status."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import numpy as np
import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from client import AsyncTensorgateClient, StreamItem, TensorgateClient
from server.telemetry import Tracing
from tests.harness import ServerThread

X = np.ones((1, 256), np.float32)


@pytest.fixture
def traced(
    start_server: Callable[..., ServerThread],
) -> Iterator[tuple[ServerThread, InMemorySpanExporter, Any]]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    running = start_server(tracing=Tracing(provider))
    # The caller's own tracer, as an instrumented service would have.
    caller = provider.get_tracer("caller")
    yield running, exporter, caller


def _spans(exporter: InMemorySpanExporter) -> list[ReadableSpan]:
    return list(exporter.get_finished_spans())


def _children(spans: list[ReadableSpan], parent: ReadableSpan) -> dict[str, ReadableSpan]:
    return {
        s.name: s
        for s in spans
        if s.parent is not None and s.parent.span_id == parent.context.span_id
    }


def _wait_for(exporter: InMemorySpanExporter, name: str, count: int = 1) -> list[ReadableSpan]:
    import time

    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        found = [s for s in _spans(exporter) if s.name == name]
        if len(found) >= count:
            return found
        time.sleep(0.01)
    raise AssertionError(f"no {count} span(s) named {name}: {[s.name for s in _spans(exporter)]}")


def test_unary_span_tree_continues_the_callers_trace(traced: Any) -> None:
    running, exporter, caller = traced
    with caller.start_as_current_span("caller-operation") as parent:
        with TensorgateClient(running.target, timeout_s=10) as c:
            c.predict("mlp", {"input": X}, request_id="r-1")
    [rpc] = _wait_for(exporter, "tensorgate.v1.Inference/Predict")
    spans = _spans(exporter)
    assert rpc.kind == SpanKind.SERVER
    assert rpc.context.trace_id == parent.get_span_context().trace_id
    assert rpc.parent is not None and rpc.parent.span_id == parent.get_span_context().span_id
    attrs = rpc.attributes or {}
    assert attrs["rpc.system"] == "grpc" and attrs["rpc.service"] == "tensorgate.v1.Inference"
    assert attrs["rpc.method"] == "Predict" and attrs["rpc.grpc.status_code"] == 0
    assert attrs["tensorgate.model"] == "mlp" and attrs["tensorgate.request_id"] == "r-1"
    assert attrs["tensorgate.batch.size"] == 1 and attrs["tensorgate.instance"] in (0, 1)
    stages = _children(spans, rpc)
    assert set(stages) == {"validate", "queue", "execute", "encode"}
    order = [stages[n] for n in ("validate", "queue", "execute", "encode")]
    for earlier, later in itertools.pairwise(order):
        assert earlier.start_time <= later.start_time
        assert earlier.end_time <= later.end_time
    assert rpc.start_time <= order[0].start_time and order[-1].end_time <= rpc.end_time
    assert "tensorgate.queue.depth" in (stages["queue"].attributes or {})
    [batch] = [s for s in spans if s.name == "batch"]
    assert [link.context.span_id for link in batch.links] == [rpc.context.span_id]
    assert "compute" in _children(spans, batch)


def test_one_batch_span_links_every_request_in_it(traced: Any) -> None:
    running, exporter, _ = traced

    async def burst() -> None:
        async with AsyncTensorgateClient(running.target, timeout_s=10) as c:
            await asyncio.gather(*(c.predict("mlp_wide", {"input": X}) for _ in range(8)))

    asyncio.run(burst())
    rpcs = _wait_for(exporter, "tensorgate.v1.Inference/Predict", 8)
    [batch] = [s for s in _spans(exporter) if s.name == "batch"]
    assert (batch.attributes or {})["tensorgate.batch.size"] == 8
    assert {link.context.span_id for link in batch.links} == {s.context.span_id for s in rpcs}
    assert all((s.attributes or {})["tensorgate.batch.size"] == 8 for s in rpcs)


def test_stream_has_a_span_per_request(traced: Any) -> None:
    running, exporter, _ = traced
    with TensorgateClient(running.target, timeout_s=10) as c:
        items = [StreamItem(f"s{i}", "mlp", {"input": X}) for i in range(3)]
        items.append(StreamItem("bad", "mlp", {"input": np.ones((1, 3), np.float32)}))
        assert len(list(c.stream(items))) == 4
    [call] = _wait_for(exporter, "tensorgate.v1.Inference/StreamPredict")
    spans = _spans(exporter)
    requests = [s for s in spans if s.name == "request"]
    assert len(requests) == 4
    assert all(r.parent is not None and r.parent.span_id == call.context.span_id for r in requests)
    by_id = {(r.attributes or {})["tensorgate.request_id"]: r for r in requests}
    assert set(_children(spans, by_id["s0"])) == {"validate", "queue", "execute", "encode"}
    assert by_id["bad"].status.status_code == StatusCode.ERROR
    assert "model expects [-1,256]" in (by_id["bad"].status.description or "")


def test_job_trace_links_submit_run_and_get_result(traced: Any) -> None:
    running, exporter, caller = traced
    with caller.start_as_current_span("caller-operation") as parent:
        with TensorgateClient(running.target, timeout_s=10) as c:
            job = c.submit("mlp", {"input": X})
            assert c.get_result(job.job_id, wait_timeout_s=5).status == "SUCCEEDED"
    [submit] = _wait_for(exporter, "tensorgate.v1.Inference/Submit")
    [get] = _wait_for(exporter, "tensorgate.v1.Inference/GetResult")
    [run] = _wait_for(exporter, "job")
    trace_id = parent.get_span_context().trace_id
    assert submit.context.trace_id == get.context.trace_id == run.context.trace_id == trace_id
    assert run.parent is not None and run.parent.span_id == submit.context.span_id
    assert (run.attributes or {})["tensorgate.job.id"] == job.job_id
    assert (run.attributes or {})["tensorgate.job.status"] == "SUCCEEDED"
    assert {"queue", "execute"} <= set(_children(_spans(exporter), run))
    assert run.context.span_id in {link.context.span_id for link in get.links}


def test_a_failed_call_carries_the_error_status(traced: Any) -> None:
    running, exporter, _ = traced
    with TensorgateClient(running.target, timeout_s=10) as c:
        with pytest.raises(grpc.RpcError):
            c.predict("mlp", {"input": np.ones((1, 3), np.float32)})
    [rpc] = _wait_for(exporter, "tensorgate.v1.Inference/Predict")
    assert rpc.status.status_code == StatusCode.ERROR
    assert (rpc.attributes or {})["rpc.grpc.status_code"] == grpc.StatusCode.INVALID_ARGUMENT.value[
        0
    ]
    assert "has shape [1,3]" in (rpc.status.description or "")


def test_tracing_is_off_unless_configured() -> None:
    assert not Tracing.from_env({}).enabled
    assert not Tracing.from_env({"OTEL_TRACES_EXPORTER": "none"}).enabled
    console = Tracing.from_env({"OTEL_TRACES_EXPORTER": "console", "OTEL_SERVICE_NAME": "tg"})
    assert console.enabled
    console.shutdown()
    otlp = Tracing.from_env({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4317"})
    assert otlp.enabled
    otlp.shutdown()
