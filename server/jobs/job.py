"""The job record and its states."""

from __future__ import annotations

import asyncio
import enum
from dataclasses import dataclass, field

from opentelemetry.trace import Span

from server.batching.request import InferenceRequest, Outputs
from server.errors import TensorgateError


class JobStatus(enum.Enum):
    PENDING = "PENDING"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"

    @property
    def finished(self) -> bool:
        return self in _FINISHED


_FINISHED = {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED}


@dataclass(slots=True, eq=False)
class Job:
    """One submitted request and, once finished, its outcome. Times are time.monotonic()."""

    id: str
    model: str
    request: InferenceRequest
    idempotency_key: str = ""
    status: JobStatus = JobStatus.PENDING
    outputs: Outputs | None = None
    error: TensorgateError | None = None
    created_at: float = 0.0
    finished_at: float | None = None
    expires_at: float | None = None  # set when the job finishes
    # Engine runs so far; a retryable failure runs the job again (see JobRunner).
    attempts: int = 1
    # The `job` span (child of the Submit call's span) while tracing.
    span: Span | None = None
    finished: asyncio.Event = field(default_factory=asyncio.Event)
