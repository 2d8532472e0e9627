"""Interactive latency while a burst of jobs is queued: jobs below interactive calls (the default,
job_priority = -1) vs at the same priority (job_priority = 0), in one run.

    python -m bench.priorities                 # about 1 minute

For each setting: one `tensorgate serve` on the bundled mlp; 10,000 jobs are submitted from 64
senders, and once 2,000 are accepted, closed-loop Predict at 4 in flight runs for --seconds while
the rest arrive and the backlog drains. The same Predict load with no burst is the reference.
Writes docs/priorities.json and the "Priorities" section of docs/benchmarks.md.
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
from bench.report import replace_section  # noqa: E402
from bench.serverproc import ServeProcess  # noqa: E402
from tensorgate.server.bundled import build  # noqa: E402


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
        # None: no burst (the reference); 0: jobs at the interactive priority (as before
        # priorities); -1: jobs below interactive calls (the default).
        for job_priority in (None, 0, -1):
            config.write_text(f"job_priority = {job_priority or 0}\n" + base)
            server = ServeProcess(repository, models=["mlp"])
            try:
                burst = None
                if job_priority is not None:
                    accepted = threading.Event()
                    burst = threading.Thread(
                        target=_run_burst, args=(server.target, args.jobs, accepted)
                    )
                    burst.start()
                    accepted.wait(60)
                result = run(LoadSpec(server.target, "mlp", concurrency=4, seconds=args.seconds,
                                      warmup_s=0.2))  # fmt: skip
                if burst is not None:
                    burst.join()
            finally:
                server.stop()
            row = {"job_priority": job_priority, **result.as_dict()}
            rows.append(row)
            what = "no burst" if job_priority is None else f"job_priority {job_priority:>2}"
            print(f"{what}: Predict p50 {row['p50_ms']:.2f} ms, p99 {row['p99_ms']:.2f} ms, "
                  f"{row['req_per_s']:.0f} req/s", flush=True)  # fmt: skip
    (ROOT / "docs" / "priorities.json").write_text(json.dumps(rows, indent=2) + "\n")
    replace_section(ROOT / "docs" / "benchmarks.md", "priorities", _markdown(rows, args))
    return 0


def _markdown(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    names = {None: "no jobs (reference)", 0: "jobs at the same priority (`job_priority = 0`)",
             -1: "jobs below interactive calls (`job_priority = -1`, the default)"}  # fmt: skip
    lines = [
        "## Priorities: interactive calls during a job burst (python -m bench.priorities)",
        "",
        f"One `tensorgate serve` on mlp per setting. {args.jobs:,} jobs are submitted from 64 "
        "senders; once 2,000 are accepted, Predict at 4 in flight runs for "
        f"{args.seconds:g} s while the rest arrive and the backlog drains.",
        "",
        "| setting | Predict req/s | p50 ms | p99 ms | errors |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {names[row['job_priority']]} | {row['req_per_s']:.0f} | {row['p50_ms']:.2f} | "
            f"{row['p99_ms']:.2f} | {sum(row['errors'].values())} |"
        )
    return "\n".join(lines) + "\n"


def _run_burst(target: str, count: int, accepted: threading.Event) -> None:
    asyncio.run(_burst(target, count, accepted))


async def _burst(target: str, count: int, accepted: threading.Event) -> None:
    from tensorgate.client import AsyncTensorgateClient

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
