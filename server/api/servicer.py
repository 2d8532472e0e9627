"""tensorgate.v1.Inference over the data plane: decode, call, encode, map errors."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc
from opentelemetry.trace import Span

from server.api import codec
from server.api.status import abort, as_domain_error, error_message, status_of
from server.batching.request import Outputs
from server.dataplane import DataPlane
from server.errors import Cancelled, InvalidArgument
from server.jobs.job import Job, JobStatus
from server.model import ModelState
from server.telemetry import Tracing
from tensorgate.v1 import inference_pb2 as pb
from tensorgate.v1 import inference_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

Req = TypeVar("Req")
Resp = TypeVar("Resp")
Handler = Callable[[Any, Req, grpc.aio.ServicerContext, Span | None], Awaitable[Resp]]

_MAX_LISTED_JOBS = 1000

# A deadline further away than this is treated as none (gRPC reports "infinite" as a huge number).
_NO_DEADLINE_S = 10**8


def _rpc(
    method: Handler[Req, Resp],
) -> Callable[[Any, Req, grpc.aio.ServicerContext], Awaitable[Resp]]:
    """A unary handler with its span (passed in as `span`) and every failure mapped to its
    status code in one place."""
    name = method.__name__

    @functools.wraps(method)
    async def handler(self: Any, request: Req, context: grpc.aio.ServicerContext) -> Resp:
        tracing: Tracing = self._tracing
        span = tracing.start_rpc(name, context.invocation_metadata(), **_span_attributes(request))
        try:
            response = await method(self, request, context, span)
        except asyncio.CancelledError:
            tracing.end_rpc(span, grpc.StatusCode.CANCELLED.value[0], "the caller cancelled")
            raise
        except Exception as exc:
            error = as_domain_error(exc)
            tracing.end_rpc(span, status_of(error).value[0], str(error))
            await abort(context, error)
            raise AssertionError("unreachable: abort raises") from exc
        tracing.end_rpc(span, 0)
        return response

    return handler


def _span_attributes(request: Any) -> dict[str, str]:
    inner = getattr(request, "request", request)  # SubmitRequest wraps a PredictRequest
    return {
        "model": getattr(inner, "model", ""),
        "request_id": getattr(inner, "id", ""),
        "job.id": getattr(request, "job_id", ""),
    }


def deadline_of(context: grpc.aio.ServicerContext) -> float | None:
    """The caller's deadline on the monotonic clock, or None."""
    remaining: float | None = context.time_remaining()
    if remaining is None or remaining > _NO_DEADLINE_S:
        return None
    return time.monotonic() + remaining


