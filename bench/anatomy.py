"""Where one unary request's CPU goes inside the server: CPU time per request by thread (the event
loop, each instance's worker, gRPC's own threads), the batches formed, and how many Python
function calls the event loop makes per request (a deterministic count, from cProfile over a
second measured window; the profiler slows that window, not the first).

    python -m bench.anatomy                       # unary Predict of mlp at 64 in flight
    python -m bench.anatomy --concurrency 16 --top 25
    python -m bench.anatomy --mode submit --job-store redis    # jobs, kept by a redis-server
    python -m bench.anatomy --mode voice --sequences 100        # live silero_vad sequences

The server runs in this process on uvloop (as `tensorgate serve` does); the load generator runs
in processes of its own on the same cores.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import cProfile
import pstats
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "protos")]

from bench.loadgen import LoadSpec, run  # noqa: E402
from bench.serverproc import stat_cpu_seconds  # noqa: E402


def _thread_cpu() -> dict[int, float]:
    out = {}
    for task in Path("/proc/self/task").iterdir():
        try:
            out[int(task.name)] = stat_cpu_seconds(task / "stat")
        except OSError:
            continue  # the thread ended meanwhile
    return out


def _tracing(on: bool) -> object:
    """Tracing for --traced: the SDK's batch processor, exporting to an exporter that encodes
    each batch of spans as the OTLP exporter does and sends nothing (no collector to run)."""
    from tensorgate.server.telemetry.tracing import Tracing

    if not on:
        return Tracing(None)
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

    class Encoding(SpanExporter):
        def export(self, spans):  # type: ignore[no-untyped-def]
            encode_spans(spans).SerializeToString()
            return SpanExportResult.SUCCESS

    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(Encoding()))
    return Tracing(provider)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--top", type=int, default=15, help="functions listed by calls")
    parser.add_argument("--dump", type=Path, help="also write the profile here (pstats format)")
    parser.add_argument(
        "--traced", action="store_true",
        help="every request traced; spans encoded as OTLP would send them, then dropped",
    )  # fmt: skip
    parser.add_argument(
        "--mode", default="unary", choices=["unary", "stream", "submit", "job", "voice"],
        help="voice: live sequences of the bundled silero_vad at real-time pace (bench.voice); "
        "per chunk",
    )  # fmt: skip
    parser.add_argument("--sequences", type=int, default=100, help="live sequences (voice)")
    parser.add_argument(
        "--job-store", default="memory", choices=["memory", "redis"],
        help="redis: a redis-server of its own, started for the run",
    )  # fmt: skip
    args = parser.parse_args()

    import uvloop

    from tensorgate.server.bundled import build
    from tensorgate.server.config import ServerConfig
    from tests.harness import ServerThread

    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        repository = Path(tmp) / "engines"
        model = "silero_vad" if args.mode == "voice" else "mlp"
        build(model, repository)
        store = "memory"
        redis_stat: Path | None = None
        if args.job_store == "redis":
            from tests.redisproc import RedisProcess

            redis = RedisProcess(Path(tmp) / "redis").start()
            stack.callback(redis.stop)
            store = redis.url
            assert redis.process is not None
            redis_stat = Path(f"/proc/{redis.process.pid}/stat")
        config = ServerConfig(host="127.0.0.1", port=0, model_repository=repository,
                              drain_delay_s=0.0, metrics_port=-1, models=(model,),
                              job_store=store)  # fmt: skip
        server = ServerThread(config, _tracing(args.traced), loop=uvloop.new_event_loop())
        server.start()
        try:

            def window(seconds: float, begin: Callable[[], None]) -> int:
                """Runs the load for `seconds`, calling begin() as its measured window opens;
                returns the requests (voice: the chunks) it sent in that window."""
                if args.mode == "voice":
                    from bench.voice import drive

                    counted: list[int] = []

                    def opened() -> None:
                        counted.append(server.stats(model).rows)
                        begin()

                    drive(server.target, args.sequences, seconds + 1.0, 2, opened)
                    return server.stats(model).rows - counted[0]
                spec = LoadSpec(server.target, model, mode=args.mode,
                                concurrency=args.concurrency, seconds=seconds,
                                processes=2)  # fmt: skip
                begin()
                return run(spec).requests

            print("warming up", flush=True)
            if args.mode != "voice":  # voice warms up for a second of its own
                window(1.0, lambda: None)
            print(f"measuring CPU by thread for {args.seconds:g} s", flush=True)
            marks: list[tuple[dict[int, float], Any, float]] = []

            def begin() -> None:
                if redis_stat:
                    with redis.client() as c:
                        c.config_resetstat()
                marks.append((_thread_cpu(), server.stats(model),
                              stat_cpu_seconds(redis_stat) if redis_stat else 0.0))  # fmt: skip

            requests = window(args.seconds, begin)
            after, stats1 = _thread_cpu(), server.stats(model)
            before, stats0, redis0 = marks[0]
            redis_cpu = stat_cpu_seconds(redis_stat) - redis0 if redis_stat else 0.0
            names = {t.native_id: t.name for t in threading.enumerate()}
            by_thread: collections.Counter[str] = collections.Counter()
            for tid, cpu in after.items():
                name = names.get(tid, "gRPC core (native thread)")
                if "run_forever" in name:
                    name = "event loop"
                elif "_poll" in name:
                    name = "gRPC poller"
                by_thread[name] += cpu - before.get(tid, 0.0)
            batches = stats1.batches - stats0.batches
            print(f"\n{requests} requests, {batches} batches, "
                  f"{(stats1.rows - stats0.rows) / max(batches, 1):.1f} rows a batch")  # fmt: skip
            print(f"CPU µs per request: {sum(by_thread.values()) / requests * 1e6:.0f} in all")
            for name, cpu in by_thread.most_common():
                if cpu > 0:
                    print(f"  {name:<28} {cpu / requests * 1e6:7.1f}")
            if redis_stat:
                print(f"  {'(redis-server, its process)':<28} {redis_cpu / requests * 1e6:7.1f}")
                with redis.client() as c:
                    commands = c.info("commandstats")
                print("Redis's time by command (scripts' commands counted as well), per request:")
                ranked = sorted(commands.items(), key=lambda kv: -kv[1]["usec"])
                for name, numbers in ranked[:12]:
                    print(f"  {name.removeprefix('cmdstat_'):<14} {numbers['calls'] / requests:6.2f}"
                          f" calls {numbers['usec'] / requests:7.1f} µs")  # fmt: skip

            print(f"\ncounting the loop's Python calls for {args.seconds:g} s (profiled)")
            profiler = cProfile.Profile()

            async def switch(on: bool) -> None:
                profiler.enable() if on else profiler.disable()

            requests = window(args.seconds, lambda: server.call(switch(True)))
            server.call(switch(False))
            stats = pstats.Stats(profiler)
            if args.dump:
                stats.dump_stats(args.dump)
            print(f"Python function calls per request on the loop: "
                  f"{stats.total_calls / requests:.0f}")  # type: ignore[attr-defined]  # fmt: skip
            ranked = sorted(stats.stats.items(), key=lambda kv: -kv[1][1])  # type: ignore[attr-defined]
            for (path, line, function), (_, calls, *_rest) in ranked[: args.top]:
                where = "built-in" if path == "~" else f"{Path(path).parent.name}/{Path(path).name}"
                print(f"  {calls / requests:6.2f}  {function} ({where}:{line})")
        finally:
            server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
