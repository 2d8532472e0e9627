"""Where jobs are kept: the JobStore seam, and the in-memory store (the default).

The store owns a job's life outside the engine: it accepts it (idempotency, the pending bound),
queues it until a process takes it to run, records attempts and the final state, wakes whoever
waits for it, and forgets it when its result expires. The job service's lanes (lanes.py) take
jobs from the store and queue them through the model set.

Two stores implement it: MemoryJobStore (this process only) and RedisJobStore (redis_store.py:
shared by replicas, outlives a process).

The memory store keeps finished jobs in finish order, so expiry (TTL) and the bound on stored
jobs both remove the oldest finished ones first, without scanning the unfinished.
"""

from __future__ import annotations

import asyncio
import collections
import heapq
import itertools
import time
from collections.abc import AsyncIterator, Callable
from typing import Protocol

from tensorgate.server.errors import Cancelled, ResourceExhausted, Unavailable
from tensorgate.server.jobs.job import Job, JobStatus
from tensorgate.server.records import Cursor, Delivery, DeliveryState, JobEvent


class JobStore(Protocol):
    # True when other processes share the jobs: a job this process took but has not started may
    # be handed back at shutdown instead of failing.
    shared: bool
    # False while the store cannot be reached (a health service name reports it).
    available: bool
    # Set when this process recorded a final state that has a webhook to deliver (the deliverer
    # also polls, for deliveries due elsewhere or later).
    deliveries_due: asyncio.Event

    async def open(
        self,
        models: list[str],
        on_available: Callable[[bool], None],
        on_cancelled: Callable[[str], None],
    ) -> None:
        """Connects and prepares queues for these models. From then on on_available hears
        availability changes, and on_cancelled the id of each job cancelled (by any process)."""
        ...

    async def close(self) -> None: ...

    async def add_model(self, model: str) -> None:
        """Prepares the queue of a model that came to be served after open()."""
        ...

    async def add(self, job: Job) -> tuple[Job, bool, int]:
        """Stores and queues a new job: (job, False, unfinished jobs of its model before it).
        When its idempotency key already names a live job of the same tenant, stores nothing:
        (that job, True, 0). Atomic. Raises ResourceExhausted beyond the pending bound,
        Unavailable when the store is unreachable."""
        ...

    async def take(self, model: str, limit: int, wait_s: float) -> list[Job]:
        """Up to `limit` queued jobs of the model for this process to run, marked RUNNING with
        their attempt counted; waits up to wait_s for one when none is queued. Jobs are given with
        their payload (the Request to run)."""
        ...

    async def renew(self, jobs: list[Job]) -> None:
        """This process still holds these jobs (keeps their lease)."""
        ...

    async def retrying(self, job: Job) -> None:
        """A held job failed and runs again here (job.attempts and job.error are set)."""
        ...

    async def finish(self, job: Job) -> Job:
        """Records a held job's final state and wakes its waiters. Returns the final word: a job
        cancelled meanwhile (by any process) stays CANCELLED and its result is discarded."""
        ...

    async def release(self, jobs: list[Job], started: bool) -> None:
        """Hands held, unfinished jobs back to the queue for another process (shutdown). started:
        they ran (their attempt stays counted)."""
        ...

    async def abandon(self, reason: str) -> list[Job]:
        """At shutdown: the queued jobs that no process will run now turn FAILED (UNAVAILABLE)
        with the reason; returns them. A shared store has none: other processes run them."""
        ...

    async def cancel(self, job_id: str, tenant: str = "") -> Job | None:
        """Marks an unfinished job CANCELLED (a queued one then never runs); returns the job as it
        now stands, or None when unknown."""
        ...

    async def get(self, job_id: str, tenant: str = "") -> Job | None:
        """The live job with that id and tenant, or None (unknown, expired, or another's)."""
        ...

    async def wait(self, job_id: str, tenant: str, timeout_s: float) -> Job | None:
        """The live job with that id and tenant once it has finished, or as it is when timeout_s
        has passed; None when unknown (as get())."""
        ...

    def events(self, job_id: str, tenant: str) -> AsyncIterator[JobEvent]:
        """The live job's state now, then each change as it happens (from any process), ending
        after the final one; nothing when the job is unknown (as get())."""
        ...

    async def find(
        self, status: JobStatus | None, limit: int, tenant: str = "", after: Cursor | None = None
    ) -> list[Job]:
        """Up to `limit` live jobs with that status (any for None), newest first (by creation
        time, then id); with `after`, those that come after it in that order (the next page)."""
        ...

    async def delete(self, job_id: str, tenant: str = "") -> Job | None:
        """Forgets a finished job at once (its result, its record); returns it as it was. An
        unfinished job is returned unchanged, not forgotten. None when unknown."""
        ...

    async def due_deliveries(self, limit: int, lease_s: float) -> list[Job]:
        """Up to `limit` finished jobs whose webhook is due now, each with its callback, delivery
        state and (when the callback asks for it) outputs. They are this process's to attempt for
        lease_s; past it, any process may take them again (at least once)."""
        ...

    async def record_delivery(self, job: Job, next_at: float | None) -> None:
        """The outcome of an attempt (job.delivery as it now stands): next_at, when to try again
        (wall clock); None when it is settled (delivered, or dead-lettered)."""
        ...

    def queued_here(self) -> int:
        """Queued jobs that only this process can run (none, for a shared store)."""
        ...

    def count_by_status(self) -> dict[str, int]:
        """Jobs kept, by status name (read by the metrics scrape, from another thread)."""
        ...

    async def sweep(self) -> int:
        """Removes expired jobs; returns how many."""
        ...


