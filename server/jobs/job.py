"""The job record: one submitted request and, once finished, its outcome."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from opentelemetry.trace import Span

from tensorgate.server.errors import TensorgateError
from tensorgate.server.inference import InferenceRequest
from tensorgate.server.records import Callback, Delivery, JobStatus, Request
from tensorgate.server.tensors import Outputs

__all__ = ["Job", "JobStatus"]


@dataclass(slots=True, eq=False)
class Job:
    """Times are wall-clock (time.time()): a job may be read by another replica than the one that
    accepted it."""

    id: str
    model: str
    tenant: str = ""
    # The version its run was admitted to (for the metrics); "" until it runs here.
    version: str = ""
    idempotency_key: str = ""
    request_id: str = ""
    status: JobStatus = JobStatus.PENDING
    outputs: Outputs | None = None
    error: TensorgateError | None = None
    created_at: float = 0.0
    started_at: float | None = None  # when the first run was taken
    finished_at: float | None = None
    expires_at: float | None = None  # set when the job finishes
    # Engine runs started so far (deliveries, for a shared store); a retryable failure runs the
    # job again (see jobs/lanes.py) up to job_max_attempts.
    attempts: int = 0
    # What the caller sent (a store that keeps jobs elsewhere serializes it); dropped once the job
    # runs in this process.
    payload: Request | None = None
    # The request on this process's scheduler while the job is held here to run.
    run: InferenceRequest | None = None
    # Taken into a batch by this process (a job not started yet can be handed to another).
    started: bool = False
    # The store's receipt for a job this process took (a Redis stream entry id).
    receipt: str = ""
    # The `job` span (child of the Submit call's span) while tracing; with a shared store, the
    # Submit span's traceparent travels with the job and the running process starts the span.
    span: Span | None = None
    traceparent: str = ""
    finished: asyncio.Event = field(default_factory=asyncio.Event)
    # Where to POST the final state, and how that delivery stands (webhooks).
    callback: Callback | None = None
    delivery: Delivery | None = None
