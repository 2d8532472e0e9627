"""Blocking client. Failures raise grpc.RpcError with the server's status code and message."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from types import TracebackType

import grpc
import numpy as np

from tensorgate.client import codec
from tensorgate.client.codec import JobResult, JobSummary, StreamItem, StreamResult, Submitted
from tensorgate.v1 import inference_pb2 as pb
from tensorgate.v1 import inference_pb2_grpc as pb_grpc

DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024


def channel_options(max_message_bytes: int) -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
    ]


class TensorgateClient:
    """tensorgate.v1.Inference with numpy arrays in and out. Use as a context manager or close()."""

    def __init__(
        self,
        target: str = "localhost:50051",
        *,
        timeout_s: float | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        security: codec.Security | None = None,
    ) -> None:
        """security: TLS files and a bearer token (codec.Security); plaintext when None."""
        self._security = security or codec.Security()
        options = channel_options(max_message_bytes)
        if self._security.tls:
            credentials = self._security.channel_credentials()
            self._channel = grpc.secure_channel(target, credentials, options=options)
        else:
            self._channel = grpc.insecure_channel(target, options=options)
        self._stub = pb_grpc.InferenceStub(self._channel)
        self._timeout_s = timeout_s

    def _metadata(self) -> tuple[tuple[str, str], ...] | None:
        return codec.call_metadata(self._security)

    def predict(
        self,
        model: str,
        inputs: Mapping[str, np.ndarray],
        *,
        outputs: Sequence[str] = (),
        request_id: str = "",
        timeout_s: float | None = None,
        sequence_id: str = "",
        sequence_start: bool = False,
        sequence_end: bool = False,
    ) -> dict[str, np.ndarray]:
        """One inference. For a stateful model, the request is a chunk of the sequence
        sequence_id (sequence_start on its first chunk, sequence_end on its last); many live
        sequences go better over one stream (AsyncTensorgateClient.sequences)."""
        request = codec.predict_request(
            model, inputs, outputs, request_id, sequence_id, sequence_start, sequence_end
        )
        response = self._stub.Predict(
            request,
            timeout=timeout_s or self._timeout_s,
            metadata=self._metadata(),
        )
        return codec.decode_all(response.outputs)

    def submit(
        self,
        model: str,
        inputs: Mapping[str, np.ndarray],
        *,
        outputs: Sequence[str] = (),
        idempotency_key: str = "",
        request_id: str = "",
    ) -> Submitted:
        request = codec.submit_request(model, inputs, outputs, idempotency_key, request_id)
        return codec.submitted(
            self._stub.Submit(request, timeout=self._timeout_s, metadata=self._metadata())
        )

    def get_result(self, job_id: str, wait_timeout_s: float = 0.0) -> JobResult:
        """The job's state; with wait_timeout_s it returns as soon as the job finishes."""
        request = pb.GetResultRequest(job_id=job_id, wait_timeout_seconds=wait_timeout_s)
        timeout = None if self._timeout_s is None else self._timeout_s + wait_timeout_s
        return codec.job_result(
            self._stub.GetResult(request, timeout=timeout, metadata=self._metadata())
        )

    def cancel(self, job_id: str) -> str:
        """Cancels a job; returns its status afterwards."""
        response = self._stub.CancelJob(
            pb.CancelJobRequest(job_id=job_id),
            timeout=self._timeout_s,
            metadata=self._metadata(),
        )
        return pb.JobStatus.Name(response.status)

    def stream(self, items: Iterable[StreamItem]) -> Iterator[StreamResult]:
        """Sends items on one stream; yields each answer as it comes (not in send order)."""
        requests = (codec.stream_request(item) for item in items)
        for response in self._stub.StreamPredict(
            requests, timeout=self._timeout_s, metadata=self._metadata()
        ):
            yield codec.stream_result(response)

    def list_jobs(self, status: str = "", limit: int = 100) -> list[JobSummary]:
        """Jobs, newest first; status "FAILED" lists the dead letters."""
        request = pb.ListJobsRequest(status=status or "JOB_STATUS_UNSPECIFIED", limit=limit)
        response = self._stub.ListJobs(request, timeout=self._timeout_s, metadata=self._metadata())
        return [codec.job_summary(job) for job in response.jobs]

    def list_models(self) -> pb.ListModelsResponse:
        return self._stub.ListModels(
            pb.ListModelsRequest(),
            timeout=self._timeout_s,
            metadata=self._metadata(),
        )

    def model_metadata(self, model: str) -> pb.GetModelMetadataResponse:
        request = pb.GetModelMetadataRequest(model=model)
        return self._stub.GetModelMetadata(
            request, timeout=self._timeout_s, metadata=self._metadata()
        )

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> TensorgateClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
