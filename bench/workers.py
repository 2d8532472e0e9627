"""--workers: Predict throughput and latency for 1 and 2 serving processes on one port.

    python -m bench.workers                       # about 2 minutes at --seconds 5
    python -m bench.workers --workers 1 2 4 8     # on a machine with the cores for it

Closed-loop Predict on the bundled mlp at 64 and 256 in flight, the load generator in 2
processes; the same load against an empty gRPC handler shows what the load generator itself can
drive on this machine. CPU seconds are counted for the server (all its processes) and compared
with the machine's cores. Writes docs/workers.json, the "Workers" section of docs/benchmarks.md
and docs/bench_workers.png.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "protos")]

from bench.loadgen import LoadSpec, run  # noqa: E402
from bench.report import replace_section  # noqa: E402
from bench.serverproc import ServeProcess  # noqa: E402
from bench.suite import echo_server  # noqa: E402
from tensorgate.server.bundled import build  # noqa: E402
from tests.redisproc import RedisProcess  # noqa: E402

DOCS = ROOT / "docs"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--load-processes", type=int, default=2)
    parser.add_argument(
        "--results-only",
        action="store_true",
        help="write bench/results/workers.json only (docs untouched, no plot)",
    )
    args = parser.parse_args()
    rows: list[dict[str, Any]] = []
    total = (len(args.workers) + 1) * len(args.concurrency)
    step = 0
    with tempfile.TemporaryDirectory() as tmp:
        repository = Path(tmp) / "engines"
        build("mlp", repository)
        redis = RedisProcess(Path(tmp) / "redis").start()
        try:
            echo, echo_target = echo_server()
            try:
                for c in args.concurrency:
                    step += 1
                    print(f"[{step}/{total}] empty handler, {c} in flight", flush=True)
                    rows.append(
                        {"server": "empty handler", "workers": 1, **_point(args, echo_target, c)}
                    )
            finally:
                echo.terminate()
            for n in args.workers:
                flags = ["--workers", str(n), "--metrics-port", "0"]
                if n > 1:
                    flags += ["--job-store", redis.url]
                server = ServeProcess(repository, models=["mlp"], extra_args=flags)
                try:
                    for c in args.concurrency:
                        step += 1
                        print(f"[{step}/{total}] {n} worker(s), {c} in flight", flush=True)
                        cpu, (rows_before, batches_before) = (
                            server.cpu_seconds(),
                            server.batch_rows(),
                        )
                        point = _point(args, server.target, c)
                        point["server_cpu_s"] = round(server.cpu_seconds() - cpu, 2)
                        rows_after, batches_after = server.batch_rows()
                        batches = batches_after - batches_before
                        point["mean_batch_rows"] = (
                            (rows_after - rows_before) / batches if batches else 0.0
                        )
                        rows.append({"server": "tensorgate", "workers": n, **point})
                finally:
                    server.stop()
        finally:
            redis.stop()
    report = {
        "machine": f"{platform.node()}, {os.cpu_count()} cores",
        "seconds": args.seconds,
        "load_processes": args.load_processes,
        "rows": rows,
    }
    if args.results_only:
        out = ROOT / "bench" / "results" / "workers.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n")
        print(_markdown(report))
        print(f"wrote {out}")
        return 0
    (DOCS / "workers.json").write_text(json.dumps(report, indent=2) + "\n")
    replace_section(DOCS / "benchmarks.md", "workers", _markdown(report))
    _plot(rows, DOCS / "bench_workers.png")
    print(f"wrote {DOCS / 'workers.json'}, the 'workers' section of benchmarks.md, the plot")
    return 0


def _point(args: argparse.Namespace, target: str, concurrency: int) -> dict[str, Any]:
    spec = LoadSpec(
        target, "mlp", concurrency=concurrency, seconds=args.seconds,
        processes=args.load_processes,
    )  # fmt: skip
    result = run(spec)
    # The loaded time: the warm-up and the measured window.
    return {"concurrency": concurrency, "wall_s": spec.seconds + spec.warmup_s, **result.as_dict()}


def _markdown(report: dict[str, Any]) -> str:
    lines = [
        "## Workers: serving processes on one port (python -m bench.workers)",
        "",
        f"Closed-loop Predict on mlp, {report['seconds']:g} s a point, the load generator in "
        f"{report['load_processes']} processes on the same machine ({report['machine']}). "
        "server CPU is the CPU time of all the server's processes over the point's "
        "wall time, in cores.",
        "",
        "| server | workers | in flight | req/s | p50 ms | p99 ms | errors | server CPU (cores) | mean batch |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        cores = r["server_cpu_s"] / r["wall_s"] if "server_cpu_s" in r else None
        batch = r.get("mean_batch_rows")
        lines.append(
            f"| {r['server']} | {r['workers']} | {r['concurrency']} | {r['req_per_s']:.0f} | "
            f"{r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {sum(r['errors'].values())} | "
            f"{'–' if cores is None else f'{cores:.2f}'} | "
            f"{'–' if batch is None else f'{batch:.1f}'} |"
        )
    lines += ["", "![workers](bench_workers.png)", ""]
    return "\n".join(lines)


def _plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (rate_ax, p99_ax) = plt.subplots(1, 2, figsize=(11, 4))
    labels = sorted(
        {(r["server"], r["workers"]) for r in rows}, key=lambda k: (k[0] != "empty handler", k[1])
    )
    concurrencies = sorted({r["concurrency"] for r in rows})
    width = 0.8 / len(labels)
    for i, (server, workers) in enumerate(labels):
        name = server if server == "empty handler" else f"{workers} worker(s)"
        picked = [next(r for r in rows if (r["server"], r["workers"]) == (server, workers)
                       and r["concurrency"] == c) for c in concurrencies]  # fmt: skip
        xs = [j + i * width for j in range(len(concurrencies))]
        rate_ax.bar(xs, [r["req_per_s"] for r in picked], width, label=name)
        p99_ax.bar(xs, [r["p99_ms"] for r in picked], width, label=name)
    for ax in (rate_ax, p99_ax):
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(concurrencies))],
                      [f"{c} in flight" for c in concurrencies])  # fmt: skip
        ax.legend()
    rate_ax.set_title("Predict throughput, req/s")
    p99_ax.set_title("Predict p99 latency, ms")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
