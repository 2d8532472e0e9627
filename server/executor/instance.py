"""What every executor instance offers the batcher: run one batch at a time, off the loop."""

from __future__ import annotations

import asyncio
import concurrent.futures
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from server.batching.batch import Batch
from server.batching.request import Outputs


@dataclass(slots=True)
class BatchResult:
    """Per-request outputs, and how long each stage of the batch took (seconds by stage name:
    "compute" on a CPU instance; "h2d", "compute", "d2h" timed with CUDA events on a GPU one)."""

    outputs: list[Outputs]
    stage_s: dict[str, float] = field(default_factory=dict)


class Instance(ABC):
    """One backend instance and the worker thread that runs its batches."""

    def __init__(self, model: str, index: int) -> None:
        self.model = model
        self.index = index
        self._thread = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=f"{model}-instance{index}"
        )

    @abstractmethod
    def run_batch(self, batch: Batch) -> BatchResult:
        """Runs on the worker thread."""

    @abstractmethod
    def run(self, inputs: Mapping[str, np.ndarray], output_names: Sequence[str]) -> Outputs:
        """Runs whole arrays through the model, blocking (warm-up at load uses it)."""

    async def execute(self, batch: Batch) -> BatchResult:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._thread, self.run_batch, batch)

    def abandon(self) -> None:
        """Gives up on an instance whose thread is stuck in the engine: the thread cannot be
        killed, so it is left to finish (or not) on its own and the backend is not closed."""
        self._thread.shutdown(wait=False, cancel_futures=True)

    def close(self) -> None:
        self._thread.shutdown(wait=True)
