"""tensorgate.v1.Inference over the data plane: decode, call, encode, map errors."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc
from tensorgate.v1 import inference_pb2 as pb
from tensorgate.v1 import inference_pb2_grpc as pb_grpc

from server.api import codec
from server.api.status import abort, error_message
from server.batching.request import Outputs
from server.dataplane import DataPlane
from server.errors import Cancelled, InvalidArgument
from server.jobs.job import Job, JobStatus
from server.model import ModelState

log = logging.getLogger(__name__)

Req = TypeVar("Req")
Resp = TypeVar("Resp")
Handler = Callable[[Any, Req, grpc.aio.ServicerContext], Awaitable[Resp]]

_MAX_LISTED_JOBS = 1000

# A deadline further away than this is treated as none (gRPC reports "infinite" as a huge number).
_NO_DEADLINE_S = 10**8


def _unary(method: Handler[Req, Resp]) -> Handler[Req, Resp]:
    """Maps every failure of a unary handler to its status code in one place."""

    @functools.wraps(method)
    async def handler(self: Any, request: Req, context: grpc.aio.ServicerContext) -> Resp:
        try:
            return await method(self, request, context)
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as exc:
            await abort(context, exc)
            raise AssertionError("unreachable: abort raises") from exc

    return handler


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

    @_unary
    async def Predict(
        self, request: pb.PredictRequest, context: grpc.aio.ServicerContext
    ) -> pb.PredictResponse:
        outputs = await self._plane.predict(
            request.model,
            codec.tensor_inputs(request.inputs),
            request.requested_outputs,
            deadline_of(context),
            request.id,
            codec.parameters(request.parameters),
        )
        return _response(request.model, request.id, outputs)

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

        def answered(message: pb.PredictRequest, future: asyncio.Future[Outputs]) -> None:
            futures.discard(future)
            if future.cancelled():
                outbox.put_nowait(_stream_error(message.id, Cancelled("request cancelled")))
            elif (exc := future.exception()) is not None:
                outbox.put_nowait(_stream_error(message.id, exc))
            else:
                response = _response(message.model, message.id, future.result())
                outbox.put_nowait(pb.StreamPredictResponse(id=message.id, response=response))

        async def read() -> None:
            nonlocal outstanding
            try:
                async for message in request_iterator:
                    await slots.acquire()
                    outstanding += 1
                    try:
                        model, request = self._plane.new_request(
                            message.model,
                            codec.tensor_inputs(message.inputs),
                            message.requested_outputs,
                            deadline,
                            message.id,
                            codec.parameters(message.parameters),
                        )
                        self._plane.enqueue(model, request)
                    except Exception as exc:
                        outbox.put_nowait(_stream_error(message.id, exc))
                        continue
                    futures.add(request.future)
                    request.future.add_done_callback(functools.partial(answered, message))
            finally:
                outbox.put_nowait(None)  # the client half-closed (or the read failed)

        reader = asyncio.create_task(read(), name="stream-reader")
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
        finally:
            # The client went away or everything is answered; either way nothing should run on.
            reader.cancel()
            for future in list(futures):
                future.cancel()

    @_unary
    async def Submit(
        self, request: pb.SubmitRequest, context: grpc.aio.ServicerContext
    ) -> pb.SubmitResponse:
        inner = request.request
        job, deduplicated, estimate_s = self._plane.submit(
            inner.model,
            codec.tensor_inputs(inner.inputs),
            inner.requested_outputs,
            inner.id,
            codec.parameters(inner.parameters),
            request.idempotency_key,
        )
        return pb.SubmitResponse(
            job_id=job.id,
            status=_job_status(job.status),
            estimated_wait_seconds=estimate_s,
            deduplicated=deduplicated,
        )

    @_unary
    async def GetResult(
        self, request: pb.GetResultRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetResultResponse:
        job = await self._plane.get_result(request.job_id, max(request.wait_timeout_seconds, 0.0))
        return _job_result(job)

    @_unary
    async def CancelJob(
        self, request: pb.CancelJobRequest, context: grpc.aio.ServicerContext
    ) -> pb.CancelJobResponse:
        job = self._plane.cancel_job(request.job_id)
        return pb.CancelJobResponse(job_id=job.id, status=_job_status(job.status))

    @_unary
    async def ListJobs(
        self, request: pb.ListJobsRequest, context: grpc.aio.ServicerContext
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

    @_unary
    async def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(
            models=[
                pb.ModelSummary(
                    name=m.name, backend=m.config.backend, ready=m.state is ModelState.READY
                )
                for m in self._plane.models.values()
            ]
        )

    @_unary
    async def GetModelMetadata(
        self, request: pb.GetModelMetadataRequest, context: grpc.aio.ServicerContext
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
