"""The plain records that cross the data plane: what a front end hands in (Request) and what it
gets back (job views, model descriptions, statistics). No futures, no live objects: a second
protocol front end, or a process boundary, needs nothing else.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from tensorgate.server.errors import TensorgateError
from tensorgate.server.tensors import Outputs, TensorInput, TensorSpec


class RequestKind(enum.Enum):
    """How a request reached the server: it decides its default deadline and priority."""

    UNARY = "unary"
    STREAM = "stream"
    JOB = "job"


@dataclass(slots=True)
class SequenceControl:
    """Stateful-model control carried by a request (Triton's sequence batcher's fields)."""

    sequence_id: str
    start: bool = False
    end: bool = False
    # The stream that sent it ("" for a unary call): a stream that ends frees the sequences it
    # was driving.
    owner: str = ""


@dataclass(slots=True)
class Request:
    """One inference request as a front end decoded it; travels unchanged to the scheduler."""

    model: str
    inputs: Sequence[TensorInput]
    requested_outputs: Sequence[str] = ()
    id: str = ""
    parameters: Mapping[str, Any] = field(default_factory=dict)
    # time.monotonic() after which the answer is worthless; None = none.
    deadline: float | None = None
    # Higher runs first within a model's queue (schedulers that order by it).
    priority: int = 0
    sequence: SequenceControl | None = None
    # Who asks: scopes jobs and limits once callers authenticate; "" = anonymous.
    tenant: str = ""
    # The version asked for; "" = the model's default route.
    model_version: str = ""


class JobStatus(enum.Enum):
    PENDING = "PENDING"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"

    @property
    def finished(self) -> bool:
        return self in _FINISHED


_FINISHED = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED})


class DeliveryState(enum.Enum):
    """Where a job's webhook delivery stands."""

    PENDING = "DELIVERY_PENDING"  # the job is unfinished, or an attempt is due
    DELIVERED = "DELIVERY_DELIVERED"  # the receiver answered 2xx
    FAILED = "DELIVERY_FAILED"  # attempts or time ran out: dead-lettered


@dataclass(slots=True, frozen=True)
class Callback:
    """Where a job's final state is POSTed (a signed webhook)."""

    url: str
    # Put the outputs in the body when they fit (else the body refers to GetResult).
    include_result: bool = False


@dataclass(slots=True)
class Delivery:
    """A job's webhook delivery as it stands."""

    state: DeliveryState = DeliveryState.PENDING
    attempts: int = 0
    last_error: str = ""


@dataclass(slots=True, frozen=True)
class JobEvent:
    """One state of a job, as a watcher sees it: the first is the state when it began watching,
    then one per change."""

    job_id: str
    model: str
    status: JobStatus
    # The run it belongs to (0 before the first).
    attempt: int
    # Wall-clock time of the change.
    at: float
    # The job's error when it failed or was cancelled; on a retry, the error that caused it.
    error: TensorgateError | None = None
    # The job runs again after attempt - 1 failed.
    retry: bool = False
    # Filled in on the final event: the result, and the webhook delivery's state.
    outputs: Outputs | None = None
    delivery: Delivery | None = None

    @property
    def final(self) -> bool:
        return self.status.finished


# Where a page of listed jobs ends: (created_at, id) of its last job; the next page starts after.
Cursor = tuple[float, str]


@dataclass(slots=True, frozen=True)
class JobView:
    """A job as a caller sees it at one moment."""

    id: str
    model: str
    status: JobStatus
    request_id: str
    attempts: int
    age_s: float
    outputs: Outputs | None = None
    error: TensorgateError | None = None
    # Seconds until a finished job's result is forgotten; None while unfinished.
    expires_in_s: float | None = None
    # Set when the job has a callback.
    delivery: Delivery | None = None
    # Wall-clock times: accepted, first run started, final status reached.
    created_at: float = 0.0
    started_at: float | None = None
    finished_at: float | None = None


@dataclass(slots=True, frozen=True)
class Submitted:
    job: JobView
    # True when the idempotency key named a job that already existed (no new job).
    deduplicated: bool
    estimated_wait_s: float


@dataclass(slots=True, frozen=True)
class ModelInfo:
    """What a model serves and how it is batched."""

    name: str
    backend: str
    ready: bool
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    max_batch_size: int
    instance_count: int
    max_queue_delay_s: float
    preferred_batch_sizes: tuple[int, ...]
    # Why it is not serving, when it is not.
    reason: str = ""
    # The version described, the versions served, and the default route's split by version.
    version: str = "1"
    versions: tuple[str, ...] = ("1",)
    traffic: Mapping[str, int] = field(default_factory=dict)


@dataclass(slots=True, frozen=True)
class RepositoryEntry:
    """One model version of the repository as the server has it (RepositoryIndex)."""

    name: str
    version: str  # "" for a model not loaded
    state: str  # READY, UNAVAILABLE, UNLOADING
    reason: str = ""


@dataclass(slots=True, frozen=True)
class ModelStatistics:
    """Cumulative counters of one model (KServe ModelStatistics)."""

    name: str
    last_inference_ms: int
    rows: int
    batches: int
    requests: int
    success_s_total: float
    failed_requests: int
    failed_s_total: float
    queue_s_total: float
    compute_s_total: float
    # rows -> (batches of that size, their compute seconds)
    by_batch_size: Mapping[int, tuple[int, float]]
    version: str = "1"
