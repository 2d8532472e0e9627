"""GPU instances for real: the MLP as a `python` model computing in CuPy on each instance's own
stream, under concurrent load, each answer checked against ONNX Runtime on the CPU for that
request's own input. Skipped where there is no GPU (CI never has one)."""

from __future__ import annotations

import asyncio
import importlib.util
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from tensorgate.client import AsyncTensorgateClient
from tensorgate.server.backends import cuda
from tests.harness import MlpReference, ServerThread

ROOT = Path(__file__).resolve().parents[2]
_reason = cuda.gpu_unavailable_reason()
if _reason is None and importlib.util.find_spec("cupy") is None:
    _reason = "cupy is not installed"

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(_reason is not None, reason=f"no GPU: {_reason}")]


@pytest.mark.parametrize("instances", [1, 2, 4])
def test_every_request_gets_its_own_answer_from_gpu_instances(
    instances: int,
    repository: Path,
    tmp_path: Path,
    start_server: Callable[..., ServerThread],
    reference: MlpReference,
) -> None:
    shutil.copytree(repository / "mlp", tmp_path / "mlp")
    shutil.copytree(ROOT / "engines" / "mlp_python", tmp_path / "gpu_mlp")
    config = tmp_path / "gpu_mlp" / "config.toml"
    text = config.read_text().replace('device = "auto"', 'device = "gpu"')
    config.write_text(text.replace("instance_count = 1", f"instance_count = {instances}"))
    running = start_server(model_repository=tmp_path, models=("gpu_mlp",))
    rng = np.random.default_rng(instances)
    xs = [rng.standard_normal((1 + i % 7, 256)).astype(np.float32) for i in range(2000)]

    async def load() -> list[dict[str, np.ndarray]]:
        async with AsyncTensorgateClient(running.target, timeout_s=60) as c:
            limit = asyncio.Semaphore(128)

            async def one(x: np.ndarray) -> dict[str, np.ndarray]:
                async with limit:
                    return await c.predict("gpu_mlp", {"input": x})

            return await asyncio.gather(*(one(x) for x in xs))

    results = asyncio.run(load())
    for x, out in zip(xs, results, strict=True):
        np.testing.assert_allclose(out["logits"], reference.logits(x), rtol=1e-3, atol=1e-3)
    stats = running.stats("gpu_mlp")
    assert stats.rows == sum(x.shape[0] for x in xs)
    assert max(stats.batch_sizes) > 1  # batches formed across callers
