"""The one interface every backend implements. The executor and batcher see nothing else."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

import numpy as np

from server.tensors import TensorSpec


class BackendInstance(Protocol):
    """One loaded copy of a model, driven by one executor instance at a time.

    execute() runs on the instance's worker thread, never on the event loop; it takes whole
    batches (first dimension = rows) and returns the requested outputs for every row.
    """

    @property
    def inputs(self) -> Sequence[TensorSpec]: ...

    @property
    def outputs(self) -> Sequence[TensorSpec]: ...

    @property
    def max_batch_size(self) -> int | None:
        """The artifact's own limit on rows per batch, or None when it has none."""
        ...

    def execute(
        self, inputs: Mapping[str, np.ndarray], output_names: Sequence[str]
    ) -> dict[str, np.ndarray]: ...

    def close(self) -> None: ...
