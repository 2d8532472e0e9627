"""The data plane: the one narrow interface every front end (tensorgate.v1, later KServe v2) calls.

It owns the models and the job runner, knows nothing about any transport, and refuses new work
once shutdown has begun.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from typing import Any

from server.batching.request import InferenceRequest, Outputs
from server.errors import NotFound, Unavailable
from server.jobs.job import Job, JobStatus
from server.jobs.runner import JobRunner
from server.model import ServedModel
from server.tensors import TensorInput


class DataPlane:
    def __init__(self, models: Mapping[str, ServedModel], jobs: JobRunner) -> None:
        self.models = models
        self.jobs = jobs
        self.accepting = True
        # Unary and stream requests queued or running (jobs are counted by the job runner).
        self.inflight = 0

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

    def enqueue(self, model: ServedModel, request: InferenceRequest) -> None:
        """Queues a validated request; its future settles with the outputs or the error."""
        model.enqueue(request)
        self.inflight += 1
        request.future.add_done_callback(self._settled)

    def _settled(self, _: object) -> None:
        self.inflight -= 1

    async def drain(self, deadline: float) -> bool:
        """After accepting turned off: waits (until the monotonic deadline) for in-flight requests
        and accepted jobs to finish. True when everything finished."""
        while self.inflight or self.jobs.unfinished:
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.01)
        return True

    async def predict(
        self,
        model_name: str,
        inputs: Sequence[TensorInput],
        requested_outputs: Sequence[str] = (),
        deadline: float | None = None,
        request_id: str = "",
        parameters: Mapping[str, Any] | None = None,
    ) -> Outputs:
        model, request = self.new_request(
            model_name, inputs, requested_outputs, deadline, request_id, parameters
        )
        self.enqueue(model, request)
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
    ) -> tuple[Job, bool, float]:
        model, request = self.new_request(
            model_name, inputs, requested_outputs, None, request_id, parameters, False
        )
        return self.jobs.submit(model, request, idempotency_key)

    async def get_result(self, job_id: str, wait_s: float = 0.0) -> Job:
        return await self.jobs.get(job_id, wait_s)

    def cancel_job(self, job_id: str) -> Job:
        return self.jobs.cancel(job_id)

    def list_jobs(self, status: JobStatus | None, limit: int) -> list[Job]:
        return self.jobs.find(status, limit)
