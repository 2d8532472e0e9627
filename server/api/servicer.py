"""tensorgate.v1.Inference over the data plane: decode, call, encode, map errors."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import grpc
from opentelemetry.trace import Span

from server.api import codec
from server.api.rpc import Call, Frontend, rpc
from server.api.status import error_message
from server.batching.request import Outputs
from server.errors import InvalidArgument
from server.jobs.job import Job, JobStatus
from server.model import ModelState
from tensorgate.v1 import inference_pb2 as pb
from tensorgate.v1 import inference_pb2_grpc as pb_grpc

_MAX_LISTED_JOBS = 1000


class InferenceServicer(pb_grpc.InferenceServicer):
    SERVICE = "tensorgate.v1.Inference"

    def __init__(self, frontend: Frontend) -> None:
        self.frontend = frontend
        self._plane = frontend.plane

    @rpc
    async def Predict(
        self, request: pb.PredictRequest, context: grpc.aio.ServicerContext, span: Span | None
    ) -> pb.PredictResponse:
        outputs = await self.frontend.infer(_call(request), context, span)
        return self.frontend.encode(span, lambda: _response(request.model, request.id, outputs))

    async def StreamPredict(
        self,
        request_iterator: AsyncIterator[pb.PredictRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[pb.StreamPredictResponse]:
        async for response in self.frontend.pump(
            self.SERVICE,
            "StreamPredict",
            request_iterator,
            context,
            _call,
            lambda message, outputs: pb.StreamPredictResponse(
                id=message.id, response=_response(message.model, message.id, outputs)
            ),
            lambda message, error: _stream_error(message.id, error),
        ):
            yield response

    @rpc
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

    @rpc
    async def GetResult(
        self, request: pb.GetResultRequest, context: grpc.aio.ServicerContext, span: Span | None
    ) -> pb.GetResultResponse:
        job = await self._plane.get_result(request.job_id, max(request.wait_timeout_seconds, 0.0))
        self.frontend.tracing.link_to(span, job.span)  # the trace of the job's run
        return _job_result(job)

    @rpc
    async def CancelJob(
        self, request: pb.CancelJobRequest, context: grpc.aio.ServicerContext, span: Span | None
    ) -> pb.CancelJobResponse:
        job = self._plane.cancel_job(request.job_id)
        return pb.CancelJobResponse(job_id=job.id, status=_job_status(job.status))

    @rpc
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

    @rpc
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

    @rpc
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


def _call(request: pb.PredictRequest) -> Call:
    return Call(
        request.model,
        codec.tensor_inputs(request.inputs),
        request.requested_outputs,
        request.id,
        codec.parameters(request.parameters),
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
