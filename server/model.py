"""A served model: its backend instances, its instance pool and its scheduler, with a lifecycle.

`ready` is the one source of truth for the model's health: grpc.health.v1 hears every change
through on_ready, and KServe's ModelReady reads the same property.
"""

from __future__ import annotations

import asyncio
import collections
import enum
import logging
import time
from collections.abc import Callable
from dataclasses import replace

import numpy as np

from tensorgate.server.backends import AnyBackendInstance, load_instance
from tensorgate.server.batching.batcher import DynamicBatcher
from tensorgate.server.batching.scheduler import Scheduler
from tensorgate.server.batching.sequences import SequenceScheduler
from tensorgate.server.config import ConfigError
from tensorgate.server.datatypes import NUMPY_BY_DATATYPE
from tensorgate.server.errors import InvalidArgument, Unavailable
from tensorgate.server.executor.instance import Instance
from tensorgate.server.executor.pool import InstancePool, make_instance
from tensorgate.server.inference import InferenceRequest
from tensorgate.server.model_config import ModelConfig
from tensorgate.server.records import ModelStatistics, Request, RequestKind
from tensorgate.server.telemetry import Telemetry
from tensorgate.server.tensors import TensorSpec, decode_inputs, view_inputs

log = logging.getLogger(__name__)

# A scheduler that dies of an unexpected error restarts at once; after this many deaths within
# _CRASH_WINDOW_S, each restart waits twice as long as the last (from _FIRST_BACKOFF_S, at most
# _MAX_BACKOFF_S), so a fault that recurs cannot spin the loop.
_CRASHES_BEFORE_BACKOFF = 3
_CRASH_WINDOW_S = 10.0
_FIRST_BACKOFF_S = 0.1
_MAX_BACKOFF_S = 5.0


class ModelState(enum.Enum):
    LOADING = "LOADING"
    READY = "READY"
    FAILED = "FAILED"
    STOPPED = "STOPPED"


