"""What every gRPC front end shares: the unary call wrapper (admission, span, error → status),
the caller's deadline, request counting, and the pump that runs a bidirectional stream's requests
through the data plane. tensorgate.v1 (servicer.py) and KServe v2 (kserve.py) are thin adapters
over these.

Admission is the application's, not gRPC core's: calls and open streams beyond
max_concurrent_rpcs are refused with RESOURCE_EXHAUSTED and retry-after-ms, while the health
service, which is not wrapped, keeps answering probes however busy the server is.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc
from opentelemetry.trace import Span

from tensorgate.server.api.auth import Authenticator, TenantRates
from tensorgate.server.api.messages import Malformed, resolve
from tensorgate.server.api.status import abort, as_domain_error, status_of
from tensorgate.server.dataplane import DataPlane
from tensorgate.server.errors import Cancelled, DeadlineExceeded, ResourceExhausted, Unauthenticated
from tensorgate.server.logs import REQUEST_ID
from tensorgate.server.records import Request, Submitted
from tensorgate.server.tensors import Outputs

log = logging.getLogger(__name__)

Req = TypeVar("Req")
Resp = TypeVar("Resp")
Msg = TypeVar("Msg")
Handler = Callable[[Any, Req, grpc.aio.ServicerContext, Span | None], Awaitable[Resp]]

# The tenant of the call being handled (set by Frontend.admitted, read by the handlers and, in a
# stream, by the reader task it starts).
_TENANT: contextvars.ContextVar[str] = contextvars.ContextVar("tenant", default="")

# A deadline further away than this is treated as none (gRPC reports "infinite" as a huge number).
_NO_DEADLINE_S = 10**8


def rpc(
    method: Handler[Req, Resp],
) -> Callable[[Any, Req, grpc.aio.ServicerContext], Awaitable[Resp]]:
    """A unary handler with its span (passed in as `span`) and every failure mapped to its
    status code in one place. The servicer names its service in SERVICE and holds a Frontend in
    `frontend`."""
    name = method.__name__

    @functools.wraps(method)
    async def handler(self: Any, request: Req, context: grpc.aio.ServicerContext) -> Resp:
        frontend: Frontend = self.frontend
        frontend.plane.note_call()
        async with frontend.admitted(context):
            request = await resolve(request)
            request_id = getattr(getattr(request, "request", request), "id", "")
            if request_id:
                REQUEST_ID.set(request_id)  # log lines of this call carry it
            if isinstance(request, Malformed):
                await abort(context, request.error())
            tracing = frontend.tracing
            if not tracing.enabled:
                # No span: skip reading the call's metadata and attributes (no cost when off).
                try:
                    return await method(self, request, context, None)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    await abort(context, exc)
                    raise AssertionError("unreachable: abort raises") from exc
            span = tracing.start_rpc(
                name,
                context.invocation_metadata(),
                service=self.SERVICE,
                **_span_attributes(request),
            )
            try:
                response = await method(self, request, context, span)
            except asyncio.CancelledError:
                why = gone(deadline_of(context))
                tracing.end_rpc(span, status_of(why).value[0], str(why))
                raise
            except Exception as exc:
                error = as_domain_error(exc)
                tracing.end_rpc(span, status_of(error).value[0], str(error))
                await abort(context, error)
                raise AssertionError("unreachable: abort raises") from exc
            tracing.end_rpc(span, 0)
            return response

    return handler


def gone(deadline: float | None) -> Cancelled | DeadlineExceeded:
    """Why a call's task was cancelled: its deadline passed, or the caller went away."""
    if deadline is not None and time.monotonic() >= deadline:
        return DeadlineExceeded("the call's deadline passed before it was answered")
    return Cancelled("the caller cancelled the call")


def _span_attributes(request: Any) -> dict[str, str]:
    inner = getattr(request, "request", request)  # SubmitRequest wraps a PredictRequest
    return {
        "model": getattr(inner, "model", "") or getattr(inner, "model_name", ""),
        "request_id": getattr(inner, "id", ""),
        "job.id": getattr(request, "job_id", ""),
    }


