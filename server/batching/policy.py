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

import math
from dataclasses import dataclass
from typing import Protocol


class BatchingPolicy(Protocol):
    def wait_s(
        self, queued_rows: int, oldest_enqueued_at: float, now: float, idle_instances: int
    ) -> float:
        """How long to keep waiting for more requests; 0 means send now. idle_instances counts
        the instances idle besides the one that would run this batch."""
        ...

    def batch_rows(self, queued_rows: int) -> int:
        """The most rows to take into the batch that goes now."""
        ...

    def wake_rows(self, queued_rows: int, oldest_enqueued_at: float, until: float) -> int:
        """While a batch waits for company until `until` (the time wait_s gave): the queued rows
        at which wait_s must be asked again before then. Arrivals short of it cannot make it go
        sooner, so the batcher is not woken for each one."""
        ...

    def arrived(self, rows: int, now: float) -> None:
        """A request was queued (the policy may learn the arrival rate)."""
        ...

    def ran(self, rows: int, seconds: float) -> None:
        """A batch held an instance this long (the policy may learn the engine's cost)."""
        ...


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

    def wake_rows(self, queued_rows: int, oldest_enqueued_at: float, until: float) -> int:
        return _next_size(queued_rows, self.preferred_batch_sizes, self.max_batch_size)

    def arrived(self, rows: int, now: float) -> None:
        pass

    def ran(self, rows: int, seconds: float) -> None:
        pass


# Smoothing of the arrival and batch-cost estimates (weight of the newest observation).
_SMOOTHING = 0.1
# Until batches have been timed: what one more engine call is assumed to cost.
_DEFAULT_CALL_S = 0.0005
# Sending every request on its own keeps an instance busy call_s per arrival: while that is below
# this share of the time between arrivals, the load is light and a batch goes at once (while
# another instance is idle); above it, batching pays, and requests wait for company.
_EAGER_UTILIZATION = 0.5
# An arrival gap longer than this says "idle" as well as any longer one would.
_MAX_GAP_S = 1.0


@dataclass(slots=True)
class AdaptiveWindow:
    """Waits for company only when company is coming soon enough to be worth it.

    It learns the arrival rate (rows a second) and what one engine call costs (the time a batch
    of one or two rows holds an instance). A batch goes at once when it is full or at a preferred
    size; when waiting longer would break max_queue_delay_s or the latency budget (queue time
    plus the batch's own run time); when the next row is not expected before then; and while
    another instance is idle and running each request on its own would keep an instance busy
    less than half the time (spare capacity, light load: company is not worth the wait).
    Otherwise it waits for as many rows as are expected within those limits, up to a full batch.
    So a lone caller is answered without a window, and under load batches fill as under the
    static window.

    The cost of a call is timed from the event loop, so it includes the loop's turnaround, which
    a request waits as well. When the loop is the bottleneck (a busy CPU: 1-2 ms per call seen
    from the loop, for an engine's 0.1 ms), one more call looks as dear as it is to the server,
    and batches stop going at once: under load the policy forms the same batches as the static
    window (the mean rows per batch in bench.batching).
    """

    max_batch_size: int
    max_queue_delay_s: float
    preferred_batch_sizes: tuple[int, ...] = ()
    # Queue wait plus run time to stay within while the load allows; 0 = none.
    latency_budget_s: float = 0.0
    _gap_s: float = 0.0  # smoothed seconds between arriving rows; 0 = nothing seen yet
    _last_arrival: float | None = None
    _call_s: float = _DEFAULT_CALL_S  # one more engine call (a small batch's run time)
    _row_s: float = 0.0  # the extra run time of one more row in a batch

    def arrived(self, rows: int, now: float) -> None:
        """A request of `rows` rows was queued at `now`."""
        if self._last_arrival is not None:
            gap = min(now - self._last_arrival, _MAX_GAP_S) / max(rows, 1)
            self._gap_s = (
                gap if self._gap_s == 0 else self._gap_s + _SMOOTHING * (gap - self._gap_s)
            )
        self._last_arrival = now

    def ran(self, rows: int, seconds: float) -> None:
        """A batch of `rows` rows held an instance for `seconds`."""
        if rows <= 2:
            self._call_s += _SMOOTHING * (seconds - self._call_s)
        else:
            per_row = max(seconds - self._call_s, 0.0) / rows
            self._row_s += _SMOOTHING * (per_row - self._row_s)

    def run_s(self, rows: int) -> float:
        """The expected run time of a batch of `rows` rows."""
        return self._call_s + self._row_s * rows

    def wait_s(
        self, queued_rows: int, oldest_enqueued_at: float, now: float, idle_instances: int
    ) -> float:
        if queued_rows >= self.max_batch_size or queued_rows in self.preferred_batch_sizes:
            return 0.0
        limit = self.max_queue_delay_s
        if self.latency_budget_s > 0:
            limit = min(limit, self.latency_budget_s - self.run_s(queued_rows))
        left = oldest_enqueued_at + limit - now
        gap = self._gap_s
        if left <= 0 or gap <= 0 or gap >= left:
            return 0.0  # out of time, nothing learned yet, or nobody expected in time
        if idle_instances > 0 and self._call_s <= gap * _EAGER_UTILIZATION:
            return 0.0  # spare capacity, and arrivals too sparse to fill a batch: go now
        return min(left, (self.max_batch_size - queued_rows) * gap)

    def batch_rows(self, queued_rows: int) -> int:
        if queued_rows < self.max_batch_size and queued_rows in self.preferred_batch_sizes:
            return queued_rows
        return self.max_batch_size

    def wake_rows(self, queued_rows: int, oldest_enqueued_at: float, until: float) -> int:
        """The wait asked for is the time the batch is expected to fill in (within
        max_queue_delay_s), so the batch goes when it fills, reaches a preferred size, or that
        time is up; an arrival in between only refines the estimate (at worst the batch waits out
        the time first asked for). A latency budget adds one size: each row lengthens the batch's
        run time and so moves the latest time it may go (oldest + budget - run time) earlier,
        and the batcher is woken at the rows that move it before `until` (at once, the next
        row, when the budget is what set `until`)."""
        rows = _next_size(queued_rows, self.preferred_batch_sizes, self.max_batch_size)
        if self.latency_budget_s > 0 and self._row_s > 0:
            # run_s(n) <= oldest + budget - until  <=>  n <= fits
            fits = (oldest_enqueued_at + self.latency_budget_s - until - self._call_s) / self._row_s
            rows = min(rows, max(queued_rows + 1, math.floor(fits + 1e-9) + 1))
        return rows


def _next_size(queued_rows: int, preferred: tuple[int, ...], max_batch_size: int) -> int:
    """The smallest preferred size above queued_rows, or max_batch_size."""
    return min((p for p in preferred if p > queued_rows), default=max_batch_size)
