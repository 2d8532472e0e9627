"""TensorRT plans on the GPU (engines/<model>/model.plan), TensorRT 10/11 runtime API only.

The runtime is imported as `tensorrt` when the full package is installed, else the lean runtime
(`tensorrt_lean`, or `tensorrt_lean_bindings` as TensorRT 11's standalone wheel names it), which
runs plans built with version compatibility. I/O names, modes, datatypes and profile shapes come
from the engine, so the model config lists no I/O.

Instance i uses optimization profile i of the plan (tensorgate build --tensorrt writes one per
instance), since contexts that run at once with dynamic shapes must not share a profile; an
instance beyond the plan's profiles deserializes its own copy of the engine.
"""

from __future__ import annotations

import importlib
import logging
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Literal

from tensorgate.server.backends.base import DeviceArray, RequestInfo
from tensorgate.server.config import ConfigError
from tensorgate.server.errors import Internal, InvalidArgument
from tensorgate.server.model_config import ModelConfig
from tensorgate.server.tensors import TensorSpec, format_shape

log = logging.getLogger(__name__)

DEFAULT_ARTIFACT = "model.plan"
RUNTIME_MODULES = ("tensorrt", "tensorrt_bindings", "tensorrt_lean", "tensorrt_lean_bindings")

# TensorRT DataType name -> tensor datatype. BF16, FP8 and FP4 I/O have no numpy type: cast at
# the model's boundary when building the plan.
_DATATYPES = {
    "FLOAT": "FP32",
    "HALF": "FP16",
    "INT8": "INT8",
    "INT32": "INT32",
    "INT64": "INT64",
    "UINT8": "UINT8",
    "BOOL": "BOOL",
}


def import_runtime() -> ModuleType:
    """The first TensorRT runtime module that imports; ConfigError naming the packages if none."""
    failures = []
    for name in RUNTIME_MODULES:
        try:
            return importlib.import_module(name)
        except ImportError as exc:
            failures.append(f"{name}: {exc}")
    raise ConfigError(
        "no TensorRT runtime is installed (pip install 'tensorgate[tensorrt]', i.e. "
        "tensorrt-lean-cu13-bindings and tensorrt-lean-cu13-libs); tried " + "; ".join(failures)
    )


class _TrtLogger:
    """One logger per process: TensorRT warns when it gets several."""

    _instance: Any = None
    _lock = threading.Lock()

    @classmethod
    def get(cls, trt: ModuleType) -> Any:
        with cls._lock:
            if cls._instance is None:
                cls._instance = trt.Logger(trt.Logger.WARNING)
            return cls._instance


def _deserialize(trt: ModuleType, plan: bytes, model: str) -> Any:
    runtime = trt.Runtime(_TrtLogger.get(trt))
    engine = runtime.deserialize_cuda_engine(plan)
    if engine is None:
        raise ConfigError(
            f"model '{model}': TensorRT {trt.__version__} could not deserialize the plan "
            "(built by another TensorRT version without version compatibility, or for another "
            "GPU? see model.plan.json beside it)"
        )
    # The runtime must outlive the engine.
    return engine, runtime


