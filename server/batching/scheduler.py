"""The scheduler seam: what a served model needs from whatever decides which requests run
together. The dynamic batcher (batcher.py) is one scheduler; the sequence scheduler for stateful
models (sequences.py), in front of a dynamic batcher, is another."""

from __future__ import annotations

from typing import Protocol

from tensorgate.server.batching.stats import BatcherStats
from tensorgate.server.errors import TensorgateError
from tensorgate.server.inference import InferenceRequest


class Scheduler(Protocol):
    stats: BatcherStats

    def put(self, request: InferenceRequest) -> None:
        """Queues a validated request; raises ResourceExhausted or Unavailable to refuse it."""
        ...

    async def run(self) -> None:
        """Forms and dispatches batches until cancelled."""
        ...

    async def drain(self, deadline: float) -> bool:
        """Waits (until the monotonic deadline) for queued and running work to finish; True if
        it all did."""
        ...

    def fail_all(self, error: TensorgateError) -> None:
        """Fails every queued and running request with the error (forced stop)."""
        ...

    @property
    def healthy(self) -> bool:
        """False while the engine keeps failing."""
        ...

    @property
    def queued_requests(self) -> int: ...

    @property
    def queued_rows(self) -> int: ...

    @property
    def busy_instances(self) -> int:
        """Instances running a batch now (not merely reserved for the next one)."""
        ...

    @property
    def running_requests(self) -> int:
        """Requests in the batches running now."""
        ...

    @property
    def rows_per_s(self) -> float:
        """Observed service rate of all instances, 0 before the first batch."""
        ...
