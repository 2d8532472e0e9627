"""GPU executor check: the MLP as a `python` backend model doing its work in CuPy on each
instance's own CUDA stream, served through the real gRPC server with 1, 2 and 4 instances under
concurrent load. Every answer is compared with ONNX Runtime on the CPU for that request's own input
(a cross-instance mix-up would show as a mismatch), and throughput is reported per instance count.

    python -m bench.gpu_instances                       # on a GPU machine (needs cupy)
    python -m bench.gpu_instances --device cpu --seconds 3   # dry run of the same path on a CPU

Prints a table and writes bench/results/gpu_instances.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "protos")]

from tensorgate.client import AsyncTensorgateClient  # noqa: E402
from tensorgate.server.app import TensorgateServer  # noqa: E402
from tensorgate.server.bundled.graphs import mlp  # noqa: E402
from tensorgate.server.config import ServerConfig  # noqa: E402


def make_repository(root: Path, device: str, instances: int, in_features: int, hidden: int) -> None:
    (root / "wide").mkdir(parents=True)
    onnx.save(mlp(in_features, hidden, 16), root / "wide" / "model.onnx")
    (root / "wide" / "config.toml").write_text('backend = "onnxruntime"\nmax_batch_size = 64\n')
    shutil.copytree(ROOT / "engines" / "mlp_python", root / "gpu_mlp")
    config = (root / "gpu_mlp" / "config.toml").read_text()
    config = config.replace('device = "auto"', f'device = "{device}"')
    config = config.replace("instance_count = 1", f"instance_count = {instances}")
    config = config.replace("shape = [-1, 256]", f"shape = [-1, {in_features}]")
    config = config.replace("../mlp/model.onnx", "../wide/model.onnx")
    (root / "gpu_mlp" / "config.toml").write_text(config)


async def drive(target: str, seconds: float, concurrency: int, rows: int, in_features: int,
                reference: ort.InferenceSession) -> dict[str, float]:  # fmt: skip
    latencies: list[float] = []
    mismatches = 0
    stop = time.monotonic() + seconds
    rng = np.random.default_rng(0)

    async def worker(client: AsyncTensorgateClient, seed: int) -> None:
        nonlocal mismatches
        local = np.random.default_rng(seed)
        while time.monotonic() < stop:
            x = local.standard_normal((rows, in_features)).astype(np.float32)
            started = time.perf_counter()
            out = await client.predict("gpu_mlp", {"input": x}, outputs=["logits"])
            latencies.append(time.perf_counter() - started)
            expected = reference.run(["logits"], {"input": x})[0]
            if not np.allclose(out["logits"], expected, rtol=1e-3, atol=1e-3):
                mismatches += 1

    async with AsyncTensorgateClient(target, timeout_s=30) as client:
        started = time.perf_counter()
        seeds = rng.integers(0, 2**31, concurrency)
        await asyncio.gather(*(worker(client, int(s)) for s in seeds))
        elapsed = time.perf_counter() - started
    latencies.sort()
    return {
        "requests": len(latencies),
        "req_per_s": len(latencies) / elapsed,
        "p50_ms": 1000 * statistics.median(latencies),
        "p99_ms": 1000 * latencies[int(0.99 * (len(latencies) - 1))],
        "mismatches": mismatches,
    }


async def run_one(args: argparse.Namespace, instances: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_repository(root, args.device, instances, args.in_features, args.hidden)
        reference = ort.InferenceSession(str(root / "wide" / "model.onnx"))
        server = TensorgateServer(
            ServerConfig(
                host="127.0.0.1",
                port=0,
                metrics_port=-1,
                model_repository=root,
                models=("gpu_mlp",),
            )
        )
        await server.start()
        try:
            result = await drive(
                f"127.0.0.1:{server.port}", args.seconds, args.concurrency, args.rows,
                args.in_features, reference,
            )  # fmt: skip
            stats = server.models["gpu_mlp"].batcher.stats
            result["mean_batch_rows"] = stats.rows / max(stats.batches, 1)
        finally:
            await server.stop(1.0)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["gpu", "cpu"], default="gpu")
    parser.add_argument("--instances", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--rows", type=int, default=8, help="rows per request")
    parser.add_argument("--in-features", type=int, default=1024)
    parser.add_argument("--hidden", type=int, default=8192, help="wide enough to keep a GPU busy")
    args = parser.parse_args()
    results = {}
    for i, count in enumerate(args.instances, 1):
        print(
            f"[{i}/{len(args.instances)}] {count} instance(s), {args.seconds:.0f} s ...", flush=True
        )
        results[count] = asyncio.run(run_one(args, count))
    base = results[args.instances[0]]["req_per_s"]
    print(f"\n{'instances':>9} {'req/s':>9} {'vs first':>8} {'p50 ms':>8} {'p99 ms':>8} "
          f"{'batch':>6} {'mismatches':>10}")  # fmt: skip
    for count, r in results.items():
        ratio = r["req_per_s"] / base
        print(
            f"{count:>9} {r['req_per_s']:>9.1f} {ratio:>8.2f} {r['p50_ms']:>8.2f} "
            f"{r['p99_ms']:>8.2f} {r['mean_batch_rows']:>6.1f} {r['mismatches']:>10}"
        )
    out = ROOT / "bench" / "results" / "gpu_instances.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "results": results}, indent=2) + "\n")
    print(f"wrote {out}")
    return 1 if any(r["mismatches"] for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
