"""In-memory job store: jobs by id and by idempotency key.

Finished jobs are kept in finish order, so expiry (TTL) and the bound on stored jobs both remove
the oldest finished ones first, without scanning the unfinished.
"""

from __future__ import annotations

import collections
import time

from server.jobs.job import Job, JobStatus


class MemoryJobStore:
    """Holds the jobs of this process: every unfinished job, and finished ones until they expire
    or until more than max_finished are kept."""

    def __init__(self, max_finished: int = 100_000) -> None:
        self._jobs: dict[str, Job] = {}
        self._by_key: dict[str, Job] = {}
        self._finished: collections.OrderedDict[str, Job] = collections.OrderedDict()
        self._max_finished = max_finished

    def __len__(self) -> int:
        return len(self._jobs)

    def add(self, job: Job) -> None:
        self._jobs[job.id] = job
        if job.idempotency_key:
            self._by_key[job.idempotency_key] = job

    def finished(self, job: Job) -> None:
        """Records that a job finished; evicts the oldest finished jobs beyond the bound."""
        self._finished[job.id] = job
        while len(self._finished) > self._max_finished:
            _, oldest = self._finished.popitem(last=False)
            self._remove(oldest)

    def get(self, job_id: str) -> Job | None:
        job = self._jobs.get(job_id)
        return None if job is None or _expired(job, time.monotonic()) else job

    def by_key(self, key: str) -> Job | None:
        job = self._by_key.get(key)
        return None if job is None or _expired(job, time.monotonic()) else job

    def find(self, status: JobStatus | None = None, limit: int = 100) -> list[Job]:
        """Up to `limit` live jobs with that status (all statuses for None), newest first.

        Jobs are kept in the order they were added, so walking backwards is newest first and
        stops after `limit` matches: no sort of the whole store on the event loop.
        """
        now = time.monotonic()
        found: list[Job] = []
        for job in reversed(self._jobs.values()):
            if len(found) >= limit:
                break
            if (status is None or job.status is status) and not _expired(job, now):
                found.append(job)
        return found

    def count_by_status(self) -> dict[str, int]:
        """Jobs kept, by status name (read by the metrics scrape, from another thread)."""
        counts = dict.fromkeys((s.value for s in JobStatus), 0)
        for job in list(self._jobs.values()):
            counts[job.status.value] += 1
        return counts

    def unfinished(self) -> list[Job]:
        return [job for job in self._jobs.values() if not job.status.finished]

    def sweep(self) -> int:
        """Removes expired jobs; returns how many."""
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
        if job.idempotency_key and self._by_key.get(job.idempotency_key) is job:
            del self._by_key[job.idempotency_key]


def _expired(job: Job, now: float) -> bool:
    return job.expires_at is not None and job.expires_at <= now
