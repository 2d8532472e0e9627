"""One traced Predict on a GPU instance (the MLP in CuPy); prints the stages of its batch
timed as JSON on the last line. Used by bench.gpu_check: `h2d`, `compute` and `d2h` come from CUDA
events on the instance's stream.

    python -m bench.gpu_check_trace
"""

from __future__ import annotations

import asyncio
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "protos")]

from tensorgate.client import AsyncTensorgateClient  # noqa: E402
from tensorgate.server.app import TensorgateServer  # noqa: E402
from tensorgate.server.bundled import build  # noqa: E402
from tensorgate.server.config import ServerConfig  # noqa: E402
from tensorgate.server.telemetry import Tracing  # noqa: E402


async def traced_stages(repository: Path) -> list[str]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    config = ServerConfig(
        host="127.0.0.1", port=0, model_repository=repository, models=("gpu_mlp",),
        drain_delay_s=0.0, metrics_port=-1,
    )  # fmt: skip
    server = TensorgateServer(config, Tracing(provider))
    await server.start()
    try:
        async with AsyncTensorgateClient(f"127.0.0.1:{server.port}", timeout_s=30) as client:
            await client.predict("gpu_mlp", {"input": np.ones((4, 256), np.float32)})
    finally:
        await server.stop(2.0)
    # The batch's stage times (tensorgate.h2d_ms, ...), on the request's span since the batch
    # held one traced request, named by stage.
    return [
        key.removeprefix("tensorgate.").removesuffix("_ms")
        for span in exporter.get_finished_spans()
        for key in span.attributes or {}
        if key in ("tensorgate.h2d_ms", "tensorgate.compute_ms", "tensorgate.d2h_ms")
    ]


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        repository = Path(tmp)
        build("mlp", repository)
        shutil.copytree(ROOT / "engines" / "mlp_python", repository / "gpu_mlp")
        config = repository / "gpu_mlp" / "config.toml"
        config.write_text(config.read_text().replace('device = "auto"', 'device = "gpu"'))
        names = asyncio.run(traced_stages(repository))
    print(json.dumps(names))
    return 0


if __name__ == "__main__":
    sys.exit(main())
