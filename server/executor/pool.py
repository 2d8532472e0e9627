"""A pool of instances per model; the scheduler takes an idle one for each batch."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from tensorgate.server.backends.base import AnyBackendInstance
from tensorgate.server.executor.cpu import CpuInstance
from tensorgate.server.executor.instance import Instance
from tensorgate.server.model_config import ModelConfig


def make_instance(
    config: ModelConfig, index: int, backend: AnyBackendInstance, max_rows: int
) -> Instance:
    """A CPU instance (worker thread) or a GPU instance (stream, buffers) for the backend."""
    if backend.placement == "gpu":
        from tensorgate.server.executor.gpu import GpuInstance  # imports cuda-python

        pad = config.preferred_batch_sizes if config.pad_to_preferred else ()
        return GpuInstance(config.name, index, backend, max_rows, pad)
    return CpuInstance(config.name, index, backend)


class InstancePool:
    """Hands out idle instances; a batch runs on one instance at a time."""

    def __init__(self, instances: Sequence[Instance]) -> None:
        self.instances = list(instances)
        # The instance that finished last goes out first: at light load one instance does the
        # work and its thread, engine arena and the model's weights stay warm in the caches
        # (each batch on the other instance found them cold: 132 -> 120 µs of worker CPU a
        # request at 1 in flight, bench.anatomy --concurrency 1). Under load all are busy anyway.
        self._idle: asyncio.LifoQueue[Instance] = asyncio.LifoQueue()
        self.taken: set[Instance] = set()  # acquired and not yet released
        for instance in self.instances:
            self._idle.put_nowait(instance)

    @property
    def idle(self) -> int:
        return self._idle.qsize()

    async def acquire(self) -> Instance:
        instance = await self._idle.get()
        self.taken.add(instance)
        return instance

    def try_acquire(self) -> Instance | None:
        """An idle instance without waiting, or None."""
        try:
            instance = self._idle.get_nowait()
        except asyncio.QueueEmpty:
            return None
        self.taken.add(instance)
        return instance

    def release(self, instance: Instance) -> None:
        self.taken.discard(instance)
        self._idle.put_nowait(instance)

    def replace(self, old: Instance, new: Instance | None) -> None:
        """Swaps a retired instance for a fresh one (or just drops it when none could be made)."""
        self.taken.discard(old)
        self.instances.remove(old)
        if new is not None:
            self.instances.append(new)
            self._idle.put_nowait(new)
