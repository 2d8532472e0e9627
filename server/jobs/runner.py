"""Runs jobs through the same model schedulers as unary and stream traffic.

Submit hands a validated job to the store (store.py: this process's memory, or Redis shared by
replicas). A feeder per model takes jobs from the store only while this process holds fewer
than a few batches' worth of that model's jobs, so a burst of jobs neither fills the queue that
interactive callers share nor gets refused: the rest wait in the store, where any replica may take
them. A held job goes to the model's scheduler; its outcome goes back to the store, which wakes
GetResult callers wherever they wait.

Failures with INTERNAL or UNAVAILABLE run again here after a backoff, up to job_max_attempts. On
shutdown a shared store gets back the held jobs that have not started; the rest finish within
the grace period.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import random
import secrets
import time
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from typing import Any

from opentelemetry.trace import Span

from tensorgate.server.batching.request import InferenceRequest
from tensorgate.server.config import ServerConfig
from tensorgate.server.errors import (
    Cancelled,
    Internal,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    TensorgateError,
    Unavailable,
)
from tensorgate.server.futures import settle_error
from tensorgate.server.jobs.job import Job, JobStatus
from tensorgate.server.jobs.store import JobStore
from tensorgate.server.model import ServedModel
from tensorgate.server.records import JobView, Request
from tensorgate.server.telemetry import Telemetry
from tensorgate.server.tensors import Outputs

log = logging.getLogger(__name__)

# Pause before offering held jobs to a full model queue again.
_REQUEUE_PAUSE_S = 0.005
# Longest wait of one take() for new jobs (it returns at once when jobs are queued).
_TAKE_WAIT_S = 1.0
# Pause before asking an unreachable store again.
_STORE_RETRY_S = 0.5
# The longest stop() waits for the feeders, sweeper and lease renewal to end.
_STOP_S = 2.0


@dataclass(slots=True, eq=False)
class _Lane:
    """The jobs of one model that this process holds: taken from the store, not yet recorded
    as finished."""

    model: ServedModel
    # Jobs held at once: a few batches ahead of the instances.
    capacity: int
    held: dict[str, Job] = field(default_factory=dict)
    # Held jobs waiting to enter (or, retried, re-enter) the model's scheduler.
    ready: collections.deque[Job] = field(default_factory=collections.deque)
    room: asyncio.Event = field(default_factory=asyncio.Event)
    pause: asyncio.TimerHandle | None = None


class JobRunner:
    """Submit, GetResult (long-poll), CancelJob and ListJobs over a JobStore, and the running of
    the jobs this process takes."""

    def __init__(
        self,
        models: Mapping[str, ServedModel],
        store: JobStore,
        config: ServerConfig,
        telemetry: Telemetry | None = None,
        on_available: Callable[[bool], None] | None = None,
    ) -> None:
        self._models = models
        self.store = store
        self._ttl_s = config.job_ttl_s
        self._max_wait_s = config.max_result_wait_s
        self._max_attempts = config.job_max_attempts
        self._retry_base_s = config.job_retry_base_s
        self._lease_s = config.job_lease_s
        self._on_available = on_available or (lambda _: None)
        self._retrying = True  # off once the grace period is over
        self._taking = True  # off while shutting down with a shared store
        telemetry = telemetry or Telemetry.quiet()
        self._tracing = telemetry.tracing
        self._metrics = telemetry.metrics
        self._lanes: dict[str, _Lane] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._feeders: list[asyncio.Task[None]] = []
        self._short: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        """Opens the store, starts a feeder for every ready model, and the sweeper of expired
        jobs (and, with a shared store, the renewal of held jobs' leases)."""
        ready = [model for model in self._models.values() if model.ready]
        await self.store.open([m.name for m in ready], self._on_available, self._cancelled)
        for model in ready:
            capacity = 2 * model.max_batch_size * model.config.instance_count
            lane = self._lanes[model.name] = _Lane(model, capacity)
            self._feeders.append(self._spawn(self._feed(lane), f"job-feeder-{model.name}"))
        self._spawn(self._sweep(), "job-sweeper")
        if self.store.shared:
            self._spawn(self._renew(), "job-lease-renewal")

    @property
    def unfinished(self) -> int:
        """Jobs this process must finish before it stops: those it holds, and those queued that
        no other process can run."""
        return sum(len(lane.held) for lane in self._lanes.values()) + self.store.queued_here()

    # --- the API ------------------------------------------------------------------------------

    async def submit(
        self,
        model: ServedModel,
        payload: Request,
        request: InferenceRequest,
        idempotency_key: str = "",
        span: Span | None = None,
    ) -> tuple[Job, bool, float]:
        """Accepts a validated request as a job; returns (job, deduplicated, estimated wait s).
        request: the payload validated by model.new_request (the run itself, unless the store
        hands the job to another process)."""
        if model.name not in self._lanes:
            request.future.cancel()
            raise Unavailable(f"model '{model.name}' does not take jobs now")
        job = Job(
            id=secrets.token_hex(16),
            model=model.name,
            tenant=payload.tenant,
            idempotency_key=idempotency_key,
            request_id=payload.id,
            created_at=time.time(),
            payload=payload,
            run=None if self.store.shared else request,
        )
        if self.store.shared:
            request.future.cancel()  # whichever process takes the job validates it again
            job.traceparent = self._tracing.traceparent(span)
        rows = request.rows
        try:
            stored, deduplicated, ahead = await self.store.add(job)
        except TensorgateError:
            request.future.cancel()
            raise
        if deduplicated:
            request.future.cancel()
            return stored, True, self._estimate(stored.model, 0)
        if not self.store.shared:
            job.span = self._tracing.start_child(
                span, "job", model=model.name, **{"job.id": job.id}
            )
        # The unfinished jobs ahead are counted at this one's size (those already in the model's
        # queue twice over: an estimate that errs long).
        return job, False, self._estimate(model.name, (ahead + 1) * rows)

    async def get(self, job_id: str, tenant: str = "", wait_s: float = 0.0) -> Job:
        """The job; with wait_s > 0, waits (up to max_result_wait_s) for it to finish first."""
        if wait_s <= 0:
            return await self._find(job_id, tenant)
        _check_id(job_id)
        return _known(job_id, await self.store.wait(job_id, tenant, min(wait_s, self._max_wait_s)))

    async def cancel(self, job_id: str, tenant: str = "") -> Job:
        """Cancels an unfinished job wherever it is. The answer is the job's final word: a job
        that finished first keeps its outcome; one cancelled while its batch runs stays
        CANCELLED and its result is discarded."""
        _check_id(job_id)
        held = self._held(job_id)
        if held is not None and held.tenant == tenant and held.run is not None:
            future = held.run.future
            if future.done() and not future.cancelled() and future.exception() is None:
                # It succeeded, and the callback recording that has not run yet: record it now.
                self._done(held, future)
                return held
        job = _known(job_id, await self.store.cancel(job_id, tenant))
        if held is not None and held.tenant == tenant:
            self._cancelled(job_id)
            return held if job.status is JobStatus.RUNNING else job
        return job

    async def find(
        self, status: JobStatus | None = None, limit: int = 100, tenant: str = ""
    ) -> list[Job]:
        """Jobs for operators: status FAILED lists the dead letters (retries exhausted)."""
        return await self.store.find(status, limit, tenant)

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
        )

    async def _find(self, job_id: str, tenant: str) -> Job:
        _check_id(job_id)
        return _known(job_id, await self.store.get(job_id, tenant))

    def _held(self, job_id: str) -> Job | None:
        for lane in self._lanes.values():
            job = lane.held.get(job_id)
            if job is not None:
                return job
        return None

    def _estimate(self, model_name: str, rows: int) -> float:
        lane = self._lanes.get(model_name)
        return 0.0 if lane is None else lane.model.estimated_wait_s(extra_rows=rows)

    # --- running held jobs --------------------------------------------------------------------

    async def _feed(self, lane: _Lane) -> None:
        name = lane.model.name
        while self._taking:  # quiesce() turns it off (a cancellation alone may be swallowed)
            room = lane.capacity - len(lane.held)
            if room <= 0:
                lane.room.clear()
                await lane.room.wait()
                continue
            try:
                jobs = await self.store.take(name, room, _TAKE_WAIT_S)
            except Unavailable as exc:
                log.debug("jobs of %s: %s", name, exc)
                await asyncio.sleep(_STORE_RETRY_S)
                continue
            for job in jobs:
                self._hold(lane, job)
            self._dispatch(lane)

    def _hold(self, lane: _Lane, job: Job) -> None:
        if job.run is None:
            assert job.payload is not None
            try:
                job.run = lane.model.new_request(job.payload, job=True)
            except TensorgateError as exc:
                lane.held[job.id] = job
                self._settle(lane, job, JobStatus.FAILED, error=exc)
                return
        job.payload = None
        job.started = False
        if job.span is None and job.traceparent:
            job.span = self._tracing.start_remote_child(
                job.traceparent, "job", model=job.model, **{"job.id": job.id}
            )
        job.run.trace = self._tracing.request_trace(job.span, 0)
        lane.held[job.id] = job
        self._watch(job, job.run)
        lane.ready.append(job)

    def _dispatch(self, lane: _Lane) -> None:
        """Moves ready jobs into the model's scheduler until it is full."""
        lane.pause = None
        while lane.ready:
            job = lane.ready[0]
            request = job.run
            if request is None or request.future.done() or lane.held.get(job.id) is not job:
                lane.ready.popleft()
                continue
            try:
                lane.model.scheduler.put(request)
            except ResourceExhausted:
                if lane.pause is None:
                    loop = asyncio.get_running_loop()
                    lane.pause = loop.call_later(_REQUEUE_PAUSE_S, self._dispatch, lane)
                return
            except TensorgateError as exc:
                settle_error(request.future, exc)
            lane.ready.popleft()

    def _watch(self, job: Job, request: InferenceRequest) -> None:
        request.on_start = lambda: _mark_started(job)
        request.future.add_done_callback(lambda future: self._done(job, future))

    def _done(self, job: Job, future: asyncio.Future[Outputs]) -> None:
        lane = self._lanes.get(job.model)
        if lane is None or lane.held.get(job.id) is not job or job.status.finished:
            return  # handed back, or already recorded
        if job.run is None or future is not job.run.future:
            return  # an earlier attempt's
        error = None if future.cancelled() else future.exception()
        if error is not None and self._retry_later(lane, job, error):
            return
        if future.cancelled():
            self._settle(lane, job, JobStatus.CANCELLED, error=Cancelled("the job was cancelled"))
        elif error is not None:
            error = error if isinstance(error, TensorgateError) else Internal(str(error))
            self._settle(lane, job, JobStatus.FAILED, error=error)
        else:
            # Copies, so a kept result does not pin the whole batch's output arrays.
            outputs = {name: array.copy() for name, array in future.result().items()}
            self._settle(lane, job, JobStatus.SUCCEEDED, outputs=outputs)

    def _settle(
        self,
        lane: _Lane,
        job: Job,
        status: JobStatus,
        outputs: Outputs | None = None,
        error: TensorgateError | None = None,
    ) -> None:
        """Sets a held job's outcome here, then records it in the store (which may overrule it
        with a cancellation from elsewhere)."""
        job.status, job.outputs, job.error = status, outputs, error
        job.finished_at = time.time()
        job.run = None  # the request's inputs and futures are no longer needed
        self._spawn(self._record(lane, job), f"job-finished-{job.id}", keep=False)

    async def _record(self, lane: _Lane, job: Job) -> None:
        while True:
            try:
                job = await self.store.finish(job)
                break
            except Unavailable as exc:
                if not self._retrying:
                    log.warning(
                        "job %s: result not stored (%s); another replica reruns it", job.id, exc
                    )
                    break
                log.warning("job %s: cannot store the result yet: %s", job.id, exc)
                await asyncio.sleep(_STORE_RETRY_S)
            except Exception:
                # Not worth retrying; a shared store's lease hands the job to another replica.
                log.exception("job %s: storing its result failed", job.id)
                break
        lane.held.pop(job.id, None)
        lane.room.set()
        if job.status.finished:  # else it was handed on: its new holder counts it
            code = job.error.code if job.error is not None else "OK"
            self._metrics.request_counter(job.model, "job", code, job.tenant).inc()
            self._metrics.request_seconds.labels(job.model, "job").observe(
                max((job.finished_at or time.time()) - job.created_at, 0.0)
            )
        if job.span is not None:
            job.span.set_attribute("tensorgate.job.status", job.status.value)
            job.span.set_attribute("tensorgate.job.attempts", job.attempts)
            self._tracing.end(job.span, job.error if job.status is JobStatus.FAILED else None)

    def _retry_later(self, lane: _Lane, job: Job, error: BaseException) -> bool:
        """Schedules another run of a held job whose engine call failed, if it may have one."""
        if not (
            self._retrying
            and isinstance(error, (Internal, Unavailable))
            and job.attempts < self._max_attempts
        ):
            return False
        assert job.run is not None
        loop = asyncio.get_running_loop()
        job.run = dataclasses.replace(
            job.run,
            future=loop.create_future(),
            queued=False,
            on_start=None,
            trace=self._tracing.request_trace(job.span, 0),
        )
        self._watch(job, job.run)
        job.attempts += 1
        job.started = False
        job.error = error if isinstance(error, TensorgateError) else Internal(str(error))
        self._spawn(self._note_retry(job), f"job-retry-{job.id}", keep=False)
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
            if lane.held.get(job.id) is job and not job.status.finished:
                lane.ready.append(job)
                self._dispatch(lane)

        loop.call_later(delay_s, requeue)
        return True

    async def _note_retry(self, job: Job) -> None:
        try:
            await self.store.retrying(job)
        except Unavailable as exc:
            log.warning("job %s: attempt not recorded: %s", job.id, exc)

    def _cancelled(self, job_id: str) -> None:
        """A job was cancelled (here or by another process): if this process holds it, its
        request leaves the queue, or its result is discarded when it comes."""
        job = self._held(job_id)
        if job is None or job.status.finished or job.run is None:
            return
        job.run.future.cancel()
        self._done(job, job.run.future)

    # --- shutdown -------------------------------------------------------------------------------

    async def quiesce(self) -> None:
        """Shutdown begins: with a shared store, takes no more jobs and hands back the held ones
        that have not started, so other replicas run them now. (A private store keeps feeding:
        its queued jobs can run nowhere else.)"""
        if not self.store.shared:
            return
        self._taking = False
        for lane in self._lanes.values():
            lane.room.set()
        for task in self._feeders:
            task.cancel()
        await asyncio.gather(*self._feeders, return_exceptions=True)
        await self._hand_back(started=False)

    async def abandon(self, reason: str, finish_s: float = 0.0) -> list[Job]:
        """The grace period is over. With a shared store, held jobs that have not started go
        back to it; those running on an instance get up to finish_s more to finish here (a job
        handed back mid-run would run twice), and only what is still running then is handed
        back. Otherwise every unfinished job turns FAILED (UNAVAILABLE) with the reason, so none
        vanishes without a final status. Returns the jobs affected."""
        self._retrying = False
        if self.store.shared:
            handed = await self._hand_back(started=False)
            deadline = time.monotonic() + finish_s
            while any(lane.held for lane in self._lanes.values()):
                if time.monotonic() >= deadline:
                    return handed + await self._hand_back(started=None)
                await asyncio.sleep(0.005)
            return handed
        left: list[Job] = []
        for lane in self._lanes.values():
            for job in list(lane.held.values()):
                if job.run is not None and settle_error(job.run.future, Unavailable(reason)):
                    left.append(job)
        return left + await self.store.abandon(reason)

    async def recorded(self, timeout_s: float) -> bool:
        """Waits (up to timeout_s) until the outcome of every job this process held is in the
        store, where its waiters see it. True when all are."""
        deadline = time.monotonic() + timeout_s
        while any(lane.held for lane in self._lanes.values()) or self._short:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            if self._short:
                await asyncio.wait(list(self._short), timeout=remaining)
            else:
                await asyncio.sleep(0.005)  # a settled run's outcome is being recorded
        return True

    async def _hand_back(self, started: bool | None) -> list[Job]:
        """Returns held, unfinished jobs to the shared store: those not started (started=False),
        or all (None)."""
        handed: dict[bool, list[Job]] = {True: [], False: []}
        for lane in self._lanes.values():
            for job in list(lane.held.values()):
                if job.status.finished or (started is False and job.started):
                    continue
                if job.run is not None and job.run.future.done():
                    # It ran here (its outcome's callback has not run yet): record it, never
                    # hand it back as well.
                    self._done(job, job.run.future)
                    continue
                del lane.held[job.id]
                handed[job.started].append(job)
                if job.run is not None:
                    job.run.future.cancel()  # leaves the queue; its outcome is not recorded
                    job.run = None
            lane.room.set()
        for ran, jobs in handed.items():
            if jobs:
                try:
                    await self.store.release(jobs, started=ran)
                except Unavailable as exc:
                    log.warning(
                        "%d job(s) not handed back (%s): their lease expires", len(jobs), exc
                    )
        return handed[True] + handed[False]

    async def stop(self) -> None:
        """Stops the feeders and sweeper, waits briefly for results being stored, closes the
        store."""
        self._retrying = False
        self._taking = False  # a feeder whose cancellation take() dropped ends at its loop's test
        for task in self._tasks:
            task.cancel()
        # Bounded: a store call that drops its cancellation must not hold the shutdown.
        if self._tasks:
            _, running = await asyncio.wait(self._tasks, timeout=_STOP_S)
            if running:
                names = ", ".join(task.get_name() for task in running)
                log.warning("job tasks still running at shutdown: %s", names)
        if self._short:
            await asyncio.wait(list(self._short), timeout=2.0)
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
            held = [job for lane in self._lanes.values() for job in lane.held.values()]
            try:
                await self.store.renew(held)
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


def _check_id(job_id: str) -> None:
    if len(job_id) != 32 or not all(c in "0123456789abcdef" for c in job_id):
        raise InvalidArgument(f"job id '{job_id[:64]}' is malformed: expected 32 hex digits")


def _known(job_id: str, job: Job | None) -> Job:
    """The job, or NOT_FOUND: unknown, expired and another tenant's read alike."""
    if job is None:
        raise NotFound(f"job '{job_id}' is unknown or its result has expired")
    return job


def _mark_started(job: Job) -> None:
    job.started = True


def _log_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("task %s failed", task.get_name(), exc_info=task.exception())
