"""Prometheus metrics on a scrape endpoint (--metrics-port), in a registry of their own.

Counters and histograms are updated where things happen; gauges that describe current state
(queue depth, busy instances, jobs by status) are read from the live objects at scrape time, so
the request path pays nothing for them.
"""

from __future__ import annotations

import bisect
import math
import socket
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

_LATENCY_BUCKETS_S = (
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0,
)  # fmt: skip
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
# Connections served at once; more are closed (Prometheus scrapes one at a time).
SCRAPE_THREADS = 8


class Metrics:
    """The server's metrics. Constructing it does no I/O; serve() starts the HTTP endpoint."""

    def __init__(self, tenant_label: bool = False) -> None:
        """tenant_label: count requests by tenant too (one series per tenant: only when the
        tenants are few)."""
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.tenant_label = tenant_label
        # Counted on every request or batch: kept as plain numbers by the event loop, read at
        # scrape time (LoopCounter, LoopHistogram), not through prometheus_client's locks.
        self.requests = LoopCounter(
            "tensorgate_requests",
            "Inference requests answered, by model, RPC kind and gRPC status code"
            + (", and tenant" if tenant_label else ""),
            ("model", "version", "kind", "code", *(("tenant",) if tenant_label else ())),
        )
        self.request_seconds = LoopHistogram(
            "tensorgate_request_duration_seconds",
            "Time from a request's arrival to its answer",
            ("model", "version", "kind"),
            _LATENCY_BUCKETS_S,
        )
        self.queue_seconds = LoopHistogram(
            "tensorgate_queue_wait_seconds",
            "Time a request waited in its model's queue before joining a batch",
            ("model",),
            _LATENCY_BUCKETS_S,
        )
        self.compute_seconds = LoopHistogram(
            "tensorgate_batch_compute_seconds",
            "Engine time of one batch (CUDA-event time on GPU instances)",
            ("model",),
            _LATENCY_BUCKETS_S,
        )
        self.batch_rows = LoopHistogram(
            "tensorgate_batch_size_rows",
            "Rows per batch sent to an instance",
            ("model",),
            _BATCH_BUCKETS,
        )
        self.instance_busy_seconds = LoopCounter(
            "tensorgate_instance_busy_seconds",
            "Time instances spent running batches; rate() over it is utilization",
            ("model", "instance"),
        )
        self.calls = LoopCounter(
            "tensorgate_calls",
            "Calls answered, by RPC method (every service but health) and gRPC status code",
            ("method", "code"),
        )
        r.register(_LoopCollector((self.requests, self.request_seconds, self.queue_seconds,
                                   self.compute_seconds, self.batch_rows,
                                   self.instance_busy_seconds, self.calls)))  # fmt: skip
        self.scheduler_restarts = Counter(
            "tensorgate_scheduler_restarts",
            "Times a model's scheduler died of an unexpected error and was restarted",
            ["model"],
            registry=r,
        )
        self.webhook_attempts = Counter(
            "tensorgate_webhook_attempts",
            "Webhook delivery attempts, by outcome: delivered, retry (due again) or failed "
            "(dead-lettered)",
            ["outcome"],
            registry=r,
        )
        self.open_streams = Gauge(
            "tensorgate_open_streams", "StreamPredict calls open now", registry=r
        )
        self._server: Any = None
        self._serving = False

    def request_counter(
        self, model: str, kind: str, code: str, tenant: str = "", version: str = ""
    ) -> LoopSeries:
        """The requests counter's series for these labels (tenant only when it is a label)."""
        if self.tenant_label:
            return self.requests.labels(model, version, kind, code, tenant)
        return self.requests.labels(model, version, kind, code)

    def watch(self, state: Callable[[], Mapping[str, Any]]) -> None:
        """Reads current state at scrape time: state() returns {"queue_depth": {model: n},
        "busy_instances": {model: n}, "instances": {model: n}, "jobs": {status: n}}."""
        self.registry.register(_StateCollector(state))

    def bind(self, port: int, host: str = "0.0.0.0") -> int:
        """Binds the scrape endpoint's port without answering yet (start() does); returns the
        port (useful with port 0). OSError when the port cannot be bound."""
        server = ScrapeServer((host, port), SCRAPE_THREADS)
        server.set_app(make_wsgi_app(self.registry))
        self._server = server
        return int(server.server_port)

    def start(self) -> None:
        """Answers scrapes on the bound port (a thread accepts, a small pool answers)."""
        if self._server is not None:
            threading.Thread(target=self._server.serve_forever, name="metrics", daemon=True).start()
            self._serving = True

    def serve(self, port: int, host: str = "0.0.0.0") -> int:
        """bind() then start(); returns the port."""
        bound = self.bind(port, host)
        self.start()
        return bound

    def close(self) -> None:
        if self._server is not None:
            if self._serving:
                self._server.shutdown()
            self._server.server_close()
            self._server = None
            self._serving = False


