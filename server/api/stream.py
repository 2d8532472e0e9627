"""The pump of every bidirectional stream, on both front ends (StreamPredict, ModelStreamInfer).

Every request of a stream goes through the shared queue and is answered as soon as it is done; a
failed one is answered as such and the stream goes on; on half-close what is in flight finishes,
then the stream ends. Each request is charged to the tenant's rate and counted like a unary
call.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import TypeVar

import grpc
from opentelemetry.trace import Span

from tensorgate.server.api.frontend import Frontend, deadline_of, encoded, gone
from tensorgate.server.api.messages import Malformed, Unparsed, resolve
from tensorgate.server.errors import Cancelled
from tensorgate.server.futures import settle_result
from tensorgate.server.logs import REQUEST_ID
from tensorgate.server.records import Request, RequestKind
from tensorgate.server.tensors import Outputs

log = logging.getLogger(__name__)

Msg = TypeVar("Msg")
Resp = TypeVar("Resp")


async def pump(
    frontend: Frontend,
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
    async with frontend.admitted(context) as tenant:
        loop = asyncio.get_running_loop()
        limit = frontend.max_inflight_per_stream
        ready: collections.deque[Resp] = collections.deque()  # answers not yet handed to gRPC
        futures: set[asyncio.Future[Outputs]] = set()
        outstanding = 0  # requests read and not yet answered to gRPC
        reading = True
        # The writer waits on `wake` for an answer (or the end of reading), the reader on `room`
        # for a free slot; each is made only when its side has to wait.
        wake: asyncio.Future[None] | None = None
        room: asyncio.Future[None] | None = None
        deadline = deadline_of(context)
        # Names this stream as the owner of the sequences it starts or drives: when it ends,
        # they are freed.
        owner = frontend.stream_owner()
        drives_sequences = False
        tracing = frontend.tracing
        call_span = tracing.start_rpc(method, context.invocation_metadata(), service=service)
        frontend.metrics.open_streams.inc()

        def deliver(response: Resp) -> None:
            ready.append(response)
            if wake is not None:
                settle_result(wake, None)

        def respond(
            message: Msg,
            model: tuple[str, str],
            span: Span | None,
            started: float,
            outputs: Outputs | None,
            error: BaseException | None,
        ) -> None:
            if error is None and outputs is not None:
                deliver(encoded(tracing, span, lambda: answer(message, outputs)))
            else:
                deliver(fail(message, error or Cancelled("cancelled")))
            tracing.end(span, error)
            frontend.count(model[0], "stream", error, started, tenant, model[1])

        def answered(
            message: Msg,
            model: tuple[str, str],
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
            nonlocal outstanding, drives_sequences, reading, room
            try:
                async for message in request_iterator:
                    frontend.plane.note_call()
                    while outstanding >= limit:
                        room = loop.create_future()
                        await room
                    outstanding += 1
                    started = time.perf_counter()
                    model = ("", "")  # (name, version) for the metrics
                    span = None
                    try:
                        if isinstance(message, Unparsed):  # large: parsed off the loop
                            message = await resolve(message)
                        if isinstance(message, Malformed):
                            raise message.error()
                        request = decode(message)
                        model = (request.model, "")
                        if request.id:
                            REQUEST_ID.set(request.id)  # log lines about it carry it
                        request.deadline = deadline
                        request.tenant = tenant
                        if request.sequence is not None:
                            request.sequence.owner = owner
                            drives_sequences = True
                        frontend.rates.charge(tenant)
                        span = tracing.start_child(
                            call_span, "request", model=request.model, request_id=request.id
                        )
                        future = frontend.plane.start(request, RequestKind.STREAM, span)
                        model = (request.model, request.model_version)
                    except Exception as exc:
                        respond(message, model, span, started, None, exc)
                        continue
                    futures.add(future)
                    future.add_done_callback(
                        functools.partial(answered, message, model, span, started)
                    )
            except Exception as exc:
                log.warning("stream read failed: %s", exc)
            finally:
                reading = False  # the client half-closed (or the read failed)
                if wake is not None:
                    settle_result(wake, None)

        reader = asyncio.create_task(read(), name="stream-reader")
        cancelled = False
        try:
            while True:
                if ready:
                    outstanding -= 1
                    if room is not None:
                        settle_result(room, None)
                    yield ready.popleft()
                elif reading or outstanding:
                    wake = loop.create_future()
                    await wake
                    wake = None
                else:
                    break
        except asyncio.CancelledError:
            cancelled = True
            raise
        finally:
            # The client went away or everything is answered; either way nothing should run on.
            reader.cancel()
            for future in list(futures):
                future.cancel()
            if drives_sequences:
                frontend.plane.end_sequences(owner)
            frontend.metrics.open_streams.dec()
            code = grpc.StatusCode.CANCELLED if cancelled else grpc.StatusCode.OK
            tracing.end_rpc(call_span, code.value[0])
