"""The job service: Submit, GetResult (long-poll), CancelJob and ListJobs over a job store, and
the lifecycle of the jobs this process runs (lanes.py runs them).

Submit hands a job admitted by the model set to the store (store.py: this process's memory, or
Redis shared by replicas). With the memory store the job keeps its admitted request, so it is
decoded once; with a shared store the request travels as the caller sent it and whichever
process takes the job rebuilds it without checking it again.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

from opentelemetry.trace import Span

from tensorgate.server.config import ServerConfig
from tensorgate.server.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable
from tensorgate.server.inference import InferenceRequest
from tensorgate.server.jobs.job import Job, JobStatus
from tensorgate.server.jobs.lanes import JobLanes, RetryPolicy
from tensorgate.server.jobs.store import JobStore
from tensorgate.server.jobs.webhooks import Webhooks
from tensorgate.server.models import ModelSet
from tensorgate.server.records import Callback, Cursor, Delivery, JobEvent, JobView, Request
from tensorgate.server.telemetry import Telemetry

log = logging.getLogger(__name__)

# The longest stop() waits for the feeders, sweeper and lease renewal to end.
_STOP_S = 2.0


class JobService:
    """Jobs over a JobStore: the API, and the running of the jobs this process takes."""

    def __init__(
        self,
        models: ModelSet,
        store: JobStore,
        config: ServerConfig,
        telemetry: Telemetry | None = None,
        on_available: Callable[[bool], None] | None = None,
        webhooks: Webhooks | None = None,
    ) -> None:
        """webhooks: checks and delivers callbacks (made from config when not given)."""
        self._models = models
        self.store = store
        self._ttl_s = config.job_ttl_s
        self._max_wait_s = config.max_result_wait_s
        self._lease_s = config.job_lease_s
        self._on_available = on_available or (lambda _: None)
        telemetry = telemetry or Telemetry.quiet()
        self._tracing = telemetry.tracing
        self.webhooks = webhooks or Webhooks(config, telemetry.metrics)
        self._tasks: list[asyncio.Task[None]] = []
        self._short: set[asyncio.Task[None]] = set()
        # Set when the server stops: open watches (the tasks serving them) end.
        self._closing = asyncio.Event()
        self._watches: set[asyncio.Task[Any]] = set()
        self._lanes = JobLanes(
            models,
            store,
            RetryPolicy(config.job_max_attempts, config.job_retry_base_s),
            telemetry,
            self._spawn,
        )

    async def start(self, models: list[str]) -> None:
        """Opens the store, starts a lane for each serving model that takes jobs, and the
        sweeper of expired jobs (and, with a shared store, the renewal of held jobs' leases)."""
        names = [name for name in models if self._models.takes_jobs(name)]
        await self.store.open(names, self._on_available, self._lanes.cancelled)
        self._lanes.start(names)
        await self.webhooks.start(self.store)
        self._spawn(self._sweep(), "job-sweeper")
        if self.store.shared:
            self._spawn(self._renew(), "job-lease-renewal")

    async def add_model(self, name: str) -> None:
        """A model came to be served while running: its jobs are taken from now on."""
        if not self._models.takes_jobs(name) or self._lanes.serves(name):
            return
        await self.store.add_model(name)
        self._lanes.start([name])

    def remove_model(self, name: str) -> None:
        """A model was unloaded: its jobs are no longer taken (those held finish on the version
        that admitted them; queued ones wait in the store for a process that serves it)."""
        self._lanes.remove(name)

    @property
    def unfinished(self) -> int:
        """Jobs this process must finish before it stops: those it holds, and those queued that
        no other process can run."""
        return self._lanes.held_count + self.store.queued_here()

    # --- the API ------------------------------------------------------------------------------

    async def submit(
        self,
        payload: Request,
        admitted: InferenceRequest,
        idempotency_key: str = "",
        span: Span | None = None,
        callback: Callback | None = None,
    ) -> tuple[Job, bool, float]:
        """Accepts an admitted request as a job; returns (job, deduplicated, estimated wait s).
        admitted: payload as the model set admitted it (the run itself, with a private store).
        callback: where to POST its final state."""
        if not self._lanes.serves(payload.model):
            raise Unavailable(f"model '{payload.model}' does not take jobs now")
        if callback is not None:
            self.webhooks.check(callback, payload.tenant)
        shared = self.store.shared
        job = Job(
            id=secrets.token_hex(16),
            model=payload.model,
            tenant=payload.tenant,
            idempotency_key=idempotency_key,
            request_id=payload.id,
            created_at=time.time(),
            payload=payload,
            run=None if shared else admitted,
            callback=callback,
        )
        if shared:
            job.traceparent = self._tracing.traceparent(span)
        try:
            stored, deduplicated, ahead = await self.store.add(job)
        except BaseException:
            admitted.future.cancel()  # never to run: the version that admitted it stops counting it
            raise
        if shared or deduplicated:
            # The admitted record does not run from here (a shared store's job is admitted again
            # by whichever process takes it): its version stops counting it now.
            admitted.future.cancel()
        if deduplicated:
            return stored, True, self._models.wait_estimate_s(stored.model)
        if not shared:
            job.span = self._tracing.start_child(
                span, "job", model=payload.model, **{"job.id": job.id}
            )
        # The unfinished jobs ahead are counted at this one's size (those already in the model's
        # queue twice over: an estimate that errs long).
        return job, False, self._models.wait_estimate_s(payload.model, (ahead + 1) * admitted.rows)

    async def get(self, job_id: str, tenant: str = "", wait_s: float = 0.0) -> Job:
        """The job; with wait_s > 0, waits (up to max_result_wait_s) for it to finish first."""
        _check_id(job_id)
        if wait_s <= 0:
            return _known(job_id, await self.store.get(job_id, tenant))
        return _known(job_id, await self.store.wait(job_id, tenant, min(wait_s, self._max_wait_s)))

    async def cancel(self, job_id: str, tenant: str = "") -> Job:
        """Cancels an unfinished job wherever it is. The answer is the job's final word: a job
        that finished first keeps its outcome; one cancelled while its batch runs stays
        CANCELLED and its result is discarded."""
        _check_id(job_id)
        held = self._lanes.held(job_id)
        if held is not None and held.tenant == tenant and self._lanes.record_if_done(held):
            return held  # it succeeded, and the callback recording that had not run yet
        job = _known(job_id, await self.store.cancel(job_id, tenant))
        if held is not None and held.tenant == tenant:
            self._lanes.cancelled(job_id)
            return held if job.status is JobStatus.RUNNING else job
        return job

    async def watch(self, job_id: str, tenant: str = "") -> AsyncIterator[JobEvent]:
        """The job's state now, then each change, ending after the final one (which carries the
        result and the webhook's state). NOT_FOUND for an unknown job, or another tenant's; a
        watch open when the server stops ends with UNAVAILABLE (watch again elsewhere)."""
        _check_id(job_id)
        known = False
        task = asyncio.current_task()
        assert task is not None
        self._watches.add(task)
        try:
            async for event in self.store.events(job_id, tenant):
                if not known or event.final:
                    # The first and the last event carry what only the record holds: the result
                    # and the webhook's state (which change messages do not repeat).
                    event = await self._completed(event, tenant)
                known = True
                yield event
        except asyncio.CancelledError:
            if not self._closing.is_set() or task.uncancel() > 0:
                raise  # the caller went away (or more than close_watches cancelled it)
            raise Unavailable(
                f"the server is shutting down; watch job '{job_id}' again on another replica "
                "(or GetResult it)"
            ) from None
        finally:
            self._watches.discard(task)
        if not known:
            _known(job_id, None)

    async def _completed(self, event: JobEvent, tenant: str) -> JobEvent:
        job = await self.store.get(event.job_id, tenant)
        if job is None or (event.final and not job.status.finished):
            return event
        return dataclasses.replace(
            event, outputs=job.outputs if event.final else None, delivery=_copy(job.delivery)
        )

    async def find(
        self,
        status: JobStatus | None = None,
        limit: int = 100,
        tenant: str = "",
        after: Cursor | None = None,
    ) -> list[Job]:
        """Jobs for operators, newest first: status FAILED lists the dead letters (retries
        exhausted); after: the last job of the previous page."""
        return await self.store.find(status, limit, tenant, after)

    async def delete(self, job_id: str, tenant: str = "") -> Job:
        """Forgets a finished job (its result and record) now; FAILED_PRECONDITION for one that
        has not finished (cancel it first)."""
        _check_id(job_id)
        job = _known(job_id, await self.store.delete(job_id, tenant))
        if not job.status.finished:
            raise FailedPrecondition(
                f"job '{job_id}' is {job.status.value}: only a finished job can be deleted "
                "(cancel it first)"
            )
        return job

    def view(self, job: Job) -> JobView:
        now = time.time()
        return JobView(
            id=job.id,
            model=job.model,
            status=job.status,
            request_id=job.request_id,
            attempts=job.attempts,
            age_s=max(now - job.created_at, 0.0),
            outputs=job.outputs,
            error=job.error,
            expires_in_s=None if job.expires_at is None else max(job.expires_at - now, 0.0),
            delivery=_copy(job.delivery),
            created_at=job.created_at,
            started_at=job.started_at,
            finished_at=job.finished_at,
        )

    # --- shutdown -------------------------------------------------------------------------------

    async def quiesce(self) -> None:
        """Shutdown begins: with a shared store, takes no more jobs and hands back the held ones
        that have not started, so other replicas run them now. (A private store keeps feeding:
        its queued jobs can run nowhere else.)"""
        if self.store.shared:
            await self._lanes.quiesce()

    async def abandon(self, reason: str, finish_s: float = 0.0) -> list[Job]:
        """The grace period is over. With a shared store, held jobs that have not started go
        back to it, and those running get up to finish_s to finish here first; otherwise every
        unfinished job turns FAILED (UNAVAILABLE) with the reason, so none vanishes without a
        final status. Returns the jobs affected."""
        if self.store.shared:
            return await self._lanes.finish_or_hand_back(finish_s)
        return self._lanes.fail_unfinished(reason) + await self.store.abandon(reason)

    async def recorded(self, timeout_s: float) -> bool:
        """Waits (up to timeout_s) until the outcome of every job this process held is in the
        store, where its waiters see it. True when all are."""
        deadline = time.monotonic() + timeout_s
        while self._lanes.held_count or self._short:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            if self._short:
                await asyncio.wait(list(self._short), timeout=remaining)
            else:
                await asyncio.sleep(0.005)  # a settled run's outcome is being recorded
        return True

    def close_watches(self) -> None:
        """Ends every open WatchJob with UNAVAILABLE (at shutdown, once final states are
        recorded, so a watcher of a finished job saw its end)."""
        self._closing.set()
        for task in list(self._watches):
            task.cancel()

    async def stop(self) -> None:
        """Stops the feeders and sweeper, waits briefly for results being stored, closes the
        store."""
        self.close_watches()
        self._lanes.stop()
        for task in self._tasks:
            task.cancel()
        # Bounded: a store call that drops its cancellation must not hold the shutdown.
        if self._tasks:
            _, running = await asyncio.wait(self._tasks, timeout=_STOP_S)
            if running:
                names = ", ".join(task.get_name() for task in running)
                log.warning("job tasks still running at shutdown: %s", names)
        if self._short:
            await asyncio.wait(list(self._short), timeout=_STOP_S)
        # A private store's webhooks due now (jobs that finished as the server stopped) get a
        # moment to go out: nobody else can send them.
        await self.webhooks.stop(flush_s=0.0 if self.store.shared else _STOP_S)
        await self.store.close()

    # --- housekeeping -------------------------------------------------------------------------

    async def _sweep(self) -> None:
        interval_s = min(max(self._ttl_s / 10, 0.05), 5.0)
        while True:
            await asyncio.sleep(interval_s)
            try:
                removed = await self.store.sweep()
            except Unavailable:
                continue
            if removed:
                log.debug("removed %d expired jobs", removed)

    async def _renew(self) -> None:
        """Keeps the lease on held jobs, so replicas reclaim only the jobs of a process that
        died."""
        while True:
            await asyncio.sleep(self._lease_s / 3)
            try:
                await self.store.renew(self._lanes.held_jobs())
            except Unavailable as exc:
                log.warning("job leases not renewed: %s", exc)

    def _spawn(
        self, coro: Coroutine[Any, Any, None], name: str, keep: bool = True
    ) -> asyncio.Task[None]:
        """Starts a task, kept referenced until done; failures are logged. keep: stop() cancels
        it (the long-lived feeders and sweeper)."""
        task = asyncio.create_task(coro, name=name)
        task.add_done_callback(_log_failure)
        if keep:
            self._tasks.append(task)
        else:
            self._short.add(task)
            task.add_done_callback(self._short.discard)
        return task


def _copy(delivery: Delivery | None) -> Delivery | None:
    """A snapshot of a delivery's state (the sender changes the job's own as it goes)."""
    return None if delivery is None else dataclasses.replace(delivery)


_HEX_DIGITS = frozenset("0123456789abcdef")


def _check_id(job_id: str) -> None:
    if len(job_id) != 32 or not _HEX_DIGITS.issuperset(job_id):  # one C call, not 32 steps
        raise InvalidArgument(f"job id '{job_id[:64]}' is malformed: expected 32 hex digits")


def _known(job_id: str, job: Job | None) -> Job:
    """The job, or NOT_FOUND: unknown, expired and another tenant's read alike."""
    if job is None:
        raise NotFound(f"job '{job_id}' is unknown or its result has expired")
    return job


def _log_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("task %s failed", task.get_name(), exc_info=task.exception())