class LoopSeries:
    """One label set of a LoopCounter or LoopHistogram. Updated by one thread (the event loop)
    with plain arithmetic; a scrape reads the numbers as they stand."""

    __slots__ = ("_bounds", "buckets", "labels", "sum", "value")

    def __init__(self, labels: tuple[str, ...], bounds: tuple[float, ...] = ()) -> None:
        self.labels = labels
        self.value = 0.0  # a counter's total
        self._bounds = bounds
        self.buckets = [0] * len(bounds)  # a histogram's count per bucket (not cumulative)
        self.sum = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount

    def observe(self, value: float) -> None:
        # bounds end with +Inf, so every value has a bucket: the first bound >= value.
        self.buckets[bisect.bisect_left(self._bounds, value)] += 1
        self.sum += value


class LoopCounter:
    """A counter family for the request path. prometheus_client's Counter takes a lock and
    checks its labels on every update; this one adds to a float, on the one thread that updates
    it, and is exposed through _LoopCollector."""

    def __init__(self, name: str, documentation: str, labelnames: tuple[str, ...]) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = labelnames
        self._series: dict[tuple[str, ...], LoopSeries] = {}

    def labels(self, *values: str) -> LoopSeries:
        series = self._series.get(values)
        if series is None:
            if len(values) != len(self.labelnames):
                raise ValueError(f"{self.name}: {len(values)} label values for {self.labelnames}")
            series = self._series[values] = self._new(values)
        return series

    def _new(self, values: tuple[str, ...]) -> LoopSeries:
        return LoopSeries(values)

    def every(self) -> list[LoopSeries]:
        return list(self._series.values())  # a copy: the loop may add a series meanwhile

    def family(self) -> Any:
        family = CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for series in self.every():
            family.add_metric(series.labels, series.value)
        return family


class LoopHistogram(LoopCounter):
    """A histogram family for the request path, kept like LoopCounter."""

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: tuple[str, ...],
        buckets: tuple[float, ...],
    ) -> None:
        super().__init__(name, documentation, labelnames)
        self.bounds = (*buckets, math.inf)

    def _new(self, values: tuple[str, ...]) -> LoopSeries:
        return LoopSeries(values, self.bounds)

    def family(self) -> Any:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for series in self.every():
            counts = list(series.buckets)  # one reading: the count is their sum
            cumulative, running = [], 0
            for bound, count in zip(self.bounds, counts, strict=True):
                running += count
                cumulative.append((floatToGoString(bound), running))
            family.add_metric(series.labels, cumulative, series.sum)
        return family


class _LoopCollector(Collector):
    def __init__(self, families: tuple[LoopCounter, ...]) -> None:
        self._families = families

    def collect(self) -> Iterator[Any]:
        for family in self._families:
            yield family.family()


class _StateCollector(Collector):
    def __init__(self, state: Callable[[], Mapping[str, Any]]) -> None:
        self._state = state

    def collect(self) -> Iterator[GaugeMetricFamily]:
        state = self._state()
        for key, name, text, label in (
            ("queue_depth", "tensorgate_queue_depth", "Requests waiting in a model queue", "model"),
            ("busy_instances", "tensorgate_instances_busy", "Instances running a batch", "model"),
            ("instances", "tensorgate_instances", "Instances loaded", "model"),
            ("jobs", "tensorgate_jobs", "Jobs kept by the server, by status", "status"),
        ):
            family = GaugeMetricFamily(name, text, labels=[label])
            for value_label, value in sorted(state.get(key, {}).items()):
                family.add_metric([value_label], value)
            yield family


class _ScrapeHandler(WSGIRequestHandler):
    # An idle or slow connection is dropped after this, instead of holding a thread forever.
    timeout = 5.0

    def log_message(self, format: str, *args: Any) -> None:
        pass  # scrapes are not worth a log line each


class ScrapeServer(WSGIServer):
    """A WSGI server with a cap on connection threads.

    prometheus-client's own server starts a thread per connection with no timeout: 2,000 idle
    connections meant 2,000 threads. Here at most `threads` connections are served at once,
    each dropped after _ScrapeHandler.timeout of silence; a connection beyond the cap is closed
    at once (Prometheus retries at its next scrape).
    """

    # socketserver's default listen backlog of 5 leaves connects beyond it retrying for seconds.
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], threads: int) -> None:
        self._slots = threading.BoundedSemaphore(threads)
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        super().__init__(address, _ScrapeHandler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)
            return
        threading.Thread(
            target=self._handle, args=(request, client_address), name="metrics", daemon=True
        ).start()

    def _handle(self, request: Any, client_address: Any) -> None:
        try:
            self.finish_request(request, client_address)
        except Exception:
            self.handle_error(request, client_address)
        finally:
            self.shutdown_request(request)
            self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that went away or timed out is not an error worth a traceback
