"""numpy <-> tensorgate.v1 messages, shared by the sync and asyncio clients."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
from opentelemetry import propagate

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


@dataclass(slots=True, frozen=True)
class Submitted:
    job_id: str
    status: str
    estimated_wait_s: float
    deduplicated: bool


@dataclass(slots=True, frozen=True)
class JobResult:
    job_id: str
    status: str  # PENDING, RUNNING, SUCCEEDED, FAILED, CANCELLED
    outputs: dict[str, np.ndarray] | None = None
    error_code: grpc.StatusCode | None = None
    error_message: str = ""
    expires_in_s: float = 0.0

    @property
    def finished(self) -> bool:
        return self.status in ("SUCCEEDED", "FAILED", "CANCELLED")


@dataclass(slots=True, frozen=True)
class JobSummary:
    job_id: str
    model: str
    status: str
    attempts: int
    age_s: float
    request_id: str = ""
    error_code: grpc.StatusCode | None = None
    error_message: str = ""


@dataclass(slots=True, frozen=True)
class StreamItem:
    """One request to send on a stream."""

    id: str
    model: str
    inputs: Mapping[str, np.ndarray]
    outputs: Sequence[str] = field(default_factory=tuple)
    # A chunk of a sequence, for a stateful model (see AsyncTensorgateClient.sequences).
    sequence_id: str = ""
    sequence_start: bool = False
    sequence_end: bool = False


@dataclass(slots=True, frozen=True)
class StreamResult:
    """The answer to one stream request: outputs, or an error for that request alone."""

    id: str
    outputs: dict[str, np.ndarray] | None = None
    error_code: grpc.StatusCode | None = None
    error_message: str = ""

    @property
    def ok(self) -> bool:
        return self.error_code is None


@dataclass(slots=True, frozen=True)
class Security:
    """How a client proves itself: TLS (the server's CA; a client certificate and key for mutual
    TLS) and a bearer token. Empty: plaintext, anonymous."""

    tls_ca: str = ""
    tls_cert: str = ""
    tls_key: str = ""
    token: str = ""

    @property
    def tls(self) -> bool:
        return bool(self.tls_ca or self.tls_cert)

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """The TLS credentials; ValueError naming the flag of a file that cannot be read."""

        def read(path: str, flag: str) -> bytes | None:
            if not path:
                return None
            try:
                return Path(path).expanduser().read_bytes()
            except OSError as exc:
                raise ValueError(f"{flag} {path}: {exc.strerror or exc}") from None

        return grpc.ssl_channel_credentials(
            root_certificates=read(self.tls_ca, "--tls-ca"),
            private_key=read(self.tls_key, "--tls-key"),
            certificate_chain=read(self.tls_cert, "--tls-cert"),
        )

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.token}"),) if self.token else ()


def call_metadata(security: Security) -> tuple[tuple[str, str], ...] | None:
    """A call's metadata: the trace context (when tracing) and the bearer token (when set)."""
    trace = trace_metadata() or ()
    both = (*trace, *security.metadata())
    return both or None


def trace_metadata() -> tuple[tuple[str, str], ...] | None:
    """W3C trace context (traceparent, tracestate) of the caller's current OpenTelemetry span,
    so the server's spans continue the caller's trace; None when there is no active span."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return tuple(carrier.items()) or None


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
    sequence_id: str = "",
    sequence_start: bool = False,
    sequence_end: bool = False,
) -> pb.PredictRequest:
    return pb.PredictRequest(
        model=model,
        id=request_id,
        inputs=[encode(name, array) for name, array in inputs.items()],
        requested_outputs=list(outputs),
        sequence_id=sequence_id,
        sequence_start=sequence_start,
        sequence_end=sequence_end,
    )


def submit_request(
    model: str,
    inputs: Mapping[str, np.ndarray],
    outputs: Sequence[str] = (),
    idempotency_key: str = "",
    request_id: str = "",
) -> pb.SubmitRequest:
    return pb.SubmitRequest(
        request=predict_request(model, inputs, outputs, request_id),
        idempotency_key=idempotency_key,
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
    )


def stream_request(item: StreamItem) -> pb.PredictRequest:
    return predict_request(
        item.model, item.inputs, item.outputs, item.id,
        item.sequence_id, item.sequence_start, item.sequence_end,
    )  # fmt: skip


def stream_result(response: pb.StreamPredictResponse) -> StreamResult:
    if response.HasField("error"):
        return StreamResult(
            id=response.id,
            error_code=_status_code(response.error.code),
            error_message=response.error.message,
        )
    return StreamResult(id=response.id, outputs=decode_all(response.response.outputs))


def _status_code(number: int) -> grpc.StatusCode:
    for code in grpc.StatusCode:
        if code.value[0] == number:
            return code
    return grpc.StatusCode.UNKNOWN
