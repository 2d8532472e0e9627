"""TensorRT plans of the bundled models (tensorgate build --tensorrt): the full TensorRT builder
and a GPU are needed; the lean runtime the server uses can run plans but not build them.

One optimization profile per instance over the batch range; --version-compatible (the default)
builds plans that run on the lean runtime, which is left out of the plan. Precision: TensorRT 10
builds FP16 from builder flags; TensorRT 11 networks are strongly typed, so for fp16 an FP16 ONNX
variant is written first (model.fp16.onnx) and built. A timing cache (<out>/.timing_cache) is
kept between builds.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import onnx

from tensorgate.server.backends import cuda
from tensorgate.server.bundled.graphs import BuildError, float16_variant


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
        f"# Built by tensorgate build --tensorrt from {name}; see model.plan.json.\n"
        f'backend = "tensorrt"\nmax_batch_size = {high}\nmax_queue_delay_ms = 2.0\n'
        f"instance_count = {instances}\n"
    )
    return plan_path
