"""OpenTelemetry tracing, configured the standard way and off unless configured.

On when OTEL_TRACES_EXPORTER names an exporter (otlp, console; comma-separated) or an OTLP
endpoint is set (OTEL_EXPORTER_OTLP_ENDPOINT / OTEL_EXPORTER_OTLP_TRACES_ENDPOINT). The SDK reads
the rest from its own variables: OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES, sampling from
OTEL_TRACES_SAMPLER(_ARG), batching from OTEL_BSP_*, the OTLP exporter's endpoint, headers and
TLS from OTEL_EXPORTER_OTLP_*.

One span per request. Its stages, and the batch it ran in, are attributes of that span rather
than child spans and a batch span: five spans per request cost over half the throughput, one
costs about a third (bench/tracing_overhead.py). The stages always come in the same order, so
their durations give the timeline, in milliseconds:

    tensorgate.v1.Inference/Predict      SERVER, parent = the caller's traceparent
        tensorgate.validate_ms           decode and check the inputs
        tensorgate.queue_ms              enqueued → taken into a batch
        tensorgate.queue.depth           requests ahead of it on arrival
        tensorgate.execute_ms            the batch it ran in, of which:
        tensorgate.h2d_ms / compute_ms / d2h_ms   on a GPU instance, from CUDA events;
                                         compute_ms alone on a CPU instance
        tensorgate.batch.id              shared by the requests that ran in one batch
        tensorgate.batch.size / .requests / tensorgate.instance   rows and requests in it, where
        tensorgate.encode_ms             outputs → response message

A stream has one span for the call and a `request` child per request; a job's `job` span is a
child of its Submit span, and the GetResult span that returns the result links to it.

In production, sample at the root and follow the caller's decision (README, "Tracing"):
OTEL_TRACES_SAMPLER=parentbased_traceidratio OTEL_TRACES_SAMPLER_ARG=0.01.
"""

from __future__ import annotations

import logging
import os
import random
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

log = logging.getLogger(__name__)

RPC_SERVICE = "tensorgate.v1.Inference"
_PROPAGATOR = TraceContextTextMapPropagator()


@dataclass(slots=True, eq=False)
class RequestTrace:
    """The span of one request and the wall-clock times (ns) of its stages so far."""

    span: Span
    enqueued_ns: int = 0
    taken_ns: int = 0
    queue_depth: int = 0
    # How long validation took (a duration, unlike the wall-clock times above).
    validate_took_ns: int = 0


