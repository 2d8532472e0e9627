"""The data plane: the one interface every front end (tensorgate.v1, KServe v2) calls.

Front ends hand in plain records (server/records.py) and get plain records or outputs back. The
path of every request is api → dataplane → the model set (models.py: admitted once, queued on its
model) → scheduler → executor → backends; a job goes api → dataplane → the model set (admitted)
→ the job service (jobs/), whose lanes queue it through the model set when it runs. Nothing here
knows a transport. Once shutdown begins it refuses new work.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator

from opentelemetry.trace import Span

from tensorgate.server.control import ModelControl
from tensorgate.server.errors import Unavailable
from tensorgate.server.jobs.service import JobService
from tensorgate.server.limits import check_idempotency_key
from tensorgate.server.models import ModelSet, stateful_job_error
from tensorgate.server.records import (
    Callback,
    Cursor,
    JobEvent,
    JobStatus,
    JobView,
    ModelInfo,
    ModelStatistics,
    RepositoryEntry,
    Request,
    RequestKind,
    Submitted,
)
from tensorgate.server.telemetry import Telemetry
from tensorgate.server.tensors import Outputs


class DataPlane:
    def __init__(
        self,
        models: ModelSet,
        jobs: JobService,
        telemetry: Telemetry | None = None,
        control: ModelControl | None = None,
    ) -> None:
        self._models = models
        self._jobs = jobs
        # How models change while serving (--model-control); fixed when not given.
        self.control = control or ModelControl(models)
        self.telemetry = telemetry or Telemetry.quiet()
        self.tracing = self.telemetry.tracing
        self.accepting = True
        # Shutdown began: readiness (health and KServe alike) says no, while calls are still
        # served through the drain delay. A private job store takes no new job from then on.
        self.draining = False
        # Unary and stream requests queued or running (jobs are counted by the job service).
        self.inflight = 0
        # When the last call reached the data plane (monotonic); drain waits for a quiet spell.
        self.last_call_at = 0.0

    # --- inference ---------------------------------------------------------------------------

    def start(
        self, request: Request, kind: RequestKind = RequestKind.UNARY, span: Span | None = None
    ) -> asyncio.Future[Outputs]:
        """Admits and queues one request (unary or stream); the future settles with its outputs
        or its error. With a span, the request's stages are recorded on it (validate, queue,
        execute)."""
        future = self._queue(request, kind, span)
        self.inflight += 1
        future.add_done_callback(self._settled)
        return future

    async def infer(self, request: Request, span: Span | None = None) -> Outputs:
        # If the caller goes away, this task is cancelled and so is the future: the request
        # leaves its queue at once. (Counted in flight here, not by a done-callback: one
        # callback fewer for the loop to run per call.)
        future = self._queue(request, RequestKind.UNARY, span)
        self.inflight += 1
        try:
            return await future
        finally:
            self.inflight -= 1

    def _queue(
        self, request: Request, kind: RequestKind, span: Span | None
    ) -> asyncio.Future[Outputs]:
        self._check_accepting()
        started_ns = time.time_ns() if span is not None else 0
        queued = self._models.admit(request, kind)
        if span is not None:
            span.set_attribute("tensorgate.model_version", request.model_version)
            queued.trace = self.tracing.request_trace(span, 0, time.time_ns() - started_ns)
        self._models.enqueue(queued, request.model)
        return queued.future

    def _settled(self, _: object) -> None:
        self.inflight -= 1

    def end_sequences(self, owner: str) -> None:
        """A stream ended: frees the sequences it was driving, on every stateful model."""
        self._models.end_sequences(owner)

    def _check_accepting(self) -> None:
        if not self.accepting:
            raise Unavailable("the server is shutting down and takes no new requests")

    # --- jobs --------------------------------------------------------------------------------

    async def submit(
        self,
        request: Request,
        idempotency_key: str = "",
        span: Span | None = None,
        callback: Callback | None = None,
    ) -> Submitted:
        """Admits and accepts a job. With the Submit call's span, the job's run is traced as a
        `job` span under it. callback: a webhook for its final state."""
        check_idempotency_key(idempotency_key)
        if self.draining and not self._jobs.store.shared:
            # A job is a promise that outlives the call; this process's memory does not outlive
            # the shutdown. (Jobs in a shared store do: any replica runs them.)
            raise Unavailable(
                "the server is shutting down and takes no new jobs (its job store is in this "
                "process's memory); submit to another replica"
            )
        self._check_accepting()
        if not self._models.takes_jobs(request.model):
            raise stateful_job_error(request.model)
        admitted = self._models.admit(request, RequestKind.JOB)
        job, deduplicated, estimate_s = await self._jobs.submit(
            request, admitted, idempotency_key, span, callback
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

    def watch_job(self, job_id: str, tenant: str = "") -> AsyncIterator[JobEvent]:
        """The job's state now, then each change until the final one (NOT_FOUND when unknown)."""
        return self._jobs.watch(job_id, tenant)

    async def cancel_job(self, job_id: str, tenant: str = "") -> JobView:
        return self._jobs.view(await self._jobs.cancel(job_id, tenant))

    async def delete_job(self, job_id: str, tenant: str = "") -> JobView:
        """Forgets a finished job now (FAILED_PRECONDITION while it is unfinished)."""
        return self._jobs.view(await self._jobs.delete(job_id, tenant))

    async def list_jobs(
        self,
        status: JobStatus | None,
        limit: int,
        tenant: str = "",
        after: Cursor | None = None,
    ) -> list[JobView]:
        """Newest first; after: (created_at, id) of the previous page's last job."""
        found = await self._jobs.find(status, limit, tenant, after)
        return [self._jobs.view(job) for job in found]

    # --- models ------------------------------------------------------------------------------

    @property
    def serving(self) -> bool:
        """Not shutting down: the server-wide half of every readiness answer."""
        return self.accepting and not self.draining

    def models(self) -> list[ModelInfo]:
        return [self._served(info) for info in self._models.infos()]

    def model_info(self, name: str, version: str = "") -> ModelInfo:
        return self._served(self._models.info(name, version))

    def _served(self, info: ModelInfo) -> ModelInfo:
        """A model as callers see it: not ready while the server shuts down."""
        if info.ready and not self.serving:
            return dataclasses.replace(info, ready=False, reason="the server is shutting down")
        return info

    def model_ready(self, name: str, version: str = "") -> bool:
        """The same answer grpc.health.v1 gives for the model's name (or for one version)."""
        return self.serving and self._models.ready(name, version)

    def server_ready(self) -> bool:
        return self.serving and self._models.all_ready()

    def statistics(self, name: str = "", version: str = "") -> list[ModelStatistics]:
        """Counters of one version, of one model's versions, or of every model that has
        served."""
        return self._models.statistics(name, version)

    # --- the model repository (model control) ---------------------------------------------------

    async def repository_index(self, ready_only: bool = False) -> list[RepositoryEntry]:
        """Every model of the repository: each version loaded (READY, UNAVAILABLE, UNLOADING)
        and each model not loaded (UNAVAILABLE with the reason)."""
        entries = await self.control.index()
        return [e for e in entries if e.state == "READY"] if ready_only else entries

    async def load_model(self, name: str) -> list[str]:
        """Loads a model, or reloads it from the repository as it now is, with no downtime;
        returns the versions loaded."""
        self._check_accepting()
        return await self.control.load(name)

    async def unload_model(self, name: str) -> None:
        """Unloads a model: its versions finish what they were given; new calls are NOT_FOUND."""
        self._check_accepting()
        await self.control.unload(name)

    def metric_model(self, name: str) -> str:
        """The model label for metrics: unknown names collapse into one, so callers cannot grow
        the label set."""
        return self._models.metric_label(name)

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
