"""Soak: mixed unary, stream, job and bad-input traffic against a `tensorgate serve` process for
a bounded time; reports requests served, errors by code, and the server's RSS at start and end.

    python -m bench.soak --minutes 3

Progress every 10 s; writes bench/results/soak.json. Traffic stays on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "protos")]

from bench.serverproc import ServeProcess  # noqa: E402
from tensorgate.client import AsyncTensorgateClient, StreamItem  # noqa: E402
from tensorgate.server.bundled import build  # noqa: E402


async def soak(target: str, seconds: float, rss_mib: Callable[[], float]) -> dict[str, int]:
    counts: collections.Counter[str] = collections.Counter()
    stop = time.monotonic() + seconds
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 256)).astype(np.float32)
    bad = np.zeros((1, 3), np.float32)

    async def unary(c: AsyncTensorgateClient, i: int) -> None:
        while time.monotonic() < stop:
            inputs = {"input": bad if i == 0 and counts["unary"] % 50 == 0 else x[: 1 + i % 4]}
            try:
                await c.predict("mlp", inputs)
                counts["unary OK"] += 1
            except grpc.aio.AioRpcError as exc:
                counts[f"unary {exc.code().name}"] += 1
            counts["unary"] += 1

    async def jobs(c: AsyncTensorgateClient) -> None:
        while time.monotonic() < stop:
            try:
                job = await c.submit("mlp", {"input": x[:2]})
                result = await c.get_result(job.job_id, wait_timeout_s=30)
                counts[f"job {result.status}"] += 1
            except grpc.aio.AioRpcError as exc:
                counts[f"job {exc.code().name}"] += 1

    async def stream(c: AsyncTensorgateClient) -> None:
        while time.monotonic() < stop:
            items = [StreamItem(str(i), "mlp", {"input": x[:1]}) for i in range(500)]
            async for result in c.stream(items):
                counts["stream OK" if result.ok else f"stream {result.error_code.name}"] += 1  # type: ignore[union-attr]

    async def progress() -> None:
        started = time.monotonic()
        while time.monotonic() < stop:
            await asyncio.sleep(10)
            served = sum(v for k, v in counts.items() if k.endswith((" OK", "SUCCEEDED")))
            print(f"  {time.monotonic() - started:5.0f} s  served {served:>8}  "
                  f"rss {rss_mib():6.1f} MiB", flush=True)  # fmt: skip

    async with AsyncTensorgateClient(target, timeout_s=60) as c:
        workers = [unary(c, i) for i in range(16)] + [jobs(c) for _ in range(8)]
        workers += [stream(c) for _ in range(2)] + [progress()]
        await asyncio.gather(*workers)
    counts.pop("unary")
    return dict(counts)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=3.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        repository = Path(tmp)
        build("mlp", repository)
        server = ServeProcess(repository)
        try:
            time.sleep(0.5)
            rss_start = server.rss_mib()
            print(
                f"soak for {args.minutes:g} min; server RSS at start {rss_start:.1f} MiB",
                flush=True,
            )
            counts = asyncio.run(soak(server.target, args.minutes * 60, server.rss_mib))
            rss_end = server.rss_mib()
        finally:
            code = server.stop()
    served = sum(v for k, v in counts.items() if k.endswith((" OK", "SUCCEEDED")))
    errors = {k: v for k, v in counts.items() if not k.endswith((" OK", "SUCCEEDED"))}
    report = {
        "minutes": args.minutes,
        "served": served,
        "by_outcome": counts,
        "errors": errors,
        "rss_mib_start": round(rss_start, 1),
        "rss_mib_end": round(rss_end, 1),
        "exit_code": code,
    }
    print(json.dumps(report, indent=2))
    out = ROOT / "bench" / "results" / "soak.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