class ServedModel:
    """One model of the repository.

    load() blocks (run it off the loop); start() needs the running loop.
    """

    def __init__(self, config: ModelConfig) -> None:
        self.config = config
        self.name = config.name
        self.version = config.version
        self.state = ModelState.LOADING
        # Requests admitted to this version whose result is not settled yet: a version being
        # retired is released only once none is left (and no sequence lives on it).
        self.admitted = 0
        self.failure = ""
        # What callers send and get back. A stateful model's engine also takes and returns its
        # state (the server's business, not the caller's): engine_inputs / engine_outputs.
        self.inputs: tuple[TensorSpec, ...] = ()
        self._inputs_by_name: dict[str, TensorSpec] = {}
        self.outputs: tuple[TensorSpec, ...] = ()
        self.engine_inputs: tuple[TensorSpec, ...] = ()
        self.engine_outputs: tuple[TensorSpec, ...] = ()
        self._output_names: tuple[str, ...] = ()
        self.max_batch_size = config.max_batch_size
        self._instances: list[Instance] = []
        self._pool: InstancePool | None = None
        self._scheduler: DynamicBatcher | SequenceScheduler | None = None
        self._task: asyncio.Task[None] | None = None
        self._restart: asyncio.TimerHandle | None = None
        self._crashes: collections.deque[float] = collections.deque(maxlen=32)
        self._telemetry = Telemetry.quiet()
        self._on_ready: Callable[[bool], None] = lambda ready: None
        self._reported_ready = False
        # The loop start() ran on: admit() makes its futures there without asking asyncio
        # for the running loop (a getpid() system call each time on Python 3.11).
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def scheduler(self) -> Scheduler:
        if self._scheduler is None:
            raise Unavailable(self.not_ready_message())
        return self._scheduler

    @property
    def ready(self) -> bool:
        """Loaded, started, its scheduler running, at least one instance, and the engine not
        failing every batch."""
        return (
            self.state is ModelState.READY
            and self._scheduler is not None
            and self._scheduler.healthy
            and self._pool is not None
            and bool(self._pool.instances)
            and self._task is not None
            and not self._task.done()
        )

    def load(self) -> None:
        """Loads every instance and runs a warm-up batch on each. Blocking."""
        started = time.perf_counter()
        config = self.config
        for index in range(config.instance_count):
            self._instances.append(self._load_instance(index))
        log.info(
            "model %s loaded: backend %s, %d instance(s), max batch %d, in %.2f s",
            self.name,
            config.backend,
            len(self._instances),
            self.max_batch_size,
            time.perf_counter() - started,
        )

    def _load_instance(self, index: int) -> Instance:
        """Loads backend instance `index`, wraps it in an executor instance and warms it up."""
        config = self.config
        backend = load_instance(config, index)
        try:
            if not self.inputs:
                self._describe(backend)
            instance = make_instance(config, index, backend, self.max_batch_size)
        except BaseException:
            backend.close()
            raise
        try:
            self._warm_up(instance)
        except BaseException:
            instance.close()
            raise
        return instance

    def _describe(self, backend: AnyBackendInstance) -> None:
        """Takes the model's I/O and batch limit from its first backend instance."""
        self.engine_inputs, self.engine_outputs = tuple(backend.inputs), tuple(backend.outputs)
        sequence = self.config.sequence
        state = {n for s in sequence.state for n in (s.input, s.output)} if sequence else set()
        self.inputs = tuple(spec for spec in self.engine_inputs if spec.name not in state)
        self._inputs_by_name = {spec.name: spec for spec in self.inputs}
        self.outputs = tuple(spec for spec in self.engine_outputs if spec.name not in state)
        self._output_names = tuple(spec.name for spec in self.outputs)
        if not self.inputs or not self.outputs:
            raise ConfigError(f"model '{self.name}' has no inputs or no outputs")
        limit = backend.max_batch_size
        if limit is not None and limit < self.config.max_batch_size:
            log.info(
                "model %s: max_batch_size %d lowered to the artifact's limit %d",
                self.name,
                self.config.max_batch_size,
                limit,
            )
            self.max_batch_size = limit

    def _warm_up(self, instance: Instance) -> None:
        names = [spec.name for spec in self.engine_outputs]
        for rows in sorted({1, self.max_batch_size}):
            inputs = {
                spec.name: np.zeros(
                    (rows, *(d if d > 0 else 1 for d in spec.shape[1:])),
                    dtype=NUMPY_BY_DATATYPE[spec.datatype],
                )
                for spec in self.engine_inputs
            }
            instance.run(inputs, names)

    def start(
        self,
        on_ready: Callable[[bool], None] = lambda ready: None,
        telemetry: Telemetry | None = None,
    ) -> None:
        """Starts the scheduler on the running loop. on_ready hears every change of `ready`."""
        self._pool = InstancePool(self._instances)
        self._loop = asyncio.get_running_loop()
        self._on_ready = on_ready
        config = self.config
        if self.max_batch_size != config.max_batch_size:
            config = _with_max_batch(config, self.max_batch_size)
        batcher = DynamicBatcher(
            config,
            [s.name for s in self.engine_outputs],
            self._pool,
            self._replace,
            lambda healthy: self._notify(),
            telemetry,
        )
        self._scheduler = SequenceScheduler(config, batcher) if config.sequence else batcher
        self._telemetry = telemetry or Telemetry.quiet()
        self.state = ModelState.READY
        self._run_scheduler()

    def _run_scheduler(self) -> None:
        """Starts (or restarts) the scheduler's task."""
        self._restart = None
        if self.state is not ModelState.READY or self._scheduler is None:
            return
        self._task = asyncio.create_task(self._scheduler.run(), name=f"scheduler-{self.name}")
        self._task.add_done_callback(self._scheduler_ended)
        self._notify()

    def _notify(self) -> None:
        """Tells on_ready when `ready` changed since it last heard."""
        ready = self.ready
        if ready != self._reported_ready:
            self._reported_ready = ready
            self._on_ready(ready)

    @property
    def busy_instances(self) -> int:
        return self._scheduler.busy_instances if self._scheduler is not None else 0

    @property
    def instance_total(self) -> int:
        return len(self._pool.instances) if self._pool is not None else 0

    async def _replace(self, stuck: Instance) -> None:
        """Retires an instance the watchdog gave up on and loads a fresh one in its place."""
        assert self._pool is not None and self._scheduler is not None
        stuck.abandon()
        fresh: Instance | None = None
        if self.state is ModelState.READY:
            try:
                fresh = await asyncio.to_thread(self._load_instance, stuck.index)
            except Exception as exc:
                log.error(
                    "model %s: could not replace instance %d: %s", self.name, stuck.index, exc
                )
        if self.state is not ModelState.READY:  # the model stopped meanwhile
            if fresh is not None:
                await asyncio.to_thread(fresh.close)
            return
        self._pool.replace(stuck, fresh)
        if fresh is not None:
            log.info("model %s: instance %d replaced", self.name, stuck.index)
        elif not self._pool.instances:
            log.error("model %s: no working instance left: NOT_SERVING", self.name)
            self._scheduler.fail_all(
                Unavailable(f"model '{self.name}' has no working instance left")
            )
        self._notify()

    def fail(self, reason: str) -> None:
        self.state = ModelState.FAILED
        self.failure = reason
        self._notify()

    def check_taking(self) -> None:
        """UNAVAILABLE naming the cause unless the model takes requests now. (One whose engine
        keeps failing still does: a success is how it recovers.)"""
        if self.state is not ModelState.READY or self._pool is None or not self._pool.instances:
            raise Unavailable(self.not_ready_message())

    def admit(self, request: Request, kind: RequestKind) -> InferenceRequest:
        """Checks a request against this model's inputs and outputs and wraps it, decoded into
        zero-copy views, with a fresh future. Raises InvalidArgument naming what is wrong."""
        arrays, rows = decode_inputs(
            self.name, self._inputs_by_name, request.inputs, self.max_batch_size
        )
        if request.requested_outputs:
            known = self._output_names
            unknown = [name for name in request.requested_outputs if name not in known]
            if unknown:
                raise InvalidArgument(
                    f"model '{self.name}' has no output '{unknown[0][:200]}'; "
                    f"its outputs are: {', '.join(known)}"
                )
        return self._request(request, kind, arrays, rows)

    def admit_stored(self, payload: Request) -> InferenceRequest:
        """A job's request, admitted when it was submitted, decoded from what the store holds
        without checking it again."""
        arrays, rows = view_inputs(payload.inputs)
        return self._request(payload, RequestKind.JOB, arrays, rows)

    def _request(
        self, request: Request, kind: RequestKind, arrays: dict[str, np.ndarray], rows: int
    ) -> InferenceRequest:
        """The record the scheduler takes. Without a caller deadline the model's default_timeout
        applies, except to a job (nobody waits on the call). Without a priority (0) the request
        gets the model's default for its kind: default_priority, or job_priority for a job."""
        job = kind is RequestKind.JOB
        deadline = request.deadline
        if deadline is None and not job and self.config.default_timeout_s > 0:
            deadline = time.monotonic() + self.config.default_timeout_s
        names = request.requested_outputs
        admitted = InferenceRequest(
            inputs=arrays,
            rows=rows,
            output_names=tuple(dict.fromkeys(names)) if names else self._output_names,
            future=(self._loop or asyncio.get_running_loop()).create_future(),
            deadline=deadline,
            id=request.id,
            parameters=request.parameters,
            priority=request.priority
            or (self.config.job_priority if job else self.config.default_priority),
            tenant=request.tenant,
            sequence=request.sequence if self.config.sequence else None,
            target=self,
        )
        if job:
            # A job's request may be held (by its lane) before it is queued here: counted until
            # it settles. A call's or stream item's is queued in the same step it is admitted
            # in, so the scheduler's own state covers it (see idle), with no callback per call.
            self.track(admitted)
        return admitted

    def track(self, request: InferenceRequest) -> None:
        """Counts a job's request as admitted here until its future settles."""
        self.admitted += 1
        request.future.add_done_callback(self._settled)

    def _settled(self, _: object) -> None:
        self.admitted -= 1

    @property
    def idle(self) -> bool:
        """Nothing queued or running on it, no job's request held for it and no sequence living
        on it: a retiring version may be released."""
        scheduler = self._scheduler
        if scheduler is not None and (scheduler.queued_requests or scheduler.running_requests):
            return False
        return self.admitted <= 0 and self.live_sequences == 0

    def holds_sequence(self, tenant: str, sequence_id: str) -> bool:
        """Whether the sequence lives on this version (its chunks must come here)."""
        if isinstance(self._scheduler, SequenceScheduler):
            return self._scheduler.holds((tenant, sequence_id))
        return False

    def statistics(self) -> ModelStatistics:
        """Cumulative counters (KServe ModelStatistics)."""
        stats = self.scheduler.stats
        return ModelStatistics(
            name=self.name,
            version=self.version,
            last_inference_ms=stats.last_inference_ms,
            rows=stats.rows,
            batches=stats.batches,
            requests=stats.requests,
            success_s_total=stats.success_s_total,
            failed_requests=stats.failed_requests,
            failed_s_total=stats.failed_s_total,
            queue_s_total=stats.queue_s_total,
            compute_s_total=stats.compute_s_total,
            by_batch_size={
                size: (count, stats.compute_s_by_size[size])
                for size, count in sorted(stats.batch_sizes.items())
            },
        )

    @property
    def queued_requests(self) -> int:
        return self._scheduler.queued_requests if self._scheduler is not None else 0

    def end_sequences(self, owner: str) -> int:
        """Frees the sequences a stream was driving; returns how many (0 for a stateless
        model)."""
        if isinstance(self._scheduler, SequenceScheduler):
            return self._scheduler.end_owner(owner)
        return 0

    @property
    def live_sequences(self) -> int:
        if isinstance(self._scheduler, SequenceScheduler):
            return self._scheduler.live_sequences
        return 0

    def estimated_wait_s(self, extra_rows: int = 0) -> float:
        """Time to work through the queued rows plus extra_rows at the observed service rate."""
        scheduler = self.scheduler
        rate = scheduler.rows_per_s
        if rate <= 0:
            return 0.0
        return (scheduler.queued_rows + extra_rows) / rate

    async def stop(self, deadline: float) -> None:
        """Finishes queued and running batches until the monotonic deadline; what is left then
        fails with UNAVAILABLE. Stops the scheduler and releases the instances: an instance
        still inside the engine is abandoned (its thread cannot be stopped) instead of waited
        for, so stopping takes no longer than the deadline plus a moment."""
        scheduler = self._scheduler
        drained = True
        if scheduler is not None:
            drained = await scheduler.drain(deadline)
            if not drained:
                log.warning("model %s: work left at the end of the grace period fails", self.name)
                scheduler.fail_all(Unavailable(f"model '{self.name}' stopped before it ran"))
        if self._restart is not None:
            self._restart.cancel()
            self._restart = None
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            except Exception:
                pass  # a scheduler that died: _scheduler_ended logged it
        if self._pool is not None and not drained:
            for instance in self._pool.taken:
                instance.abandon()  # still inside the engine
        self.state = ModelState.STOPPED
        self._notify()
        await asyncio.to_thread(self.close)

    def close(self) -> None:
        """Releases the instances (abandoned ones are left alone)."""
        for instance in self._pool.instances if self._pool is not None else self._instances:
            instance.close()
        self._instances = []
        self._pool = None

    def not_ready_message(self) -> str:
        if self.state is ModelState.FAILED:
            return f"model '{self.name}' failed to load: {self.failure}"
        if self.state is ModelState.READY:
            if self._pool is not None and not self._pool.instances:
                return f"model '{self.name}' has no working instance"
            return f"model '{self.name}' is not serving: its engine keeps failing"
        return f"model '{self.name}' is {self.state.value.lower()}, not ready"

    def _scheduler_ended(self, task: asyncio.Task[None]) -> None:
        """A scheduler task ended. Cancelled: the model stops. Anything else is a fault in the
        server, not in the model: the task restarts (logged and counted) and the model turns
        SERVING again, instead of refusing every call until the process restarts."""
        if task is not self._task:
            return
        self._notify()
        if task.cancelled() or self.state is not ModelState.READY:
            return
        error = task.exception()
        now = time.monotonic()
        self._crashes.append(now)
        recent = sum(1 for at in self._crashes if now - at <= _CRASH_WINDOW_S)
        delay_s = 0.0
        if recent > _CRASHES_BEFORE_BACKOFF:
            delay_s = min(
                _FIRST_BACKOFF_S * 2 ** (recent - _CRASHES_BEFORE_BACKOFF - 1), _MAX_BACKOFF_S
            )
        log.error(
            "model %s: scheduler failed (%d time(s) in %.0f s); restarting it in %.2f s",
            self.name, recent, _CRASH_WINDOW_S, delay_s, exc_info=error,
        )  # fmt: skip
        self._telemetry.metrics.scheduler_restarts.labels(self.name).inc()
        self._restart = asyncio.get_running_loop().call_later(delay_s, self._run_scheduler)


def _with_max_batch(config: ModelConfig, max_batch_size: int) -> ModelConfig:
    return replace(
        config,
        max_batch_size=max_batch_size,
        preferred_batch_sizes=tuple(s for s in config.preferred_batch_sizes if s <= max_batch_size),
    )
