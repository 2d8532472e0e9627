"""The dynamic batcher: one bounded queue per model, batches formed when an instance is free.

The batcher first waits for an idle instance, then for a first request. From the moment the oldest
queued request arrived, it waits at most max_queue_delay_s for more; it sends the batch early when
the queue holds max_batch_size rows or reaches a preferred batch size. While every instance is
busy, requests accumulate, so batches grow with load without any extra waiting.

With eager_dispatch, a batch goes at once while another instance is still idle: low-load latency
drops to the engine's, at the price of smaller batches, and so less throughput, near saturation
(docs/benchmarks.md has the measured trade-off).

Requests whose caller has gone (future cancelled) or whose deadline has passed are dropped when
the batch is formed, before they cost compute. Running a batch is execution.py's job.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from server.batching.batch import Batch
from server.batching.execution import BatchExecution, InstanceHung
from server.batching.request import InferenceRequest
from server.batching.stats import BatcherStats
from server.config import ModelConfig
from server.errors import DeadlineExceeded, ResourceExhausted, Unavailable
from server.executor.instance import Instance
from server.executor.pool import InstancePool
from server.telemetry import Telemetry

log = logging.getLogger(__name__)


class DynamicBatcher:
    """Queues validated requests of one model and feeds batches to its instance pool."""

    def __init__(
        self,
        config: ModelConfig,
        output_names: Sequence[str],
        pool: InstancePool,
        replace_instance: Callable[[Instance], Coroutine[Any, Any, None]],
        on_health: Callable[[bool], None] = lambda healthy: None,
        telemetry: Telemetry | None = None,
    ) -> None:
        self._config = config
        self._model_outputs = tuple(output_names)
        self._pool = pool
        self._replace_instance = replace_instance
        telemetry = telemetry or Telemetry.quiet()
        self._m_queue = telemetry.metrics.queue_seconds.labels(config.name)
        self._queue: collections.deque[InferenceRequest] = collections.deque()
        self._queued_rows = 0
        self._arrived = asyncio.Event()
        self._running: set[asyncio.Task[None]] = set()  # batches and instance replacements
        self.stats = BatcherStats()
        self._execution = BatchExecution(config, self.stats, telemetry, on_health)

    @property
    def healthy(self) -> bool:
        """False while the engine keeps failing (see BatchExecution)."""
        return self._execution.healthy

    @property
    def queued_requests(self) -> int:
        return len(self._queue)

    @property
    def queued_rows(self) -> int:
        return self._queued_rows

    @property
    def rows_per_s(self) -> float:
        """Observed service rate of the whole pool, 0 before the first batch."""
        return self.stats.rows_per_instance_s * self._config.instance_count

    def put(self, request: InferenceRequest) -> None:
        """Queues a request or raises ResourceExhausted when the queue is full."""
        if len(self._queue) >= self._config.queue_capacity:
            raise ResourceExhausted(
                f"model '{self._config.name}' queue is full "
                f"({self._config.queue_capacity} requests waiting); retry later"
            )
        request.enqueued_at = time.monotonic()
        if request.trace is not None:
            request.trace.enqueued_ns = time.time_ns()
            request.trace.queue_depth = len(self._queue)
        self._queue.append(request)
        self._queued_rows += request.rows
        self._arrived.set()

    async def run(self) -> None:
        """Forms and dispatches batches until cancelled."""
        try:
            while True:
                instance = await self._pool.acquire()
                try:
                    batch = await self._next_batch()
                except BaseException:
                    self._pool.release(instance)
                    raise
                if batch is None:
                    self._pool.release(instance)
                    continue
                task = asyncio.create_task(self._execute(instance, batch))
                self._running.add(task)
                task.add_done_callback(self._running.discard)
        finally:
            self._fail_queued(f"model '{self._config.name}' is shutting down")

    async def drain(self) -> None:
        """Waits until the queue is empty and every dispatched batch has finished."""
        while self._queue or self._running:
            if self._running:
                await asyncio.wait(set(self._running))
            else:
                await asyncio.sleep(0.001)

    async def _next_batch(self) -> Batch | None:
        config = self._config
        while not self._queue:
            self._arrived.clear()
            await self._arrived.wait()
        preferred = config.preferred_batch_sizes
        # eager_dispatch: while another instance is idle, a request arriving next is served at
        # once anyway, so the batch goes now instead of waiting for company.
        eager = config.eager_dispatch and self._pool.idle > 0
        while (
            not eager
            and self._queued_rows < config.max_batch_size
            and self._queued_rows not in preferred
        ):
            remaining = self._queue[0].enqueued_at + config.max_queue_delay_s - time.monotonic()
            if remaining <= 0:
                break
            self._arrived.clear()
            try:
                async with asyncio.timeout(remaining):
                    await self._arrived.wait()
            except TimeoutError:
                break
            if not self._queue:  # everything was cancelled meanwhile
                return None
        target = config.max_batch_size
        if preferred and self._queued_rows < target:
            fitting = [size for size in preferred if size <= self._queued_rows]
            if fitting and fitting[-1] == self._queued_rows:
                target = fitting[-1]
        return self._take(target)

    def _take(self, max_rows: int) -> Batch | None:
        now = time.monotonic()
        taken: list[InferenceRequest] = []
        rows = 0
        queue = self._queue
        while queue and rows + queue[0].rows <= max_rows:
            request = queue.popleft()
            self._queued_rows -= request.rows
            if request.future.done():
                self.stats.dropped_cancelled += 1
                continue
            if request.deadline is not None and request.deadline <= now:
                self.stats.dropped_expired += 1
                request.future.set_exception(
                    DeadlineExceeded(
                        f"deadline passed after {now - request.enqueued_at:.3f} s "
                        f"in model '{self._config.name}' queue, before it ran"
                    )
                )
                continue
            taken.append(request)
            rows += request.rows
            waited_s = now - request.enqueued_at
            self.stats.queue_s_total += waited_s
            self._m_queue.observe(waited_s)
            if request.trace is not None:
                request.trace.taken_ns = time.time_ns()
        if not taken:
            return None
        wanted = set().union(*(r.output_names for r in taken))
        names = tuple(n for n in self._model_outputs if n in wanted)
        for request in taken:
            if request.on_start is not None:
                request.on_start()
        return Batch(self._config.name, taken, rows, names)

    async def _execute(self, instance: Instance, batch: Batch) -> None:
        try:
            await self._execution.run(instance, batch)
        except InstanceHung:
            task = asyncio.create_task(self._replace_instance(instance))
            self._running.add(task)
            task.add_done_callback(self._running.discard)
        except BaseException:
            self._pool.release(instance)
            raise
        else:
            self._pool.release(instance)

    def _fail_queued(self, message: str) -> None:
        while self._queue:
            request = self._queue.popleft()
            if not request.future.done():
                request.future.set_exception(Unavailable(message))
        self._queued_rows = 0
