"""In-memory job store: jobs by id and by idempotency key, finished ones expiring after a TTL."""

from __future__ import annotations

import time

from server.jobs.job import Job


class MemoryJobStore:
    """Holds the jobs of this process. Expired jobs are invisible at once and removed by sweep()."""

    def __init__(self) -> None:
        self._jobs: dict[str, Job] = {}
        self._by_key: dict[str, Job] = {}

    def __len__(self) -> int:
        return len(self._jobs)

    def add(self, job: Job) -> None:
        self._jobs[job.id] = job
        if job.idempotency_key:
            self._by_key[job.idempotency_key] = job

    def get(self, job_id: str) -> Job | None:
        job = self._jobs.get(job_id)
        return None if job is None or _expired(job, time.monotonic()) else job

    def by_key(self, key: str) -> Job | None:
        job = self._by_key.get(key)
        return None if job is None or _expired(job, time.monotonic()) else job

    def sweep(self) -> int:
        """Removes expired jobs; returns how many."""
        now = time.monotonic()
        expired = [job for job in self._jobs.values() if _expired(job, now)]
        for job in expired:
            del self._jobs[job.id]
            if job.idempotency_key and self._by_key.get(job.idempotency_key) is job:
                del self._by_key[job.idempotency_key]
        return len(expired)


def _expired(job: Job, now: float) -> bool:
    return job.expires_at is not None and job.expires_at <= now
