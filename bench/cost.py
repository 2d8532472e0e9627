"""The server's CPU time per request: tensorgate against an empty grpc.aio handler, in one run.

    python -m bench.cost                     # about 3 minutes at --seconds 4
    python -m bench.cost --rounds 3          # medians of 3 rounds
    python -m bench.cost --before REV        # and that revision's server, in the same run
    python -m bench.cost --modes unary --concurrency 64 --no-write   # a quick look

For unary Predict, stream items (StreamPredict) and jobs (Submit, then a long-poll GetResult) at
1, 16 and 64 in flight, each server's own CPU clock (user + system, from /proc, its worker
processes included) is read beside the load, interpolated to the load generator's measured
window, and divided by the requests answered in it. The empty handler (bench/echo_server.py, on
the same event loop as tensorgate serve) answers each call at once: its figure is what gRPC
itself costs, and the difference is ours. Writes docs/cost.json, the "Cost per request" section of
docs/performance.md and docs/bench_cost.png.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "protos")]

from bench.loadgen import LoadSpec, run  # noqa: E402
from bench.report import replace_section  # noqa: E402
from bench.serverproc import ServeProcess, checkout, stat_cpu_seconds  # noqa: E402
from tensorgate.server.bundled import build  # noqa: E402

DOCS = ROOT / "docs"
SECTION = "cost"
MODES = ("unary", "stream", "job")
CONCURRENCY = (1, 16, 64)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=4.0, help="measured seconds per point")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--concurrency", type=int, nargs="+", default=list(CONCURRENCY))
    parser.add_argument(
        "--before", help="a git revision whose server is measured too (a before/after table)"
    )
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/ as it is")
    args = parser.parse_args()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp, _checkout(args.before, Path(tmp)) as before_root:
        repository = Path(tmp) / "engines"
        build("mlp", repository)
        echo, echo_target = _echo_server()
        running = [ServeProcess(repository, ("mlp",), extra_args=["--drain-delay-s", "0"])]
        try:
            servers: dict[str, tuple[str, Callable[[], float]]] = {
                "empty handler": (
                    echo_target,
                    lambda: stat_cpu_seconds(Path(f"/proc/{echo.pid}/stat")),
                ),
            }
            if before_root is not None:
                running.append(ServeProcess(repository, ("mlp",), root=before_root,
                                            extra_args=["--drain-delay-s", "0"]))  # fmt: skip
                servers["before"] = (running[1].target, running[1].cpu_seconds)
            servers["tensorgate"] = (running[0].target, running[0].cpu_seconds)
            modes, levels = args.modes, args.concurrency
            points = [(m, c, s) for m in modes for c in levels for s in servers]
            total = len(points) * args.rounds
            step = 0
            for round_index in range(args.rounds):
                for mode, concurrency, name in points:
                    step += 1
                    target, cpu = servers[name]
                    row = _point(target, cpu, mode, concurrency, args.seconds)
                    rows.append({"round": round_index, "server": name, **row})
                    print(f"[{step}/{total}] {name:<13} {mode:<6} c={concurrency:<3} "
                          f"{row['req_per_s']:8.0f} req/s  {row['cpu_us']:6.0f} µs CPU a request",
                          flush=True)  # fmt: skip
        finally:
            for server in running:
                server.stop()
            echo.send_signal(signal.SIGTERM)
            echo.wait(10)
    report = {"seconds": args.seconds, "rounds": args.rounds, "before": args.before,
              "rows": rows, "summary": _summary(rows, modes, levels)}  # fmt: skip
    print(_markdown(report))
    if args.no_write:
        return 0
    (DOCS / "cost.json").write_text(json.dumps(report, indent=2) + "\n")
    replace_section(DOCS / "performance.md", SECTION, _markdown(report))
    _plot(report["summary"], DOCS / "bench_cost.png")
    print(f"wrote {DOCS / 'cost.json'}, the '{SECTION}' section of performance.md, the plot")
    return 0


@contextlib.contextmanager
def _checkout(revision: str | None, tmp: Path) -> Iterator[Path | None]:
    """A temporary worktree of the revision (None: no revision asked for)."""
    if revision is None:
        yield None
        return
    with checkout(revision, tmp) as worktree:
        yield worktree


def _point(
    target: str, cpu: Callable[[], float], mode: str, concurrency: int, seconds: float
) -> dict[str, Any]:
    """One load, the server's CPU clock sampled beside it every 50 ms."""
    samples: list[tuple[float, float]] = []
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            samples.append((time.time(), cpu()))
            time.sleep(0.05)
        samples.append((time.time(), cpu()))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    spec = LoadSpec(target, "mlp", mode=mode, concurrency=concurrency, seconds=seconds,
                    processes=1 if concurrency <= 4 else 2)  # fmt: skip
    result = run(spec)
    done.set()
    sampler.join(5)
    start, end = result.extra["window"]
    cpu_s = _at(samples, end) - _at(samples, start)
    return {
        "mode": mode,
        "concurrency": concurrency,
        "requests": result.requests,
        "errors": result.errors,
        "req_per_s": result.req_per_s,
        "p50_ms": result.p50_ms,
        "p99_ms": result.p99_ms,
        "cpu_us": cpu_s / max(result.requests, 1) * 1e6,
        "cores": cpu_s / seconds,
    }


