"""The one door of every call with one request, on both front ends: the `rpc` decorator (unary
calls) and `rpc_stream` (one request, a stream of answers: WatchJob).

Each call is admitted (tenant, concurrency limit), charged to its tenant's rate, given its span
when tracing, counted (tensorgate_calls_total; inference calls also in tensorgate_requests_total)
and has every failure mapped to its status code, in this one place. The handler gets the decoded
message and a Call: who asks, until when, and the span to time its stages on.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
from opentelemetry.trace import Span

from tensorgate.server.api.frontend import Frontend, deadline_of, encoded, gone
from tensorgate.server.api.messages import Malformed, Unparsed, resolve
from tensorgate.server.api.status import abort, as_domain_error, status_of
from tensorgate.server.errors import TensorgateError
from tensorgate.server.logs import REQUEST_ID
from tensorgate.server.records import Request
from tensorgate.server.telemetry import Tracing

Req = TypeVar("Req")
Resp = TypeVar("Resp")


@dataclass(slots=True)
class Call:
    """One unary call as its handler sees it."""

    tenant: str
    # The caller's deadline on the monotonic clock, or None.
    deadline: float | None
    span: Span | None
    tracing: Tracing
    # The inference request the call made (bind), whose model_version, once run, names the
    # version that ran it.
    request: Request | None = None

    def bind(self, request: Request) -> Request:
        """The request, acting for this call's tenant and within its deadline."""
        request.tenant = self.tenant
        request.deadline = self.deadline
        self.request = request
        return request

    def encode(self, build: Callable[[], Resp]) -> Resp:
        """Builds the response, timed as the request's `encode` stage when traced."""
        return encoded(self.tracing, self.span, build)


Handler = Callable[[Any, Req, Call], Awaitable[Resp]]
GrpcHandler = Callable[[Any, Req, grpc.aio.ServicerContext], Awaitable[Resp]]


def rpc(kind: str | None = None) -> Callable[[Handler[Req, Resp]], GrpcHandler[Req, Resp]]:
    """Wraps a unary handler of a servicer (which names its service in SERVICE and holds a
    Frontend in `frontend`). kind: an inference call, counted by model in
    tensorgate_requests_total: "unary" (every outcome) or "job" (a refused Submit; an accepted
    job is counted when it finishes)."""

    def decorate(method: Handler[Req, Resp]) -> GrpcHandler[Req, Resp]:
        name = method.__name__

        @functools.wraps(method)
        async def handler(self: Any, message: Req, context: grpc.aio.ServicerContext) -> Resp:
            frontend: Frontend = self.frontend
            frontend.plane.note_call()
            try:
                tenant = frontend.enter(context)
            except TensorgateError as exc:
                await abort(context, exc)
            try:
                started = time.perf_counter()
                if type(message) in _NOT_PARSED:
                    message = await _parsed(message, context)
                inner = getattr(message, "request", message)  # SubmitRequest wraps a request
                request_id = getattr(inner, "id", "")
                if request_id:
                    REQUEST_ID.set(request_id)  # log lines of this call carry it
                deadline = deadline_of(context)
                tracing = frontend.tracing
                span = None
                if tracing.enabled:  # no metadata read, no attributes built, when off
                    span = tracing.start_rpc(
                        name, context.invocation_metadata(), service=self.SERVICE,
                        **_span_attributes(message, inner),
                    )  # fmt: skip
                error: TensorgateError | None = None
                call = Call(tenant, deadline, span, tracing)
                try:
                    frontend.rates.charge(tenant)
                    return await method(self, message, call)
                except asyncio.CancelledError:
                    error = gone(deadline)
                    raise
                except Exception as exc:
                    error = as_domain_error(exc)
                    await abort(context, error)
                    raise AssertionError("unreachable: abort raises") from exc
                finally:
                    frontend.count_call(name, error)
                    if kind == "unary" or (kind is not None and error is not None):
                        model = _model_of(inner)
                        version = call.request.model_version if call.request is not None else ""
                        frontend.count(model, kind, error, started, tenant, version)
                    if span is not None:
                        code = 0 if error is None else status_of(error).value[0]
                        tracing.end_rpc(span, code, "" if error is None else str(error))
            finally:
                frontend.leave()

        return handler

    return decorate


StreamHandler = Callable[[Any, Req, Call], AsyncIterator[Resp]]
GrpcStreamHandler = Callable[[Any, Req, grpc.aio.ServicerContext], AsyncIterator[Resp]]


def rpc_stream() -> Callable[[StreamHandler[Req, Resp]], GrpcStreamHandler[Req, Resp]]:
    """Wraps a server-streaming handler (an async generator) of a servicer: admitted and counted
    as an open stream for as long as it runs, charged once to its tenant's rate, its failure
    mapped to a status code (which ends the stream), counted in tensorgate_calls_total."""

    def decorate(method: StreamHandler[Req, Resp]) -> GrpcStreamHandler[Req, Resp]:
        name = method.__name__

        @functools.wraps(method)
        async def handler(
            self: Any, message: Req, context: grpc.aio.ServicerContext
        ) -> AsyncIterator[Resp]:
            frontend: Frontend = self.frontend
            frontend.plane.note_call()
            async with frontend.admitted(context) as tenant:
                message = await _parsed(message, context)
                deadline = deadline_of(context)
                error: TensorgateError | None = None
                try:
                    frontend.rates.charge(tenant)
                    call = Call(tenant, deadline, None, frontend.tracing)
                    async for item in method(self, message, call):
                        yield item
                except asyncio.CancelledError:
                    error = gone(deadline)
                    raise
                except Exception as exc:
                    error = as_domain_error(exc)
                    await abort(context, error)
                finally:
                    frontend.count_call(name, error)

        return handler

    return decorate


# What a deserializer hands over in place of a parsed message (messages.py): only these need
# the awaited step below; a parsed message goes straight on.
_NOT_PARSED = (Unparsed, Malformed)


async def _parsed(message: Any, context: grpc.aio.ServicerContext) -> Any:
    """The call's message, parsed (off the loop when large); a malformed one ends the call with
    INVALID_ARGUMENT."""
    message = await resolve(message)
    if isinstance(message, Malformed):
        await abort(context, message.error())
    return message


def _model_of(message: Any) -> str:
    return str(getattr(message, "model", "") or getattr(message, "model_name", ""))


def _span_attributes(message: Any, inner: Any) -> dict[str, str]:
    return {
        "model": _model_of(inner),
        "request_id": getattr(inner, "id", ""),
        "job.id": getattr(message, "job_id", ""),
    }
