"""A CPU instance: a backend that takes numpy batches, driven by its own worker thread."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence

import numpy as np

from tensorgate.server.backends.base import BackendInstance
from tensorgate.server.executor.batch import Batch, BatchPart
from tensorgate.server.executor.instance import BatchResult, Instance
from tensorgate.server.tensors import Outputs


class CpuInstance(Instance):
    def __init__(self, model: str, index: int, backend: BackendInstance) -> None:
        super().__init__(model, index)
        self.backend = backend

    def run(self, inputs: Mapping[str, np.ndarray], output_names: Sequence[str]) -> Outputs:
        return self._worker.call(lambda: self.backend.execute(inputs, output_names))

    def run_batch(self, batch: Batch[BatchPart]) -> BatchResult:
        started = time.perf_counter()
        outputs = self.backend.execute(batch.pack(), batch.output_names, batch.infos())
        compute_s = time.perf_counter() - started
        return BatchResult(batch.split(outputs), {"compute": compute_s})

    def close(self) -> None:
        if self.abandoned:
            return
        super().close()
        self.backend.close()
