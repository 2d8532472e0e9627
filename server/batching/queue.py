"""A model's bounded request queue, which forgets a request the moment its caller gives up, and
takes higher priorities first.

A cancelled request stops counting at once toward the capacity, the queued rows (which decide a
full batch and the job wait estimate) and the age of the oldest request (which times the batch
window); its entry is skipped when reached and compacted away when dead entries pile up.

Requests wait in one first-in-first-out line per priority. The next request is the head of the
highest priority, unless a lower one's head has waited longer than max_passed_over_s: then the
oldest such head goes first, so a low priority is delayed, never starved.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import time

from tensorgate.server.batching.stats import BatcherStats
from tensorgate.server.errors import ResourceExhausted, TensorgateError
from tensorgate.server.futures import settle_error
from tensorgate.server.inference import InferenceRequest

# Dead entries tolerated beyond the live ones before the deque is rebuilt without them.
_COMPACT_SLACK = 64


class RequestQueue:
    def __init__(
        self, model: str, capacity: int, stats: BatcherStats, max_passed_over_s: float = 0.1
    ) -> None:
        self._model = model
        self._stats = stats
        self.capacity = capacity
        self.max_passed_over_s = max_passed_over_s
        # priority -> its line; _order: the priorities present, highest first.
        self._lines: dict[int, collections.deque[InferenceRequest]] = {}
        self._order: list[int] = []
        self.live = 0  # requests queued whose caller still waits
        self.rows = 0  # their rows
        self._changed = asyncio.Event()
        # An arrival wakes changed() only once the queue holds this many rows (0: every one);
        # the batcher raises it while it waits for company (its policy's wake_rows). Departures
        # always wake it.
        self.wake_rows = 0

    def put(self, request: InferenceRequest) -> None:
        """Queues a request or raises ResourceExhausted when the queue is full."""
        if self.live >= self.capacity:
            raise ResourceExhausted(
                f"model '{self._model}' queue is full ({self.capacity} requests waiting); "
                "retry later"
            )
        request.enqueued_at = time.monotonic()
        request.queued = True
        line = self._lines.get(request.priority)
        if line is None:
            line = self._lines[request.priority] = collections.deque()
            self._order = sorted(self._lines, reverse=True)
        line.append(request)
        self.live += 1
        self.rows += request.rows
        request.watch = functools.partial(self._settled, request)
        request.future.add_done_callback(request.watch)
        if self.rows >= self.wake_rows:
            self._changed.set()

    def _settled(self, request: InferenceRequest, _: object) -> None:
        """The caller went away (or the request failed) while it was still queued."""
        if not request.queued:
            return
        request.queued = False
        self.live -= 1
        self.rows -= request.rows
        self._stats.dropped_cancelled += 1
        line = self._lines.get(request.priority)
        if line is not None and len(line) > 2 * self.live + _COMPACT_SLACK:
            self._lines[request.priority] = collections.deque(r for r in line if r.queued)
        self._changed.set()

    def _heads(self) -> list[collections.deque[InferenceRequest]]:
        """The non-empty lines, highest priority first, each with a live head (dead heads and
        emptied lines are dropped on the way)."""
        heads = []
        emptied = False
        for priority in self._order:
            line = self._lines[priority]
            while line and not line[0].queued:
                line.popleft()
            if line:
                heads.append(line)
            else:
                del self._lines[priority]
                emptied = True
        if emptied:
            self._order = sorted(self._lines, reverse=True)
        return heads

    def _next_line(self) -> collections.deque[InferenceRequest] | None:
        heads = self._heads()
        if len(heads) <= 1:
            return heads[0] if heads else None
        overdue = time.monotonic() - self.max_passed_over_s
        waited = [line for line in heads[1:] if line[0].enqueued_at <= overdue]
        if waited:
            return min(waited, key=lambda line: line[0].enqueued_at)
        return heads[0]

    def oldest_enqueued_at(self) -> float | None:
        """When the oldest live request arrived (monotonic), or None when there is none."""
        heads = self._heads()
        if len(heads) <= 1:  # one priority in use: the common case, without a generator
            return heads[0][0].enqueued_at if heads else None
        return min(line[0].enqueued_at for line in heads)

    def take(self, room: int) -> InferenceRequest | None:
        """Removes and returns the next live request if its rows fit in `room` rows; None when
        they do not or the queue is empty (what a batch being formed takes, one by one)."""
        line = self._next_line()
        if line is None or line[0].rows > room:
            return None
        return self._remove(line)

    def pop(self) -> InferenceRequest:
        """Removes and returns the next live request (the queue must not be empty)."""
        line = self._next_line()
        assert line is not None, "pop() on an empty queue"
        return self._remove(line)

    def _remove(self, line: collections.deque[InferenceRequest]) -> InferenceRequest:
        request = line.popleft()
        request.queued = False
        self.live -= 1
        self.rows -= request.rows
        if request.watch is not None:
            request.future.remove_done_callback(request.watch)
            request.watch = None
        return request

    async def changed(self) -> None:
        """Waits for an arrival or a departure."""
        self._changed.clear()
        await self._changed.wait()

    async def nonempty(self) -> None:
        while not self.live:
            await self.changed()

    def fail_all(self, error: TensorgateError) -> None:
        while self.live:
            settle_error(self.pop().future, error)
        self._lines.clear()
        self._order = []
