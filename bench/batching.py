"""The batching policies side by side, in one run, with the same client: adaptive (the default)
vs the static window, on the bundled mlp, and an empty gRPC handler as the floor.

    python -m bench.batching                  # about 9 minutes at --seconds 4 --rounds 5

Closed loop at 1, 16 and 64 in flight, and an open-loop Poisson sweep (the highest rate each
policy holds at p99 < 50 ms). Both servers and the empty handler stay up; each point of one
policy is measured right beside the same point of the other, so the ratios compare like with
like on a machine whose speed drifts. Writes docs/batching.json, the "Batching
policies" section of docs/benchmarks.md and docs/bench_batching.png.
"""

from __future__ import annotations

import argparse
import contextlib
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
from tensorgate.server.bundled import build  # noqa: E402

DOCS = ROOT / "docs"
POLICIES = ("static", "adaptive")
P99_TARGET_MS = 50.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=4.0)
    # One point moves by up to ±10 % on this shared 2-core machine; five pairs make the median
    # ratio steady to a few per cent.
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--rates", type=float, nargs="+", default=[1000, 2000, 3000, 4000])
    args = parser.parse_args()
    closed: dict[str, dict[int, list[dict[str, Any]]]] = {p: {} for p in POLICIES}
    open_loop: dict[str, dict[float, list[dict[str, Any]]]] = {p: {} for p in POLICIES}
    floors: list[dict[str, Any]] = []
    if 1 not in args.concurrency:
        parser.error("--concurrency must include 1 (the empty handler is measured beside it)")
    points = args.rounds * (1 + len(POLICIES) * (len(args.concurrency) + len(args.rates)))
    step = 0
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        # Both policies' servers, and the empty handler, stay up for the whole run: every
        # point of one policy is measured right beside the same point of the other.
        servers = {}
        for policy in POLICIES:
            repository = Path(tmp) / policy
            build("mlp", repository)
            config = repository / "mlp" / "config.toml"
            # A top-level key: before the file's first [table].
            config.write_text(f'batching = "{policy}"\n' + config.read_text())
            # A metrics endpoint, for the rows per batch of each point.
            servers[policy] = ServeProcess(
                repository, models=["mlp"], extra_args=["--metrics-port", "0"]
            )
            stack.callback(servers[policy].stop)
        echo, echo_target = echo_server()
        stack.callback(echo.terminate)
        for round_index in range(args.rounds):
            # Alternate which policy goes first, so neither always follows the other.
            order = POLICIES if round_index % 2 == 0 else POLICIES[::-1]
            for c in args.concurrency:
                sequence = list(order)
                if c == 1:
                    # The empty handler right beside the adaptive point (the pair of the c=1
                    # target), on the side away from the static one.
                    sequence = [*order, "empty"] if order[-1] == "adaptive" else ["empty", *order]
                for policy in sequence:
                    if policy == "empty":
                        floors.append(_point(echo_target, 1, args.seconds))
                        step += 1
                        print(f"[{step}/{points}] round {round_index + 1} empty handler c=1: "
                              f"p50 {floors[-1]['p50_ms']:.2f} ms", flush=True)  # fmt: skip
                        continue
                    row = _point(servers[policy], c, args.seconds)
                    closed[policy].setdefault(c, []).append(row)
                    step += 1
                    print(f"[{step}/{points}] round {round_index + 1} {policy:<8} c={c:<3} "
                          f"{row['req_per_s']:8.0f} req/s  p50 {row['p50_ms']:6.2f}  "
                          f"p99 {row['p99_ms']:6.2f} ms  batch {row['mean_batch']:5.2f}",
                          flush=True)  # fmt: skip
            for rate in args.rates:
                for policy in order:
                    row = _point(servers[policy], 0, args.seconds, rate)
                    open_loop[policy].setdefault(rate, []).append(row)
                    step += 1
                    print(f"[{step}/{points}] round {round_index + 1} {policy:<8} open "
                          f"{rate:6.0f}/s  served {row['req_per_s']:.0f}  p99 "
                          f"{row['p99_ms']:.2f} ms", flush=True)  # fmt: skip
    report = _summarize(args, floors, closed, open_loop)
    (DOCS / "batching.json").write_text(json.dumps(report, indent=2) + "\n")
    replace_section(DOCS / "benchmarks.md", "batching", _markdown(report))
    _plot(report, DOCS / "bench_batching.png")
    print(json.dumps(report["targets"], indent=2))
    return 0


def _point(
    server: ServeProcess | str, concurrency: int, seconds: float, rate: float = 0.0
) -> dict[str, Any]:
    """One load point against a tensorgate server (with its mean rows per batch over the
    point) or against a bare target (the empty handler)."""
    target = server if isinstance(server, str) else server.target
    spec = LoadSpec(target, "mlp", concurrency=max(concurrency, 1), rate=rate, seconds=seconds,
                    processes=1 if concurrency <= 4 and not rate else 2)  # fmt: skip
    before = (0.0, 0.0) if isinstance(server, str) else server.batch_rows()
    row = run(spec).as_dict()
    if not isinstance(server, str):
        rows, batches = (b - a for a, b in zip(before, server.batch_rows(), strict=True))
        row["mean_batch"] = rows / batches if batches else 0.0
    row.update(concurrency=concurrency, rate=rate)
    return row


