"""When a batch goes, and how big: the batching decision as a small pure object, so unit tests
drive it with plain numbers for the clock and the queue.

StaticWindow is the dynamic batcher's classic rule: from the moment the oldest queued request
arrived, wait at most max_queue_delay_s for company; go at once when the queue holds
max_batch_size rows or reaches a preferred size. While every instance is busy, requests
accumulate anyway, so batches grow with load without extra waiting. With eager_dispatch a batch
goes at once while another instance is idle (no window at low load, smaller batches near
saturation).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True, frozen=True)
class StaticWindow:
    max_batch_size: int
    max_queue_delay_s: float
    preferred_batch_sizes: tuple[int, ...] = ()
    eager_dispatch: bool = False

    def wait_s(
        self, queued_rows: int, oldest_enqueued_at: float, now: float, idle_instances: int
    ) -> float:
        """How long to keep waiting for more requests; 0 means send now. idle_instances counts
        the instances idle besides the one that would run this batch."""
        if queued_rows >= self.max_batch_size or queued_rows in self.preferred_batch_sizes:
            return 0.0
        if self.eager_dispatch and idle_instances > 0:
            return 0.0
        return max(oldest_enqueued_at + self.max_queue_delay_s - now, 0.0)

    def batch_rows(self, queued_rows: int) -> int:
        """The most rows to take into the batch that goes now."""
        if queued_rows < self.max_batch_size and queued_rows in self.preferred_batch_sizes:
            return queued_rows
        return self.max_batch_size
