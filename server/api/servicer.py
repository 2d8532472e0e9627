"""tensorgate.v1.Inference over the data plane: decode, call, encode, map errors."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from tensorgate.server.api import codec
from tensorgate.server.api.frontend import Frontend
from tensorgate.server.api.status import error_message
from tensorgate.server.api.stream import pump
from tensorgate.server.api.unary import Call, rpc, rpc_stream
from tensorgate.server.errors import InvalidArgument
from tensorgate.server.records import (
    Callback,
    Delivery,
    JobEvent,
    JobStatus,
    JobView,
    Request,
    SequenceControl,
)
from tensorgate.server.tensors import Outputs, TensorSpec
from tensorgate.v1 import inference_pb2 as pb
from tensorgate.v1 import inference_pb2_grpc as pb_grpc

_MAX_LISTED_JOBS = 1000


class InferenceServicer(pb_grpc.InferenceServicer):
    SERVICE = "tensorgate.v1.Inference"

    def __init__(self, frontend: Frontend) -> None:
        self.frontend = frontend
        self._plane = frontend.plane

    @rpc("unary")
    async def Predict(self, request: pb.PredictRequest, call: Call) -> pb.PredictResponse:
        outputs = await self._plane.infer(call.bind(_request(request)), call.span)
        return call.encode(lambda: predict_response(request.model, request.id, outputs))

    async def StreamPredict(
        self,
        request_iterator: AsyncIterator[pb.PredictRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[pb.StreamPredictResponse]:
        async for response in pump(
            self.frontend,
            self.SERVICE,
            "StreamPredict",
            request_iterator,
            context,
            _request,
            _stream_response,
            lambda message, error: _stream_error(message, error),
        ):
            yield response

    @rpc("job")
    async def Submit(self, request: pb.SubmitRequest, call: Call) -> pb.SubmitResponse:
        callback = None
        if request.HasField("callback"):
            if not request.callback.url:
                raise InvalidArgument("callback.url is empty: give the URL to POST the result to")
            callback = Callback(request.callback.url, request.callback.include_result)
        submitted = await self._plane.submit(
            call.bind(_request(request.request)), request.idempotency_key, call.span, callback
        )
        return pb.SubmitResponse(
            job_id=submitted.job.id,
            status=submitted.job.status.value,
            estimated_wait_seconds=submitted.estimated_wait_s,
            deduplicated=submitted.deduplicated,
        )

    @rpc()
    async def GetResult(self, request: pb.GetResultRequest, call: Call) -> pb.GetResultResponse:
        job = await self._plane.job(
            request.job_id,
            call.tenant,
            wait_s=max(request.wait_timeout_seconds, 0.0),
            span=call.span,
        )
        return _job_result(job)

    @rpc_stream()
    async def WatchJob(self, request: pb.WatchJobRequest, call: Call) -> AsyncIterator[pb.JobEvent]:
        async for event in self._plane.watch_job(request.job_id, call.tenant):
            yield job_event(event)

    @rpc()
    async def CancelJob(self, request: pb.CancelJobRequest, call: Call) -> pb.CancelJobResponse:
        job = await self._plane.cancel_job(request.job_id, call.tenant)
        return pb.CancelJobResponse(job_id=job.id, status=job.status.value)

    @rpc()
    async def ListJobs(self, request: pb.ListJobsRequest, call: Call) -> pb.ListJobsResponse:
        if request.limit < 0 or request.limit > _MAX_LISTED_JOBS:
            raise InvalidArgument(f"limit must be between 0 and {_MAX_LISTED_JOBS}")
        jobs = await self._plane.list_jobs(
            _job_status(request.status), request.limit or 100, call.tenant
        )
        return pb.ListJobsResponse(
            jobs=[
                pb.JobSummary(
                    job_id=job.id,
                    model=job.model,
                    status=job.status.value,
                    attempts=job.attempts,
                    error=error_message(job.error) if job.error is not None else None,
                    age_seconds=job.age_s,
                    request_id=job.request_id,
                    delivery=webhook_delivery(job.delivery),
                )
                for job in jobs
            ]
        )

    @rpc()
    async def ListModels(self, request: pb.ListModelsRequest, call: Call) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(
            models=[
                pb.ModelSummary(
                    name=m.name,
                    backend=m.backend,
                    ready=m.ready,
                    versions=m.versions,
                    traffic=m.traffic,
                )
                for m in self._plane.models()
            ]
        )

    @rpc()
    async def GetModelMetadata(
        self,
        request: pb.GetModelMetadataRequest,
        call: Call,
    ) -> pb.GetModelMetadataResponse:
        model = self._plane.model_info(request.model, request.version)
        return pb.GetModelMetadataResponse(
            version=model.version,
            versions=model.versions,
            name=model.name,
            backend=model.backend,
            inputs=[_tensor_metadata(s) for s in model.inputs],
            outputs=[_tensor_metadata(s) for s in model.outputs],
            max_batch_size=model.max_batch_size,
            instance_count=model.instance_count,
        )


def _request(message: pb.PredictRequest) -> Request:
    return Request(
        model=message.model,
        inputs=codec.tensor_inputs(message.inputs),
        requested_outputs=message.requested_outputs,
        id=message.id,
        parameters=codec.parameters(message.parameters),
        priority=message.priority,
        sequence=_sequence(message),
        model_version=message.model_version,
    )


def _sequence(message: pb.PredictRequest) -> SequenceControl | None:
    if not message.sequence_id:
        if message.sequence_start or message.sequence_end:
            raise InvalidArgument("sequence_start/sequence_end need a sequence_id")
        return None
    return SequenceControl(message.sequence_id, message.sequence_start, message.sequence_end)


def _tensor_metadata(spec: TensorSpec) -> pb.TensorMetadata:
    return pb.TensorMetadata(name=spec.name, datatype=spec.datatype, shape=spec.shape)


def predict_response(
    model: str, request_id: str, outputs: Outputs, into: pb.PredictResponse | None = None
) -> pb.PredictResponse:
    """The response; `into`: a PredictResponse field of a larger message, filled in place (no
    copy of the outputs)."""
    response = pb.PredictResponse() if into is None else into
    response.model = model
    response.id = request_id
    codec.add_tensors(response.outputs, outputs)
    return response


def _stream_response(message: pb.PredictRequest, outputs: Outputs) -> pb.StreamPredictResponse:
    response = pb.StreamPredictResponse(id=message.id)
    predict_response(message.model, message.id, outputs, into=response.response)
    return response


def _stream_error(message: pb.PredictRequest, error: BaseException) -> pb.StreamPredictResponse:
    request_id = message.id if isinstance(message, pb.PredictRequest) else ""
    return pb.StreamPredictResponse(id=request_id, error=error_message(error))


def _job_status(value: int) -> JobStatus | None:
    """The JobStatus a ListJobs filter names; None for UNSPECIFIED (every status)."""
    if value == pb.JOB_STATUS_UNSPECIFIED:
        return None
    try:
        return JobStatus(pb.JobStatus.Name(value))
    except ValueError:
        known = ", ".join(pb.JobStatus.keys())
        raise InvalidArgument(f"status {value} is not a job status; use one of {known}") from None


def webhook_delivery(delivery: Delivery | None) -> pb.WebhookDelivery | None:
    if delivery is None:
        return None
    return pb.WebhookDelivery(
        state=delivery.state.value, attempts=delivery.attempts, last_error=delivery.last_error
    )


def job_event(event: JobEvent) -> pb.JobEvent:
    message = pb.JobEvent(
        job_id=event.job_id,
        model=event.model,
        status=event.status.value,
        attempt=event.attempt,
        retry=event.retry,
        delivery=webhook_delivery(event.delivery),
    )
    message.time.FromNanoseconds(int(event.at * 1e9))
    if event.error is not None:
        message.error.CopyFrom(error_message(event.error))
    if event.outputs is not None:
        predict_response(event.model, "", event.outputs, into=message.result)
    return message


def _job_result(job: JobView) -> pb.GetResultResponse:
    response = pb.GetResultResponse(
        job_id=job.id,
        status=job.status.value,
        attempts=job.attempts,
        delivery=webhook_delivery(job.delivery),
    )
    if job.outputs is not None:
        predict_response(job.model, job.request_id, job.outputs, into=response.result)
    if job.error is not None:
        response.error.CopyFrom(error_message(job.error))
    if job.expires_in_s is not None:
        response.expires_in_seconds = job.expires_in_s
    return response
