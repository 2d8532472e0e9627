"""The jobs this process runs: a lane per model, fed from the job store into the model set.

A feeder per model takes jobs from the store only while this process holds fewer than a few
batches' worth of that model's jobs (ModelSet.job_capacity), so a burst of jobs neither fills the
queue that interactive callers share nor gets refused: the rest wait in the store, where any
replica may take them. A held job's request goes to the model set; its outcome goes back to the
store, which wakes GetResult callers wherever they wait.

Failures with INTERNAL or UNAVAILABLE run again here after a backoff, up to job_max_attempts. On
shutdown a shared store gets back the held jobs that have not started (hand-back), and a job
handed back is never also finished here.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import random
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from tensorgate.server.errors import (
    Cancelled,
    Internal,
    ResourceExhausted,
    TensorgateError,
    Unavailable,
)
from tensorgate.server.futures import settle_error
from tensorgate.server.jobs.job import Job, JobStatus
from tensorgate.server.jobs.store import JobStore
from tensorgate.server.models import ModelSet
from tensorgate.server.telemetry import Telemetry
from tensorgate.server.tensors import Outputs

log = logging.getLogger(__name__)

# Pause before offering held jobs to a full model queue again.
_REQUEUE_PAUSE_S = 0.005
# Longest wait of one take() for new jobs (it returns at once when jobs are queued).
_TAKE_WAIT_S = 1.0
# Pause before asking an unreachable store again.
_STORE_RETRY_S = 0.5
# After a take from a shared store that found jobs but not a lane's worth: how long the next
# take waits for more to gather. Jobs then come several to a read and a claim (one round trip
# each) instead of one, at the cost of this much more wait for a job that arrives meanwhile.
# (An empty take blocks in the store and returns as the first job arrives: no wait when idle.)
_GATHER_S = 0.002
# At a shared store's shutdown, how long a feeder's take under way may take to finish.
_QUIESCE_S = 0.2


@dataclass(slots=True, eq=False)
class _Lane:
    """The jobs of one model that this process holds: taken from the store, not yet recorded
    as finished."""

    model: str
    # Jobs held at once: a few batches ahead of the instances.
    capacity: int
    held: dict[str, Job] = field(default_factory=dict)
    # Held jobs whose outcome is on its way to the store: they take no place ahead of the
    # instances (capacity counts the others), so a slow store does not starve the model.
    recording: int = 0
    # Held jobs waiting to enter (or, retried, re-enter) the model's queue.
    ready: collections.deque[Job] = field(default_factory=collections.deque)
    room: asyncio.Event = field(default_factory=asyncio.Event)
    pause: asyncio.TimerHandle | None = None
    # False once the model is unloaded here: its feeder stops taking jobs.
    feeding: bool = True
    feeder: asyncio.Task[None] | None = None


@dataclass(slots=True, frozen=True)
class RetryPolicy:
    """A job whose engine call fails with INTERNAL or UNAVAILABLE runs again, up to
    max_attempts in all, after exponential backoff with jitter from base_s."""

    max_attempts: int
    base_s: float


class JobLanes:
    """Feeds held jobs into the model set, records their outcomes, retries and hands back."""

    def __init__(
        self,
        models: ModelSet,
        store: JobStore,
        retry: RetryPolicy,
        telemetry: Telemetry,
        spawn: Callable[[Coroutine[Any, Any, None], str, bool], asyncio.Task[None]],
    ) -> None:
        """spawn(coro, name, keep): starts a task the service keeps referenced (keep: a
        long-lived one that stop() cancels)."""
        self._models = models
        self._store = store
        self._retry = retry
        self._tracing = telemetry.tracing
        self._metrics = telemetry.metrics
        self._spawn = spawn
        self._lanes: dict[str, _Lane] = {}
        self._feeders: list[asyncio.Task[None]] = []
        self.retrying = True  # off once the grace period is over
        self._taking = True  # off while shutting down with a shared store

    def start(self, models: list[str]) -> None:
        """A lane and its feeder for each model that takes jobs."""
        for name in models:
            lane = self._lanes.get(name)  # a model loaded again keeps its lane and held jobs
            if lane is None:
                lane = self._lanes[name] = _Lane(name, self._models.job_capacity(name))
            lane.feeding = True
            lane.feeder = self._spawn(self._feed(lane), f"job-feeder-{name}", True)
            self._feeders.append(lane.feeder)

    def serves(self, model: str) -> bool:
        return model in self._lanes and self._lanes[model].feeding

    def remove(self, model: str) -> None:
        """Stops taking the model's jobs; the held ones finish (the lane goes once they have)."""
        lane = self._lanes.get(model)
        if lane is None:
            return
        lane.feeding = False
        lane.room.set()
        if lane.feeder is not None:
            lane.feeder.cancel()
        if not lane.held:
            del self._lanes[model]

    @property
    def held_count(self) -> int:
        return sum(len(lane.held) for lane in self._lanes.values())

    def held_jobs(self) -> list[Job]:
        return [job for lane in self._lanes.values() for job in lane.held.values()]

    def held(self, job_id: str) -> Job | None:
        for lane in self._lanes.values():
            job = lane.held.get(job_id)
            if job is not None:
                return job
        return None

    # --- feeding ------------------------------------------------------------------------------

    async def _feed(self, lane: _Lane) -> None:
        while self._taking and lane.feeding:  # quiesce() (or an unload) turns it off
            room = lane.capacity - len(lane.held) + lane.recording
            if room <= 0:
                lane.room.clear()
                await lane.room.wait()
                continue
            try:
                jobs = await self._store.take(lane.model, room, _TAKE_WAIT_S)
            except Unavailable as exc:
                log.debug("jobs of %s: %s", lane.model, exc)
                await asyncio.sleep(_STORE_RETRY_S)
                continue
            for job in jobs:
                self._hold(lane, job)
            self._dispatch(lane)
            if jobs and len(jobs) < room and self._store.shared:
                await asyncio.sleep(_GATHER_S)

    def _hold(self, lane: _Lane, job: Job) -> None:
        if job.run is None:
            # Taken from a shared store: admitted where it was submitted.
            assert job.payload is not None
            try:
                job.run = self._models.admit_stored(job.payload)
            except TensorgateError as exc:
                lane.held[job.id] = job
                self._settle(lane, job, JobStatus.FAILED, error=exc)
                return
            except Exception as exc:  # a payload the model cannot take any more
                lane.held[job.id] = job
                self._settle(lane, job, JobStatus.FAILED, error=Internal(str(exc)))
                return
        job.payload = None
        job.version = job.run.target.version if job.run.target is not None else ""
        job.started = False
        if job.span is None and job.traceparent:
            job.span = self._tracing.start_remote_child(
                job.traceparent, "job", model=job.model, **{"job.id": job.id}
            )
        job.run.trace = self._tracing.request_trace(job.span, 0)
        lane.held[job.id] = job
        self._watch(job)
        lane.ready.append(job)

    def _dispatch(self, lane: _Lane) -> None:
        """Moves ready jobs into the model's queue until it is full."""
        lane.pause = None
        while lane.ready:
            job = lane.ready[0]
            request = job.run
            if request is None or request.future.done() or lane.held.get(job.id) is not job:
                lane.ready.popleft()
                continue
            try:
                self._models.enqueue(request, lane.model)
            except ResourceExhausted:
                if lane.pause is None:
                    loop = asyncio.get_running_loop()
                    lane.pause = loop.call_later(_REQUEUE_PAUSE_S, self._dispatch, lane)
                return
            except TensorgateError as exc:
                settle_error(request.future, exc)
            lane.ready.popleft()

    def _watch(self, job: Job) -> None:
        assert job.run is not None
        future = job.run.future
        job.run.on_start = lambda: _mark_started(job)
        future.add_done_callback(lambda _: self._done(job, future))

    # --- outcomes -----------------------------------------------------------------------------

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

    def record_if_done(self, job: Job) -> bool:
        """Records a held job whose run has succeeded but whose callback has not run yet; True
        if it did (so CancelJob answers with the job's real outcome)."""
        future = job.run.future if job.run is not None else None
        if future is None or not future.done() or future.cancelled() or future.exception():
            return False
        self._done(job, future)
        return True

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
        lane.recording += 1
        lane.room.set()
        self._spawn(self._record(lane, job), f"job-finished-{job.id}", False)

    async def _record(self, lane: _Lane, job: Job) -> None:
        while True:
            try:
                job = await self._store.finish(job)
                break
            except Unavailable as exc:
                if not self.retrying:
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
        lane.recording -= 1
        lane.room.set()
        if job.status.finished:  # else it was handed on: its new holder counts it
            code = job.error.code if job.error is not None else "OK"
            version = job.version
            self._metrics.request_counter(job.model, "job", code, job.tenant, version).inc()
            self._metrics.request_seconds.labels(job.model, version, "job").observe(
                max((job.finished_at or time.time()) - job.created_at, 0.0)
            )
        if job.span is not None:
            job.span.set_attribute("tensorgate.job.status", job.status.value)
            job.span.set_attribute("tensorgate.job.attempts", job.attempts)
            self._tracing.end(job.span, job.error if job.status is JobStatus.FAILED else None)

    def _retry_later(self, lane: _Lane, job: Job, error: BaseException) -> bool:
        """Schedules another run of a held job whose engine call failed, if it may have one."""
        if not (
            self.retrying
            and isinstance(error, (Internal, Unavailable))
            and job.attempts < self._retry.max_attempts
        ):
            return False
        assert job.run is not None
        job.run = self._models.again(job.run, self._tracing.request_trace(job.span, 0))
        self._watch(job)
        job.attempts += 1
        job.started = False
        job.error = error if isinstance(error, TensorgateError) else Internal(str(error))
        self._spawn(self._note_retry(job), f"job-retry-{job.id}", False)
        # Exponential backoff with full jitter on the upper half, so retries of a batch that
        # failed together do not arrive together.
        delay_s = self._retry.base_s * 2 ** (job.attempts - 2) * random.uniform(0.5, 1.0)
        log.info(
            "job %s: attempt %d failed (%s); retrying in %.3f s",
            job.id, job.attempts - 1, error, delay_s,
        )  # fmt: skip

        def requeue() -> None:
            if lane.held.get(job.id) is job and not job.status.finished:
                lane.ready.append(job)
                self._dispatch(lane)

        asyncio.get_running_loop().call_later(delay_s, requeue)
        return True

    async def _note_retry(self, job: Job) -> None:
        try:
            await self._store.retrying(job)
        except Unavailable as exc:
            log.warning("job %s: attempt not recorded: %s", job.id, exc)

    def cancelled(self, job_id: str) -> None:
        """A job was cancelled (here or by another process): if this process holds it, its
        request leaves the queue, or its result is discarded when it comes."""
        job = self.held(job_id)
        if job is None or job.status.finished or job.run is None:
            return
        job.run.future.cancel()
        self._done(job, job.run.future)

    # --- shutdown -------------------------------------------------------------------------------

    async def quiesce(self) -> None:
        """Takes no more jobs and hands the held ones that have not started back to the store,
        so other replicas run them now (a shared store only)."""
        self._taking = False
        for lane in self._lanes.values():
            lane.room.set()
        # A take under way is let finish, so the jobs it claims are held and handed back below
        # (cancelled mid-claim, they would wait out their lease); one still waiting for jobs
        # after a moment is cancelled.
        feeders = [task for task in self._feeders if not task.done()]
        if feeders:
            _, waiting = await asyncio.wait(feeders, timeout=_QUIESCE_S)
            for task in waiting:
                task.cancel()
            await asyncio.gather(*feeders, return_exceptions=True)
        held = self.held_jobs()
        log.info("stopping: %d job(s) held here, %d of them started",
                 len(held), sum(job.started for job in held))  # fmt: skip
        await self.hand_back(started=False)

    def fail_unfinished(self, reason: str) -> list[Job]:
        """Fails every held job not finished yet with UNAVAILABLE (a private store at the end of
        the grace period); returns them."""
        self.retrying = False
        left: list[Job] = []
        for lane in self._lanes.values():
            for job in list(lane.held.values()):
                if job.run is not None and settle_error(job.run.future, Unavailable(reason)):
                    left.append(job)
        return left

    async def finish_or_hand_back(self, finish_s: float) -> list[Job]:
        """The grace period is over (a shared store): held jobs that have not started go back at
        once; those on an instance get up to finish_s more to finish here (one handed back
        mid-run would run twice), and only what is still running then goes back."""
        self.retrying = False
        handed = await self.hand_back(started=False)
        deadline = time.monotonic() + finish_s
        while self.held_count:
            if time.monotonic() >= deadline:
                return handed + await self.hand_back(started=None)
            await asyncio.sleep(0.005)
        return handed

    async def hand_back(self, started: bool | None) -> list[Job]:
        """Returns held, unfinished jobs to the shared store: those not started (started=False),
        or all (None). A job whose run already ended is recorded instead, never handed back."""
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
                    await self._store.release(jobs, started=ran)
                except Unavailable as exc:
                    log.warning(
                        "%d job(s) not handed back (%s): their lease expires", len(jobs), exc
                    )
        return handed[True] + handed[False]

    def stop(self) -> None:
        self.retrying = False
        self._taking = False  # a feeder whose cancellation take() dropped ends at its loop's test


def _mark_started(job: Job) -> None:
    job.started = True
