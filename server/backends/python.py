"""User models written in Python: engines/<model>/model.py defines a class (default `Model`):

    class Model:
        def load(self, config: dict) -> None: ...
        def execute(self, inputs: dict, stream: int | None) -> dict: ...

On the CPU (`device = "cpu"`), execute() gets numpy arrays and stream None and returns numpy
arrays. On the GPU (`device = "gpu"`), it gets DeviceArray inputs (wrap them without a copy:
cp.asarray(x)), the raw handle of the instance's CUDA stream (run on it:
cp.cuda.ExternalStream(stream)), and returns arrays exposing __cuda_array_interface__.
`device = "auto"` picks the GPU when one is usable.

A model that wants to see the requests of a batch takes a third argument, `requests`: the
batch's requests in the order their rows are packed, each a RequestInfo with its `rows`, its
`id` and the `parameters` its caller sent (tensorgate.v1 `parameters`, KServe's request
parameters):

        def execute(self, inputs: dict, stream: int | None, requests: list) -> dict: ...

The I/O is declared in the config:

    backend = "python"
    [python]
    device = "cpu"
    inputs = [{ name = "input", datatype = "FP32", shape = [-1, 256] }]
    outputs = [{ name = "logits", datatype = "FP32", shape = [-1, 16] }]
    # every other key reaches load(config) under config["parameters"]
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from tensorgate.server.backends.base import DeviceArray, RequestInfo
from tensorgate.server.config import ConfigError
from tensorgate.server.datatypes import NUMPY_BY_DATATYPE
from tensorgate.server.errors import Internal
from tensorgate.server.model_config import ModelConfig
from tensorgate.server.tensors import TensorSpec


class _UserModel:
    """The user's object, with its I/O declaration and the checks on what it returns."""

    def __init__(self, config: ModelConfig, instance_index: int) -> None:
        options = dict(config.backend_options)
        self.name = config.name
        module_path = config.path / str(options.pop("module", "model.py"))
        class_name = str(options.pop("class_name", "Model"))
        self.inputs = _specs(options.pop("inputs", None), "inputs", config)
        self.outputs = _specs(options.pop("outputs", None), "outputs", config)
        self.device = str(options.pop("device", "cpu"))
        if self.device not in ("cpu", "gpu", "auto"):
            raise ConfigError(f"model '{config.name}': [python] device must be cpu, gpu or auto")
        cls = getattr(_import(module_path, config.name), class_name, None)
        if cls is None:
            raise ConfigError(f"model '{config.name}': {module_path} defines no class {class_name}")
        self.obj = cls()
        self._takes_requests = "requests" in inspect.signature(self.obj.execute).parameters
        self.obj.load(
            {
                "model_name": config.name,
                "model_dir": str(config.path),
                "instance_index": instance_index,
                "parameters": options,
            }
        )

    def call(
        self, inputs: Mapping[str, Any], stream: int | None, requests: Sequence[RequestInfo]
    ) -> Mapping[str, Any]:
        if self._takes_requests:
            result = self.obj.execute(dict(inputs), stream, requests=list(requests))
        else:
            result = self.obj.execute(dict(inputs), stream)
        if not isinstance(result, Mapping):
            raise Internal(
                f"model '{self.name}': execute() returned {type(result).__name__}, not a dict"
            )
        return result


class _PythonInstance:
    """What both placements share: the user's object and its declared I/O."""

    def __init__(self, model: _UserModel) -> None:
        self._model = model

    @property
    def inputs(self) -> Sequence[TensorSpec]:
        return self._model.inputs

    @property
    def outputs(self) -> Sequence[TensorSpec]:
        return self._model.outputs

    @property
    def max_batch_size(self) -> int | None:
        return None


class PythonCpuInstance(_PythonInstance):
    placement: Literal["cpu"] = "cpu"

    def execute(
        self,
        inputs: Mapping[str, np.ndarray],
        output_names: Sequence[str],
        requests: Sequence[RequestInfo] = (),
    ) -> dict[str, np.ndarray]:
        result = self._model.call(inputs, None, requests)
        outputs = {}
        for spec in self._model.outputs:
            if spec.name not in output_names:
                continue
            if spec.name not in result:
                raise Internal(f"model '{self._model.name}' returned no output '{spec.name}'")
            outputs[spec.name] = np.asarray(
                result[spec.name], dtype=NUMPY_BY_DATATYPE[spec.datatype]
            )
        return outputs

    def close(self) -> None:
        _close(self._model)


