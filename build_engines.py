"""Builds the model repository's artifacts from code, reproducibly (fixed seeds).

    python build_engines.py                  # every bundled model into engines/
    python build_engines.py --only mlp       # one model
    python build_engines.py --out /tmp/repo  # another repository (configs are copied along)

Each model folder keeps a hand-written config.toml; this script writes the artifact beside it
(model.onnx). The same seed gives byte-identical files.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ENGINES = Path(__file__).resolve().parent / "engines"
OPSET = 17
IR_VERSION = 9  # read by every ONNX Runtime release of the last years


def mlp(
    in_features: int = 256, hidden: int = 1024, classes: int = 16, seed: int = 0
) -> onnx.ModelProto:
    """The default model: in_features → hidden (ReLU) → classes, with logits and probabilities."""
    rng = np.random.default_rng(seed)
    w1 = (rng.standard_normal((in_features, hidden)) * np.sqrt(2.0 / in_features)).astype(
        np.float32
    )
    b1 = (rng.standard_normal(hidden) * 0.01).astype(np.float32)
    w2 = (rng.standard_normal((hidden, classes)) * np.sqrt(1.0 / hidden)).astype(np.float32)
    b2 = (rng.standard_normal(classes) * 0.01).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["input", "w1"], ["h_mm"]),
        helper.make_node("Add", ["h_mm", "b1"], ["h_pre"]),
        helper.make_node("Relu", ["h_pre"], ["h"]),
        helper.make_node("MatMul", ["h", "w2"], ["o_mm"]),
        helper.make_node("Add", ["o_mm", "b2"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=-1),
    ]
    graph = helper.make_graph(
        nodes,
        "mlp",
        inputs=[helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", in_features])],
        outputs=[
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", classes]),
            helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", classes]),
        ],
        initializer=[
            numpy_helper.from_array(w1, "w1"),
            numpy_helper.from_array(b1, "b1"),
            numpy_helper.from_array(w2, "w2"),
            numpy_helper.from_array(b2, "b2"),
        ],
    )
    return _finish(graph)


def _finish(graph: onnx.GraphProto) -> onnx.ModelProto:
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="tensorgate"
    )
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    return model


# model folder -> builder of its ONNX artifact
MODELS: dict[str, Callable[[], onnx.ModelProto]] = {
    "mlp": mlp,
}


def build(name: str, out: Path) -> Path:
    """Writes out/<name>/model.onnx (and copies the bundled config.toml when out is elsewhere)."""
    folder = out / name
    folder.mkdir(parents=True, exist_ok=True)
    bundled_config = ENGINES / name / "config.toml"
    if folder.resolve() != (ENGINES / name).resolve() and bundled_config.exists():
        shutil.copyfile(bundled_config, folder / "config.toml")
    artifact = folder / "model.onnx"
    onnx.save(MODELS[name](), artifact)
    return artifact


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ENGINES, help="model repository to fill")
    parser.add_argument("--only", action="append", choices=sorted(MODELS), help="model to build")
    args = parser.parse_args()
    names = args.only or list(MODELS)
    for i, name in enumerate(names, 1):
        artifact = build(name, args.out)
        print(f"[{i}/{len(names)}] {name}: {artifact} ({artifact.stat().st_size / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
