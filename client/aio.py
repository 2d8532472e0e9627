"""asyncio client. Failures raise TensorgateError (a grpc.aio.AioRpcError) with the server's
status code, message and retry-after hint."""

from __future__ import annotations

from collections.abc import (
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Mapping,
    Sequence,
)
from types import TracebackType
from typing import Any

import grpc
import numpy as np

from tensorgate.client import codec
from tensorgate.client.connection import DEFAULT_MAX_MESSAGE_BYTES, aio_connection
from tensorgate.client.errors import Retry, TensorgateError, acall
from tensorgate.client.results import (
    JobEvent,
    JobResult,
    JobSummary,
    ModelMetadata,
    ModelSummary,
    RepositoryModel,
    StreamItem,
    StreamResult,
    Submitted,
)
from tensorgate.client.security import Security
from tensorgate.client.sequences import SequenceStream
from tensorgate.kserve import grpc_service_pb2 as kpb
from tensorgate.v1 import inference_pb2 as pb


class AsyncTensorgateClient:
    """tensorgate.v1.Inference on grpc.aio. Use `async with` or `await close()`."""

    def __init__(
        self,
        target: str = "localhost:50051",
        *,
        timeout_s: float | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        security: Security | None = None,
        retry: Retry | None = None,
    ) -> None:
        """security: TLS files and a bearer token; plaintext when None. retry: run calls the
        server refuses (RESOURCE_EXHAUSTED, UNAVAILABLE) again, honouring its retry-after hint;
        off when None."""
        self._connection = aio_connection(target, timeout_s, max_message_bytes, security, retry)
        self._channel = self._connection.channel
        self._stub = self._connection.stub
        self._timeout_s = timeout_s

    async def predict(
        self,
        model: str,
        inputs: Mapping[str, np.ndarray],
        *,
        outputs: Sequence[str] = (),
        request_id: str = "",
        priority: int = 0,
        parameters: Mapping[str, bool | int | float | str] | None = None,
        timeout_s: float | None = None,
        sequence_id: str = "",
        sequence_start: bool = False,
        sequence_end: bool = False,
        model_version: str = "",
    ) -> dict[str, np.ndarray]:
        """One inference. priority: higher is taken first in the model's queue (0: the model's
        default). parameters reach the model (a python model's execute() reads them). For a
        stateful model, the request is a chunk of the sequence sequence_id (sequence_start on
        its first chunk, sequence_end on its last); many live sequences go better over one
        stream (sequences())."""
        request = codec.predict_request(
            model, inputs, outputs, request_id, priority=priority, parameters=parameters,
            sequence_id=sequence_id, sequence_start=sequence_start, sequence_end=sequence_end,
            model_version=model_version,
        )  # fmt: skip
        response = await self._call(self._stub.Predict, request, timeout_s)
        return codec.decode_all(response.outputs)

    async def submit(
        self,
        model: str,
        inputs: Mapping[str, np.ndarray],
        *,
        outputs: Sequence[str] = (),
        idempotency_key: str = "",
        request_id: str = "",
        priority: int = 0,
        parameters: Mapping[str, bool | int | float | str] | None = None,
        callback_url: str = "",
        include_result: bool = False,
        model_version: str = "",
    ) -> Submitted:
        """A job: its id at once (get_result() or watch() for the outcome). Retried after
        UNAVAILABLE only with an idempotency_key, which makes a second try name the same job.
        callback_url: the server POSTs the final state there (a signed webhook; the URL must
        match the server's --webhook-allow); include_result puts the outputs in it when they
        fit."""
        request = codec.submit_request(
            model, inputs, outputs, request_id, idempotency_key=idempotency_key,
            priority=priority, parameters=parameters, callback_url=callback_url,
            include_result=include_result, model_version=model_version,
        )  # fmt: skip
        response = await self._call(self._stub.Submit, request, may_be_accepted=not idempotency_key)
        return codec.submitted(response)

    async def get_result(self, job_id: str, wait_timeout_s: float = 0.0) -> JobResult:
        """The job's state; with wait_timeout_s it returns as soon as the job finishes."""
        request = pb.GetResultRequest(job_id=job_id, wait_timeout_seconds=wait_timeout_s)
        timeout = None if self._timeout_s is None else self._timeout_s + wait_timeout_s
        return codec.job_result(await self._call(self._stub.GetResult, request, timeout))

    async def watch(self, job_id: str) -> AsyncIterator[JobEvent]:
        """The job's state now, then each change as it happens; ends after the final event
        (SUCCEEDED with its outputs, FAILED or CANCELLED with the error)."""
        stream = self._stub.WatchJob(
            pb.WatchJobRequest(job_id=job_id),
            timeout=self._timeout_s,
            metadata=self._connection.metadata(),
        )
        try:
            async for event in stream:
                yield codec.job_event(event)
        except grpc.RpcError as exc:
            raise TensorgateError.of(exc) from None
        finally:
            stream.cancel()

    async def cancel(self, job_id: str) -> str:
        """Cancels a job; returns its status afterwards."""
        response = await self._call(self._stub.CancelJob, pb.CancelJobRequest(job_id=job_id))
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

        stream = self._stub.StreamPredict(
            requests(), timeout=self._timeout_s, metadata=self._connection.metadata()
        )
        try:
            async for response in stream:
                yield codec.stream_result(response)
        except grpc.RpcError as exc:
            raise TensorgateError.of(exc) from None

    def sequences(self, model: str) -> SequenceStream:
        """One stream carrying chunks of many sequences of a stateful model
        (`async with client.sequences(model) as s: await s.send(id, inputs, start=True)`)."""
        return SequenceStream(self._stub, model, self._connection.metadata(), self._timeout_s)

    async def list_jobs(self, status: str = "", limit: int = 100) -> list[JobSummary]:
        """Jobs, newest first; status "FAILED" lists the dead letters."""
        request = pb.ListJobsRequest(status=status or "JOB_STATUS_UNSPECIFIED", limit=limit)
        response = await self._call(self._stub.ListJobs, request)
        return [codec.job_summary(job) for job in response.jobs]

    async def list_models(self) -> list[ModelSummary]:
        return codec.model_summaries(
            await self._call(self._stub.ListModels, pb.ListModelsRequest())
        )

    async def repository_index(self, ready_only: bool = False) -> list[RepositoryModel]:
        """The model repository: every version loaded, and every model not loaded (the KServe
        repository extension; with auth on, an --admin-tenants tenant's token)."""
        request = kpb.RepositoryIndexRequest(ready=ready_only)
        response = await self._call(self._connection.kserve.RepositoryIndex, request)
        return [RepositoryModel(m.name, m.version, m.state, m.reason) for m in response.models]

    async def load_model(self, model: str, timeout_s: float | None = None) -> None:
        """Loads a model, or reloads it from the repository as it now is (no downtime: the new
        versions take over once warm). The server must run with --model-control explicit or
        poll."""
        request = kpb.RepositoryModelLoadRequest(model_name=model)
        await self._call(self._connection.kserve.RepositoryModelLoad, request, timeout_s)

    async def unload_model(self, model: str) -> None:
        """Unloads a model: what it was given finishes; new calls to it are NOT_FOUND."""
        request = kpb.RepositoryModelUnloadRequest(model_name=model)
        await self._call(self._connection.kserve.RepositoryModelUnload, request)

    async def model_metadata(self, model: str, version: str = "") -> ModelMetadata:
        request = pb.GetModelMetadataRequest(model=model, version=version)
        return codec.model_metadata(await self._call(self._stub.GetModelMetadata, request))

    async def _call(
        self,
        method: Callable[..., Awaitable[Any]],
        request: object,
        timeout_s: float | None = None,
        may_be_accepted: bool = False,
    ) -> Any:
        connection = self._connection

        def once() -> Awaitable[Any]:
            return method(  # type: ignore[no-any-return]
                request,
                timeout=timeout_s or connection.timeout_s,
                metadata=connection.metadata(),
            )

        return await acall(once, connection.retry, may_be_accepted)

    async def close(self) -> None:
        await self._connection.channel.close()

    async def __aenter__(self) -> AsyncTensorgateClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
