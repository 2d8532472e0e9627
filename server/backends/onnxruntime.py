"""ONNX Runtime on the CPU: the default backend, so tensorgate serves anywhere."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import numpy as np
import onnxruntime as ort

from tensorgate.server.backends.base import RequestInfo
from tensorgate.server.config import ConfigError
from tensorgate.server.model_config import ModelConfig
from tensorgate.server.tensors import TensorSpec

DEFAULT_ARTIFACT = "model.onnx"

_DATATYPE_BY_ORT_TYPE = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
}


class OnnxRuntimeInstance:
    """One InferenceSession. Its run() releases the GIL, so instances run in parallel threads."""

    placement: Literal["cpu"] = "cpu"

    def __init__(
        self, session: ort.InferenceSession, model: str, unbatched: frozenset[str] = frozenset()
    ) -> None:
        self._session = session
        self._inputs = [
            _spec(arg, model, arg.name not in unbatched) for arg in session.get_inputs()
        ]
        self._outputs = [
            _spec(arg, model, arg.name not in unbatched) for arg in session.get_outputs()
        ]

    @property
    def inputs(self) -> Sequence[TensorSpec]:
        return self._inputs

    @property
    def outputs(self) -> Sequence[TensorSpec]:
        return self._outputs

    @property
    def max_batch_size(self) -> int | None:
        return None  # the batch dimension is dynamic (checked at load)

    def execute(
        self,
        inputs: Mapping[str, np.ndarray],
        output_names: Sequence[str],
        requests: Sequence[RequestInfo] = (),
    ) -> dict[str, np.ndarray]:
        results = self._session.run(list(output_names), dict(inputs))
        return dict(zip(output_names, results, strict=True))

    def close(self) -> None:
        del self._session


def load(config: ModelConfig, instance_index: int) -> OnnxRuntimeInstance:
    """Creates a session for config.path/model.onnx with the [onnxruntime] options of the config.

    Options: intra_op_threads (default 1), allow_spinning (default false: spin-waiting threads
    steal the cores that the gRPC front end needs on small machines).
    """
    options = dict(config.backend_options)
    artifact = config.path / str(options.pop("artifact", DEFAULT_ARTIFACT))
    if not artifact.exists():
        raise ConfigError(
            f"model '{config.name}': {artifact} does not exist; put the ONNX file there, or set "
            "[onnxruntime] artifact in its config.toml (`tensorgate build` writes the bundled "
            "models)"
        )
    session_options = ort.SessionOptions()
    session_options.intra_op_num_threads = int(options.pop("intra_op_threads", 1))
    session_options.inter_op_num_threads = 1
    session_options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    session_options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session_options.log_severity_level = 3
    spinning = bool(options.pop("allow_spinning", False))
    session_options.add_session_config_entry("session.intra_op.allow_spinning", str(int(spinning)))
    if options:
        raise ConfigError(f"model '{config.name}': unknown [onnxruntime] options {sorted(options)}")
    session = ort.InferenceSession(
        str(artifact), sess_options=session_options, providers=["CPUExecutionProvider"]
    )
    # A stateful model's state and constant tensors put their batch axis elsewhere or have none:
    # backends/stateful.py checks every tensor against [sequence] instead.
    names = [arg.name for arg in (*session.get_inputs(), *session.get_outputs())]
    unbatched = frozenset(names if config.sequence is not None else ())
    return OnnxRuntimeInstance(session, config.name, unbatched)


def _spec(arg: ort.NodeArg, model: str, batched: bool = True) -> TensorSpec:
    datatype = _DATATYPE_BY_ORT_TYPE.get(arg.type)
    if datatype is None:
        raise ConfigError(f"model '{model}': tensor '{arg.name}' has unsupported type {arg.type}")
    # ONNX marks dynamic dims with a name or None; both become -1.
    shape = tuple(d if isinstance(d, int) and d >= 0 else -1 for d in arg.shape)
    if batched and (not shape or shape[0] != -1):
        raise ConfigError(
            f"model '{model}': tensor '{arg.name}' has shape {list(arg.shape)}; "
            "its first dimension must be the dynamic batch dimension"
        )
    return TensorSpec(arg.name, datatype, shape)
