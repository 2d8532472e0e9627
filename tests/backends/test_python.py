"""The `python` backend: user classes in engines/<model>/model.py, served for real."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import pytest

from tensorgate.client import AsyncTensorgateClient, TensorgateClient
from tensorgate.server.backends import cuda
from tests.harness import MlpReference, ServerThread, write_config

ROOT = Path(__file__).resolve().parents[2]

ECHO_MODEL = """
import numpy as np

class Model:
    def load(self, config):
        self.scale = config["parameters"]["scale"]

    def execute(self, inputs, stream):
        x = inputs["x"]
        if (x == -999).any():
            raise ValueError("marked input -999 seen")
        if (x == -998).any():
            return "not a dict"
        return {"y": x * self.scale}
"""


@pytest.fixture
def python_repository(repository: Path, tmp_path: Path) -> Path:
    import shutil

    shutil.copytree(ROOT / "engines" / "mlp_python", tmp_path / "mlp_python")
    # Its weights path points at ../mlp/model.onnx.
    shutil.copytree(repository / "mlp", tmp_path / "mlp")
    folder = tmp_path / "echo"
    write_config(
        folder,
        backend="python",
        max_batch_size=8,
        python={
            "device": "cpu",
            "inputs": '[{ name = "x", datatype = "FP32", shape = [-1, 3] }]',
            "outputs": '[{ name = "y", datatype = "FP32", shape = [-1, 3] }]',
            "scale": 2.5,
        },
    )
    (folder / "model.py").write_text(ECHO_MODEL)
    return tmp_path


def test_bundled_python_mlp_matches_the_reference(
    python_repository: Path,
    start_server: Callable[..., ServerThread],
    reference: MlpReference,
    rng: np.random.Generator,
) -> None:
    running = start_server(model_repository=python_repository)
    x = rng.standard_normal((6, 256)).astype(np.float32)
    with TensorgateClient(running.target, timeout_s=10) as c:
        out = c.predict("mlp_python", {"input": x})
        onnx_out = c.predict("mlp", {"input": x})
    np.testing.assert_allclose(out["logits"], reference.logits(x), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(out["logits"], onnx_out["logits"], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(out["probabilities"].sum(axis=1), 1.0, rtol=1e-5)


def test_user_model_parameters_and_failures(
    python_repository: Path, start_server: Callable[..., ServerThread]
) -> None:
    running = start_server(model_repository=python_repository, models=("echo",))
    with TensorgateClient(running.target, timeout_s=10) as c:
        x = np.array([[1, 2, 3]], np.float32)
        assert c.predict("echo", {"x": x})["y"].tolist() == [[2.5, 5.0, 7.5]]
        with pytest.raises(grpc.RpcError) as raised:
            c.predict("echo", {"x": np.full((1, 3), -999, np.float32)})
        assert raised.value.code() == grpc.StatusCode.INTERNAL
        assert "marked input -999 seen" in raised.value.details()
        with pytest.raises(grpc.RpcError) as bad_return:
            c.predict("echo", {"x": np.full((1, 3), -998, np.float32)})
        assert bad_return.value.code() == grpc.StatusCode.INTERNAL
        assert "execute() returned str, not a dict" in bad_return.value.details()
        # Still serving.
        assert c.predict("echo", {"x": x})["y"].shape == (1, 3)


@pytest.mark.skipif(cuda.gpu_unavailable_reason() is None, reason="this machine has a GPU")
def test_a_gpu_python_model_is_refused_without_a_gpu(
    python_repository: Path, start_server: Callable[..., ServerThread]
) -> None:
    config = python_repository / "mlp_python" / "config.toml"
    config.write_text(config.read_text().replace('device = "auto"', 'device = "gpu"'))
    running = start_server(model_repository=python_repository, models=("mlp_python", "echo"))
    with TensorgateClient(running.target, timeout_s=10) as c:
        ready = {m.name: m.ready for m in c.list_models()}
    assert ready == {"mlp_python": False, "echo": True}
    failure = running.server.models["mlp_python"].failure
    assert failure.startswith("model 'mlp_python' needs an NVIDIA GPU")


@pytest.mark.parametrize(
    ("python_table", "message"),
    [
        ({"device": "cpu"}, "[python] inputs must list tensors"),
        ({"device": "tpu"}, "[python] device must be cpu, gpu or auto"),
    ],
)
def test_bad_python_config_fails_the_model_with_the_reason(
    tmp_path: Path,
    python_repository: Path,
    start_server: Callable[..., ServerThread],
    python_table: dict[str, object],
    message: str,
) -> None:
    folder = python_repository / "broken"
    table = {
        "inputs": '[{ name = "x", datatype = "FP32", shape = [-1, 3] }]',
        "outputs": '[{ name = "y", datatype = "FP32", shape = [-1, 3] }]',
        **python_table,
    }
    if "inputs must" in message:
        del table["inputs"]
    write_config(folder, backend="python", python=table)
    (folder / "model.py").write_text(ECHO_MODEL)
    running = start_server(model_repository=python_repository, models=("broken", "echo"))
    assert message in running.server.models["broken"].failure


_SCALING_MODEL = """
class Model:
    def load(self, config):
        self.seen = []

    def execute(self, inputs, stream, requests):
        x = inputs["x"].copy()
        start = 0
        for request in requests:  # each request's rows, in packing order
            x[start : start + request.rows] *= request.parameters.get("scale", 1)
            start += request.rows
        self.seen.append([r.id for r in requests])
        return {"y": x}
"""


def test_a_python_model_reads_each_requests_parameters_in_a_shared_batch(
    tmp_path: Path, start_server: Callable[..., ServerThread]
) -> None:
    """Request parameters reach the backend: a batch of three callers, each with its own
    `scale`, and every caller gets its own rows scaled by its own value."""
    write_config(
        tmp_path / "scaling",
        backend="python",
        max_batch_size=16,
        max_queue_delay_ms=300.0,
        batching="static",
        instance_count=1,
        python={
            "device": "cpu",
            "inputs": '[{ name = "x", datatype = "FP32", shape = [-1, 4] }]',
            "outputs": '[{ name = "y", datatype = "FP32", shape = [-1, 4] }]',
        },
    )
    (tmp_path / "scaling" / "model.py").write_text(_SCALING_MODEL)
    running = start_server(model_repository=tmp_path, models=("scaling",))

    async def three() -> list[dict[str, np.ndarray]]:
        async with AsyncTensorgateClient(running.target, timeout_s=10) as c:
            return await asyncio.gather(
                c.predict("scaling", {"x": np.ones((1, 4), np.float32)}, request_id="a",
                          parameters={"scale": 2}),
                c.predict("scaling", {"x": np.ones((2, 4), np.float32)}, request_id="b",
                          parameters={"scale": 3.5}),
                c.predict("scaling", {"x": np.ones((1, 4), np.float32)}, request_id="c"),
            )  # fmt: skip

    a, b, c = asyncio.run(three())
    np.testing.assert_array_equal(a["y"], np.full((1, 4), 2.0, np.float32))
    np.testing.assert_array_equal(b["y"], np.full((2, 4), 3.5, np.float32))
    np.testing.assert_array_equal(c["y"], np.ones((1, 4), np.float32))
    assert running.stats("scaling").batch_sizes[4] == 1  # all three shared one batch
