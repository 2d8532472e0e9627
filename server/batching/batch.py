"""A batch: requests concatenated along the first dimension, and outputs split back per request.

pack() and split() run on the instance's worker thread, so copies never hold the event loop.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from server.batching.request import InferenceRequest, Outputs
from server.errors import Internal


@dataclass(slots=True)
class Batch:
    model: str
    requests: list[InferenceRequest]
    rows: int
    # Union of what the requests asked for, in the model's output order.
    output_names: tuple[str, ...]

    def halves(self) -> list[Batch]:
        """The still-wanted requests in two batches (for isolating a failing request)."""
        live = [r for r in self.requests if not r.future.done()]
        middle = len(live) // 2
        parts = [live[:middle], live[middle:]] if middle else [live]
        return [
            Batch(self.model, part, sum(r.rows for r in part), self.output_names)
            for part in parts
            if part
        ]

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
