"""The data plane: the one narrow interface every front end (tensorgate.v1, KServe v2) calls.

It owns the models and the job runner, knows nothing about any transport, and refuses new work
once shutdown has begun.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from typing import Any

from opentelemetry.trace import Span

from server.batching.request import InferenceRequest, Outputs
from server.errors import NotFound, Unavailable
from server.jobs.job import Job, JobStatus
from server.jobs.runner import JobRunner
from server.model import ServedModel
from server.telemetry import Telemetry
from server.tensors import TensorInput


class DataPlane:
    def __init__(
        self,
        models: Mapping[str, ServedModel],
        jobs: JobRunner,
        telemetry: Telemetry | None = None,
    ) -> None:
        self.models = models
        self.jobs = jobs
        self.telemetry = telemetry or Telemetry.quiet()
        self.tracing = self.telemetry.tracing
        self.accepting = True
        # Unary and stream requests queued or running (jobs are counted by the job runner).
        self.inflight = 0
        # When the last call reached the data plane (monotonic); drain waits for a quiet spell.
        self.last_call_at = 0.0

    def model(self, name: str) -> ServedModel:
        model = self.models.get(name)
        if model is None:
            known = ", ".join(self.models) or "none"
            raise NotFound(f"model '{name}' is not served; served models: {known}")
        return model

    def new_request(
        self,
        model_name: str,
        inputs: Sequence[TensorInput],
        requested_outputs: Sequence[str] = (),
        deadline: float | None = None,
        request_id: str = "",
        parameters: Mapping[str, Any] | None = None,
        default_deadline: bool = True,
    ) -> tuple[ServedModel, InferenceRequest]:
        """Validates a request; InvalidArgument/NotFound/Unavailable say what is wrong."""
        if not self.accepting:
            raise Unavailable("the server is shutting down and takes no new requests")
        model = self.model(model_name)
        request = model.new_request(
            inputs, requested_outputs, deadline, request_id, parameters, default_deadline
        )
        return model, request

    def note_call(self) -> None:
        """A call (or a stream's request) arrived; drain() waits until they stop coming."""
        self.last_call_at = time.monotonic()

    def metric_model(self, name: str) -> str:
        """The model label for metrics: unknown names collapse into one, so callers cannot grow
        the label set."""
        return name if name in self.models else "_unknown"

    def start(
        self,
        model_name: str,
        inputs: Sequence[TensorInput],
        requested_outputs: Sequence[str] = (),
        deadline: float | None = None,
        request_id: str = "",
        parameters: Mapping[str, Any] | None = None,
        span: Span | None = None,
    ) -> InferenceRequest:
        """Validates and queues one request (unary or stream); await its future for the outputs.

        With a span, validation becomes its `validate` child and the request is traced through
        the queue and the batch.
        """
        started_ns = time.time_ns() if span is not None else 0
        model, request = self.new_request(
            model_name, inputs, requested_outputs, deadline, request_id, parameters
        )
        if span is not None:
            self.tracing.stage(span, "validate", started_ns, time.time_ns())
            request.trace = self.tracing.request_trace(span, 0)
        self.enqueue(model, request)
        return request

    def enqueue(self, model: ServedModel, request: InferenceRequest) -> None:
        """Queues a validated request; its future settles with the outputs or the error."""
        model.enqueue(request)
        self.inflight += 1
        request.future.add_done_callback(self._settled)

    def _settled(self, _: object) -> None:
        self.inflight -= 1

    async def drain(self, deadline: float, quiet_s: float = 0.25) -> bool:
        """After accepting turned off: waits (until the monotonic deadline) for in-flight requests
        and accepted jobs to finish, and for callers to stop arriving for quiet_s: a call that
        reaches gRPC after the server stops is cancelled by gRPC itself, while one that arrives
        now is refused with a clean UNAVAILABLE. True when everything finished."""
        while True:
            now = time.monotonic()
            busy = self.inflight or self.jobs.unfinished
            if not busy and now - self.last_call_at >= quiet_s:
                return True
            if now >= deadline:
                return not busy
            await asyncio.sleep(0.01)

    async def predict(
        self,
        model_name: str,
        inputs: Sequence[TensorInput],
        requested_outputs: Sequence[str] = (),
        deadline: float | None = None,
        request_id: str = "",
        parameters: Mapping[str, Any] | None = None,
        span: Span | None = None,
    ) -> Outputs:
        request = self.start(
            model_name, inputs, requested_outputs, deadline, request_id, parameters, span
        )
        # If the caller goes away, this task is cancelled and so is the future: the batcher then
        # drops the request before it runs.
        return await request.future

    def submit(
        self,
        model_name: str,
        inputs: Sequence[TensorInput],
        requested_outputs: Sequence[str] = (),
        request_id: str = "",
        parameters: Mapping[str, Any] | None = None,
        idempotency_key: str = "",
        span: Span | None = None,
    ) -> tuple[Job, bool, float]:
        """Validates and accepts a job. With the Submit call's span, the job's run is traced as
        a `job` span under it."""
        model, request = self.new_request(
            model_name, inputs, requested_outputs, None, request_id, parameters, False
        )
        return self.jobs.submit(model, request, idempotency_key, span)

    async def get_result(self, job_id: str, wait_s: float = 0.0) -> Job:
        return await self.jobs.get(job_id, wait_s)

    def cancel_job(self, job_id: str) -> Job:
        return self.jobs.cancel(job_id)

    def list_jobs(self, status: JobStatus | None, limit: int) -> list[Job]:
        return self.jobs.find(status, limit)
