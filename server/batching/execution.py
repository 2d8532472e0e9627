"""Running one batch on an instance: under a watchdog, isolating the requests that make the engine
fail, recording what ran, and noticing when the engine stops working altogether.

A batch the engine fails on runs again in halves, down to single requests, so only the requests
that cause the failure fail. A batch still running after execution_timeout_s fails with
UNAVAILABLE and raises InstanceHung: that instance must be replaced, not reused.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from tensorgate.server.batching.stats import BatcherStats
from tensorgate.server.errors import Internal, TensorgateError, Unavailable
from tensorgate.server.executor.batch import Batch
from tensorgate.server.executor.instance import BatchResult, Instance
from tensorgate.server.futures import settle_error, settle_result
from tensorgate.server.inference import InferenceRequest
from tensorgate.server.model_config import ModelConfig
from tensorgate.server.telemetry import Telemetry

log = logging.getLogger(__name__)

# Weight of the newest batch in the moving average of the service rate.
_RATE_SMOOTHING = 0.2
# Engine failures in a row, with no success between them, after which the model is unhealthy.
_UNHEALTHY_AFTER_FAILURES = 5


class InstanceHung(Exception):
    """The watchdog gave up on an instance; it must not take another batch."""


@dataclass(slots=True)
class Started:
    """A batch's engine call, handed to its instance at `at_s` (perf_counter) and `at_ns`
    (wall clock, 0 when untraced): where its execute stage begins."""

    call: asyncio.Future[BatchResult]
    at_s: float
    at_ns: int


class BatchExecution:
    """Runs batches of one model and keeps its execution counters and engine health."""

    def __init__(
        self,
        config: ModelConfig,
        stats: BatcherStats,
        telemetry: Telemetry,
        on_health: Callable[[bool], None] = lambda healthy: None,
        on_batch: Callable[[int, float], None] = lambda rows, seconds: None,
    ) -> None:
        """on_batch(rows, seconds): a batch succeeded, holding its instance that long (what the
        batching policy learns the engine's cost from)."""
        self._config = config
        self.stats = stats
        self._on_health = on_health
        self._on_batch = on_batch
        self._tracing = telemetry.tracing
        metrics, model = telemetry.metrics, config.name
        self._m_compute = metrics.compute_seconds.labels(model)
        self._m_rows = metrics.batch_rows.labels(model)
        self._m_busy = metrics.instance_busy_seconds
        self.healthy = True
        self._consecutive_failures = 0

    def start(self, instance: Instance, batch: Batch[InferenceRequest]) -> Started:
        """Hands the batch to the instance now; its execute stage is timed from this moment."""
        started_s = time.perf_counter()
        started_ns = time.time_ns() if self._tracing.enabled else 0
        return Started(instance.start(batch), started_s, started_ns)  # type: ignore[arg-type]

    async def run(
        self,
        instance: Instance,
        batch: Batch[InferenceRequest],
        started: Started | None = None,
    ) -> None:
        """Runs the batch under the watchdog, awaited (`started`: its engine call, already handed
        to the instance by start()). The batcher takes the same steps from callbacks for a
        batch's first run (succeeded, failed, timed_out); this is the path of a retried half."""
        if started is None:  # a retried half: its call starts here
            started = self.start(instance, batch)
        try:
            async with asyncio.timeout(self._config.execution_timeout_s or None):
                result = await started.call
        except TimeoutError:
            self.timed_out(instance, batch)
            raise InstanceHung from None
        except Exception as exc:
            if len(batch.requests) > 1:
                await self.run_halves(instance, batch)
            else:
                self.failed(instance, batch, started, exc)
        else:
            self.succeeded(instance, batch, started, result)

    def timed_out(self, instance: Instance, batch: Batch[InferenceRequest]) -> None:
        """The watchdog gave up on the batch: its requests fail (the instance must be replaced)."""
        config = self._config
        self.stats.watchdog_timeouts += 1
        log.error(
            "model %s: instance %d did not finish a batch of %d rows within %.1f s; replacing it",
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

    def failed(
        self,
        instance: Instance,
        batch: Batch[InferenceRequest],
        started: Started,
        exc: BaseException,
    ) -> None:
        """The engine failed on a batch that is not split further (one request)."""
        if not isinstance(exc, TensorgateError):
            request_id = batch.requests[0].id if batch.requests else ""
            log.warning(
                "model %s failed on request %r: %r", self._config.name, request_id, exc,
                extra={"request_id": request_id},
            )  # fmt: skip
            exc = Internal(
                f"model '{self._config.name}' failed on this request: {type(exc).__name__}: {exc}"
            )
        self._fail(batch, exc)
        self._note_engine(ok=False)
        self._trace(batch, instance, started.at_ns, {})

    def succeeded(
        self,
        instance: Instance,
        batch: Batch[InferenceRequest],
        started: Started,
        result: BatchResult,
    ) -> None:
        """The batch ran: its counters, and each request that still waits gets its outputs."""
        elapsed_s = time.perf_counter() - started.at_s
        compute_s = result.stage_s.get("compute", 0.0)
        self._record(batch, elapsed_s, compute_s)
        self._on_batch(batch.rows, elapsed_s)
        self._m_rows.observe(batch.rows)
        self._m_compute.observe(compute_s)
        self._m_busy.labels(self._config.name, str(instance.index)).inc(elapsed_s)
        self._trace(batch, instance, started.at_ns, result.stage_s)
        now = time.monotonic()
        for request, outputs in zip(batch.requests, result.outputs, strict=True):
            if request.future.done():
                continue  # its caller went away while it ran
            if request.keep is not None:
                outputs = request.keep(outputs)
            settle_result(request.future, outputs)
            self.stats.success_s_total += now - request.enqueued_at
        self._note_engine(ok=True)

    def _trace(
        self,
        batch: Batch[InferenceRequest],
        instance: Instance,
        started_ns: int,
        stage_s: dict[str, float],
    ) -> None:
        if not self._tracing.enabled:
            return
        traces = [r.trace for r in batch.requests if r.trace is not None]
        self._tracing.batch_done(
            self._config.name, traces, batch.rows, len(batch.requests), instance.index,
            started_ns, time.time_ns(), stage_s,
        )  # fmt: skip

    async def run_halves(self, instance: Instance, batch: Batch[InferenceRequest]) -> None:
        """The engine failed on the batch: each half runs again, down to single requests."""
        self.stats.isolation_retries += 1
        halves = _halves(batch)
        for i, half in enumerate(halves):
            try:
                await self.run(instance, half)
            except InstanceHung:
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

    def _record(self, batch: Batch[InferenceRequest], elapsed_s: float, compute_s: float) -> None:
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

    def _fail(self, batch: Batch[InferenceRequest], error: TensorgateError) -> None:
        self.stats.failed_batches += 1
        now = time.monotonic()
        for request in batch.requests:
            if settle_error(request.future, error):
                self.stats.failed_requests += 1
                self.stats.failed_s_total += now - request.enqueued_at


def _halves(batch: Batch[InferenceRequest]) -> list[Batch[InferenceRequest]]:
    """The still-wanted requests of a batch in two batches."""
    live = [r for r in batch.requests if not r.future.done()]
    middle = len(live) // 2
    parts = [live[:middle], live[middle:]] if middle else [live]
    return [
        Batch(batch.model, part, sum(r.rows for r in part), batch.output_names)
        for part in parts
        if part
    ]
