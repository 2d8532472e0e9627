"""Observability: OpenTelemetry spans for every stage of a request, and Prometheus metrics.

Both are reached through one Telemetry object that the app builds and hands to the servicer and
the batchers; with tracing off, the tracing hooks return at their first line.
"""

from __future__ import annotations

from tensorgate.server.telemetry.metrics import Metrics
from tensorgate.server.telemetry.tracing import RequestTrace, Tracing

__all__ = ["Metrics", "RequestTrace", "Telemetry", "Tracing"]


class Telemetry:
    def __init__(self, tracing: Tracing, metrics: Metrics) -> None:
        self.tracing = tracing
        self.metrics = metrics

    @classmethod
    def quiet(cls) -> Telemetry:
        """No tracing, and metrics kept in a registry nobody scrapes (parts built on their own)."""
        return cls(Tracing(None), Metrics())
