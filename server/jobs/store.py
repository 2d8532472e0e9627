"""Where jobs are kept: the JobStore seam, and the in-memory store (the default).

The runner owns running jobs; the store owns finding them again: by id, by idempotency key, by
status, and waking whoever waits for one to finish. A store shared by replicas (Redis) plugs in
behind the same interface.

The memory store keeps finished jobs in finish order, so expiry (TTL) and the bound on stored
jobs both remove the oldest finished ones first, without scanning the unfinished.
"""

from __future__ import annotations

import asyncio
import collections
import time
from typing import Protocol

from server.jobs.job import Job, JobStatus


class JobStore(Protocol):
    async def add(self, job: Job) -> Job:
        """Stores a new job. When its idempotency key already names a live job of the same
        tenant, stores nothing and returns that job instead (atomically)."""
        ...

    async def get(self, job_id: str, tenant: str = "") -> Job | None:
        """The live job with that id and tenant, or None (unknown, expired, or another's)."""
        ...

    async def by_key(self, key: str, tenant: str = "") -> Job | None: ...

    async def wait(self, job: Job, timeout_s: float) -> Job:
        """The job once finished, or as it is when timeout_s has passed."""
        ...

    async def finished(self, job: Job) -> None:
        """Records a job's final state (it is kept until it expires or is evicted)."""
        ...

    async def find(self, status: JobStatus | None, limit: int, tenant: str = "") -> list[Job]:
        """Up to `limit` live jobs with that status (any for None), newest first."""
        ...

    def unfinished(self) -> list[Job]:
        """This process's jobs that have not finished."""
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

    def __init__(self, max_finished: int = 100_000) -> None:
        self._jobs: dict[str, Job] = {}
        self._by_key: dict[tuple[str, str], Job] = {}
        self._finished: collections.OrderedDict[str, Job] = collections.OrderedDict()
        self._max_finished = max_finished

    def __len__(self) -> int:
        return len(self._jobs)

    async def add(self, job: Job) -> Job:
        if job.idempotency_key:
            key = (job.tenant, job.idempotency_key)
            existing = self._by_key.get(key)
            if existing is not None and not _expired(existing, time.monotonic()):
                return existing
            self._by_key[key] = job
        self._jobs[job.id] = job
        return job

    async def finished(self, job: Job) -> None:
        self._finished[job.id] = job
        while len(self._finished) > self._max_finished:
            _, oldest = self._finished.popitem(last=False)
            self._remove(oldest)

    async def get(self, job_id: str, tenant: str = "") -> Job | None:
        job = self._jobs.get(job_id)
        if job is None or job.tenant != tenant or _expired(job, time.monotonic()):
            return None
        return job

    async def by_key(self, key: str, tenant: str = "") -> Job | None:
        job = self._by_key.get((tenant, key))
        return None if job is None or _expired(job, time.monotonic()) else job

    async def wait(self, job: Job, timeout_s: float) -> Job:
        if timeout_s > 0 and not job.status.finished:
            try:
                async with asyncio.timeout(timeout_s):
                    await job.finished.wait()
            except TimeoutError:
                pass
        return job

    async def find(self, status: JobStatus | None, limit: int, tenant: str = "") -> list[Job]:
        # Jobs are kept in the order they were added, so walking backwards is newest first and
        # stops after `limit` matches: no sort of the whole store on the event loop.
        now = time.monotonic()
        found: list[Job] = []
        for job in reversed(self._jobs.values()):
            if len(found) >= limit:
                break
            if (
                (status is None or job.status is status)
                and job.tenant == tenant
                and not _expired(job, now)
            ):
                found.append(job)
        return found

    def count_by_status(self) -> dict[str, int]:
        counts = dict.fromkeys((s.value for s in JobStatus), 0)
        for job in list(self._jobs.values()):
            counts[job.status.value] += 1
        return counts

    def unfinished(self) -> list[Job]:
        return [job for job in self._jobs.values() if not job.status.finished]

    async def sweep(self) -> int:
        now = time.monotonic()
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


def _expired(job: Job, now: float) -> bool:
    return job.expires_at is not None and job.expires_at <= now
