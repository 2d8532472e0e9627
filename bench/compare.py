"""Before/after: the same load against the server of another revision (checked out into a
temporary git worktree) and of this tree, alternating, in one run.

    python -m bench.compare --before 06c8d13 --concurrency 1 64 --rounds 3 [--mode job]
    python -m bench.compare --before REV --mode job --concurrency 64 --job-store redis

Prints medians and the after ÷ before ratios; writes bench/results/compare.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "protos")]

from bench.loadgen import LoadSpec, run  # noqa: E402
from bench.serverproc import ServeProcess, checkout  # noqa: E402
from tensorgate.server.bundled import build  # noqa: E402
from tests.redisproc import RedisProcess  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", required=True, help="git revision to compare against")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--mode", default="unary", choices=["unary", "job", "submit", "stream"], help="the load"
    )
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument(
        "--job-store", default="memory", choices=["memory", "redis"],
        help="redis: each server keeps its jobs in a redis-server of its own, started for it",
    )  # fmt: skip
    args = parser.parse_args()
    results: dict[str, dict[int, list[dict[str, float]]]] = {"before": {}, "after": {}}
    with tempfile.TemporaryDirectory() as tmp, checkout(args.before, Path(tmp)) as worktree:
        repository = Path(tmp) / "engines"
        build("mlp", repository)
        roots = {"before": worktree, "after": ROOT}
        total = args.rounds * len(args.concurrency) * 2
        step = 0
        for round_index in range(args.rounds):
            for c in args.concurrency:
                for side in ("before", "after"):
                    step += 1
                    store: list[str] = []
                    redis = None
                    if args.job_store == "redis":
                        redis = RedisProcess(Path(tmp) / f"redis-{step}").start()
                        store = ["--job-store", redis.url]
                    server = ServeProcess(repository, ("mlp",), root=roots[side],
                                          extra_args=store)  # fmt: skip
                    try:
                        spec = LoadSpec(server.target, "mlp", mode=args.mode, concurrency=c,
                                        seconds=args.seconds, processes=1 if c <= 4 else 2)  # fmt: skip
                        result = run(spec)
                    finally:
                        server.stop()
                        if redis is not None:
                            redis.stop()
                    results[side].setdefault(c, []).append(result.as_dict())
                    print(f"[{step}/{total}] round {round_index + 1} {side:<6} c={c:<4} "
                          f"{result.req_per_s:8.1f} req/s  p50 {result.p50_ms:6.2f}  "
                          f"p99 {result.p99_ms:6.2f} ms", flush=True)  # fmt: skip
    summary = {}
    print(f"\nmedians of {args.rounds} rounds (after = this tree, before = {args.before}):")
    for c in args.concurrency:
        med = {
            side: {
                k: statistics.median(r[k] for r in results[side][c])
                for k in ("req_per_s", "p50_ms", "p99_ms")
            }
            for side in ("before", "after")
        }
        ratio = med["after"]["req_per_s"] / med["before"]["req_per_s"]
        summary[c] = {**med, "throughput_ratio": ratio,
                      "p50_ratio": med["after"]["p50_ms"] / med["before"]["p50_ms"],
                      "p99_ratio": med["after"]["p99_ms"] / med["before"]["p99_ms"]}  # fmt: skip
        print(f"  c={c:<4} req/s {med['before']['req_per_s']:8.1f} -> {med['after']['req_per_s']:8.1f} "
              f"(x{ratio:.3f}); p50 {med['before']['p50_ms']:.2f} -> {med['after']['p50_ms']:.2f} ms; "
              f"p99 {med['before']['p99_ms']:.2f} -> {med['after']['p99_ms']:.2f} ms")  # fmt: skip
    out = ROOT / "bench" / "results" / "compare.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps({"args": vars(args), "summary": summary, "runs": results}, indent=2) + "\n"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