class PythonGpuInstance(_PythonInstance):
    placement: Literal["gpu"] = "gpu"
    device = 0  # CuPy and the instance's stream run on the current device

    def __init__(self, model: _UserModel) -> None:
        super().__init__(model)
        self._stream: int | None = None
        # The last batch's results stay referenced until the next one: their memory must live
        # until the device-to-device copies enqueued from them have run.
        self._last: Mapping[str, Any] = {}

    @property
    def min_batch_size(self) -> int:
        return 1

    def max_shape(self, name: str, rows: int) -> tuple[int, ...]:
        spec = next(s for s in (*self.inputs, *self.outputs) if s.name == name)
        if -1 in spec.shape[1:]:
            raise ConfigError(
                f"model '{self._model.name}': '{name}' needs fixed non-batch dims on the GPU"
            )
        return (rows, *spec.shape[1:])

    def bind(self, stream: int) -> None:
        self._stream = stream

    def enqueue(
        self,
        inputs: Mapping[str, DeviceArray],
        outputs: Mapping[str, DeviceArray],
        stream: int,
        requests: Sequence[RequestInfo] = (),
    ) -> dict[str, tuple[int, ...]]:
        from tensorgate.server.backends import cuda

        result = self._model.call(inputs, stream, requests)
        self._last = result
        wrapped = cuda.Stream.wrap(stream)
        shapes = {}
        for name, target in outputs.items():
            if name not in result:
                raise Internal(f"model '{self._model.name}' returned no output '{name}'")
            interface = result[name].__cuda_array_interface__
            shape = tuple(interface["shape"])
            dtype = np.dtype(interface["typestr"])
            strides = interface.get("strides")
            if dtype != target.dtype or (
                strides is not None and strides != _c_strides(shape, dtype)
            ):
                raise Internal(
                    f"model '{self._model.name}': output '{name}' must be a C-contiguous "
                    f"{target.dtype} array, got {dtype} with strides {strides}"
                )
            nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            if nbytes > target.nbytes:
                raise Internal(
                    f"model '{self._model.name}': output '{name}' of shape {list(shape)} is "
                    f"larger than its declared shape allows"
                )
            cuda.copy_on_device(target.ptr, interface["data"][0], nbytes, wrapped)
            shapes[name] = shape
        return shapes

    def close(self) -> None:
        self._last = {}
        _close(self._model)


def load(config: ModelConfig, instance_index: int) -> PythonCpuInstance | PythonGpuInstance:
    model = _UserModel(config, instance_index)
    device = model.device
    if device == "auto":
        from tensorgate.server.backends import cuda

        device = "gpu" if cuda.gpu_unavailable_reason() is None else "cpu"
    elif device == "gpu":
        from tensorgate.server.backends import cuda

        reason = cuda.gpu_unavailable_reason()
        if reason is not None:
            _close(model)
            raise ConfigError(f"model '{config.name}' needs an NVIDIA GPU: {reason}")
    return PythonGpuInstance(model) if device == "gpu" else PythonCpuInstance(model)


def _import(path: Path, model: str) -> Any:
    if not path.exists():
        raise ConfigError(f"model '{model}': {path} does not exist")
    # One module per file and content: instances of one version share it, and a version loaded
    # again after its file changed (a reload) gets the new code.
    stat = path.stat()
    stamp = (stat.st_mtime_ns, stat.st_size)
    digest = hashlib.sha256(str(path).encode()).hexdigest()[:12]
    module_name = f"tensorgate_user_model_{model}_{digest}"
    module = sys.modules.get(module_name)
    if module is not None and getattr(module, "__tensorgate_stamp__", None) == stamp:
        return module
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise ConfigError(f"model '{model}': cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    module.__tensorgate_stamp__ = stamp  # type: ignore[attr-defined]
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[module_name]
        raise ConfigError(f"model '{model}': importing {path} failed: {exc!r}") from exc
    return module


def _specs(raw: Any, key: str, config: ModelConfig) -> list[TensorSpec]:
    if not isinstance(raw, list) or not raw:
        raise ConfigError(
            f"model '{config.name}': [python] {key} must list tensors, e.g. "
            f'[{{ name = "x", datatype = "FP32", shape = [-1, 4] }}]'
        )
    specs = []
    for item in raw:
        try:
            spec = TensorSpec(
                str(item["name"]), str(item["datatype"]), tuple(int(d) for d in item["shape"])
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(
                f"model '{config.name}': [python] {key} entry {item!r}: {exc}"
            ) from exc
        if spec.datatype not in NUMPY_BY_DATATYPE:
            raise ConfigError(
                f"model '{config.name}': '{spec.name}' has unknown datatype {spec.datatype}"
            )
        if not spec.shape or spec.shape[0] != -1:
            raise ConfigError(
                f"model '{config.name}': '{spec.name}' shape must start with -1 (batch)"
            )
        specs.append(spec)
    return specs


def _c_strides(shape: tuple[int, ...], dtype: np.dtype) -> tuple[int, ...]:
    strides, step = [], dtype.itemsize
    for dim in reversed(shape):
        strides.append(step)
        step *= dim
    return tuple(reversed(strides))


def _close(model: _UserModel) -> None:
    close = getattr(model.obj, "close", None)
    if callable(close):
        close()
