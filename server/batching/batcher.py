"""The dynamic batcher: a model's bounded queue, and batches formed when an instance is free.

The batcher waits for a first request, then for an idle instance (requests pile up meanwhile, so
batches grow with load), then asks the policy (policy.py) how long to wait for company and how
many rows to take. A request that finds the batcher idle, an instance free and the policy saying
"go now" is sent from put() itself, without waking the batcher's task. Requests whose caller
has gone leave the queue at once (queue.py); requests whose deadline has passed are dropped when
the batch is formed, before they cost compute. Running a batch is execution.py's job; the batcher
follows each batch's engine call with a done-callback and a watchdog timer (no task per batch),
and only a batch the engine failed on, retried in halves, gets a task.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from tensorgate.server.batching.execution import BatchExecution, InstanceHung, Started
from tensorgate.server.batching.policy import AdaptiveWindow, BatchingPolicy, StaticWindow
from tensorgate.server.batching.queue import RequestQueue
from tensorgate.server.batching.stats import BatcherStats
from tensorgate.server.errors import DeadlineExceeded, Internal, TensorgateError, Unavailable
from tensorgate.server.executor.batch import Batch
from tensorgate.server.executor.instance import BatchResult, Instance
from tensorgate.server.executor.pool import InstancePool
from tensorgate.server.futures import settle_error
from tensorgate.server.inference import InferenceRequest
from tensorgate.server.model_config import ModelConfig
from tensorgate.server.telemetry import Telemetry

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
        self.policy: BatchingPolicy = (
            StaticWindow(
                config.max_batch_size,
                config.max_queue_delay_s,
                config.preferred_batch_sizes,
                config.eager_dispatch,
            )
            if config.batching == "static"
            else AdaptiveWindow(
                config.max_batch_size,
                config.max_queue_delay_s,
                config.preferred_batch_sizes,
                config.latency_budget_s,
            )
        )
        telemetry = telemetry or Telemetry.quiet()
        self._m_queue = telemetry.metrics.queue_seconds.labels(config.name)
        self.stats = BatcherStats()
        self._queue = RequestQueue(
            config.name, config.queue_capacity, self.stats, config.priority_aging_s
        )
        # Batches on instances (by their engine call, or the task retrying one in halves), and
        # instance replacements under way.
        self._batches: dict[asyncio.Future[Any], Batch[InferenceRequest]] = {}
        # True while run() waits for a first request: nothing is being formed.
        self._parked = False
        self._replacing: set[asyncio.Task[None]] = set()
        self._execution = BatchExecution(
            config, self.stats, telemetry, on_health, on_batch=self.policy.ran
        )

    @property
    def healthy(self) -> bool:
        """False while the engine keeps failing (see BatchExecution)."""
        return self._execution.healthy

    @property
    def queued_requests(self) -> int:
        return self._queue.live

    @property
    def queued_rows(self) -> int:
        return self._queue.rows

    @property
    def busy_instances(self) -> int:
        return len(self._batches)

    @property
    def running_requests(self) -> int:
        return sum(len(batch.requests) for batch in self._batches.values())

    @property
    def rows_per_s(self) -> float:
        return self.stats.rows_per_instance_s * len(self._pool.instances)

    def put(self, request: InferenceRequest) -> None:
        if not self._pool.instances:
            raise Unavailable(f"model '{self._config.name}' has no working instance")
        alone = self._parked and not self._queue.live and self._pool.idle > 0
        if alone:
            request.enqueued_at = time.monotonic()
        else:
            self._queue.put(request)
        self.policy.arrived(request.rows, request.enqueued_at)
        if request.trace is not None:
            request.trace.enqueued_ns = time.time_ns()
            request.trace.queue_depth = self._queue.live - (0 if alone else 1)
        if alone and not self._send_alone(request):
            self._queue.put(request)

    def _send_alone(self, request: InferenceRequest) -> bool:
        """Nothing queued, the batcher's task parked, an instance free: when the policy would
        send this request at once anyway, it goes to the instance from here, without waking the
        batcher's task (a loop turn sooner, at low load). False: it must be queued."""
        now = request.enqueued_at
        if request.deadline is not None and request.deadline <= now:
            return False  # the queue fails it, as any request that expires there
        if self.policy.wait_s(request.rows, now, now, self._pool.idle - 1) > 0:
            return False
        instance = self._pool.try_acquire()
        if instance is None:
            return False
        self._dispatch(instance, self._batch_of([request], request.rows, now))
        return True

    async def run(self) -> None:
        try:
            while True:
                self._parked = True
                try:
                    await self._queue.nonempty()
                finally:
                    self._parked = False
                instance = await self._pool.acquire()
                try:
                    batch = await self._next_batch()
                except BaseException:
                    self._pool.release(instance)
                    raise
                self._dispatch(instance, batch)
        except asyncio.CancelledError:
            self._queue.fail_all(Unavailable(f"model '{self._config.name}' is shutting down"))
            raise
        except BaseException as exc:
            # The model restarts this task (model.py); what waited here gets a retryable answer
            # rather than a second crash if the cause sits in the queue.
            self._queue.fail_all(
                Unavailable(
                    f"model '{self._config.name}' scheduler failed ({type(exc).__name__}) and "
                    "is restarting; retry"
                )
            )
            raise

    def _dispatch(self, instance: Instance, batch: Batch[InferenceRequest] | None) -> None:
        """Starts the batch's engine call on the instance now, followed by _ran when it ends and
        by the watchdog's timer (no batch: the instance goes back)."""
        if batch is None:
            self._pool.release(instance)
            return
        started = self._execution.start(instance, batch)
        timeout_s = self._config.execution_timeout_s
        watchdog = (
            asyncio.get_running_loop().call_later(
                timeout_s, self._timed_out, instance, batch, started
            )
            if timeout_s
            else None
        )
        self._batches[started.call] = batch
        started.call.add_done_callback(
            functools.partial(self._ran, instance, batch, started, watchdog)
        )

    def _ran(
        self,
        instance: Instance,
        batch: Batch[InferenceRequest],
        started: Started,
        watchdog: asyncio.TimerHandle | None,
        call: asyncio.Future[BatchResult],
    ) -> None:
        """A batch's engine call ended (or was cancelled by fail_all)."""
        if watchdog is not None:
            watchdog.cancel()
        if self._batches.pop(call, None) is None:
            return  # the watchdog gave up on it: its instance is abandoned
        error = None if call.cancelled() else call.exception()
        if error is not None and len(batch.requests) > 1:
            task = asyncio.create_task(self._run_halves(instance, batch))
            self._batches[task] = batch
            task.add_done_callback(self._batch_done)
            return
        try:
            if error is not None:
                self._execution.failed(instance, batch, started, error)
            elif not call.cancelled():
                self._execution.succeeded(instance, batch, started, call.result())
        except Exception as exc:  # a defect here: the batch's callers still get an answer
            log.error("model %s: a batch failed", self._config.name, exc_info=exc)
            for request in batch.requests:
                settle_error(request.future, Internal(f"model '{self._config.name}': {exc!r}"))
        finally:
            self._pool.release(instance)

    def _timed_out(
        self, instance: Instance, batch: Batch[InferenceRequest], started: Started
    ) -> None:
        """The watchdog: the batch is still on its instance after execution_timeout_s."""
        if self._batches.pop(started.call, None) is None:
            return
        self._execution.timed_out(instance, batch)
        self._abandon(instance)

    async def drain(self, deadline: float) -> bool:
        while self._queue.live or self._batches:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            if self._batches:
                await asyncio.wait(set(self._batches), timeout=remaining)
            else:
                try:
                    async with asyncio.timeout(remaining):
                        await self._queue.changed()
                except TimeoutError:
                    return False
        return True

    def fail_all(self, error: TensorgateError) -> None:
        self._queue.fail_all(error)
        for running, batch in list(self._batches.items()):
            running.cancel()
            for request in batch.requests:
                settle_error(request.future, error)

    async def _next_batch(self) -> Batch[InferenceRequest] | None:
        queue, policy = self._queue, self.policy
        while True:
            oldest = queue.oldest_enqueued_at()
            if oldest is None:  # everything was cancelled meanwhile
                return None
            now = time.monotonic()
            wait_s = policy.wait_s(queue.rows, oldest, now, self._pool.idle)
            if wait_s <= 0:
                break
            queue.wake_rows = policy.wake_rows(queue.rows, oldest, now + wait_s)
            try:
                async with asyncio.timeout(wait_s):
                    await queue.changed()
            except TimeoutError:
                break
            finally:
                queue.wake_rows = 0
        return self._take(policy.batch_rows(queue.rows))

    def _take(self, max_rows: int) -> Batch[InferenceRequest] | None:
        now = time.monotonic()
        taken: list[InferenceRequest] = []
        rows = 0
        queue = self._queue
        while (request := queue.take(max_rows - rows)) is not None:
            if request.future.done():
                # Its caller cancelled it this loop iteration: the queue hears of it only on the
                # next one (done-callbacks run through call_soon).
                self.stats.dropped_cancelled += 1
                continue
            if request.deadline is not None and request.deadline <= now:
                self.stats.dropped_expired += 1
                settle_error(
                    request.future,
                    DeadlineExceeded(
                        f"deadline passed after {now - request.enqueued_at:.3f} s "
                        f"in model '{self._config.name}' queue, before it ran"
                    ),
                )
                continue
            taken.append(request)
            rows += request.rows
        return self._batch_of(taken, rows, now) if taken else None

    def _batch_of(
        self, taken: list[InferenceRequest], rows: int, now: float
    ) -> Batch[InferenceRequest]:
        """The batch of requests taken at `now`, their queue time counted."""
        for request in taken:
            waited_s = now - request.enqueued_at
            self.stats.queue_s_total += waited_s
            self._m_queue.observe(waited_s)
            if request.trace is not None:
                request.trace.taken_ns = time.time_ns()
            if request.on_start is not None:
                request.on_start()
        wanted = set().union(*(r.output_names for r in taken))
        names = tuple(n for n in self._model_outputs if n in wanted)
        return Batch(self._config.name, taken, rows, names)

    async def _run_halves(self, instance: Instance, batch: Batch[InferenceRequest]) -> None:
        try:
            await self._execution.run_halves(instance, batch)
        except InstanceHung:
            self._abandon(instance)
        except BaseException:
            self._pool.release(instance)
            raise
        else:
            self._pool.release(instance)

    def _abandon(self, instance: Instance) -> None:
        """The instance hung: it takes no more work, and a new one is started in its place."""
        instance.abandon()  # at once: nothing may close it or give it work from now on
        task = asyncio.create_task(self._replace_instance(instance))
        self._replacing.add(task)
        task.add_done_callback(self._replacing.discard)

    def _batch_done(self, task: asyncio.Task[None]) -> None:
        self._batches.pop(task, None)
        if not task.cancelled() and task.exception() is not None:
            log.error("model %s: a batch failed", self._config.name, exc_info=task.exception())
