"""Interactive latency while a burst of jobs is queued: jobs below interactive calls (the default,
job_priority = -1) vs at the same priority (job_priority = 0), in one run.

    python -m bench.priorities                 # about 1 minute

For each setting: one `tensorgate serve` on the bundled mlp; 10,000 jobs are submitted from 64
senders, and once 2,000 are accepted, closed-loop Predict at 4 in flight runs for --seconds while
the rest arrive and the backlog drains. Prints interactive p50/p99 and writes
bench/results/priorities.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "protos")]

from bench.loadgen import LoadSpec, run  # noqa: E402
from bench.serverproc import ServeProcess  # noqa: E402
from build_engines import build  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--jobs", type=int, default=10_000)
    args = parser.parse_args()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        repository = Path(tmp) / "engines"
        build("mlp", repository)
        config = repository / "mlp" / "config.toml"
        base = config.read_text()
        for job_priority in (0, -1):
            config.write_text(f"job_priority = {job_priority}\n" + base)
            server = ServeProcess(repository, models=["mlp"])
            try:
                accepted = threading.Event()
                burst = threading.Thread(
                    target=_run_burst, args=(server.target, args.jobs, accepted)
                )
                burst.start()
                accepted.wait(60)
                result = run(LoadSpec(server.target, "mlp", concurrency=4, seconds=args.seconds,
                                      warmup_s=0.2))  # fmt: skip
                burst.join()
            finally:
                server.stop()
            row = {"job_priority": job_priority, **result.as_dict()}
            rows.append(row)
            print(f"job_priority {job_priority:>2}: Predict during the burst p50 "
                  f"{row['p50_ms']:.2f} ms, p99 {row['p99_ms']:.2f} ms", flush=True)  # fmt: skip
    out = ROOT / "bench" / "results" / "priorities.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


def _run_burst(target: str, count: int, accepted: threading.Event) -> None:
    asyncio.run(_burst(target, count, accepted))


async def _burst(target: str, count: int, accepted: threading.Event) -> None:
    from client import AsyncTensorgateClient

    x = np.zeros((1, 256), np.float32)
    left = iter(range(count))
    done = 0
    async with AsyncTensorgateClient(target, timeout_s=120) as client:

        async def sender() -> None:
            nonlocal done
            for _ in left:
                await client.submit("mlp", {"input": x})
                done += 1
                if done >= 2000:
                    accepted.set()

        await asyncio.gather(*(sender() for _ in range(64)))
    accepted.set()


if __name__ == "__main__":
    sys.exit(main())