def deadline_of(context: grpc.aio.ServicerContext) -> float | None:
    """The caller's deadline on the monotonic clock, or None."""
    remaining: float | None = context.time_remaining()
    if remaining is None or remaining > _NO_DEADLINE_S:
        return None
    return time.monotonic() + remaining


class Frontend:
    """The data plane plus the telemetry a front end reports to, and the admission limit shared
    by every front end."""

    def __init__(
        self,
        plane: DataPlane,
        max_inflight_per_stream: int,
        max_concurrent_rpcs: int = 0,
        auth: Authenticator | None = None,
        tenant_rate: float = 0.0,
    ) -> None:
        self.plane = plane
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
        self._children: dict[tuple[str, str, str, str], tuple[Any, Any]] = {}

    def tenant(self) -> str:
        """The tenant of the call being handled ("" with auth off)."""
        return _TENANT.get()

    @contextlib.asynccontextmanager
    async def admitted(self, context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
        """Names the caller's tenant, and counts a unary call or an open stream for as long as it
        runs; beyond max_concurrent_rpcs the call ends at once with RESOURCE_EXHAUSTED and
        retry-after-ms."""
        if self.auth is not None:
            try:
                _TENANT.set(self.auth.tenant(context.invocation_metadata(), context.auth_context()))
            except Unauthenticated as exc:
                await abort(context, exc)
        limit = self.max_concurrent_rpcs
        if limit and self.calls >= limit:
            await abort(
                context,
                ResourceExhausted(
                    f"the server is at its limit of {limit} concurrent calls and streams "
                    "(--max-concurrent-rpcs); retry later",
                    retry_after_s=0.05,
                ),
            )
        self.calls += 1
        try:
            yield
        finally:
            self.calls -= 1

    def count(
        self, model: str, kind: str, error: BaseException | None, started: float, tenant: str = ""
    ) -> None:
        code = "OK" if error is None else as_domain_error(error).code
        if not self.metrics.tenant_label:
            tenant = ""
        key = (model, kind, code, tenant)
        children = self._children.get(key)
        if children is None:
            label = self.plane.metric_model(model)
            children = (
                self.metrics.request_counter(label, kind, code, tenant),
                self.metrics.request_seconds.labels(label, kind),
            )
            if label == model:  # unknown names are not remembered, so the dict stays bounded
                self._children[key] = children
        children[0].inc()
        children[1].observe(time.perf_counter() - started)

    async def infer(
        self, request: Request, context: grpc.aio.ServicerContext, span: Span | None
    ) -> Outputs:
        """One unary inference, counted; its span gets the stage children."""
        started = time.perf_counter()
        error: BaseException | None = None
        request.deadline = deadline_of(context)
        request.tenant = _TENANT.get()
        try:
            self.rates.charge(request.tenant)
            return await self.plane.infer(request, span)
        except BaseException as exc:
            error = gone(request.deadline) if isinstance(exc, asyncio.CancelledError) else exc
            raise
        finally:
            self.count(request.model, "unary", error, started, request.tenant)

    async def submit(self, request: Request, idempotency_key: str, span: Span | None) -> Submitted:
        """Accepts a job. A refused Submit is counted here; an accepted job is counted by the
        job runner when it finishes."""
        started = time.perf_counter()
        request.tenant = _TENANT.get()
        try:
            self.rates.charge(request.tenant)
            return await self.plane.submit(request, idempotency_key, span)
        except Exception as exc:
            self.count(request.model, "job", exc, started, request.tenant)
            raise

    def encode(self, span: Span | None, build: Callable[[], Resp]) -> Resp:
        """Builds a response, timed as the request's `encode` stage."""
        if span is None:
            return build()
        started_ns = time.time_ns()
        response = build()
        self.tracing.stage(span, "encode", started_ns, time.time_ns())
        return response

    async def pump(
        self,
        service: str,
        method: str,
        request_iterator: AsyncIterator[Msg],
        context: grpc.aio.ServicerContext,
        decode: Callable[[Msg], Request],
        answer: Callable[[Msg, Outputs], Resp],
        fail: Callable[[Msg, BaseException], Resp],
    ) -> AsyncIterator[Resp]:
        """Runs a bidirectional stream: every request goes through the shared queue and is
        answered as soon as it is done; a failed one is answered with fail() and the stream goes
        on; on half-close what is in flight finishes, then the stream ends.

        The reader reads only while fewer than max_inflight_per_stream requests await their
        answer, and a request's slot frees when its answer is handed to gRPC, so a client that
        stops reading also stops the server from reading: memory stays bounded.
        """
        async with self.admitted(context):
            slots = asyncio.Semaphore(self.max_inflight_per_stream)
            outbox: asyncio.Queue[Resp | None] = asyncio.Queue()
            futures: set[asyncio.Future[Outputs]] = set()
            outstanding = 0
            deadline = deadline_of(context)
            tenant = _TENANT.get()
            # Names this stream as the owner of the sequences it starts or drives: when it ends,
            # they are freed.
            self._streams += 1
            owner = f"stream-{self._streams}"
            drives_sequences = False
            tracing = self.tracing
            call_span = tracing.start_rpc(method, context.invocation_metadata(), service=service)
            self.metrics.open_streams.inc()

            def respond(
                message: Msg,
                model: str,
                span: Span | None,
                started: float,
                outputs: Outputs | None,
                error: BaseException | None,
            ) -> None:
                if error is None and outputs is not None:
                    outbox.put_nowait(self.encode(span, lambda: answer(message, outputs)))
                else:
                    outbox.put_nowait(fail(message, error or Cancelled("cancelled")))
                tracing.end(span, error)
                self.count(model, "stream", error, started, tenant)

            def answered(
                message: Msg,
                model: str,
                span: Span | None,
                started: float,
                future: asyncio.Future[Outputs],
            ) -> None:
                futures.discard(future)
                if future.cancelled():
                    respond(message, model, span, started, None, gone(deadline))
                elif (exc := future.exception()) is not None:
                    respond(message, model, span, started, None, exc)
                else:
                    respond(message, model, span, started, future.result(), None)

            async def read() -> None:
                nonlocal outstanding, drives_sequences
                try:
                    async for message in request_iterator:
                        self.plane.note_call()
                        await slots.acquire()
                        outstanding += 1
                        started = time.perf_counter()
                        model = ""
                        span = None
                        try:
                            message = await resolve(message)
                            if isinstance(message, Malformed):
                                raise message.error()
                            request = decode(message)
                            model = request.model
                            request.deadline = deadline
                            request.tenant = tenant
                            if request.sequence is not None:
                                request.sequence.owner = owner
                                drives_sequences = True
                            self.rates.charge(tenant)
                            span = tracing.start_child(
                                call_span, "request", model=request.model, request_id=request.id
                            )
                            future = self.plane.start(request, span)
                        except Exception as exc:
                            respond(message, model, span, started, None, exc)
                            continue
                        futures.add(future)
                        future.add_done_callback(
                            functools.partial(answered, message, model, span, started)
                        )
                finally:
                    outbox.put_nowait(None)  # the client half-closed (or the read failed)

            reader = asyncio.create_task(read(), name="stream-reader")
            cancelled = False
            try:
                reader_done = False
                while not reader_done or outstanding:
                    item = await outbox.get()
                    if item is None:
                        reader_done = True
                        if reader.done() and not reader.cancelled() and reader.exception():
                            log.warning("stream read failed: %s", reader.exception())
                        continue
                    outstanding -= 1
                    slots.release()
                    yield item
            except asyncio.CancelledError:
                cancelled = True
                raise
            finally:
                # The client went away or everything is answered; either way nothing should run on.
                reader.cancel()
                for future in list(futures):
                    future.cancel()
                if drives_sequences:
                    self.plane.end_sequences(owner)
                self.metrics.open_streams.dec()
                code = grpc.StatusCode.CANCELLED if cancelled else grpc.StatusCode.OK
                tracing.end_rpc(call_span, code.value[0])