class Tracing:
    """Creates the spans of the serving path. Disabled, every method returns at once."""

    def __init__(self, provider: TracerProvider | None = None) -> None:
        self.provider = provider
        self.enabled = provider is not None
        self._tracer = provider.get_tracer("tensorgate") if provider is not None else None
        # Numbers the traced batches (tensorgate.batch.id), from a random start so that ids
        # from several processes do not meet.
        self._batches = random.getrandbits(31) << 32

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> Tracing:
        names = [
            n.strip().lower()
            for n in environ.get("OTEL_TRACES_EXPORTER", "").split(",")
            if n.strip() and n.strip().lower() != "none"
        ]
        if not names and (
            environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
            or environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        ):
            names = ["otlp"]
        if not names:
            return cls(None)
        resource = Resource.create({"service.name": environ.get("OTEL_SERVICE_NAME", "tensorgate")})
        provider = TracerProvider(resource=resource)
        for exporter in _exporters(names):
            provider.add_span_processor(BatchSpanProcessor(exporter))
        log.info("tracing on: exporters %s", ", ".join(names))
        return cls(provider)

    def shutdown(self) -> None:
        if self.provider is not None:
            self.provider.force_flush()
            self.provider.shutdown()

    # --- RPC spans -------------------------------------------------------------------------

    def start_rpc(
        self,
        method: str,
        metadata: Iterable[tuple[str, Any]] | None,
        service: str = RPC_SERVICE,
        **attributes: Any,
    ) -> Span | None:
        """A SERVER span for one call, continuing the caller's W3C trace context if it sent one."""
        if self._tracer is None:
            return None
        carrier = {k: v for k, v in metadata or () if isinstance(v, str)}
        context = _PROPAGATOR.extract(carrier)
        attrs = {
            "rpc.system": "grpc",
            "rpc.service": service,
            "rpc.method": method,
            **{f"tensorgate.{k}": v for k, v in attributes.items() if v not in (None, "")},
        }
        return self._tracer.start_span(
            f"{service}/{method}", context=context, kind=SpanKind.SERVER, attributes=attrs
        )

    def end_rpc(self, span: Span | None, status_code: int, message: str = "") -> None:
        if span is None:
            return
        span.set_attribute("rpc.grpc.status_code", status_code)
        if status_code != 0:
            span.set_status(Status(StatusCode.ERROR, message))
        span.end()

    def start_child(self, parent: Span | None, name: str, **attributes: Any) -> Span | None:
        """A span for one request inside a call (a stream's request, a job's run)."""
        if self._tracer is None or parent is None or not parent.is_recording():
            return None
        context = trace.set_span_in_context(parent)
        attrs = {f"tensorgate.{k}": v for k, v in attributes.items() if v not in (None, "")}
        return self._tracer.start_span(name, context=context, attributes=attrs)

    def traceparent(self, span: Span | None) -> str:
        """The W3C traceparent of a span, to continue its trace in another process ("" when
        not traced)."""
        if span is None or not span.is_recording():
            return ""
        carrier: dict[str, str] = {}
        _PROPAGATOR.inject(carrier, context=trace.set_span_in_context(span))
        return carrier.get("traceparent", "")

    def start_remote_child(self, traceparent: str, name: str, **attributes: Any) -> Span | None:
        """A span under a parent from another process (its traceparent); None when untraced."""
        if self._tracer is None or not traceparent:
            return None
        context = _PROPAGATOR.extract({"traceparent": traceparent})
        attrs = {f"tensorgate.{k}": v for k, v in attributes.items() if v not in (None, "")}
        return self._tracer.start_span(name, context=context, attributes=attrs)

    def end(self, span: Span | None, error: BaseException | None = None) -> None:
        if span is None:
            return
        if error is not None:
            span.set_status(Status(StatusCode.ERROR, str(error)))
            span.set_attribute("tensorgate.error", type(error).__name__)
        span.end()

    def stage(self, span: Span | None, name: str, start_ns: int, end_ns: int) -> None:
        """Records a stage's duration on the span, as tensorgate.<name>_ms."""
        if span is not None and span.is_recording():
            span.set_attribute(f"tensorgate.{name}_ms", (end_ns - start_ns) / 1e6)

    def link_to(self, span: Span | None, other: Span | None) -> None:
        if span is not None and other is not None and span.is_recording():
            span.add_link(other.get_span_context())

    # --- the request's way through the queue and the batch ---------------------------------

    def request_trace(
        self, span: Span | None, queue_depth: int, validate_took_ns: int = 0
    ) -> RequestTrace | None:
        if span is None or not span.is_recording():
            return None
        return RequestTrace(
            span,
            enqueued_ns=time.time_ns(),
            queue_depth=queue_depth,
            validate_took_ns=validate_took_ns,
        )

    def batch_done(
        self,
        model: str,
        traces: Sequence[RequestTrace],
        rows: int,
        requests: int,
        instance: int,
        started_ns: int,
        ended_ns: int,
        stage_s: Mapping[str, float],
    ) -> None:
        """Each traced request's queue and execute times and its batch's stage times, on the
        request's own span. The requests of one batch share a tensorgate.batch.id."""
        if self._tracer is None or not traces:
            return
        self._batches += 1
        shared: dict[str, Any] = {
            "tensorgate.batch.id": self._batches,
            "tensorgate.batch.size": rows,
            "tensorgate.batch.requests": requests,
            "tensorgate.instance": instance,
            "tensorgate.execute_ms": (ended_ns - started_ns) / 1e6,
        }
        for name in ("h2d", "compute", "d2h"):
            seconds = stage_s.get(name)
            if seconds is not None:
                shared[f"tensorgate.{name}_ms"] = seconds * 1e3
        for t in traces:
            attributes = {
                **shared,
                "tensorgate.queue.depth": t.queue_depth,
                "tensorgate.queue_ms": ((t.taken_ns or started_ns) - t.enqueued_ns) / 1e6,
            }
            if t.validate_took_ns:
                attributes["tensorgate.validate_ms"] = t.validate_took_ns / 1e6
            t.span.set_attributes(attributes)


def _exporters(names: Sequence[str]) -> list[SpanExporter]:
    exporters: list[SpanExporter] = []
    for name in names:
        if name == "otlp":
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

            exporters.append(OTLPSpanExporter())
        elif name == "console":
            exporters.append(ConsoleSpanExporter())
        else:
            raise ValueError(
                f"OTEL_TRACES_EXPORTER: unknown exporter '{name}' (otlp, console, none)"
            )
    return exporters
