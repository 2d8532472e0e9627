"""The counters of one model's batching and execution, read by operators, statistics RPCs and
tests; updated on the event loop only."""

from __future__ import annotations

import collections
from dataclasses import dataclass, field


@dataclass(slots=True)
class BatcherStats:
    """Counters an operator (and the tests) can read; updated on the event loop only."""

    batches: int = 0
    rows: int = 0
    requests: int = 0
    dropped_expired: int = 0
    # Requests that left the queue before running: their caller went away (or a job was
    # cancelled) while they waited.
    dropped_cancelled: int = 0
    failed_batches: int = 0
    # Batches re-run in halves to isolate a failing request.
    isolation_retries: int = 0
    watchdog_timeouts: int = 0
    # Summed over requests: time from enqueue to being taken into a batch.
    queue_s_total: float = 0.0
    # Summed over batches: the instances' compute stage.
    compute_s_total: float = 0.0
    # Requests answered with outputs / with an error, and their time from enqueue to answer.
    success_s_total: float = 0.0
    failed_requests: int = 0
    failed_s_total: float = 0.0
    # Wall clock (ms since the epoch) of the last batch that ran.
    last_inference_ms: int = 0
    # batch size (rows) -> compute seconds summed over batches of that size
    compute_s_by_size: dict[int, float] = field(
        default_factory=lambda: collections.defaultdict(float)
    )
    # batch size (rows) -> number of batches of that size
    batch_sizes: collections.Counter[int] = field(default_factory=collections.Counter)
    # Moving average of rows per second one instance computes; 0 until the first batch.
    rows_per_instance_s: float = 0.0