class InferenceServicer(pb_grpc.InferenceServicer):
    def __init__(self, plane: DataPlane, max_inflight_per_stream: int) -> None:
        self._plane = plane
        self._max_inflight = max_inflight_per_stream
        self._tracing = plane.tracing
        self._metrics = plane.telemetry.metrics

    def _count(self, model: str, kind: str, error: BaseException | None, started: float) -> None:
        label = self._plane.metric_model(model)
        code = "OK" if error is None else as_domain_error(error).code
        self._metrics.requests.labels(label, kind, code).inc()
        self._metrics.request_seconds.labels(label, kind).observe(time.perf_counter() - started)

    @_rpc
    async def Predict(
        self, request: pb.PredictRequest, context: grpc.aio.ServicerContext, span: Span | None
    ) -> pb.PredictResponse:
        started = time.perf_counter()
        error: BaseException | None = None
        try:
            outputs = await self._plane.predict(
                request.model,
                codec.tensor_inputs(request.inputs),
                request.requested_outputs,
                deadline_of(context),
                request.id,
                codec.parameters(request.parameters),
                span,
            )
            encoding_ns = time.time_ns() if span is not None else 0
            response = _response(request.model, request.id, outputs)
            if span is not None:
                self._tracing.stage(span, "encode", encoding_ns, time.time_ns())
            return response
        except BaseException as exc:
            error = exc if not isinstance(exc, asyncio.CancelledError) else Cancelled("cancelled")
            raise
        finally:
            self._count(request.model, "unary", error, started)

    async def StreamPredict(
        self,
        request_iterator: AsyncIterator[pb.PredictRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[pb.StreamPredictResponse]:
        """Reads while fewer than max_inflight_per_stream requests await their answer.

        A request's slot frees when its answer has been handed to gRPC, so a client that stops
        reading also stops the server from reading: memory stays bounded.
        """
        slots = asyncio.Semaphore(self._max_inflight)
        outbox: asyncio.Queue[pb.StreamPredictResponse | None] = asyncio.Queue()
        futures: set[asyncio.Future[Outputs]] = set()
        outstanding = 0
        deadline = deadline_of(context)
        tracing = self._tracing
        call_span = tracing.start_rpc("StreamPredict", context.invocation_metadata())
        self._metrics.open_streams.inc()

        def respond(
            message: pb.PredictRequest,
            span: Span | None,
            started: float,
            outputs: Outputs | None,
            error: BaseException | None,
        ) -> None:
            encoding_ns = time.time_ns() if span is not None else 0
            if error is None and outputs is not None:
                response = _response(message.model, message.id, outputs)
                outbox.put_nowait(pb.StreamPredictResponse(id=message.id, response=response))
                tracing.stage(span, "encode", encoding_ns, time.time_ns())
            else:
                outbox.put_nowait(_stream_error(message.id, error or Cancelled("cancelled")))
            tracing.end(span, error)
            self._count(message.model, "stream", error, started)

        def answered(
            message: pb.PredictRequest,
            span: Span | None,
            started: float,
            future: asyncio.Future[Outputs],
        ) -> None:
            futures.discard(future)
            if future.cancelled():
                respond(message, span, started, None, Cancelled("request cancelled"))
            elif (exc := future.exception()) is not None:
                respond(message, span, started, None, exc)
            else:
                respond(message, span, started, future.result(), None)

        async def read() -> None:
            nonlocal outstanding
            try:
                async for message in request_iterator:
                    await slots.acquire()
                    outstanding += 1
                    started = time.perf_counter()
                    span = tracing.start_child(
                        call_span, "request", model=message.model, request_id=message.id
                    )
                    try:
                        request = self._plane.start(
                            message.model,
                            codec.tensor_inputs(message.inputs),
                            message.requested_outputs,
                            deadline,
                            message.id,
                            codec.parameters(message.parameters),
                            span,
                        )
                    except Exception as exc:
                        respond(message, span, started, None, exc)
                        continue
                    futures.add(request.future)
                    request.future.add_done_callback(
                        functools.partial(answered, message, span, started)
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
            self._metrics.open_streams.dec()
            code = grpc.StatusCode.CANCELLED if cancelled else grpc.StatusCode.OK
            tracing.end_rpc(call_span, code.value[0])

    @_rpc
    async def Submit(
        self, request: pb.SubmitRequest, context: grpc.aio.ServicerContext, span: Span | None
    ) -> pb.SubmitResponse:
        inner = request.request
        job, deduplicated, estimate_s = self._plane.submit(
            inner.model,
            codec.tensor_inputs(inner.inputs),
            inner.requested_outputs,
            inner.id,
            codec.parameters(inner.parameters),
            request.idempotency_key,
            span,
        )
        return pb.SubmitResponse(
            job_id=job.id,
            status=_job_status(job.status),
            estimated_wait_seconds=estimate_s,
            deduplicated=deduplicated,
        )

    @_rpc
    async def GetResult(
        self, request: pb.GetResultRequest, context: grpc.aio.ServicerContext, span: Span | None
    ) -> pb.GetResultResponse:
        job = await self._plane.get_result(request.job_id, max(request.wait_timeout_seconds, 0.0))
        self._tracing.link_to(span, job.span)  # the trace of the job's run
        return _job_result(job)

    @_rpc
    async def CancelJob(
        self, request: pb.CancelJobRequest, context: grpc.aio.ServicerContext, span: Span | None
    ) -> pb.CancelJobResponse:
        job = self._plane.cancel_job(request.job_id)
        return pb.CancelJobResponse(job_id=job.id, status=_job_status(job.status))

    @_rpc
    async def ListJobs(
        self, request: pb.ListJobsRequest, context: grpc.aio.ServicerContext, span: Span | None
    ) -> pb.ListJobsResponse:
        if request.limit < 0 or request.limit > _MAX_LISTED_JOBS:
            raise InvalidArgument(f"limit must be between 0 and {_MAX_LISTED_JOBS}")
        status = None
        if request.status != pb.JOB_STATUS_UNSPECIFIED:
            status = JobStatus(pb.JobStatus.Name(request.status))
        now = time.monotonic()
        jobs = self._plane.list_jobs(status, request.limit or 100)
        return pb.ListJobsResponse(
            jobs=[
                pb.JobSummary(
                    job_id=job.id,
                    model=job.model,
                    status=_job_status(job.status),
                    attempts=job.attempts,
                    error=error_message(job.error) if job.error is not None else None,
                    age_seconds=now - job.created_at,
                    request_id=job.request.id,
                )
                for job in jobs
            ]
        )

    @_rpc
    async def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext, span: Span | None
    ) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(
            models=[
                pb.ModelSummary(
                    name=m.name, backend=m.config.backend, ready=m.state is ModelState.READY
                )
                for m in self._plane.models.values()
            ]
        )

    @_rpc
    async def GetModelMetadata(
        self,
        request: pb.GetModelMetadataRequest,
        context: grpc.aio.ServicerContext,
        span: Span | None,
    ) -> pb.GetModelMetadataResponse:
        model = self._plane.model(request.model)
        return pb.GetModelMetadataResponse(
            name=model.name,
            backend=model.config.backend,
            inputs=[
                pb.TensorMetadata(name=s.name, datatype=s.datatype, shape=s.shape)
                for s in model.inputs
            ],
            outputs=[
                pb.TensorMetadata(name=s.name, datatype=s.datatype, shape=s.shape)
                for s in model.outputs
            ],
            max_batch_size=model.max_batch_size,
            instance_count=model.config.instance_count,
        )


def _response(model: str, request_id: str, outputs: Outputs) -> pb.PredictResponse:
    return pb.PredictResponse(model=model, id=request_id, outputs=codec.encode_tensors(outputs))


def _stream_error(request_id: str, error: BaseException) -> pb.StreamPredictResponse:
    return pb.StreamPredictResponse(id=request_id, error=error_message(error))


def _job_status(status: JobStatus) -> str:
    """The proto enum value of the same name (protobuf takes enum values by name)."""
    return status.value


def _job_result(job: Job) -> pb.GetResultResponse:
    response = pb.GetResultResponse(job_id=job.id, status=_job_status(job.status))
    if job.outputs is not None:
        response.result.CopyFrom(_response(job.model, job.request.id, job.outputs))
    if job.error is not None:
        response.error.CopyFrom(error_message(job.error))
    if job.expires_at is not None:
        response.expires_in_seconds = max(job.expires_at - time.monotonic(), 0.0)
    return response
