"""What every gRPC front end shares: the data plane, who is calling (auth), the admission limit,
the per-tenant rate, and the counting of calls. tensorgate.v1 (servicer.py) and KServe v2
(kserve.py) are thin adapters over it; unary.py is the one door of every unary call, stream.py
the pump of every bidirectional stream.

Admission is the application's, not gRPC core's: calls and open streams beyond
max_concurrent_rpcs are refused with RESOURCE_EXHAUSTED and retry-after-ms, while the health
service, which is not wrapped, keeps answering probes however busy the server is.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import grpc
from opentelemetry.trace import Span

from tensorgate.server.api.auth import Authenticator
from tensorgate.server.api.status import abort, as_domain_error
from tensorgate.server.dataplane import DataPlane
from tensorgate.server.errors import (
    Cancelled,
    DeadlineExceeded,
    PermissionDenied,
    ResourceExhausted,
    TensorgateError,
)
from tensorgate.server.limits import TenantRates
from tensorgate.server.telemetry import Tracing

Resp = TypeVar("Resp")

# A deadline further away than this is treated as none (gRPC reports "infinite" as a huge number).
_NO_DEADLINE_S = 10**8


def gone(deadline: float | None) -> Cancelled | DeadlineExceeded:
    """Why a call's task was cancelled: its deadline passed, or the caller went away."""
    if deadline is not None and time.monotonic() >= deadline:
        return DeadlineExceeded("the call's deadline passed before it was answered")
    return Cancelled("the caller cancelled the call")


def encoded(tracing: Tracing, span: Span | None, build: Callable[[], Resp]) -> Resp:
    """Builds a response, timed as the request's `encode` stage when traced."""
    if span is None:
        return build()
    started_ns = time.time_ns()
    response = build()
    tracing.stage(span, "encode", started_ns, time.time_ns())
    return response


def deadline_of(context: grpc.aio.ServicerContext) -> float | None:
    """The caller's deadline on the monotonic clock, or None."""
    remaining: float | None = context.time_remaining()
    if remaining is None or remaining > _NO_DEADLINE_S:
        return None
    return time.monotonic() + remaining


class Frontend:
    """The data plane plus the telemetry a front end reports to, and the limits shared by every
    front end."""

    def __init__(
        self,
        plane: DataPlane,
        max_inflight_per_stream: int,
        max_concurrent_rpcs: int = 0,
        auth: Authenticator | None = None,
        tenant_rate: float = 0.0,
        admin_tenants: tuple[str, ...] = (),
    ) -> None:
        self.plane = plane
        self.admin_tenants = frozenset(admin_tenants)
        self.auth = auth if auth is not None and auth.enabled else None
        self.rates = TenantRates(tenant_rate)
        self.tracing = plane.tracing
        self.metrics = plane.telemetry.metrics
        self.max_inflight_per_stream = max_inflight_per_stream
        self.max_concurrent_rpcs = max_concurrent_rpcs
        # Unary calls in a handler plus streams open, across both front ends.
        self.calls = 0
        # Streams opened so far (names each stream as the owner of its sequences).
        self._streams = 0
        # (model, kind, code, tenant) -> the counter and histogram children: labels() takes a
        # lock and validates on every call, which the request path need not pay. Bounded: model
        # names collapse to the served ones, kinds and codes are fixed sets, tenants are ""
        # unless --metrics-tenant-label.
        self._children: dict[tuple[str, str, str, str, str], tuple[Any, Any]] = {}
        # (method, code) -> the calls counter's child (a fixed set of methods and codes).
        self._calls_children: dict[tuple[str, str], Any] = {}

    def check_admin(self, tenant: str) -> None:
        """PERMISSION_DENIED unless the tenant may change the served models (with auth on, the
        tenants --admin-tenants names; with auth off, anyone who reaches the port)."""
        if self.auth is not None and tenant not in self.admin_tenants:
            raise PermissionDenied(
                f"tenant '{tenant}' may not use the model repository API; "
                "the server's --admin-tenants names who may"
            )

    def stream_owner(self) -> str:
        """A name for a new stream: the owner of the sequences it starts or drives."""
        self._streams += 1
        return f"stream-{self._streams}"

    def enter(self, context: grpc.aio.ServicerContext) -> str:
        """Names the caller's tenant and counts the call (or open stream) until leave(); beyond
        max_concurrent_rpcs raises RESOURCE_EXHAUSTED with retry-after-ms (Unauthenticated when
        auth refuses it). Plain calls: the unary door pays no context manager per call."""
        tenant = ""  # anonymous while auth is off
        if self.auth is not None:
            tenant = self.auth.tenant(context.invocation_metadata(), context.auth_context())
        limit = self.max_concurrent_rpcs
        if limit and self.calls >= limit:
            raise ResourceExhausted(
                f"the server is at its limit of {limit} concurrent calls and streams "
                "(--max-concurrent-rpcs); retry later",
                retry_after_s=0.05,
            )
        self.calls += 1
        return tenant

    def leave(self) -> None:
        self.calls -= 1

    @contextlib.asynccontextmanager
    async def admitted(self, context: grpc.aio.ServicerContext) -> AsyncIterator[str]:
        """enter() and leave() around a stream; a refusal ends the call with its status."""
        try:
            tenant = self.enter(context)
        except TensorgateError as exc:
            await abort(context, exc)
        try:
            yield tenant
        finally:
            self.leave()

    def count(
        self,
        model: str,
        kind: str,
        error: BaseException | None,
        started: float,
        tenant: str = "",
        version: str = "",
    ) -> None:
        """One inference request answered (tensorgate_requests_total and its latency), labelled
        with the model version that ran it ("" when it was refused before one was chosen)."""
        code = "OK" if error is None else as_domain_error(error).code
        if not self.metrics.tenant_label:
            tenant = ""
        key = (model, version, kind, code, tenant)
        children = self._children.get(key)
        if children is None:
            label = self.plane.metric_model(model)
            version = version if label == model else ""
            children = (
                self.metrics.request_counter(label, kind, code, tenant, version),
                self.metrics.request_seconds.labels(label, version, kind),
            )
            if label == model:  # unknown names are not remembered, so the dict stays bounded
                self._children[key] = children
        children[0].inc()
        children[1].observe(time.perf_counter() - started)

    def count_call(self, method: str, error: BaseException | None) -> None:
        """One call of any RPC but health's answered (tensorgate_calls_total)."""
        code = "OK" if error is None else as_domain_error(error).code
        child = self._calls_children.get((method, code))
        if child is None:
            child = self._calls_children[(method, code)] = self.metrics.calls.labels(method, code)
        child.inc()
