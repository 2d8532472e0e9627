"""A batch: parts (requests) concatenated along the first dimension, and outputs split back per
part.

The executor knows a part only as its inputs, rows and wanted outputs (BatchPart), so it never
imports the scheduler that formed the batch. pack() and split() run on the instance's worker
thread, so copies never hold the event loop.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

import numpy as np

from tensorgate.server.backends.base import RequestInfo
from tensorgate.server.errors import Internal
from tensorgate.server.tensors import Outputs


class BatchPart(Protocol):
    """What the executor reads of one request in a batch."""

    inputs: Mapping[str, np.ndarray]
    rows: int
    output_names: tuple[str, ...]
    id: str
    parameters: Mapping[str, Any]


P = TypeVar("P", bound=BatchPart)


@dataclass(slots=True)
class Batch(Generic[P]):
    model: str
    requests: Sequence[P]
    rows: int
    # Union of what the requests asked for, in the model's output order.
    output_names: tuple[str, ...]

    def infos(self) -> list[RequestInfo]:
        """The requests as the backend sees them, in packing order."""
        return [RequestInfo(r.id, r.rows, r.parameters) for r in self.requests]

    def pack(self) -> dict[str, np.ndarray]:
        first = self.requests[0].inputs
        if len(self.requests) == 1:
            return dict(first)
        return {name: np.concatenate([r.inputs[name] for r in self.requests]) for name in first}

    def split(self, outputs: Mapping[str, np.ndarray]) -> list[Outputs]:
        """Per-request views of the batch outputs, each with only the outputs it asked for."""
        for name in self.output_names:
            array = outputs.get(name)
            if array is None or array.ndim == 0 or array.shape[0] != self.rows:
                got = "nothing" if array is None else f"shape {list(array.shape)}"
                raise Internal(
                    f"model '{self.model}' returned {got} for output '{name}', "
                    f"expected {self.rows} rows"
                )
        results = []
        offset = 0
        for request in self.requests:
            end = offset + request.rows
            results.append({name: outputs[name][offset:end] for name in request.output_names})
            offset = end
        return results