class MemoryJobStore:
    """Holds the jobs of this process: every unfinished job, and finished ones until they expire
    or until more than max_finished are kept."""

    shared = False
    available = True

    def __init__(
        self, max_pending: int, ttl_s: float, max_finished: int = 100_000, max_per_tenant: int = 0
    ) -> None:
        self._jobs: dict[str, Job] = {}
        self._by_key: dict[tuple[str, str], Job] = {}
        self._finished: collections.OrderedDict[str, Job] = collections.OrderedDict()
        self._queues: dict[str, collections.deque[Job]] = collections.defaultdict(collections.deque)
        self._arrived: dict[str, asyncio.Event] = collections.defaultdict(asyncio.Event)
        self._max_pending = max_pending
        self._ttl_s = ttl_s
        self._max_finished = max_finished
        self.unfinished = 0
        self._unfinished_by_model: collections.Counter[str] = collections.Counter()
        self._unfinished_by_tenant: collections.Counter[str] = collections.Counter()
        self._max_per_tenant = max_per_tenant
        self._queued = 0
        # Watchers by job id: each a queue of the job's events.
        self._watchers: dict[str, list[asyncio.Queue[JobEvent]]] = {}
        # Webhooks to attempt: (due at, tie-breaker, job id).
        self._due: list[tuple[float, int, str]] = []
        self._due_order = itertools.count()
        self.deliveries_due = asyncio.Event()

    async def open(
        self,
        models: list[str],
        on_available: Callable[[bool], None],
        on_cancelled: Callable[[str], None],
    ) -> None:
        on_available(True)  # held jobs are cancelled by the job lanes themselves

    async def close(self) -> None:
        pass

    async def add_model(self, model: str) -> None:
        pass

    async def add(self, job: Job) -> tuple[Job, bool, int]:
        key = (job.tenant, job.idempotency_key)
        if job.idempotency_key:
            existing = self._by_key.get(key)
            if existing is not None and not _expired(existing, time.time()):
                return existing, True, 0
        if self.unfinished >= self._max_pending:
            raise ResourceExhausted(
                f"{self.unfinished} jobs are pending, the limit is {self._max_pending}; "
                "retry later",
                retry_after_s=1.0,
            )
        held = self._unfinished_by_tenant[job.tenant]
        if self._max_per_tenant and held >= self._max_per_tenant:
            raise ResourceExhausted(_over_tenant_limit(job.tenant, held), retry_after_s=1.0)
        if job.idempotency_key:
            self._by_key[key] = job
        self._jobs[job.id] = job
        self.unfinished += 1
        self._unfinished_by_tenant[job.tenant] += 1
        ahead = self._unfinished_by_model[job.model]
        self._unfinished_by_model[job.model] += 1
        self._queues[job.model].append(job)
        self._queued += 1
        self._arrived[job.model].set()
        if job.callback is not None:
            job.delivery = Delivery()
        return job, False, ahead

    async def take(self, model: str, limit: int, wait_s: float) -> list[Job]:
        queue = self._queues[model]
        if not queue and wait_s > 0:
            arrived = self._arrived[model]
            arrived.clear()
            try:
                async with asyncio.timeout(wait_s):
                    await arrived.wait()
            except TimeoutError:
                pass
        taken: list[Job] = []
        while queue and len(taken) < limit:
            job = queue.popleft()
            self._queued -= 1
            if job.status is JobStatus.PENDING:  # a cancelled one is skipped
                job.status = JobStatus.RUNNING
                job.attempts += 1
                if job.started_at is None:
                    job.started_at = time.time()
                taken.append(job)
                self._changed(job)
        return taken

    async def renew(self, jobs: list[Job]) -> None:
        pass

    async def retrying(self, job: Job) -> None:
        self._changed(job, retry=True)

    async def finish(self, job: Job) -> Job:
        if job.status.finished and job.finished.is_set():
            return job  # cancelled through the store first: that is the final word
        self._settle(job)
        return job

    async def release(self, jobs: list[Job], started: bool) -> None:
        """Not shared: nobody else could run them. They stay held here."""

    async def abandon(self, reason: str) -> list[Job]:
        failed = []
        for queue in self._queues.values():
            while queue:
                job = queue.popleft()
                self._queued -= 1
                if job.status is JobStatus.PENDING:
                    job.status = JobStatus.FAILED
                    job.error = Unavailable(reason)
                    job.finished_at = time.time()
                    self._settle(job)
                    failed.append(job)
        return failed

    async def cancel(self, job_id: str, tenant: str = "") -> Job | None:
        job = await self.get(job_id, tenant)
        if job is None or job.status.finished:
            return job
        if job.status is JobStatus.PENDING:  # still queued: it never runs
            job.status = JobStatus.CANCELLED
            job.error = Cancelled("the job was cancelled")
            job.finished_at = time.time()
            self._settle(job)
        return job

    def _settle(self, job: Job) -> None:
        if job.delivery is not None:
            self._schedule(job.id, time.time())
            self.deliveries_due.set()
        self._changed(job)
        job.expires_at = (job.finished_at or time.time()) + self._ttl_s
        job.payload = None
        job.run = None
        self.unfinished -= 1
        self._unfinished_by_model[job.model] -= 1
        self._unfinished_by_tenant[job.tenant] -= 1
        self._finished[job.id] = job
        while len(self._finished) > self._max_finished:
            _, oldest = self._finished.popitem(last=False)
            self._remove(oldest)
        job.finished.set()

    async def get(self, job_id: str, tenant: str = "") -> Job | None:
        job = self._jobs.get(job_id)
        if job is None or job.tenant != tenant or _expired(job, time.time()):
            return None
        return job

    async def wait(self, job_id: str, tenant: str, timeout_s: float) -> Job | None:
        job = await self.get(job_id, tenant)
        if job is not None and timeout_s > 0 and not job.finished.is_set():
            try:
                async with asyncio.timeout(timeout_s):
                    await job.finished.wait()
            except TimeoutError:
                pass
        return job

    def _changed(self, job: Job, retry: bool = False) -> None:
        """Tells the job's watchers (if any) of its state now."""
        queues = self._watchers.get(job.id)
        if queues:
            event = _event(job, retry)
            for queue in queues:
                queue.put_nowait(event)

    async def events(self, job_id: str, tenant: str) -> AsyncIterator[JobEvent]:
        job = await self.get(job_id, tenant)
        if job is None:
            return
        queue: asyncio.Queue[JobEvent] = asyncio.Queue()
        queues = self._watchers.setdefault(job_id, [])
        queues.append(queue)
        try:
            event = _event(job, retry=False, snapshot=True)
            while True:
                yield event
                if event.final:
                    return
                event = await queue.get()
        finally:
            queues.remove(queue)
            if not queues:
                del self._watchers[job_id]

    async def find(
        self, status: JobStatus | None, limit: int, tenant: str = "", after: Cursor | None = None
    ) -> list[Job]:
        # Jobs are kept in the order they were added, so walking backwards is newest first and
        # stops once `limit` matches are found and older jobs cannot sort before them: no sort of
        # the whole store on the event loop.
        now = time.time()
        found: list[Job] = []
        for job in reversed(self._jobs.values()):
            if len(found) >= limit and job.created_at < found[-1].created_at:
                break
            if (
                (status is None or job.status is status)
                and job.tenant == tenant
                and (after is None or (job.created_at, job.id) < after)
                and not _expired(job, now)
            ):
                found.append(job)
        found.sort(key=lambda job: (job.created_at, job.id), reverse=True)
        return found[:limit]

    async def delete(self, job_id: str, tenant: str = "") -> Job | None:
        job = await self.get(job_id, tenant)
        if job is not None and job.status.finished:
            self._finished.pop(job_id, None)
            self._remove(job)
        return job

    # --- webhooks ---------------------------------------------------------------------------

    def _schedule(self, job_id: str, at: float) -> None:
        heapq.heappush(self._due, (at, next(self._due_order), job_id))

    async def due_deliveries(self, limit: int, lease_s: float) -> list[Job]:
        now = time.time()
        due: list[Job] = []
        while self._due and self._due[0][0] <= now and len(due) < limit:
            _, _, job_id = heapq.heappop(self._due)
            job = self._jobs.get(job_id)
            delivery = job.delivery if job is not None else None
            if delivery is not None and delivery.state is DeliveryState.PENDING:
                due.append(job)  # type: ignore[arg-type]  # job is not None with a delivery
        return due

    async def record_delivery(self, job: Job, next_at: float | None) -> None:
        if next_at is not None and job.id in self._jobs:
            self._schedule(job.id, next_at)

    def queued_here(self) -> int:
        return self._queued

    def count_by_status(self) -> dict[str, int]:
        counts = dict.fromkeys((s.value for s in JobStatus), 0)
        for job in list(self._jobs.values()):
            counts[job.status.value] += 1
        return counts

    async def sweep(self) -> int:
        now = time.time()
        removed = 0
        while self._finished:
            job = next(iter(self._finished.values()))
            if not _expired(job, now):
                break  # every later one finished later, so expires later
            self._finished.popitem(last=False)
            self._remove(job)
            removed += 1
        return removed

    def _remove(self, job: Job) -> None:
        self._jobs.pop(job.id, None)
        key = (job.tenant, job.idempotency_key)
        if job.idempotency_key and self._by_key.get(key) is job:
            del self._by_key[key]


def _event(job: Job, retry: bool, snapshot: bool = False) -> JobEvent:
    """The job's state as an event: a change happening now, or (snapshot) the state it is in,
    timed when it began."""
    at = time.time()
    if snapshot:
        at = job.finished_at or job.started_at or job.created_at
    return JobEvent(
        job_id=job.id,
        model=job.model,
        status=job.status,
        attempt=job.attempts,
        at=at,
        error=job.error if job.status.finished or retry else None,
        retry=retry,
    )


def _over_tenant_limit(tenant: str, held: int) -> str:
    return (
        f"tenant '{tenant}' has {held} unfinished jobs, its limit "
        "(--max-pending-jobs-per-tenant); retry later"
    )


def _expired(job: Job, now: float) -> bool:
    return job.expires_at is not None and job.expires_at <= now
