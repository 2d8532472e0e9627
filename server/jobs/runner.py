"""Runs submitted jobs through the same model schedulers as unary and stream traffic.

Accepted jobs wait in a per-model backlog (bounded by max_pending_jobs over all models); a feeder
moves them into the model's scheduler while keeping only a few batches' worth in it, so a burst
of jobs neither fills the queue that interactive callers share nor gets refused. Jobs are kept
and found through a JobStore (store.py).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import random
import secrets
import time
from collections.abc import Coroutine, Mapping
from dataclasses import dataclass, field
from typing import Any

from opentelemetry.trace import Span

from server.batching.request import InferenceRequest
from server.config import ServerConfig
from server.errors import (
    Cancelled,
    Internal,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    TensorgateError,
    Unavailable,
)
from server.jobs.job import Job, JobStatus
from server.jobs.store import JobStore
from server.model import ServedModel
from server.records import JobView
from server.telemetry import Telemetry
from server.tensors import Outputs

log = logging.getLogger(__name__)

# Pause before retrying when a model queue is full.
_REQUEUE_PAUSE_S = 0.005


@dataclass(slots=True, eq=False)
class _Backlog:
    """Accepted jobs of one model not yet handed to its queue."""

    model: ServedModel
    # Jobs of this model allowed in its queue or on its instances at once.
    slots: asyncio.Semaphore
    jobs: collections.deque[Job] = field(default_factory=collections.deque)
    rows: int = 0
    arrived: asyncio.Event = field(default_factory=asyncio.Event)


class JobRunner:
    """Submit, GetResult (long-poll), CancelJob, and expiry of finished jobs."""

    def __init__(
        self,
        models: Mapping[str, ServedModel],
        store: JobStore,
        config: ServerConfig,
        telemetry: Telemetry | None = None,
    ) -> None:
        self._models = models
        self.store = store
        self._max_pending = config.max_pending_jobs
        self._ttl_s = config.job_ttl_s
        self._max_wait_s = config.max_result_wait_s
        self._max_attempts = config.job_max_attempts
        self._retry_base_s = config.job_retry_base_s
        self._retrying = True  # off while shutting down
        telemetry = telemetry or Telemetry.quiet()
        self._tracing = telemetry.tracing
        self._metrics = telemetry.metrics
        self.unfinished = 0
        self._backlogs: dict[str, _Backlog] = {}
        # The future a finished job's request keeps: done, holding nothing.
        self._settled: asyncio.Future[Outputs] | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._short: set[asyncio.Task[None]] = set()

    def start(self) -> None:
        """Starts a feeder for every ready model, and the sweeper of expired jobs."""
        self._settled = asyncio.get_running_loop().create_future()
        self._settled.set_result({})
        for name, model in self._models.items():
            if not model.ready:
                continue
            slots = 2 * model.max_batch_size * model.config.instance_count
            backlog = _Backlog(model, asyncio.Semaphore(slots))
            self._backlogs[name] = backlog
            self._spawn(self._feed(backlog), f"job-feeder-{name}")
        self._spawn(self._sweep(), "job-sweeper")

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for backlog in self._backlogs.values():
            while backlog.jobs:
                job = backlog.jobs.popleft()
                if not job.request.future.done():
                    job.request.future.set_exception(
                        Unavailable("the server shut down before the job ran")
                    )

    async def submit(
        self,
        model: ServedModel,
        request: InferenceRequest,
        idempotency_key: str = "",
        span: Span | None = None,
    ) -> tuple[Job, bool, float]:
        """Accepts a validated request as a job; returns (job, deduplicated, estimated wait s)."""
        backlog = self._backlogs.get(model.name)
        if backlog is None:
            raise Unavailable(f"model '{model.name}' does not take jobs now")
        if idempotency_key:
            existing = await self.store.by_key(idempotency_key, request.tenant)
            if existing is not None:
                request.future.cancel()
                return existing, True, self._estimate(self._backlogs.get(existing.model))
        if self.unfinished >= self._max_pending:
            raise ResourceExhausted(
                f"{self.unfinished} jobs are pending, the limit is {self._max_pending}; "
                "retry later",
                retry_after_s=1.0,
            )
        job = Job(
            id=secrets.token_hex(16),
            model=model.name,
            request=request,
            tenant=request.tenant,
            idempotency_key=idempotency_key,
            created_at=time.monotonic(),
        )
        stored = await self.store.add(job)
        if stored is not job:  # the same key won a race with this call
            request.future.cancel()
            return stored, True, self._estimate(self._backlogs.get(stored.model))
        job.span = self._tracing.start_child(span, "job", model=model.name, **{"job.id": job.id})
        request.trace = self._tracing.request_trace(job.span, 0)
        self._watch(job, request)
        self.unfinished += 1
        backlog.jobs.append(job)
        backlog.rows += request.rows
        backlog.arrived.set()
        # The wait includes the rows queued ahead of the job, and its own.
        return job, False, self._estimate(backlog)

    async def get(self, job_id: str, tenant: str = "", wait_s: float = 0.0) -> Job:
        """The job; with wait_s > 0, waits (up to max_result_wait_s) for it to finish first."""
        job = await self._find(job_id, tenant)
        return await self.store.wait(job, min(wait_s, self._max_wait_s))

    async def cancel(self, job_id: str, tenant: str = "") -> Job:
        """Cancels an unfinished job, dropping its queued request. The answer is the job's final
        word: a job that finished first keeps its outcome; one cancelled while its batch runs
        stays CANCELLED and its result is discarded."""
        job = await self._find(job_id, tenant)
        if job.status.finished:
            return job
        future = job.request.future
        if future.done() and not future.cancelled() and future.exception() is None:
            # It succeeded, and the callback recording that has not run yet: record it now.
            self._finish(job, future)
            return job
        future.cancel()
        self._finish(job, future, cancelled=True)
        return job

    async def _find(self, job_id: str, tenant: str) -> Job:
        if len(job_id) != 32 or not all(c in "0123456789abcdef" for c in job_id):
            raise InvalidArgument(f"job id '{job_id[:64]}' is malformed: expected 32 hex digits")
        job = await self.store.get(job_id, tenant)
        if job is None:
            raise NotFound(f"job '{job_id}' is unknown or its result has expired")
        return job

    def view(self, job: Job) -> JobView:
        now = time.monotonic()
        return JobView(
            id=job.id,
            model=job.model,
            status=job.status,
            request_id=job.request.id,
            attempts=job.attempts,
            age_s=now - job.created_at,
            outputs=job.outputs,
            error=job.error,
            expires_in_s=None if job.expires_at is None else max(job.expires_at - now, 0.0),
        )

    def _estimate(self, backlog: _Backlog | None) -> float:
        if backlog is None:
            return 0.0
        return backlog.model.estimated_wait_s(extra_rows=backlog.rows)

    async def find(
        self, status: JobStatus | None = None, limit: int = 100, tenant: str = ""
    ) -> list[Job]:
        """Jobs for operators: status FAILED lists the dead letters (retries exhausted)."""
        return await self.store.find(status, limit, tenant)

    def fail_unfinished(self, reason: str) -> list[Job]:
        """At shutdown: every job not finished yet turns FAILED (UNAVAILABLE) with the reason, so
        none vanishes without a final status. Returns them."""
        self._retrying = False
        jobs = self.store.unfinished()
        for job in jobs:
            if not job.request.future.done():
                job.request.future.set_exception(Unavailable(reason))
            self._finish(job, job.request.future)
        return jobs

    def _watch(self, job: Job, request: InferenceRequest) -> None:
        request.on_start = lambda: _mark_running(job)
        request.future.add_done_callback(
            lambda future: None if future is not job.request.future else self._finish(job, future)
        )

    def _retry_later(self, job: Job, error: BaseException) -> bool:
        """Schedules another run of a job whose engine call failed, if it may have one."""
        if not (
            self._retrying
            and isinstance(error, (Internal, Unavailable))
            and job.attempts < self._max_attempts
        ):
            return False
        backlog = self._backlogs.get(job.model)
        if backlog is None:
            return False
        job.request = dataclasses.replace(
            job.request,
            future=asyncio.get_running_loop().create_future(),
            queued=False,
            on_start=None,
            trace=self._tracing.request_trace(job.span, 0),
        )
        self._watch(job, job.request)
        job.attempts += 1
        job.status = JobStatus.PENDING
        # Exponential backoff with full jitter on the upper half, so retries of a batch that
        # failed together do not arrive together.
        delay_s = self._retry_base_s * 2 ** (job.attempts - 2) * random.uniform(0.5, 1.0)
        log.info(
            "job %s: attempt %d failed (%s); retrying in %.3f s",
            job.id,
            job.attempts - 1,
            error,
            delay_s,
        )

        def requeue() -> None:
            if not job.request.future.done():
                backlog.jobs.append(job)
                backlog.rows += job.request.rows
                backlog.arrived.set()

        asyncio.get_running_loop().call_later(delay_s, requeue)
        return True

    def _finish(self, job: Job, future: asyncio.Future[Outputs], cancelled: bool = False) -> None:
        if job.status.finished:
            return
        error = None if cancelled or future.cancelled() else future.exception()
        if error is not None and self._retry_later(job, error):
            return
        if cancelled or future.cancelled():
            job.status = JobStatus.CANCELLED
            job.error = Cancelled("the job was cancelled")
        elif error is not None:
            job.status = JobStatus.FAILED
            job.error = error if isinstance(error, TensorgateError) else Internal(str(error))
        else:
            job.status = JobStatus.SUCCEEDED
            # Copies, so a kept result does not pin the whole batch's output arrays.
            job.outputs = {name: array.copy() for name, array in future.result().items()}
        job.finished_at = time.monotonic()
        job.expires_at = job.finished_at + self._ttl_s
        code = job.error.code if job.error is not None else "OK"
        self._metrics.requests.labels(job.model, "job", code).inc()
        self._metrics.request_seconds.labels(job.model, "job").observe(
            job.finished_at - job.created_at
        )
        if job.span is not None:
            job.span.set_attribute("tensorgate.job.status", job.status.value)
            job.span.set_attribute("tensorgate.job.attempts", job.attempts)
            self._tracing.end(job.span, job.error if job.status is JobStatus.FAILED else None)
        # A finished job keeps only what GetResult shows: not its inputs, and not the future,
        # whose result holds views that would keep the whole batch's outputs alive.
        settled = self._settled if self._settled is not None else job.request.future
        job.request = dataclasses.replace(
            job.request, inputs={}, future=settled, on_start=None, trace=None
        )
        self.unfinished -= 1
        job.finished.set()
        self._spawn(self.store.finished(job), f"job-finished-{job.id}", keep=False)

    async def _feed(self, backlog: _Backlog) -> None:
        model = backlog.model
        while True:
            while not backlog.jobs:
                backlog.arrived.clear()
                await backlog.arrived.wait()
            await backlog.slots.acquire()
            job = backlog.jobs.popleft()
            request: InferenceRequest = job.request
            backlog.rows -= request.rows
            if request.future.done():
                backlog.slots.release()
                continue
            try:
                model.scheduler.put(request)
            except ResourceExhausted:
                backlog.jobs.appendleft(job)
                backlog.rows += request.rows
                backlog.slots.release()
                await asyncio.sleep(_REQUEUE_PAUSE_S)
                continue
            except TensorgateError as exc:
                backlog.slots.release()
                request.future.set_exception(exc)
                continue
            request.future.add_done_callback(lambda _: backlog.slots.release())

    async def _sweep(self) -> None:
        interval_s = min(max(self._ttl_s / 10, 0.05), 10.0)
        while True:
            await asyncio.sleep(interval_s)
            removed = await self.store.sweep()
            if removed:
                log.debug("removed %d expired jobs", removed)

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str, keep: bool = True) -> None:
        """Starts a task, kept referenced until done; failures are logged. keep: stop() cancels
        it (the long-lived feeders and sweeper)."""
        task = asyncio.create_task(coro, name=name)
        task.add_done_callback(_log_failure)
        if keep:
            self._tasks.append(task)
        else:
            self._short.add(task)
            task.add_done_callback(self._short.discard)


def _mark_running(job: Job) -> None:
    if job.status is JobStatus.PENDING:
        job.status = JobStatus.RUNNING


def _log_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("task %s failed", task.get_name(), exc_info=task.exception())
