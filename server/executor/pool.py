"""A pool of instances per model; the batcher takes an idle one for each batch.

A CPU instance is one backend instance driven by its own worker thread: the whole batch (pack,
execute, split) runs there, and asyncio hands the result back to the loop thread-safely.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Sequence

from server.backends.base import BackendInstance
from server.batching.batch import Batch
from server.batching.request import Outputs


class Instance:
    """One backend instance and the thread that runs its batches, one at a time."""

    def __init__(self, model: str, index: int, backend: BackendInstance) -> None:
        self.model = model
        self.index = index
        self.backend = backend
        self._thread = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=f"{model}-instance{index}"
        )

    def run_batch(self, batch: Batch) -> list[Outputs]:
        """Runs on the worker thread."""
        outputs = self.backend.execute(batch.pack(), batch.output_names)
        return batch.split(outputs)

    async def execute(self, batch: Batch) -> list[Outputs]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._thread, self.run_batch, batch)

    def close(self) -> None:
        self._thread.shutdown(wait=True)
        self.backend.close()


class InstancePool:
    """Hands out idle instances; a batch runs on one instance at a time."""

    def __init__(self, instances: Sequence[Instance]) -> None:
        self.instances = list(instances)
        self._idle: asyncio.Queue[Instance] = asyncio.Queue()
        for instance in self.instances:
            self._idle.put_nowait(instance)

    @property
    def busy(self) -> int:
        return len(self.instances) - self._idle.qsize()

    async def acquire(self) -> Instance:
        return await self._idle.get()

    def release(self, instance: Instance) -> None:
        self._idle.put_nowait(instance)

    async def execute(self, instance: Instance, batch: Batch) -> list[Outputs]:
        return await instance.execute(batch)

    def close(self) -> None:
        for instance in self.instances:
            instance.close()
