"""The bundled MLP written for the `python` backend (see server/backends/python.py).

With stream None it runs numpy on the CPU; with a CUDA stream handle it runs CuPy on that stream,
reading its inputs straight from the instance's device buffers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper


class Model:
    def load(self, config: dict[str, Any]) -> None:
        path = Path(config["model_dir"]) / config["parameters"]["weights"]
        weights = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}
        self.w1, self.b1, self.w2, self.b2 = (weights[k] for k in ("w1", "b1", "w2", "b2"))
        self.gpu: tuple[Any, ...] | None = None

    def execute(self, inputs: dict[str, Any], stream: int | None) -> dict[str, Any]:
        if stream is None:
            return _forward(np, inputs["input"], self.w1, self.b1, self.w2, self.b2)
        import cupy as cp

        with cp.cuda.ExternalStream(stream):
            if self.gpu is None:
                self.gpu = tuple(cp.asarray(w) for w in (self.w1, self.b1, self.w2, self.b2))
            return _forward(cp, cp.asarray(inputs["input"]), *self.gpu)


def _forward(xp: Any, x: Any, w1: Any, b1: Any, w2: Any, b2: Any) -> dict[str, Any]:
    hidden = xp.maximum(x @ w1 + b1, 0)
    logits = hidden @ w2 + b2
    shifted = xp.exp(logits - logits.max(axis=1, keepdims=True))
    return {"logits": logits, "probabilities": shifted / shifted.sum(axis=1, keepdims=True)}
