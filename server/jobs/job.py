"""The job record: one submitted request and, once finished, its outcome."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from opentelemetry.trace import Span

from server.batching.request import InferenceRequest
from server.errors import TensorgateError
from server.records import JobStatus
from server.tensors import Outputs

__all__ = ["Job", "JobStatus"]


@dataclass(slots=True, eq=False)
class Job:
    """Times are time.monotonic()."""

    id: str
    model: str
    request: InferenceRequest
    tenant: str = ""
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
