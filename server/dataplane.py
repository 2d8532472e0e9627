"""The data plane: the one interface every front end (tensorgate.v1, KServe v2) calls.

Front ends hand in plain records (server/records.py) and get plain records or outputs back. The
path of every request is api → dataplane → scheduler (server/batching) → executor → backends;
jobs go through the job runner, which feeds the same schedulers. Nothing here knows a transport.
Once shutdown begins it refuses new work.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping

from opentelemetry.trace import Span

from tensorgate.server.errors import InvalidArgument, NotFound, Unavailable, clip
from tensorgate.server.jobs.runner import JobRunner
from tensorgate.server.limits import check_idempotency_key, check_request
from tensorgate.server.model import ModelState, ServedModel
from tensorgate.server.records import (
    JobStatus,
    JobView,
    ModelInfo,
    ModelStatistics,
    Request,
    Submitted,
)
from tensorgate.server.telemetry import Telemetry
from tensorgate.server.tensors import Outputs


class DataPlane:
    def __init__(
        self,
        models: Mapping[str, ServedModel],
        jobs: JobRunner,
        telemetry: Telemetry | None = None,
    ) -> None:
        self._models = models
        self._jobs = jobs
        self.telemetry = telemetry or Telemetry.quiet()
        self.tracing = self.telemetry.tracing
        self.accepting = True
        # Shutdown began: readiness (health and KServe alike) says no, while calls are still
        # served through the drain delay. A private job store takes no new job from then on.
        self.draining = False
        # Unary and stream requests queued or running (jobs are counted by the job runner).
        self.inflight = 0
        # When the last call reached the data plane (monotonic); drain waits for a quiet spell.
        self.last_call_at = 0.0

    # --- inference ---------------------------------------------------------------------------

    def start(self, request: Request, span: Span | None = None) -> asyncio.Future[Outputs]:
        """Validates and queues one request (unary or stream); the future settles with its
        outputs or its error. With a span, the request's stages are recorded on it (validate,
        queue, execute)."""
        started_ns = time.time_ns() if span is not None else 0
        model = self._admit(request)
        queued = model.new_request(request)
        if span is not None:
            queued.trace = self.tracing.request_trace(span, 0, time.time_ns() - started_ns)
        model.scheduler.put(queued)
        self.inflight += 1
        queued.future.add_done_callback(self._settled)
        return queued.future

    async def infer(self, request: Request, span: Span | None = None) -> Outputs:
        # If the caller goes away, this task is cancelled and so is the future: the request
        # leaves its queue at once.
        return await self.start(request, span)

    def _settled(self, _: object) -> None:
        self.inflight -= 1

    def end_sequences(self, owner: str) -> None:
        """A stream ended: frees the sequences it was driving, on every stateful model."""
        for model in self._models.values():
            model.end_sequences(owner)

    def _admit(self, request: Request) -> ServedModel:
        if not self.accepting:
            raise Unavailable("the server is shutting down and takes no new requests")
        check_request(request)
        return self._model(request.model)

    # --- jobs --------------------------------------------------------------------------------

    async def submit(
        self, request: Request, idempotency_key: str = "", span: Span | None = None
    ) -> Submitted:
        """Validates and accepts a job. With the Submit call's span, the job's run is traced as
        a `job` span under it."""
        check_idempotency_key(idempotency_key)
        if self.draining and not self._jobs.store.shared:
            # A job is a promise that outlives the call; this process's memory does not outlive
            # the shutdown. (Jobs in a shared store do: any replica runs them.)
            raise Unavailable(
                "the server is shutting down and takes no new jobs (its job store is in this "
                "process's memory); submit to another replica"
            )
        model = self._admit(request)
        if model.config.sequence is not None:
            raise InvalidArgument(
                f"model '{model.name}' is stateful: its sequences run through Predict or "
                "StreamPredict, not as jobs"
            )
        queued = model.new_request(request, job=True)
        job, deduplicated, estimate_s = await self._jobs.submit(
            model, request, queued, idempotency_key, span
        )
        return Submitted(self._jobs.view(job), deduplicated, estimate_s)

    async def job(
        self, job_id: str, tenant: str = "", wait_s: float = 0.0, span: Span | None = None
    ) -> JobView:
        """A job's state; with wait_s, once it finishes (long-poll) or wait_s has passed. The
        call's span links to the trace of the job's run."""
        job = await self._jobs.get(job_id, tenant, wait_s)
        self.tracing.link_to(span, job.span)
        return self._jobs.view(job)

    async def cancel_job(self, job_id: str, tenant: str = "") -> JobView:
        return self._jobs.view(await self._jobs.cancel(job_id, tenant))

    async def list_jobs(
        self, status: JobStatus | None, limit: int, tenant: str = ""
    ) -> list[JobView]:
        return [self._jobs.view(job) for job in await self._jobs.find(status, limit, tenant)]

    # --- models ------------------------------------------------------------------------------

    def models(self) -> list[ModelInfo]:
        return [self._info(model) for model in self._models.values()]

    def model_info(self, name: str) -> ModelInfo:
        return self._info(self._model(name))

    @property
    def serving(self) -> bool:
        """Not shutting down: the server-wide half of every readiness answer."""
        return self.accepting and not self.draining

    def model_ready(self, name: str) -> bool:
        """The same answer grpc.health.v1 gives for the model's name."""
        return self.serving and self._model(name).ready

    def server_ready(self) -> bool:
        return self.serving and all(m.ready for m in self._models.values())

    def statistics(self, name: str = "") -> list[ModelStatistics]:
        """Counters of one model, or of every model that has served."""
        if name:
            model = self._model(name)
            if model.state is not ModelState.READY:
                raise Unavailable(model.not_ready_message())
            return [_statistics(model)]
        return [_statistics(m) for m in self._models.values() if m.state is ModelState.READY]

    def metric_model(self, name: str) -> str:
        """The model label for metrics: unknown names collapse into one, so callers cannot grow
        the label set."""
        return name if name in self._models else "_unknown"

    def _model(self, name: str) -> ServedModel:
        model = self._models.get(name)
        if model is None:
            known = ", ".join(self._models) or "none"
            raise NotFound(f"model '{clip(name)}' is not served; served models: {known}")
        return model

    def _info(self, model: ServedModel) -> ModelInfo:
        config = model.config
        return ModelInfo(
            name=model.name,
            backend=config.backend,
            ready=self.serving and model.ready,
            inputs=model.inputs,
            outputs=model.outputs,
            max_batch_size=model.max_batch_size,
            instance_count=config.instance_count,
            max_queue_delay_s=config.max_queue_delay_s,
            preferred_batch_sizes=config.preferred_batch_sizes,
            reason="" if model.ready else model.not_ready_message(),
        )

    # --- lifecycle ---------------------------------------------------------------------------

    def note_call(self) -> None:
        """A call (or a stream's request) arrived; drain() waits until they stop coming."""
        self.last_call_at = time.monotonic()

    async def drain(self, deadline: float, quiet_s: float = 0.25) -> bool:
        """After accepting turned off: waits (until the monotonic deadline) for in-flight requests
        and accepted jobs to finish, and for callers to stop arriving for quiet_s: a call that
        reaches gRPC after the server stops is cancelled by gRPC itself, while one that arrives
        now is refused with a clean UNAVAILABLE. True when everything finished."""
        while True:
            now = time.monotonic()
            busy = self.inflight or self._jobs.unfinished
            if not busy and now - self.last_call_at >= quiet_s:
                return True
            if now >= deadline:
                return not busy
            await asyncio.sleep(0.01)


def _statistics(model: ServedModel) -> ModelStatistics:
    stats = model.scheduler.stats
    return ModelStatistics(
        name=model.name,
        last_inference_ms=stats.last_inference_ms,
        rows=stats.rows,
        batches=stats.batches,
        requests=stats.requests,
        success_s_total=stats.success_s_total,
        failed_requests=stats.failed_requests,
        failed_s_total=stats.failed_s_total,
        queue_s_total=stats.queue_s_total,
        compute_s_total=stats.compute_s_total,
        by_batch_size={
            size: (count, stats.compute_s_by_size[size])
            for size, count in sorted(stats.batch_sizes.items())
        },
    )