class TensorRTInstance:
    """One execution context, bound to one optimization profile and (via bind) one stream."""

    placement: Literal["gpu"] = "gpu"

    def __init__(
        self,
        trt: ModuleType,
        engine: Any,
        runtime: Any,
        plan: Path | None,
        profile: int,
        model: str,
        device: int = 0,
    ) -> None:
        self.device = device
        self._trt = trt
        self._engine = engine
        self._runtime = runtime  # must outlive the engine and the context
        self._plan = plan  # set when the engine is the model's shared one (released on close)
        self._profile = profile
        self._model = model
        context = engine.create_execution_context()
        if context is None:
            raise ConfigError(f"model '{model}': could not create a TensorRT execution context")
        self._context = context
        inputs, outputs = [], []
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            spec = TensorSpec(name, self._datatype(name), tuple(engine.get_tensor_shape(name)))
            if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
                inputs.append(spec)
            else:
                outputs.append(spec)
        self._inputs, self._outputs = inputs, outputs
        # (min, opt, max) shape of every input in this instance's profile.
        self._profiles = {
            spec.name: [tuple(s) for s in engine.get_tensor_profile_shape(spec.name, profile)]
            for spec in inputs
        }
        for spec in (*inputs, *outputs):
            if not spec.shape or spec.shape[0] != -1:
                raise ConfigError(
                    f"model '{model}': tensor '{spec.name}' has shape {format_shape(spec.shape)}; "
                    "build the plan with a dynamic batch dimension first"
                )
        for spec in outputs:
            if -1 in spec.shape[1:]:
                raise ConfigError(
                    f"model '{model}': output '{spec.name}' has dynamic non-batch dims "
                    f"{format_shape(spec.shape)}, which GPU instances cannot size buffers for"
                )

    def _datatype(self, name: str) -> str:
        dtype = self._engine.get_tensor_dtype(name)
        datatype = _DATATYPES.get(dtype.name)
        if datatype is None:
            raise ConfigError(
                f"model '{self._model}': tensor '{name}' has TensorRT type {dtype.name}, which "
                "cannot travel as a tensor; cast it at the model's boundary"
            )
        return datatype

    @property
    def inputs(self) -> Sequence[TensorSpec]:
        return self._inputs

    @property
    def outputs(self) -> Sequence[TensorSpec]:
        return self._outputs

    @property
    def max_batch_size(self) -> int:
        return min(shapes[2][0] for shapes in self._profiles.values())

    @property
    def min_batch_size(self) -> int:
        return max(shapes[0][0] for shapes in self._profiles.values())

    def max_shape(self, name: str, rows: int) -> tuple[int, ...]:
        if name in self._profiles:
            return (rows, *self._profiles[name][2][1:])
        spec = next(s for s in self._outputs if s.name == name)
        return (rows, *spec.shape[1:])

    def bind(self, stream: int) -> None:
        if not self._context.set_optimization_profile_async(self._profile, stream):
            raise ConfigError(
                f"model '{self._model}': TensorRT refused optimization profile {self._profile} "
                "for this execution context"
            )

    def enqueue(
        self,
        inputs: Mapping[str, DeviceArray],
        outputs: Mapping[str, DeviceArray],
        stream: int,
        requests: Sequence[RequestInfo] = (),
    ) -> dict[str, tuple[int, ...]]:
        context = self._context
        for name, array in inputs.items():
            if not context.set_input_shape(name, array.shape):
                low, _, high = self._profiles[name]
                raise InvalidArgument(
                    f"input '{name}' shape {format_shape(array.shape)} is outside the engine's "
                    f"profile {format_shape(low)}..{format_shape(high)}"
                )
            context.set_tensor_address(name, array.ptr)
        for name, array in outputs.items():
            context.set_tensor_address(name, array.ptr)
        if not context.execute_async_v3(stream):
            raise Internal(f"model '{self._model}': TensorRT execute_async_v3 failed")
        return {name: tuple(context.get_tensor_shape(name)) for name in outputs}

    def close(self) -> None:
        del self._context
        if self._plan is not None:
            _release(self._plan)


@dataclass(slots=True)
class _Shared:
    engine: Any
    runtime: Any  # must outlive the engine
    users: int = 0


# Engines shared by the instances of one model, keyed by plan path.
_engines: dict[Path, _Shared] = {}
_engines_lock = threading.Lock()


def _release(plan: Path) -> None:
    with _engines_lock:
        shared = _engines.get(plan)
        if shared is not None:
            shared.users -= 1
            if shared.users <= 0:
                del _engines[plan]


def load(config: ModelConfig, instance_index: int) -> TensorRTInstance:
    """Deserializes the plan (once per model) and creates instance_index's context.

    Fails with one clear ConfigError where no GPU or no TensorRT runtime is present.
    """
    from tensorgate.server.backends import cuda  # imports cuda-python, needed only here

    options = dict(config.backend_options)
    plan_path = config.path / str(options.pop("artifact", DEFAULT_ARTIFACT))
    device = int(options.pop("device", 0))
    if options:
        raise ConfigError(f"model '{config.name}': unknown [tensorrt] options {sorted(options)}")
    reason = cuda.gpu_unavailable_reason(device)
    if reason is not None:
        raise ConfigError(f"model '{config.name}' needs an NVIDIA GPU: {reason}")
    trt = import_runtime()
    if not plan_path.exists():
        raise ConfigError(
            f"model '{config.name}': {plan_path} does not exist "
            "(build it on a GPU machine: tensorgate build --tensorrt)"
        )
    cuda.set_device(device)
    with _engines_lock:
        shared = _engines.get(plan_path)
        if shared is None:
            shared = _Shared(*_deserialize(trt, plan_path.read_bytes(), config.name))
            _engines[plan_path] = shared
        shared.users += 1
    profiles = shared.engine.num_optimization_profiles
    if instance_index < profiles:
        try:
            return TensorRTInstance(
                trt, shared.engine, shared.runtime, plan_path, instance_index, config.name, device
            )
        except BaseException:
            _release(plan_path)
            raise
    _release(plan_path)
    log.warning(
        "model %s: the plan has %d optimization profile(s) for %d instances; instance %d gets "
        "its own engine copy (rebuild with one profile per instance to share the weights)",
        config.name, profiles, config.instance_count, instance_index,
    )  # fmt: skip
    engine, runtime = _deserialize(trt, plan_path.read_bytes(), config.name)
    return TensorRTInstance(trt, engine, runtime, None, 0, config.name, device)