def _summarize(
    args: argparse.Namespace,
    floors: list[dict[str, Any]],
    closed: dict[str, dict[int, list[dict[str, Any]]]],
    open_loop: dict[str, dict[float, list[dict[str, Any]]]],
) -> dict[str, Any]:
    """Medians over the rounds; each target is the median of its per-round (paired) ratios."""
    keys = ("req_per_s", "p50_ms", "p99_ms", "mean_batch")
    medians = {
        policy: {c: {k: statistics.median(r[k] for r in rows) for k in keys}
                 for c, rows in by_c.items()}
        for policy, by_c in closed.items()
    }  # fmt: skip
    open_medians = {
        policy: {
            rate: {
                "p99_ms": statistics.median(r["p99_ms"] for r in rows),
                "req_per_s": statistics.median(r["req_per_s"] for r in rows),
                "errors": sum(sum(r["errors"].values()) for r in rows),
            }
            for rate, rows in by_rate.items()
        }
        for policy, by_rate in open_loop.items()
    }
    held = {
        policy: max(
            (
                rate
                for rate, m in by_rate.items()
                if m["p99_ms"] < P99_TARGET_MS and not m["errors"]
            ),
            default=0.0,
        )
        for policy, by_rate in open_medians.items()
    }
    a, s = closed["adaptive"], closed["static"]
    targets: dict[str, Any] = {}
    per_round: dict[str, list[float]] = {}
    c1 = [row["p50_ms"] / floor["p50_ms"] for row, floor in zip(a[1], floors, strict=True)]
    targets["c1_p50_vs_empty"] = statistics.median(c1)
    per_round["c1_p50_vs_empty"] = [round(r, 3) for r in c1]
    for c in a:
        if c > 1:
            ratios = [x["req_per_s"] / y["req_per_s"] for x, y in zip(a[c], s[c], strict=True)]
            targets[f"c{c}_throughput_vs_static"] = statistics.median(ratios)
            per_round[f"c{c}_throughput_vs_static"] = [round(r, 3) for r in ratios]
    targets["open_loop_held"] = held
    return {
        "seconds": args.seconds, "rounds": args.rounds,
        "empty_handler_c1": {"p50_ms": statistics.median(f["p50_ms"] for f in floors)},
        "closed": medians, "open": open_medians, "targets": targets, "per_round": per_round,
    }  # fmt: skip


def _markdown(report: dict[str, Any]) -> str:
    floor = report["empty_handler_c1"]
    lines = [
        "## Batching policies: adaptive (default) vs static window (python -m bench.batching)",
        "",
        f"Predict on mlp, {report['rounds']} rounds of {report['seconds']:g} s points. Both "
        "policies' servers and an empty gRPC handler stay up for the whole run, and every point "
        "of one policy is measured right beside the same point of the other (the order "
        "alternating by round); figures are medians over the rounds, and ratios the medians of "
        "the per-round (paired) ratios; batch is the mean rows per engine call. The empty "
        "handler, measured right beside the adaptive point at 1 in flight, answers the same "
        f"client in p50 {floor['p50_ms']:.2f} ms (median).",
        "",
        "| in flight | static req/s | adaptive req/s | ratio (per round) | static p50 ms | adaptive p50 ms | static p99 ms | adaptive p99 ms | static batch | adaptive batch |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    s, a = report["closed"]["static"], report["closed"]["adaptive"]
    targets, per_round = report["targets"], report.get("per_round", {})
    for c in sorted(a, key=int):
        key = f"c{c}_throughput_vs_static"
        ratio = (
            f"{targets[key]:.2f} ({', '.join(f'{r:.2f}' for r in per_round[key])})"
            if key in per_round
            else f"{a[c]['req_per_s'] / s[c]['req_per_s']:.2f}"
        )
        lines.append(
            f"| {c} | {s[c]['req_per_s']:.0f} | {a[c]['req_per_s']:.0f} | {ratio} | "
            f"{s[c]['p50_ms']:.2f} | {a[c]['p50_ms']:.2f} | {s[c]['p99_ms']:.2f} | "
            f"{a[c]['p99_ms']:.2f} | {s[c]['mean_batch']:.1f} | {a[c]['mean_batch']:.1f} |"
        )
    held = report["targets"]["open_loop_held"]
    lines += [
        "",
        f"Open loop (Poisson), highest rate held at p99 < {P99_TARGET_MS:g} ms (median p99 over "
        f"the rounds): static {held['static']:.0f}/s, adaptive {held['adaptive']:.0f}/s. At 1 in "
        f"flight the adaptive p50 is {report['targets']['c1_p50_vs_empty']:.2f}× the empty "
        "handler's (median of the per-round ratios: "
        f"{', '.join(f'{r:.2f}' for r in per_round.get('c1_p50_vs_empty', []))}).",
        "",
        "| open loop req/s | static p99 ms | adaptive p99 ms |",
        "|---|---|---|",
        *(
            f"| {rate:.0f} | {report['open']['static'][rate]['p99_ms']:.2f} | "
            f"{report['open']['adaptive'][rate]['p99_ms']:.2f} |"
            for rate in report["open"]["adaptive"]
        ),
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
