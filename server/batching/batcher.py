"""The dynamic batcher: one bounded queue per model, batches formed when an instance is free.

The batcher first waits for an idle instance, then for a first request. From the moment the oldest
queued request arrived, it waits at most max_queue_delay_s for more; it sends the batch early when
the queue holds max_batch_size rows or reaches a preferred batch size. While every instance is
busy, requests accumulate, so batches grow with load without any extra waiting.

With eager_dispatch, a batch goes at once while another instance is still idle: low-load latency
drops to the engine's, at the price of smaller batches, and so less throughput, near saturation
(docs/benchmarks.md has the measured trade-off).

Requests whose caller has gone (future cancelled) or whose deadline has passed are dropped when
the batch is formed, before they cost compute.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any

from server.batching.batch import Batch
from server.batching.request import InferenceRequest
from server.config import ModelConfig
from server.errors import (
    DeadlineExceeded,
    Internal,
    ResourceExhausted,
    TensorgateError,
    Unavailable,
)
from server.executor.instance import Instance
from server.executor.pool import InstancePool
from server.telemetry import Telemetry

log = logging.getLogger(__name__)

# Weight of the newest batch in the moving average of the service rate.
_RATE_SMOOTHING = 0.2
# Engine failures in a row, with no success between them, after which the model is unhealthy.
_UNHEALTHY_AFTER_FAILURES = 5


class _InstanceHung(Exception):
    """The watchdog gave up on an instance; it must not take another batch."""


@dataclass(slots=True)
class BatcherStats:
    """Counters an operator (and the tests) can read; updated on the event loop only."""

    batches: int = 0
    rows: int = 0
    requests: int = 0
    dropped_expired: int = 0
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
        self._on_health = on_health
        telemetry = telemetry or Telemetry.quiet()
        self._tracing = telemetry.tracing
        metrics, model = telemetry.metrics, config.name
        self._m_queue = metrics.queue_seconds.labels(model)
        self._m_compute = metrics.compute_seconds.labels(model)
        self._m_rows = metrics.batch_rows.labels(model)
        self._m_busy = metrics.instance_busy_seconds
        self.healthy = True
        self._consecutive_failures = 0
        self._queue: collections.deque[InferenceRequest] = collections.deque()
        self._queued_rows = 0
        self._arrived = asyncio.Event()
        self._running: set[asyncio.Task[None]] = set()  # batches and instance replacements
        self.stats = BatcherStats()

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
            await self._run_isolating(instance, batch)
        except _InstanceHung:
            task = asyncio.create_task(self._replace_instance(instance))
            self._running.add(task)
            task.add_done_callback(self._running.discard)
        except BaseException:
            self._pool.release(instance)
            raise
        else:
            self._pool.release(instance)

    async def _run_isolating(self, instance: Instance, batch: Batch) -> None:
        """Runs the batch under the watchdog. When the engine fails on it, each half runs again,
        down to single requests, so only the requests that cause the failure fail."""
        config = self._config
        started = time.perf_counter()
        started_ns = time.time_ns() if self._tracing.enabled else 0
        try:
            async with asyncio.timeout(config.execution_timeout_s or None):
                result = await instance.execute(batch)
        except TimeoutError:
            self.stats.watchdog_timeouts += 1
            log.error(
                "model %s: instance %d did not finish a batch of %d rows within %.1f s; "
                "replacing it",
                config.name, instance.index, batch.rows, config.execution_timeout_s,
            )  # fmt: skip
            self._fail(
                batch,
                Unavailable(
                    f"model '{config.name}' instance {instance.index} did not finish within "
                    f"{config.execution_timeout_s:g} s (watchdog); it is being replaced, retry"
                ),
            )
            self._note_engine(ok=False)
            raise _InstanceHung from None
        except Exception as exc:
            if len(batch.requests) > 1:
                self.stats.isolation_retries += 1
                await self._run_halves(instance, batch)
                return
            if not isinstance(exc, TensorgateError):
                log.warning(
                    "model %s failed on request %r: %r", config.name, batch.requests[0].id, exc
                )
                exc = Internal(
                    f"model '{config.name}' failed on this request: {type(exc).__name__}: {exc}"
                )
            self._fail(batch, exc)
            self._note_engine(ok=False)
            self._trace(batch, instance, started_ns, {}, exc)
        else:
            elapsed_s = time.perf_counter() - started
            compute_s = result.stage_s.get("compute", 0.0)
            self._record(batch, elapsed_s, compute_s)
            self._m_rows.observe(batch.rows)
            self._m_compute.observe(compute_s)
            self._m_busy.labels(config.name, str(instance.index)).inc(elapsed_s)
            self._trace(batch, instance, started_ns, result.stage_s)
            now = time.monotonic()
            for request, outputs in zip(batch.requests, result.outputs, strict=True):
                if not request.future.done():
                    request.future.set_result(outputs)
                    self.stats.success_s_total += now - request.enqueued_at
            self._note_engine(ok=True)

    def _trace(
        self,
        batch: Batch,
        instance: Instance,
        started_ns: int,
        stage_s: dict[str, float],
        error: BaseException | None = None,
    ) -> None:
        if not self._tracing.enabled:
            return
        traces = [r.trace for r in batch.requests if r.trace is not None]
        self._tracing.batch_done(
            self._config.name, traces, batch.rows, instance.index, started_ns, time.time_ns(),
            stage_s, error,
        )  # fmt: skip

    async def _run_halves(self, instance: Instance, batch: Batch) -> None:
        halves = batch.halves()
        for i, half in enumerate(halves):
            try:
                await self._run_isolating(instance, half)
            except _InstanceHung:
                for rest in halves[i + 1 :]:
                    self._fail(rest, Unavailable(f"model '{self._config.name}' instance hung"))
                raise

    def _note_engine(self, ok: bool) -> None:
        """Tracks whether the engine works at all: a run of failures with no success in between
        marks the model unhealthy until its next success."""
        if ok:
            self._consecutive_failures = 0
            if not self.healthy:
                self.healthy = True
                self._on_health(True)
            return
        self._consecutive_failures += 1
        if self.healthy and self._consecutive_failures >= _UNHEALTHY_AFTER_FAILURES:
            self.healthy = False
            self._on_health(False)

    def _record(self, batch: Batch, elapsed_s: float, compute_s: float) -> None:
        stats = self.stats
        stats.compute_s_total += compute_s
        stats.compute_s_by_size[batch.rows] += compute_s
        stats.last_inference_ms = time.time_ns() // 1_000_000
        stats.batches += 1
        stats.rows += batch.rows
        stats.requests += len(batch.requests)
        stats.batch_sizes[batch.rows] += 1
        rate = batch.rows / max(elapsed_s, 1e-6)
        if stats.rows_per_instance_s == 0.0:
            stats.rows_per_instance_s = rate
        else:
            stats.rows_per_instance_s += _RATE_SMOOTHING * (rate - stats.rows_per_instance_s)

    def _fail(self, batch: Batch, error: TensorgateError) -> None:
        self.stats.failed_batches += 1
        now = time.monotonic()
        for request in batch.requests:
            if not request.future.done():
                request.future.set_exception(error)
                self.stats.failed_requests += 1
                self.stats.failed_s_total += now - request.enqueued_at

    def _fail_queued(self, message: str) -> None:
        while self._queue:
            request = self._queue.popleft()
            if not request.future.done():
                request.future.set_exception(Unavailable(message))
        self._queued_rows = 0
