"""What the clients return: plain records of numpy arrays and strings, the same from the sync and
the asyncio client."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import grpc
import numpy as np


@dataclass(slots=True, frozen=True)
class Submitted:
    job_id: str
    status: str
    estimated_wait_s: float
    deduplicated: bool


@dataclass(slots=True, frozen=True)
class Delivery:
    """A job's webhook delivery: state DELIVERY_PENDING, DELIVERY_DELIVERED or DELIVERY_FAILED
    (dead-lettered), the attempts made and why the last one failed."""

    state: str
    attempts: int = 0
    last_error: str = ""


@dataclass(slots=True, frozen=True)
class JobResult:
    job_id: str
    status: str  # PENDING, RUNNING, SUCCEEDED, FAILED, CANCELLED
    outputs: dict[str, np.ndarray] | None = None
    error_code: grpc.StatusCode | None = None
    error_message: str = ""
    expires_in_s: float = 0.0
    attempts: int = 0
    # Set when the job was submitted with a callback.
    delivery: Delivery | None = None

    @property
    def finished(self) -> bool:
        return self.status in ("SUCCEEDED", "FAILED", "CANCELLED")


@dataclass(slots=True, frozen=True)
class JobSummary:
    job_id: str
    model: str
    status: str
    attempts: int
    age_s: float
    request_id: str = ""
    error_code: grpc.StatusCode | None = None
    error_message: str = ""
    delivery: Delivery | None = None


@dataclass(slots=True, frozen=True)
class JobEvent:
    """One state of a watched job (watch()): the first is its state when the watch began, then
    one per change; the last is final (SUCCEEDED with outputs, FAILED or CANCELLED)."""

    job_id: str
    model: str
    status: str
    # The run it belongs to (0 before the first).
    attempt: int
    # When the change happened (seconds since the epoch).
    time: float
    # The job runs again after attempt - 1 failed with this error.
    retry: bool = False
    outputs: dict[str, np.ndarray] | None = None
    error_code: grpc.StatusCode | None = None
    error_message: str = ""
    delivery: Delivery | None = None

    @property
    def final(self) -> bool:
        return self.status in ("SUCCEEDED", "FAILED", "CANCELLED")


@dataclass(slots=True, frozen=True)
class StreamItem:
    """One request to send on a stream."""

    id: str
    model: str
    inputs: Mapping[str, np.ndarray]
    outputs: Sequence[str] = field(default_factory=tuple)
    # A chunk of a sequence, for a stateful model (see AsyncTensorgateClient.sequences).
    sequence_id: str = ""
    sequence_start: bool = False
    sequence_end: bool = False
    # Higher is taken first within the model's queue; 0: the model's default.
    priority: int = 0
    # Reach the model (a python model's execute() reads them); bool, int, float or str values.
    parameters: Mapping[str, bool | int | float | str] = field(default_factory=dict)
    # The model version to run; "" takes the model's default route.
    model_version: str = ""


@dataclass(slots=True, frozen=True)
class StreamResult:
    """The answer to one stream request: outputs, or an error for that request alone."""

    id: str
    outputs: dict[str, np.ndarray] | None = None
    error_code: grpc.StatusCode | None = None
    error_message: str = ""

    @property
    def ok(self) -> bool:
        return self.error_code is None


@dataclass(slots=True, frozen=True)
class TensorMetadata:
    """A model input or output: shape with the batch dimension first, -1 for any size."""

    name: str
    datatype: str
    shape: tuple[int, ...]


@dataclass(slots=True, frozen=True)
class ModelSummary:
    name: str
    backend: str
    ready: bool
    # The versions served, and the default route's split by version (empty: the highest).
    versions: tuple[str, ...] = ()
    traffic: Mapping[str, int] = field(default_factory=dict)


@dataclass(slots=True, frozen=True)
class ModelMetadata:
    name: str
    backend: str
    inputs: tuple[TensorMetadata, ...]
    outputs: tuple[TensorMetadata, ...]
    max_batch_size: int
    instance_count: int
    version: str = ""
    versions: tuple[str, ...] = ()


@dataclass(slots=True, frozen=True)
class RepositoryModel:
    """One entry of the model repository index: a version loaded (READY, UNAVAILABLE,
    UNLOADING) or a model not loaded (version "", UNAVAILABLE with the reason)."""

    name: str
    version: str
    state: str
    reason: str = ""
