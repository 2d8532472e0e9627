"""A served model: its backend instances, its instance pool and its batcher, with a lifecycle."""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any

import numpy as np

from server.backends import AnyBackendInstance, load_instance
from server.batching.batcher import DynamicBatcher
from server.batching.request import InferenceRequest
from server.config import ConfigError, ModelConfig
from server.datatypes import NUMPY_BY_DATATYPE
from server.errors import InvalidArgument, Unavailable
from server.executor.instance import Instance
from server.executor.pool import InstancePool, make_instance
from server.telemetry import Telemetry
from server.tensors import TensorInput, TensorSpec, decode_inputs

log = logging.getLogger(__name__)


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
        self.state = ModelState.LOADING
        self.failure = ""
        self.inputs: Sequence[TensorSpec] = ()
        self.outputs: Sequence[TensorSpec] = ()
        self.max_batch_size = config.max_batch_size
        self._instances: list[Instance] = []
        self._pool: InstancePool | None = None
        self._batcher: DynamicBatcher | None = None
        self._task: asyncio.Task[None] | None = None
        self._on_health: Callable[[bool], None] = lambda healthy: None

    @property
    def batcher(self) -> DynamicBatcher:
        if self._batcher is None:
            raise Unavailable(self.not_ready_message())
        return self._batcher

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
        self.inputs, self.outputs = tuple(backend.inputs), tuple(backend.outputs)
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
        names = [spec.name for spec in self.outputs]
        for rows in sorted({1, self.max_batch_size}):
            inputs = {
                spec.name: np.zeros(
                    (rows, *(d if d > 0 else 1 for d in spec.shape[1:])),
                    dtype=NUMPY_BY_DATATYPE[spec.datatype],
                )
                for spec in self.inputs
            }
            instance.run(inputs, names)

    def start(
        self,
        on_health: Callable[[bool], None] = lambda healthy: None,
        telemetry: Telemetry | None = None,
    ) -> None:
        """Starts the batcher on the running loop. on_health hears when the engine stops (or
        starts again) working."""
        self._pool = InstancePool(self._instances)
        self._on_health = on_health
        config = self.config
        if self.max_batch_size != config.max_batch_size:
            config = _with_max_batch(config, self.max_batch_size)
        self._batcher = DynamicBatcher(
            config, [s.name for s in self.outputs], self._pool, self._replace, on_health, telemetry
        )
        self._task = asyncio.create_task(self._batcher.run(), name=f"batcher-{self.name}")
        self._task.add_done_callback(self._batcher_ended)
        self.state = ModelState.READY

    @property
    def busy_instances(self) -> int:
        return self._pool.busy if self._pool is not None else 0

    @property
    def instance_total(self) -> int:
        return len(self._pool.instances) if self._pool is not None else 0

    @property
    def healthy(self) -> bool:
        return self.state is ModelState.READY and (self._batcher is None or self._batcher.healthy)

    async def _replace(self, stuck: Instance) -> None:
        """Retires an instance the watchdog gave up on and loads a fresh one in its place."""
        assert self._pool is not None
        stuck.abandon()
        try:
            fresh: Instance | None = await asyncio.to_thread(self._load_instance, stuck.index)
        except Exception as exc:
            log.error("model %s: could not replace instance %d: %s", self.name, stuck.index, exc)
            fresh = None
        self._pool.replace(stuck, fresh)
        if fresh is not None:
            log.info("model %s: instance %d replaced", self.name, stuck.index)
        elif not self._pool.instances:
            self._on_health(False)

    def fail(self, reason: str) -> None:
        self.state = ModelState.FAILED
        self.failure = reason

    def new_request(
        self,
        inputs: Sequence[TensorInput],
        requested_outputs: Sequence[str] = (),
        deadline: float | None = None,
        request_id: str = "",
        parameters: Mapping[str, Any] | None = None,
        default_deadline: bool = True,
    ) -> InferenceRequest:
        """Validates a request against this model and wraps it with a fresh future.

        Without a caller deadline the model's default_timeout applies, unless default_deadline
        is False (jobs: nobody is waiting on the call).
        """
        if self.state is not ModelState.READY:
            raise Unavailable(self.not_ready_message())
        if deadline is None and default_deadline and self.config.default_timeout_s > 0:
            deadline = time.monotonic() + self.config.default_timeout_s
        arrays, rows = decode_inputs(self.name, self.inputs, inputs, self.max_batch_size)
        known = [spec.name for spec in self.outputs]
        if requested_outputs:
            unknown = [name for name in requested_outputs if name not in known]
            if unknown:
                raise InvalidArgument(
                    f"model '{self.name}' has no output '{unknown[0]}'; "
                    f"its outputs are: {', '.join(known)}"
                )
            output_names = tuple(dict.fromkeys(requested_outputs))
        else:
            output_names = tuple(known)
        return InferenceRequest(
            inputs=arrays,
            rows=rows,
            output_names=output_names,
            future=asyncio.get_running_loop().create_future(),
            deadline=deadline,
            id=request_id,
            parameters=parameters or {},
        )

    def enqueue(self, request: InferenceRequest) -> None:
        self.batcher.put(request)

    def estimated_wait_s(self, extra_rows: int = 0) -> float:
        """Time to work through the queued rows plus extra_rows at the observed service rate."""
        batcher = self.batcher
        rate = batcher.rows_per_s
        if rate <= 0:
            return 0.0
        return (batcher.queued_rows + extra_rows) / rate

    async def stop(self) -> None:
        """Finishes queued and running batches, then stops the batcher and closes the instances."""
        if self._batcher is not None:
            await self._batcher.drain()
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        await asyncio.to_thread(self.close)
        self.state = ModelState.STOPPED

    def close(self) -> None:
        """Releases the instances (blocking only while a batch is still on a thread)."""
        for instance in self._pool.instances if self._pool is not None else self._instances:
            instance.close()
        self._instances = []
        self._pool = None

    def not_ready_message(self) -> str:
        if self.state is ModelState.FAILED:
            return f"model '{self.name}' failed to load: {self.failure}"
        return f"model '{self.name}' is {self.state.value.lower()}, not ready"

    def _batcher_ended(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("model %s: batcher stopped", self.name, exc_info=task.exception())
            self.fail(f"batcher stopped: {task.exception()}")


def _with_max_batch(config: ModelConfig, max_batch_size: int) -> ModelConfig:
    return replace(
        config,
        max_batch_size=max_batch_size,
        preferred_batch_sizes=tuple(s for s in config.preferred_batch_sizes if s <= max_batch_size),
    )
