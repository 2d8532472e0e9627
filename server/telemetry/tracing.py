"""OpenTelemetry tracing, configured the standard way and off unless configured.

On when OTEL_TRACES_EXPORTER names an exporter (otlp, console; comma-separated) or an OTLP
endpoint is set (OTEL_EXPORTER_OTLP_ENDPOINT / OTEL_EXPORTER_OTLP_TRACES_ENDPOINT). The SDK reads
the rest from its own variables: OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES, sampling from
OTEL_TRACES_SAMPLER(_ARG), batching from OTEL_BSP_*, the OTLP exporter's endpoint, headers and
TLS from OTEL_EXPORTER_OTLP_*.

Span tree of a request:

    tensorgate.v1.Inference/Predict      SERVER, parent = the caller's traceparent
      ├─ validate                        decode and check the inputs
      ├─ queue                           enqueued → taken into a batch (tensorgate.queue.depth)
      ├─ execute                         the batch it ran in (tensorgate.batch.size, .instance)
      └─ encode                          outputs → response message
    batch                                one per batch; links to every request span in it
      ├─ h2d / compute / d2h             on a GPU instance, durations from CUDA events
      └─ compute                         on a CPU instance

A stream has one span for the call and a `request` child per request; a job's `job` span is a
child of its Submit span, and the GetResult span that returns the result links to it.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from opentelemetry.trace import Link, Span, SpanKind, Status, StatusCode
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


class Tracing:
    """Creates the spans of the serving path. Disabled, every method returns at once."""

    def __init__(self, provider: TracerProvider | None = None) -> None:
        self.provider = provider
        self.enabled = provider is not None
        self._tracer = provider.get_tracer("tensorgate") if provider is not None else None

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

    def stage(
        self, parent: Span | None, name: str, start_ns: int, end_ns: int, **attributes: Any
    ) -> None:
        """A finished child span with explicit times."""
        if self._tracer is None or parent is None or not parent.is_recording():
            return
        context = trace.set_span_in_context(parent)
        attrs = {f"tensorgate.{k}": v for k, v in attributes.items()}
        span = self._tracer.start_span(name, context=context, start_time=start_ns, attributes=attrs)
        span.end(end_time=end_ns)

    def link_to(self, span: Span | None, other: Span | None) -> None:
        if span is not None and other is not None and span.is_recording():
            span.add_link(other.get_span_context())

    # --- the request's way through the queue and the batch ---------------------------------

    def request_trace(self, span: Span | None, queue_depth: int) -> RequestTrace | None:
        if span is None or not span.is_recording():
            return None
        return RequestTrace(span, enqueued_ns=time.time_ns(), queue_depth=queue_depth)

    def batch_done(
        self,
        model: str,
        traces: Sequence[RequestTrace],
        rows: int,
        instance: int,
        started_ns: int,
        ended_ns: int,
        stage_s: Mapping[str, float],
        error: BaseException | None = None,
    ) -> None:
        """The batch span (linked to its requests) with its stages, and each request's queue and
        execute spans."""
        if self._tracer is None or not traces:
            return
        batch = self._tracer.start_span(
            "batch",
            start_time=started_ns,
            links=[Link(t.span.get_span_context()) for t in traces],
            attributes={
                "tensorgate.model": model,
                "tensorgate.batch.size": rows,
                "tensorgate.batch.requests": len(traces),
                "tensorgate.instance": instance,
            },
        )
        context = trace.set_span_in_context(batch)
        at = started_ns
        for name in ("h2d", "compute", "d2h"):
            seconds = stage_s.get(name)
            if seconds is None:
                continue
            end = at + int(seconds * 1e9)
            self._tracer.start_span(name, context=context, start_time=at).end(end_time=end)
            at = end
        if error is not None:
            batch.set_status(Status(StatusCode.ERROR, str(error)))
        batch.end(end_time=ended_ns)
        for t in traces:
            t.span.set_attribute("tensorgate.batch.size", rows)
            t.span.set_attribute("tensorgate.instance", instance)
            self.stage(
                t.span,
                "queue",
                t.enqueued_ns,
                t.taken_ns or started_ns,
                **{"queue.depth": t.queue_depth},
            )
            self.stage(
                t.span,
                "execute",
                started_ns,
                ended_ns,
                **{"batch.size": rows, "instance": instance},
            )


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
