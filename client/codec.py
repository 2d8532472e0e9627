"""numpy <-> tensorgate.v1 messages, and messages -> the clients' results (results.py); shared by
the sync and asyncio clients."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import grpc
import numpy as np

from tensorgate.client.results import (
    Delivery,
    JobEvent,
    JobResult,
    JobSummary,
    ModelMetadata,
    ModelSummary,
    StreamItem,
    StreamResult,
    Submitted,
    TensorMetadata,
)
from tensorgate.v1 import inference_pb2 as pb

# KServe v2 datatype <-> numpy kind and size; little-endian on the wire.
_DATATYPES = {
    ("b", 1): "BOOL",
    ("u", 1): "UINT8", ("u", 2): "UINT16", ("u", 4): "UINT32", ("u", 8): "UINT64",
    ("i", 1): "INT8", ("i", 2): "INT16", ("i", 4): "INT32", ("i", 8): "INT64",
    ("f", 2): "FP16", ("f", 4): "FP32", ("f", 8): "FP64",
}  # fmt: skip
_NUMPY = {
    name: np.dtype(f"<{kind}{size}" if kind != "b" else "?")
    for (kind, size), name in _DATATYPES.items()
}


def numpy_dtype(datatype: str) -> np.dtype:
    """The numpy dtype of a tensor datatype name; ValueError for one the wire does not carry."""
    dtype = _NUMPY.get(datatype)
    if dtype is None:
        raise ValueError(f"datatype {datatype} has no numpy equivalent")
    return dtype


def encode(name: str, array: np.ndarray) -> pb.Tensor:
    array = np.asarray(array)
    datatype = _DATATYPES.get((array.dtype.kind, array.dtype.itemsize))
    if datatype is None:
        raise TypeError(f"input '{name}': numpy dtype {array.dtype} has no tensor datatype")
    little = np.ascontiguousarray(array, dtype=_NUMPY[datatype])
    return pb.Tensor(name=name, datatype=datatype, shape=little.shape, contents=little.tobytes())


def decode(tensor: pb.Tensor) -> np.ndarray:
    dtype = _NUMPY.get(tensor.datatype)
    if dtype is None:
        raise ValueError(f"output '{tensor.name}' has unknown datatype {tensor.datatype}")
    return np.frombuffer(tensor.contents, dtype=dtype).reshape(tuple(tensor.shape))


def decode_all(tensors: Sequence[pb.Tensor]) -> dict[str, np.ndarray]:
    return {t.name: decode(t) for t in tensors}


def predict_request(
    model: str,
    inputs: Mapping[str, np.ndarray],
    outputs: Sequence[str] = (),
    request_id: str = "",
    *,
    priority: int = 0,
    parameters: Mapping[str, bool | int | float | str] | None = None,
    sequence_id: str = "",
    sequence_start: bool = False,
    sequence_end: bool = False,
    model_version: str = "",
) -> pb.PredictRequest:
    return pb.PredictRequest(
        model=model,
        model_version=model_version,
        id=request_id,
        inputs=[encode(name, array) for name, array in inputs.items()],
        requested_outputs=list(outputs),
        parameters={k: _parameter(v) for k, v in (parameters or {}).items()},
        priority=priority,
        sequence_id=sequence_id,
        sequence_start=sequence_start,
        sequence_end=sequence_end,
    )


def _parameter(value: bool | int | float | str) -> pb.Parameter:
    """A request parameter: bool, int, float or str (bool before int: True is an int too)."""
    if isinstance(value, bool):
        return pb.Parameter(bool_param=value)
    if isinstance(value, int):
        return pb.Parameter(int64_param=value)
    if isinstance(value, float):
        return pb.Parameter(double_param=value)
    if isinstance(value, str):
        return pb.Parameter(string_param=value)
    raise TypeError(f"a parameter is a bool, int, float or str, not {type(value).__name__}")


def submit_request(
    model: str,
    inputs: Mapping[str, np.ndarray],
    outputs: Sequence[str] = (),
    request_id: str = "",
    *,
    idempotency_key: str = "",
    priority: int = 0,
    parameters: Mapping[str, bool | int | float | str] | None = None,
    callback_url: str = "",
    include_result: bool = False,
    model_version: str = "",
) -> pb.SubmitRequest:
    if include_result and not callback_url:
        raise ValueError("include_result puts the result in the webhook: give callback_url too")
    return pb.SubmitRequest(
        request=predict_request(
            model,
            inputs,
            outputs,
            request_id,
            priority=priority,
            parameters=parameters,
            model_version=model_version,
        ),
        idempotency_key=idempotency_key,
        callback=(
            pb.Callback(url=callback_url, include_result=include_result) if callback_url else None
        ),
    )


def submitted(response: pb.SubmitResponse) -> Submitted:
    return Submitted(
        job_id=response.job_id,
        status=pb.JobStatus.Name(response.status),
        estimated_wait_s=response.estimated_wait_seconds,
        deduplicated=response.deduplicated,
    )


def job_result(response: pb.GetResultResponse) -> JobResult:
    has_error = response.HasField("error")
    return JobResult(
        job_id=response.job_id,
        status=pb.JobStatus.Name(response.status),
        outputs=decode_all(response.result.outputs) if response.HasField("result") else None,
        error_code=_status_code(response.error.code) if has_error else None,
        error_message=response.error.message,
        expires_in_s=response.expires_in_seconds,
        attempts=response.attempts,
        delivery=_delivery(response),
    )


def job_summary(job: pb.JobSummary) -> JobSummary:
    has_error = job.HasField("error")
    return JobSummary(
        job_id=job.job_id,
        model=job.model,
        status=pb.JobStatus.Name(job.status),
        attempts=job.attempts,
        age_s=job.age_seconds,
        request_id=job.request_id,
        error_code=_status_code(job.error.code) if has_error else None,
        error_message=job.error.message,
        delivery=_delivery(job),
    )


def job_event(event: pb.JobEvent) -> JobEvent:
    has_error = event.HasField("error")
    return JobEvent(
        job_id=event.job_id,
        model=event.model,
        status=pb.JobStatus.Name(event.status),
        attempt=event.attempt,
        time=event.time.ToNanoseconds() / 1e9,
        retry=event.retry,
        outputs=decode_all(event.result.outputs) if event.HasField("result") else None,
        error_code=_status_code(event.error.code) if has_error else None,
        error_message=event.error.message,
        delivery=_delivery(event),
    )


def _delivery(message: pb.GetResultResponse | pb.JobSummary | pb.JobEvent) -> Delivery | None:
    if not message.HasField("delivery"):
        return None
    return Delivery(
        state=pb.DeliveryState.Name(message.delivery.state),
        attempts=message.delivery.attempts,
        last_error=message.delivery.last_error,
    )


def stream_request(item: StreamItem) -> pb.PredictRequest:
    return predict_request(
        item.model, item.inputs, item.outputs, item.id, priority=item.priority,
        parameters=item.parameters,
        sequence_id=item.sequence_id, sequence_start=item.sequence_start,
        sequence_end=item.sequence_end, model_version=item.model_version,
    )  # fmt: skip


def stream_result(response: pb.StreamPredictResponse) -> StreamResult:
    if response.HasField("error"):
        return StreamResult(
            id=response.id,
            error_code=_status_code(response.error.code),
            error_message=response.error.message,
        )
    return StreamResult(id=response.id, outputs=decode_all(response.response.outputs))


def model_summaries(response: pb.ListModelsResponse) -> list[ModelSummary]:
    return [
        ModelSummary(m.name, m.backend, m.ready, tuple(m.versions), dict(m.traffic))
        for m in response.models
    ]


def model_metadata(response: pb.GetModelMetadataResponse) -> ModelMetadata:
    return ModelMetadata(
        name=response.name,
        backend=response.backend,
        inputs=tuple(_tensor_metadata(t) for t in response.inputs),
        outputs=tuple(_tensor_metadata(t) for t in response.outputs),
        max_batch_size=response.max_batch_size,
        instance_count=response.instance_count,
        version=response.version,
        versions=tuple(response.versions),
    )


def _tensor_metadata(tensor: pb.TensorMetadata) -> TensorMetadata:
    return TensorMetadata(tensor.name, tensor.datatype, tuple(tensor.shape))


def status_code(number: int) -> grpc.StatusCode:
    """The grpc.StatusCode of a status number (UNKNOWN for one gRPC does not know)."""
    return _CODES.get(number, grpc.StatusCode.UNKNOWN)


_CODES = {code.value[0]: code for code in grpc.StatusCode}


def _status_code(number: int) -> grpc.StatusCode:
    return status_code(number)
