"""A model's bounded request queue, which forgets a request the moment its caller gives up.

A cancelled request stops counting at once toward the capacity, the queued rows (which decide a
full batch and the job wait estimate) and the age of the oldest request (which times the batch
window); its entry is skipped when reached and compacted away when dead entries pile up.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import time

from server.batching.request import InferenceRequest
from server.batching.stats import BatcherStats
from server.errors import ResourceExhausted, TensorgateError

# Dead entries tolerated beyond the live ones before the deque is rebuilt without them.
_COMPACT_SLACK = 64


class RequestQueue:
    def __init__(self, model: str, capacity: int, stats: BatcherStats) -> None:
        self._model = model
        self._stats = stats
        self.capacity = capacity
        self._entries: collections.deque[InferenceRequest] = collections.deque()
        self.live = 0  # requests queued whose caller still waits
        self.rows = 0  # their rows
        self._changed = asyncio.Event()

    def put(self, request: InferenceRequest) -> None:
        """Queues a request or raises ResourceExhausted when the queue is full."""
        if self.live >= self.capacity:
            raise ResourceExhausted(
                f"model '{self._model}' queue is full ({self.capacity} requests waiting); "
                "retry later"
            )
        request.enqueued_at = time.monotonic()
        request.queued = True
        self._entries.append(request)
        self.live += 1
        self.rows += request.rows
        request.future.add_done_callback(functools.partial(self._settled, request))
        self._changed.set()

    def _settled(self, request: InferenceRequest, _: object) -> None:
        """The caller went away (or the request failed) while it was still queued."""
        if not request.queued:
            return
        request.queued = False
        self.live -= 1
        self.rows -= request.rows
        self._stats.dropped_cancelled += 1
        if len(self._entries) > 2 * self.live + _COMPACT_SLACK:
            self._entries = collections.deque(r for r in self._entries if r.queued)
        self._changed.set()

    def _drop_dead_head(self) -> None:
        entries = self._entries
        while entries and not entries[0].queued:
            entries.popleft()

    def oldest_enqueued_at(self) -> float | None:
        """When the oldest live request arrived (monotonic), or None when there is none."""
        self._drop_dead_head()
        return self._entries[0].enqueued_at if self._entries else None

    def head_rows(self) -> int:
        self._drop_dead_head()
        return self._entries[0].rows if self._entries else 0

    def pop(self) -> InferenceRequest:
        """Removes and returns the oldest live request (the queue must not be empty)."""
        self._drop_dead_head()
        request = self._entries.popleft()
        request.queued = False
        self.live -= 1
        self.rows -= request.rows
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
            request = self.pop()
            if not request.future.done():
                request.future.set_exception(error)
        self._entries.clear()
