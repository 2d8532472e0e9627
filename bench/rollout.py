"""A rollout under load: latency and errors of a steady load before, during and after a new model
version is loaded beside the serving one, and how long a new version takes from appearing on disk
to serving.

    python -m bench.rollout             # about 30 s

One `tensorgate serve --model-control poll` on the bundled mlp laid out as version 1
(engines/mlp/1/model.onnx); a closed loop of --concurrency KServe ModelInfer calls (the response
names the version that answered). After --seconds of steady load, version 2 (the same weights)
appears on disk (a folder renamed into place, as a deploy would); the poll picks it up, loads and
warms it beside version 1, routes new calls to it, and releases version 1 once idle. Windows:
before (the steady load), during (from the folder appearing until 1 s after the first answer from
version 2) and after. Writes docs/rollout.json, the "Rollout" section of docs/benchmarks.md and
docs/bench_rollout.png.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "protos")]

from bench.report import replace_section  # noqa: E402
from bench.serverproc import ServeProcess  # noqa: E402
from tensorgate.server.bundled import build  # noqa: E402

DOCS = ROOT / "docs"
SECTION = "rollout"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=8.0, help="steady load before and after")
    parser.add_argument("--concurrency", type=int, default=16, help="calls in flight")
    parser.add_argument("--poll-s", type=float, default=0.5, help="--repository-poll-s")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        repository = Path(tmp) / "engines"
        build("mlp", repository)
        model = repository / "mlp"
        (model / "1").mkdir()
        shutil.move(model / "model.onnx", model / "1" / "model.onnx")
        staged = Path(tmp) / "staged-2"
        staged.mkdir()
        shutil.copyfile(model / "1" / "model.onnx", staged / "model.onnx")
        server = ServeProcess(
            repository,
            extra_args=[
                "--model-control", "poll", "--repository-poll-s", str(args.poll_s),
                "--drain-delay-s", "0",
            ],
        )  # fmt: skip
        try:
            report = asyncio.run(_measure(args, server, staged, model / "2"))
        finally:
            server.stop()
    report.update(
        machine=f"{platform.node()} ({platform.processor() or platform.machine()})",
        concurrency=args.concurrency,
        poll_s=args.poll_s,
    )
    timeline = report.pop("timeline")  # every call: for the plot, too many for the JSON
    (DOCS / "rollout.json").write_text(json.dumps(report, indent=2) + "\n")
    report["timeline"] = timeline
    replace_section(DOCS / "benchmarks.md", SECTION, _markdown(report))
    _plot(report, DOCS / "bench_rollout.png")
    print(f"wrote {DOCS / 'rollout.json'}, the '{SECTION}' section of benchmarks.md, the plot")
    return 0


async def _measure(
    args: argparse.Namespace, server: ServeProcess, staged: Path, target: Path
) -> dict[str, Any]:
    import grpc

    from tensorgate.kserve import grpc_service_pb2 as kpb
    from tensorgate.kserve import grpc_service_pb2_grpc as kpb_grpc

    x = np.random.default_rng(0).standard_normal((1, 256)).astype(np.float32)
    request = kpb.ModelInferRequest(model_name="mlp")
    request.inputs.add(name="input", datatype="FP32", shape=[1, 256])
    request.raw_input_contents.append(x.tobytes())
    samples: list[tuple[float, float, str]] = []  # (sent, seconds, version or error code)
    stop = asyncio.Event()
    async with grpc.aio.insecure_channel(server.target) as channel:
        stub = kpb_grpc.GRPCInferenceServiceStub(channel)

        async def caller() -> None:
            while not stop.is_set():
                sent = time.perf_counter()
                try:
                    reply = await stub.ModelInfer(request, timeout=10)
                    outcome = reply.model_version
                except grpc.RpcError as exc:
                    outcome = exc.code().name
                samples.append((sent, time.perf_counter() - sent, outcome))

        callers = [asyncio.create_task(caller()) for _ in range(args.concurrency)]
        start = time.perf_counter()
        print(f"[1/3] steady load for {args.seconds:g} s", flush=True)
        await asyncio.sleep(args.seconds)
        print("[2/3] version 2 appears on disk", flush=True)
        dropped = time.perf_counter()
        staged.rename(target)  # whole, at once, as a deploy would
        while not any(s[2] == "2" for s in samples[-args.concurrency * 4 :]):
            if time.perf_counter() - dropped > 60:
                raise RuntimeError("version 2 did not serve within 60 s")
            await asyncio.sleep(0.01)
        first_v2 = min(s[0] + s[1] for s in samples if s[2] == "2")
        print(f"[3/3] version 2 served after {first_v2 - dropped:.2f} s; steady load", flush=True)
        await asyncio.sleep(args.seconds)
        stop.set()
        await asyncio.gather(*callers)
    during_end = first_v2 + 1.0
    warm = start + 1.0  # the first second (connections opening) is not steady load
    windows = {
        "before": [s for s in samples if warm <= s[0] < dropped],
        "during": [s for s in samples if dropped <= s[0] < during_end],
        "after": [s for s in samples if s[0] >= during_end],
    }
    rows = {}
    for name, chosen in windows.items():
        ms = np.array([s[1] for s in chosen]) * 1000
        errors = [s[2] for s in chosen if not s[2].isdigit()]
        span = (max(s[0] for s in chosen) - min(s[0] for s in chosen)) if chosen else 1.0
        rows[name] = {
            "calls": len(chosen),
            "per_s": len(chosen) / max(span, 1e-9),
            "p50_ms": float(np.percentile(ms, 50)),
            "p99_ms": float(np.percentile(ms, 99)),
            "errors": len(errors),
            "versions": sorted({s[2] for s in chosen if s[2].isdigit()}),
        }
    return {
        "windows": rows,
        "disk_to_serving_s": first_v2 - dropped,
        "timeline": [[round(s[0] - start, 4), round(s[1] * 1000, 3), s[2]] for s in samples],
        "dropped_at_s": dropped - start,
        "first_v2_at_s": first_v2 - start,
    }


def _markdown(report: dict[str, Any]) -> str:
    w = report["windows"]
    ratio = w["during"]["p99_ms"] / w["before"]["p99_ms"]
    lines = [
        "## Rollout: a new version under load (python -m bench.rollout)",
        "",
        f"One `tensorgate serve --model-control poll --repository-poll-s {report['poll_s']:g}` "
        f"on mlp, on {report['machine']}; {report['concurrency']} KServe ModelInfer calls in "
        "flight from the same machine. Version 2 appears on disk (a folder renamed into place); "
        "it is loaded and warmed beside version 1, takes the new calls, and version 1 is released "
        "once idle.",
        "",
        "| window | calls | calls/s | p50 ms | p99 ms | errors | answered by |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in ("before", "during", "after"):
        r = w[name]
        lines.append(
            f"| {name} | {r['calls']} | {r['per_s']:.0f} | {r['p50_ms']:.2f} | "
            f"{r['p99_ms']:.2f} | {r['errors']} | version {', '.join(r['versions'])} |"
        )
    lines += [
        "",
        f"From the folder appearing to the first answer from version 2: "
        f"**{report['disk_to_serving_s']:.2f} s** (the poll interval, then the load and warm-up). "
        f"p99 during the rollout is {ratio:.2f}x the steady p99; errors: "
        f"{sum(r['errors'] for r in w.values())}.",
        "",
        "![rollout](bench_rollout.png)",
        "",
    ]
    return "\n".join(lines)


def _plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11, 4))
    timeline = report["timeline"]
    for version, color in (("1", "C0"), ("2", "C1")):
        points = [(t, ms) for t, ms, v in timeline if v == version]
        if points:
            ts, ms = zip(*points, strict=True)
            ax.scatter(ts, ms, s=2, color=color, alpha=0.4, label=f"answered by version {version}")
    errors = [(t, ms) for t, ms, v in timeline if not v.isdigit()]
    if errors:
        ts, ms = zip(*errors, strict=True)
        ax.scatter(ts, ms, s=12, color="red", marker="x", label="errors")
    ax.axvline(report["dropped_at_s"], color="grey", linestyle="--", label="version 2 on disk")
    ax.axvline(report["first_v2_at_s"], color="black", linestyle=":", label="first answer by 2")
    ax.set_yscale("log")
    ax.set_xlabel("seconds")
    ax.set_ylabel("latency, ms")
    ax.set_title("A rollout under load: every call's latency, by the version that answered")
    ax.legend(loc="upper right", markerscale=4)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