def _at(samples: list[tuple[float, float]], when: float) -> float:
    """The CPU clock at `when`, interpolated between the samples around it."""
    for (t0, c0), (t1, c1) in itertools.pairwise(samples):
        if t0 <= when <= t1:
            return c0 + (c1 - c0) * (when - t0) / max(t1 - t0, 1e-9)
    return samples[-1][1] if when > samples[-1][0] else samples[0][1]


def _echo_server() -> tuple[subprocess.Popen[str], str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    process = subprocess.Popen(
        [sys.executable, "-m", "bench.echo_server", str(port), "--uvloop"], cwd=ROOT,
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert process.stdout is not None
    process.stdout.readline()
    return process, f"127.0.0.1:{port}"


def _summary(
    rows: list[dict[str, Any]], modes: list[str], levels: list[int]
) -> list[dict[str, Any]]:
    """Medians over rounds, and tensorgate ÷ empty handler for each mode and concurrency (and the
    earlier revision's, when measured)."""
    out = []
    names = sorted({r["server"] for r in rows})
    for mode in modes:
        for c in levels:
            med = {
                name: {
                    key: statistics.median(
                        r[key] for r in rows
                        if r["server"] == name and r["mode"] == mode and r["concurrency"] == c
                    )
                    for key in ("req_per_s", "p50_ms", "cpu_us", "cores")
                }
                for name in names
            }  # fmt: skip
            tg, empty = med["tensorgate"], med["empty handler"]
            point = {
                "mode": mode, "concurrency": c, **{f"tg_{k}": v for k, v in tg.items()},
                **{f"empty_{k}": v for k, v in empty.items()},
                "cpu_ratio": tg["cpu_us"] / empty["cpu_us"],
                "throughput_ratio": tg["req_per_s"] / empty["req_per_s"],
                "p50_ratio": tg["p50_ms"] / empty["p50_ms"],
            }  # fmt: skip
            if "before" in med:
                before = med["before"]
                point.update({f"before_{k}": v for k, v in before.items()})
                point["before_cpu_ratio"] = before["cpu_us"] / empty["cpu_us"]
                point["before_throughput_ratio"] = before["req_per_s"] / empty["req_per_s"]
                point["before_p50_ratio"] = before["p50_ms"] / empty["p50_ms"]
            out.append(point)
    return out


def _markdown(report: dict[str, Any]) -> str:
    lines = [
        "## Cost per request (python -m bench.cost)",
        "",
        f"Server CPU time per request, from each server's own CPU clock over the measured window "
        f"({report['seconds']:g} s a point, {report['rounds']} round(s), medians), tensorgate "
        "against an empty grpc.aio handler on the same event loop (uvloop), the load generator "
        "on the same 2 cores. The empty handler's figure is the transport's; the rest is ours.",
        "",
        "| load | in flight | empty µs/req | tensorgate µs/req | CPU ÷ empty | req/s ÷ empty | "
        "p50 ÷ empty |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in report["summary"]:
        lines.append(
            f"| {s['mode']} | {s['concurrency']} | {s['empty_cpu_us']:.0f} | "
            f"{s['tg_cpu_us']:.0f} | {s['cpu_ratio']:.2f}× | {s['throughput_ratio']:.2f}× | "
            f"{s['p50_ratio']:.2f}× |"
        )
    if report.get("before"):
        lines += [
            "",
            f"The same run, the server at `{report['before']}` (before) against this tree "
            "(after), each as a ratio of the empty handler:",
            "",
            "| load | in flight | µs/req before → after | CPU ÷ empty before → after | "
            "req/s ÷ empty before → after | p50 ÷ empty before → after |",
            "|---|---|---|---|---|---|",
        ]
        for s in report["summary"]:
            lines.append(
                f"| {s['mode']} | {s['concurrency']} | {s['before_cpu_us']:.0f} → "
                f"{s['tg_cpu_us']:.0f} | {s['before_cpu_ratio']:.2f}× → {s['cpu_ratio']:.2f}× | "
                f"{s['before_throughput_ratio']:.2f}× → {s['throughput_ratio']:.2f}× | "
                f"{s['before_p50_ratio']:.2f}× → {s['p50_ratio']:.2f}× |"
            )
    lines += ["", "![cost per request](bench_cost.png)", ""]
    return "\n".join(lines)


def _plot(summary: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    modes = list(dict.fromkeys(s["mode"] for s in summary))
    fig, axes = plt.subplots(1, len(modes), figsize=(4.3 * len(modes), 4), sharey=True,
                             squeeze=False)  # fmt: skip
    width = 0.27
    for ax, mode in zip(axes[0], modes, strict=True):
        rows = [s for s in summary if s["mode"] == mode]
        x = np.arange(len(rows))
        ax.bar(x, [r["empty_cpu_us"] for r in rows], width, label="empty handler")
        if "before_cpu_us" in rows[0]:
            ax.bar(x + width, [r["before_cpu_us"] for r in rows], width, label="tensorgate before")
        ax.bar(x + 2 * width, [r["tg_cpu_us"] for r in rows], width, label="tensorgate")
        ax.set_xticks(x + width, [f"{r['concurrency']} in flight" for r in rows])
        ax.set_title(f"{mode}: server CPU µs per request")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
