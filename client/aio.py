"""asyncio client. Failures raise grpc.aio.AioRpcError with the server's status and message."""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Iterable, Mapping, Sequence
from types import TracebackType

import grpc
import numpy as np

from tensorgate.client import codec
from tensorgate.client.codec import JobResult, JobSummary, StreamItem, StreamResult, Submitted
from tensorgate.client.sequences import SequenceStream
from tensorgate.client.sync import DEFAULT_MAX_MESSAGE_BYTES, channel_options
from tensorgate.v1 import inference_pb2 as pb
from tensorgate.v1 import inference_pb2_grpc as pb_grpc


class AsyncTensorgateClient:
    """tensorgate.v1.Inference on grpc.aio. Use `async with` or `await close()`."""

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
            self._channel = grpc.aio.secure_channel(target, credentials, options=options)
        else:
            self._channel = grpc.aio.insecure_channel(target, options=options)
        self._stub = pb_grpc.InferenceStub(self._channel)
        self._timeout_s = timeout_s

    def _metadata(self) -> tuple[tuple[str, str], ...] | None:
        return codec.call_metadata(self._security)

    async def predict(
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
        sequences go better over one stream (sequences())."""
        request = codec.predict_request(
            model, inputs, outputs, request_id, sequence_id, sequence_start, sequence_end
        )
        response = await self._stub.Predict(
            request,
            timeout=timeout_s or self._timeout_s,
            metadata=self._metadata(),
        )
        return codec.decode_all(response.outputs)

    async def submit(
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
            await self._stub.Submit(request, timeout=self._timeout_s, metadata=self._metadata())
        )

    async def get_result(self, job_id: str, wait_timeout_s: float = 0.0) -> JobResult:
        request = pb.GetResultRequest(job_id=job_id, wait_timeout_seconds=wait_timeout_s)
        timeout = None if self._timeout_s is None else self._timeout_s + wait_timeout_s
        return codec.job_result(
            await self._stub.GetResult(request, timeout=timeout, metadata=self._metadata())
        )

    async def cancel(self, job_id: str) -> str:
        request = pb.CancelJobRequest(job_id=job_id)
        response = await self._stub.CancelJob(
            request, timeout=self._timeout_s, metadata=self._metadata()
        )
        return pb.JobStatus.Name(response.status)

    async def stream(
        self, items: Iterable[StreamItem] | AsyncIterable[StreamItem]
    ) -> AsyncIterator[StreamResult]:
        """Sends items on one stream; yields each answer as it comes (not in send order)."""

        async def requests() -> AsyncIterator[pb.PredictRequest]:
            if isinstance(items, AsyncIterable):
                async for item in items:
                    yield codec.stream_request(item)
            else:
                for item in items:
                    yield codec.stream_request(item)

        call = self._stub.StreamPredict(
            requests(), timeout=self._timeout_s, metadata=self._metadata()
        )
        async for response in call:
            yield codec.stream_result(response)

    def sequences(self, model: str) -> SequenceStream:
        """One stream carrying chunks of many sequences of a stateful model
        (`async with client.sequences(model) as s: await s.send(id, inputs, start=True)`)."""
        return SequenceStream(self._stub, model, self._metadata(), self._timeout_s)

    async def list_jobs(self, status: str = "", limit: int = 100) -> list[JobSummary]:
        """Jobs, newest first; status "FAILED" lists the dead letters."""
        request = pb.ListJobsRequest(status=status or "JOB_STATUS_UNSPECIFIED", limit=limit)
        response = await self._stub.ListJobs(
            request, timeout=self._timeout_s, metadata=self._metadata()
        )
        return [codec.job_summary(job) for job in response.jobs]

    async def list_models(self) -> pb.ListModelsResponse:
        return await self._stub.ListModels(
            pb.ListModelsRequest(),
            timeout=self._timeout_s,
            metadata=self._metadata(),
        )

    async def model_metadata(self, model: str) -> pb.GetModelMetadataResponse:
        request = pb.GetModelMetadataRequest(model=model)
        return await self._stub.GetModelMetadata(
            request, timeout=self._timeout_s, metadata=self._metadata()
        )

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncTensorgateClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
