"""The TensorRT backend against the real TensorRT lean bindings (installed by `make test`).

No GPU is needed: every TensorRT attribute the backend touches must exist on the installed
runtime's Runtime, ICudaEngine and IExecutionContext, and loading a TensorRT model without a GPU
must fail with one clear message while the other models keep serving.
"""

from __future__ import annotations

import ast
import shutil
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import grpc
import pytest

from tensorgate.client import TensorgateClient, codec
from tensorgate.server.backends import cuda
from tensorgate.server.backends import tensorrt as backend
from tests.harness import ServerThread, write_config

SOURCE = Path(backend.__file__).read_text()

# Which TensorRT class the backend's variables hold.
RECEIVERS = {
    "engine": "ICudaEngine",
    "_engine": "ICudaEngine",
    "context": "IExecutionContext",
    "_context": "IExecutionContext",
    "runtime": "Runtime",
}


@pytest.fixture(scope="module")
def trt() -> ModuleType:
    return backend.import_runtime()


def _accessed(receiver_names: dict[str, str]) -> dict[str, set[str]]:
    """Attribute names the backend's source reads from each kind of TensorRT object."""
    used: dict[str, set[str]] = {}
    for node in ast.walk(ast.parse(SOURCE)):
        if not isinstance(node, ast.Attribute):
            continue
        value = node.value
        name = value.attr if isinstance(value, ast.Attribute) else getattr(value, "id", None)
        if name in receiver_names:
            used.setdefault(receiver_names[name], set()).add(node.attr)
    return used


def test_the_installed_runtime_is_the_lean_one_or_the_full_one(trt: ModuleType) -> None:
    assert trt.__name__ in backend.RUNTIME_MODULES
    assert int(trt.__version__.split(".")[0]) >= 10


def test_every_runtime_call_of_the_backend_exists_on_the_installed_tensorrt(
    trt: ModuleType,
) -> None:
    used = _accessed(RECEIVERS)
    # The scan must see the calls that matter, or this test could pass vacuously.
    assert {"execute_async_v3", "set_input_shape", "set_tensor_address"} <= used[
        "IExecutionContext"
    ]
    assert {"num_io_tensors", "get_tensor_profile_shape", "get_tensor_mode"} <= used["ICudaEngine"]
    assert "deserialize_cuda_engine" in used["Runtime"]
    missing = {
        cls: sorted(name for name in names if not hasattr(getattr(trt, cls), name))
        for cls, names in used.items()
    }
    assert not any(missing.values()), f"not on {trt.__name__} {trt.__version__}: {missing}"


def test_module_level_names_and_enums_exist(trt: ModuleType) -> None:
    used = _accessed({"trt": "module"})["module"]
    assert {"Runtime", "Logger", "TensorIOMode"} <= used
    assert all(hasattr(trt, name) for name in used)
    assert hasattr(trt.Logger, "WARNING") and hasattr(trt.TensorIOMode, "INPUT")
    for dtype_name in backend._DATATYPES:
        assert hasattr(trt.DataType, dtype_name), dtype_name


def test_nothing_deprecated_is_called() -> None:
    for old in (
        "execute_async_v2",
        "execute_v2",
        "get_binding",
        "set_binding_shape",
        "num_bindings",
    ):
        assert old not in SOURCE


@pytest.mark.skipif(cuda.gpu_unavailable_reason() is None, reason="this machine has a GPU")
def test_a_tensorrt_model_is_refused_without_a_gpu_while_the_others_serve(
    repository: Path, tmp_path: Path, start_server: Callable[..., ServerThread]
) -> None:
    shutil.copytree(repository / "pair", tmp_path / "pair")
    write_config(tmp_path / "trt_model", backend="tensorrt", max_batch_size=8)
    (tmp_path / "trt_model" / "model.plan").write_bytes(b"not really a plan")
    running = start_server(model_repository=tmp_path)
    with TensorgateClient(running.target, timeout_s=10) as c:
        assert {m.name: m.ready for m in c.list_models()} == {
            "pair": True,
            "trt_model": False,
        }
        with pytest.raises(grpc.RpcError) as refused:
            c._stub.Predict(codec.predict_request("trt_model", {}), timeout=5)
        import numpy as np

        out = c.predict("pair", {"a": np.ones((1, 4), np.float32), "b": np.ones((1, 4), np.int64)})
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert (
        "model 'trt_model' needs an NVIDIA GPU: cudaGetDeviceCount failed"
        in refused.value.details()
    )
    assert out["out"].tolist() == [[3.0, 3.0, 3.0, 3.0]]
