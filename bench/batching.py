"""The batching policies side by side, in one run, with the same client: adaptive (the default)
vs the static window, on the bundled mlp, and an empty gRPC handler as the floor.

    python -m bench.batching                  # about 4 minutes at --seconds 5

Closed loop at 1, 16 and 64 in flight (rounds alternate the policies), and an open-loop Poisson
sweep: the highest rate each holds at p99 < 50 ms. Writes docs/batching.json, the "Batching
policies" section of docs/benchmarks.md and docs/bench_batching.png.
"""

from __future__ import annotations

import argparse
import json
import statistics
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
from build_engines import build  # noqa: E402

DOCS = ROOT / "docs"
POLICIES = ("static", "adaptive")
P99_TARGET_MS = 50.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--rates", type=float, nargs="+", default=[1000, 2000, 3000, 4000])
    args = parser.parse_args()
    closed: dict[str, dict[int, list[dict[str, Any]]]] = {p: {} for p in POLICIES}
    open_loop: dict[str, list[dict[str, Any]]] = {p: [] for p in POLICIES}
    with tempfile.TemporaryDirectory() as tmp:
        repository = Path(tmp) / "engines"
        build("mlp", repository)
        config = repository / "mlp" / "config.toml"
        base = config.read_text()
        echo, target = echo_server()
        try:
            floor = _point(target, 1, args.seconds)
        finally:
            echo.terminate()
        print(f"empty handler, 1 in flight: p50 {floor['p50_ms']:.2f} ms", flush=True)
        for round_index in range(args.rounds):
            for policy in POLICIES:
                # A top-level key: before the file's first [table].
                config.write_text(f'batching = "{policy}"\n' + base)
                server = ServeProcess(repository, models=["mlp"])
                try:
                    for c in args.concurrency:
                        row = _point(server.target, c, args.seconds)
                        closed[policy].setdefault(c, []).append(row)
                        print(f"round {round_index + 1} {policy:<8} c={c:<3} "
                              f"{row['req_per_s']:8.0f} req/s  p50 {row['p50_ms']:6.2f}  "
                              f"p99 {row['p99_ms']:6.2f} ms", flush=True)  # fmt: skip
                    if round_index == 0:
                        for rate in args.rates:
                            row = _point(server.target, 0, args.seconds, rate)
                            open_loop[policy].append(row)
                            print(f"open {policy:<8} {rate:6.0f}/s  served {row['req_per_s']:.0f}"
                                  f"  p99 {row['p99_ms']:.2f} ms", flush=True)  # fmt: skip
                finally:
                    server.stop()
    report = _summarize(args, floor, closed, open_loop)
    (DOCS / "batching.json").write_text(json.dumps(report, indent=2) + "\n")
    replace_section(DOCS / "benchmarks.md", "batching", _markdown(report))
    _plot(report, DOCS / "bench_batching.png")
    print(json.dumps(report["targets"], indent=2))
    return 0


def _point(target: str, concurrency: int, seconds: float, rate: float = 0.0) -> dict[str, Any]:
    spec = LoadSpec(target, "mlp", concurrency=max(concurrency, 1), rate=rate, seconds=seconds,
                    processes=1 if concurrency <= 4 and not rate else 2)  # fmt: skip
    row = run(spec).as_dict()
    row.update(concurrency=concurrency, rate=rate)
    return row


def _summarize(
    args: argparse.Namespace,
    floor: dict[str, Any],
    closed: dict[str, dict[int, list[dict[str, Any]]]],
    open_loop: dict[str, list[dict[str, Any]]],
) -> dict[str, Any]:
    medians = {
        policy: {
            c: {k: statistics.median(r[k] for r in rows) for k in ("req_per_s", "p50_ms", "p99_ms")}
            for c, rows in by_c.items()
        }
        for policy, by_c in closed.items()
    }
    held = {
        policy: max(
            (
                r["rate"]
                for r in rows
                if r["p99_ms"] < P99_TARGET_MS and not sum(r["errors"].values())
            ),
            default=0.0,
        )
        for policy, rows in open_loop.items()
    }
    a, s = medians["adaptive"], medians["static"]
    targets = {
        "c1_p50_vs_empty": a[1]["p50_ms"] / floor["p50_ms"] if 1 in a else None,
        **{f"c{c}_throughput_vs_static": a[c]["req_per_s"] / s[c]["req_per_s"] for c in a if c > 1},
        "open_loop_held": held,
    }
    return {
        "seconds": args.seconds, "rounds": args.rounds, "empty_handler_c1": floor,
        "closed": medians, "open": open_loop, "targets": targets,
    }  # fmt: skip


def _markdown(report: dict[str, Any]) -> str:
    floor = report["empty_handler_c1"]
    lines = [
        "## Batching policies: adaptive (default) vs static window (python -m bench.batching)",
        "",
        f"Closed-loop Predict on mlp, medians of {report['rounds']} alternating rounds of "
        f"{report['seconds']:g} s; the empty gRPC handler answers the same client at 1 in flight "
        f"in p50 {floor['p50_ms']:.2f} ms.",
        "",
        "| in flight | static req/s | adaptive req/s | ratio | static p50 ms | adaptive p50 ms | static p99 ms | adaptive p99 ms |",
        "|---|---|---|---|---|---|---|---|",
    ]
    s, a = report["closed"]["static"], report["closed"]["adaptive"]
    for c in sorted(a, key=int):
        lines.append(
            f"| {c} | {s[c]['req_per_s']:.0f} | {a[c]['req_per_s']:.0f} | "
            f"{a[c]['req_per_s'] / s[c]['req_per_s']:.2f} | {s[c]['p50_ms']:.2f} | "
            f"{a[c]['p50_ms']:.2f} | {s[c]['p99_ms']:.2f} | {a[c]['p99_ms']:.2f} |"
        )
    held = report["targets"]["open_loop_held"]
    lines += [
        "",
        f"Open loop (Poisson), highest rate held at p99 < {P99_TARGET_MS:g} ms: static "
        f"{held['static']:.0f}/s, adaptive {held['adaptive']:.0f}/s. At 1 in flight the adaptive "
        f"p50 is {report['targets']['c1_p50_vs_empty']:.2f}× the empty handler's.",
        "",
        "![batching](bench_batching.png)",
        "",
    ]
    return "\n".join(lines)


def _plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (rate_ax, p50_ax) = plt.subplots(1, 2, figsize=(11, 4))
    concurrencies = sorted(report["closed"]["adaptive"], key=int)
    width = 0.38
    for i, policy in enumerate(POLICIES):
        rows = report["closed"][policy]
        xs = [j + i * width for j in range(len(concurrencies))]
        rate_ax.bar(xs, [rows[c]["req_per_s"] for c in concurrencies], width, label=policy)
        p50_ax.bar(xs, [rows[c]["p50_ms"] for c in concurrencies], width, label=policy)
    p50_ax.axhline(report["empty_handler_c1"]["p50_ms"], color="grey", linestyle=":",
                   label="empty handler, 1 in flight")  # fmt: skip
    for ax in (rate_ax, p50_ax):
        ax.set_xticks([j + width / 2 for j in range(len(concurrencies))],
                      [f"{c} in flight" for c in concurrencies])  # fmt: skip
        ax.legend()
    rate_ax.set_title("Predict throughput, req/s")
    p50_ax.set_title("Predict p50 latency, ms")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
