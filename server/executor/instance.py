"""What every executor instance offers the scheduler: run one batch at a time, off the loop."""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from tensorgate.server.executor.batch import Batch, BatchPart
from tensorgate.server.executor.worker import Worker
from tensorgate.server.futures import settle_error
from tensorgate.server.tensors import Outputs

# How long close() waits for a batch still on the worker thread.
_CLOSE_WAIT_S = 10.0


@dataclass(slots=True)
class BatchResult:
    """Per-request outputs, and how long each stage of the batch took (seconds by stage name:
    "compute" on a CPU instance; "h2d", "compute", "d2h" timed with CUDA events on a GPU one)."""

    outputs: list[Outputs]
    stage_s: dict[str, float] = field(default_factory=dict)


class Instance(ABC):
    """One backend instance and the worker thread that runs its batches."""

    def __init__(
        self, model: str, index: int, initializer: Callable[[], None] | None = None
    ) -> None:
        self.model = model
        self.index = index
        self.abandoned = False
        self._worker = Worker(f"{model}-instance{index}", initializer)

    @abstractmethod
    def run_batch(self, batch: Batch[BatchPart]) -> BatchResult:
        """Runs on the worker thread."""

    @abstractmethod
    def run(self, inputs: Mapping[str, np.ndarray], output_names: Sequence[str]) -> Outputs:
        """Runs whole arrays through the model on the worker thread, blocking (warm-up)."""

    def start(self, batch: Batch[BatchPart]) -> asyncio.Future[BatchResult]:
        """Hands the batch to the worker thread now and returns its result to await. Called as
        the batch is formed, the thread wakes while the loop finishes its turn: a lone request
        is answered one loop iteration sooner than through a task that starts the call."""
        try:
            return self._worker.start(lambda: self.run_batch(batch))
        except RuntimeError as exc:  # the worker was closed or abandoned meanwhile
            failed: asyncio.Future[BatchResult] = asyncio.get_running_loop().create_future()
            settle_error(failed, exc)
            return failed

    def abandon(self) -> None:
        """Gives up on an instance whose thread is stuck in the engine: the thread cannot be
        killed, so it is left to finish (or not) on its own and the backend is not closed."""
        self.abandoned = True
        self._worker.abandon()

    def close(self) -> None:
        """Stops the worker thread (waiting a bounded time for a batch still on it), then
        releases the backend (subclasses). An abandoned instance is left alone."""
        self._worker.close(_CLOSE_WAIT_S)
