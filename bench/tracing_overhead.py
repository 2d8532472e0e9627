"""Tracing cost: the same closed-loop unary load against the server with tracing off, with every
request traced, and with the production sampler (1 % of traces), exported over OTLP/gRPC to a
local sink (a stand-in collector that counts spans); measured in one run, alternating, so all see
the same machine.

    python -m bench.tracing_overhead --seconds 10 --rounds 3

Writes bench/results/tracing_overhead.json and the "Tracing" section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "protos")]

from bench.loadgen import LoadSpec, run  # noqa: E402
from bench.report import replace_section  # noqa: E402
from bench.serverproc import ServeProcess  # noqa: E402
from tensorgate.server.bundled import build  # noqa: E402


def _sink(
    port_out: multiprocessing.Queue, spans_out: multiprocessing.Queue, stop: multiprocessing.Event
) -> None:  # type: ignore[type-arg]
    """An OTLP trace receiver that counts spans (runs in its own process)."""
    from concurrent import futures

    import grpc
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

    count = 0

    class Sink(trace_service_pb2_grpc.TraceServiceServicer):
        def Export(self, request, context):  # type: ignore[no-untyped-def]
            nonlocal count
            count += sum(len(s.spans) for r in request.resource_spans for s in r.scope_spans)
            return trace_service_pb2.ExportTraceServiceResponse()

    server = grpc.server(futures.ThreadPoolExecutor(2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Sink(), server)
    port_out.put(server.add_insecure_port("127.0.0.1:0"))
    server.start()
    stop.wait()
    server.stop(1)
    spans_out.put(count)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--processes", type=int, default=2)
    args = parser.parse_args()
    ctx = multiprocessing.get_context("spawn")
    port_q, spans_q, stop = ctx.Queue(), ctx.Queue(), ctx.Event()
    sink = ctx.Process(target=_sink, args=(port_q, spans_q, stop), daemon=True)
    sink.start()
    sink_port = port_q.get(timeout=30)
    traced_env = {
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{sink_port}",
        "OTEL_EXPORTER_OTLP_INSECURE": "true",
        "OTEL_TRACES_SAMPLER": "always_on",
        "OTEL_BSP_MAX_QUEUE_SIZE": "65536",
    }
    envs = {
        "off": {},
        "on": traced_env,
        "1%": {
            **traced_env,
            "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
            "OTEL_TRACES_SAMPLER_ARG": "0.01",
        },
    }
    results: dict[str, list[dict[str, float]]] = {mode: [] for mode in envs}
    with tempfile.TemporaryDirectory() as tmp:
        build("mlp", Path(tmp))
        total = args.rounds * len(envs)
        step = 0
        for round_index in range(args.rounds):
            for mode, env in envs.items():
                step += 1
                server = ServeProcess(Path(tmp), ("mlp",), env)
                try:
                    spec = LoadSpec(
                        server.target, "mlp", concurrency=args.concurrency,
                        seconds=args.seconds, processes=args.processes,
                    )  # fmt: skip
                    result = run(spec)
                finally:
                    server.stop()
                results[mode].append(result.as_dict())
                print(f"[{step}/{total}] round {round_index + 1} tracing {mode:>3}: "
                      f"{result.req_per_s:8.1f} req/s  p50 {result.p50_ms:6.2f} ms  "
                      f"p99 {result.p99_ms:6.2f} ms  errors {sum(result.errors.values())}",
                      flush=True)  # fmt: skip
    stop.set()
    spans = spans_q.get(timeout=30)
    off, on, sampled = (statistics.median(r["req_per_s"] for r in results[mode]) for mode in envs)
    # Each round's ratio compares runs minutes apart at most; their median is the figure quoted.
    ratios = {
        mode: statistics.median(
            t["req_per_s"] / u["req_per_s"]
            for t, u in zip(results[mode], results["off"], strict=True)
        )
        for mode in ("on", "1%")
    }
    summary = {
        "median_req_per_s_off": off,
        "median_req_per_s_on": on,
        "median_req_per_s_1pct": sampled,
        "ratio_on_over_off": ratios["on"],
        "ratio_1pct_over_off": ratios["1%"],
        "spans_received_by_sink": spans,
        "args": vars(args),
        "runs": results,
    }
    print(f"\ntracing on / off throughput: {on:.1f} / {off:.1f}, ratio {ratios['on']:.3f}; "
          f"1 % sampled: {sampled:.1f}, ratio {ratios['1%']:.3f} (medians of {args.rounds} "
          f"rounds); spans received: {spans}")  # fmt: skip
    out = ROOT / "bench" / "results" / "tracing_overhead.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2) + "\n")
    _report(results, ratios, args)
    return 0


def _report(
    results: dict[str, list[dict[str, float]]], ratios: dict[str, float], args: argparse.Namespace
) -> None:
    rows = "\n".join(
        f"| {mode} | {statistics.median(r['req_per_s'] for r in runs):.0f} | "
        f"{statistics.median(r['p50_ms'] for r in runs):.2f} | "
        f"{statistics.median(r['p99_ms'] for r in runs):.2f} | "
        f"{'1' if mode == 'off' else f'{ratios[mode]:.2f}'} |"
        for mode, runs in results.items()
    )
    replace_section(
        ROOT / "docs" / "benchmarks.md",
        "tracing",
        f"""## Tracing

`python -m bench.tracing_overhead --seconds {args.seconds:g} --rounds {args.rounds}`: unary
Predict on `mlp`, {args.concurrency} in flight, tracing off, every request traced (one span a
request, exported over OTLP/gRPC to a local sink) and the production sampler
(`parentbased_traceidratio`, 1 %), alternating in one run on one 2-core machine. Ratios are the
median of each round's ratio to that round's untraced run.

| tracing | req/s | p50 ms | p99 ms | × untraced |
|---|---|---|---|---|
{rows}
""",
    )


if __name__ == "__main__":
    sys.exit(main())
