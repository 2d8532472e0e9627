"""Live voice streams: N sequences of the bundled silero_vad, each sending one 32 ms chunk every
32 ms (real-time pace), as a voice gateway would; how many one machine holds.

    python -m bench.voice                      # N = 10 50 100 150 200 400, 10 s each (~2 min)
    python -m bench.voice --sequences 200 --seconds 20 --workers 1 2   # a sweep per setting
    python -m bench.voice --sequences 100 200 --before REV --rounds 3  # REV's server beside this

The senders run in their own processes (2), each carrying its sequences over streams of 10
sequences, each stream on its own connection. Each sequence starts at a random phase within the
32 ms period and never waits for an answer before sending its next chunk (audio keeps coming). A chunk's latency runs from the time it
was due, so a sender that falls behind is counted, not hidden. The first second is warm-up.
Per N: chunk latency p50/p99/max, chunks answered per second, mean batch (sequences per engine
call), server CPU (cores), and whether N was held: p99 <= 50 ms with no error.

With --workers 2 each stream, and so each sequence, stays in the serving process its connection
reached. Writes docs/voice.json, the "Voice" section of docs/benchmarks.md and
docs/bench_voice.png.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import multiprocessing
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "protos")]

from bench.report import replace_section  # noqa: E402
from bench.serverproc import ServeProcess, checkout  # noqa: E402
from tensorgate.server.bundled import build  # noqa: E402
from tests.redisproc import RedisProcess  # noqa: E402

DOCS = ROOT / "docs"
PERIOD_S = 0.032
PER_STREAM = 50
SLOTS = 8  # sending happens in 8 phase slots of the period (4 ms apart)
P99_LIMIT_MS = 50.0


def _sender(
    target: str, first: int, count: int, seconds: float, start_at: float, tag: str, out: Any
) -> None:
    """One sender process: `count` sequences over ceil(count / PER_STREAM) StreamPredict calls.

    The sender shares the server's two cores, so it keeps its own cost down: each message is
    put together from pre-encoded protobuf pieces (the audio tensor, the sequence id, the flags,
    the request id; concatenated protobuf messages merge) and sent as bytes, and only the answer's
    id and error are read."""
    import grpc

    from tensorgate.v1 import inference_pb2 as pb

    def encoded(**fields: Any) -> bytes:
        return pb.PredictRequest(**fields).SerializeToString()

    async def main() -> dict[str, Any]:
        rng = np.random.default_rng(first)
        audio = [
            encoded(model="silero_vad", inputs=[pb.Tensor(
                name="audio", datatype="FP32", shape=[1, 512],
                contents=(rng.standard_normal(512) * 0.05).astype("<f4").tobytes(),
            )])
            for _ in range(64)
        ]  # fmt: skip
        ids = [encoded(sequence_id=f"{tag}-{first + i}") for i in range(count)]
        start_flag, end_flag = encoded(sequence_start=True), encoded(sequence_end=True)
        chunks = int(seconds / PERIOD_S)
        slots: list[list[int]] = [[] for _ in range(SLOTS)]
        for i in range(count):
            slots[int(rng.integers(SLOTS))].append(i)
        due_by_id: dict[str, tuple[float, bool]] = {}
        latencies: list[float] = []
        errors = 0
        lag = 0.0
        warm_up = int(1.0 / PERIOD_S)
        # A connection per stream, as separate voice gateways would open: with --workers the
        # kernel spreads connections (not streams) over the serving processes.
        outboxes = [asyncio.Queue[bytes | None]() for _ in range(math.ceil(count / PER_STREAM))]
        # (A local subchannel pool: otherwise gRPC shares one connection between the channels of
        # a process that have the same target.)
        channels = [
            grpc.aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])
            for _ in outboxes
        ]

        async def requests(outbox: asyncio.Queue[bytes | None]) -> Any:
            while (message := await outbox.get()) is not None:
                yield message

        async def read(channel: grpc.aio.Channel, outbox: asyncio.Queue[bytes | None]) -> None:
            nonlocal errors
            method = channel.stream_stream("/tensorgate.v1.Inference/StreamPredict")
            async for raw in method(requests(outbox)):
                response = pb.StreamPredictResponse.FromString(raw)
                due, record = due_by_id.pop(response.id)
                if response.HasField("error"):
                    errors += 1
                elif record:
                    latencies.append(time.time() - due)

        cpu_started = time.process_time()
        readers = [
            asyncio.create_task(read(channel, outbox))
            for channel, outbox in zip(channels, outboxes, strict=True)
        ]
        n = 0
        for c in range(chunks):
            flags = start_flag if c == 0 else end_flag if c == chunks - 1 else b""
            for slot, members in enumerate(slots):
                due = start_at + c * PERIOD_S + slot * PERIOD_S / SLOTS
                if (delay := due - time.time()) > 0:
                    await asyncio.sleep(delay)
                lag = max(lag, time.time() - due)
                for i in members:
                    n += 1
                    request_id = str(n)
                    due_by_id[request_id] = (due, c >= warm_up)
                    outboxes[i // PER_STREAM].put_nowait(
                        audio[(c + i) % 64] + ids[i] + flags + encoded(id=request_id)
                    )
        for outbox in outboxes:
            outbox.put_nowait(None)
        await asyncio.gather(*readers)
        for channel in channels:
            await channel.close()
        return {
            "latencies": latencies,
            "errors": errors + len(due_by_id),
            "sender_lag_s": lag,
            "cpu_s": time.process_time() - cpu_started,
        }

    out.put(asyncio.run(main()))


def drive(
    target: str, sequences: int, seconds: float, senders: int, warmed: Callable[[], None]
) -> list[dict[str, Any]]:
    """Runs `sequences` live sequences against `target` for `seconds` from sender processes;
    calls warmed() once the warm-up second is over; returns each sender's results."""
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    start_at = time.time() + 2.0  # every sender connected and ready by then
    shares = [sequences // senders + (1 if i < sequences % senders else 0) for i in range(senders)]
    firsts = [sum(shares[:i]) for i in range(senders)]
    tag = f"n{sequences}-{int(start_at)}"
    processes = [
        ctx.Process(target=_sender, args=(target, first, share, seconds, start_at, tag, out))
        for first, share in zip(firsts, shares, strict=True)
        if share
    ]
    for process in processes:
        process.start()
    time.sleep(max(start_at + 1.0 - time.time(), 0))  # from the end of the warm-up second
    warmed()
    results = [out.get(timeout=seconds + 120) for _ in processes]
    for process in processes:
        process.join(30)
    return results


def level(server: ServeProcess, sequences: int, seconds: float, senders: int) -> dict[str, Any]:
    marks: list[tuple[float, tuple[int, int], float]] = []

    def mark() -> None:
        marks.append((server.cpu_seconds(), server.batch_rows(), time.time()))

    results = drive(server.target, sequences, seconds, senders, mark)
    mark()
    (cpu0, (rows0, batches0), wall0), (cpu1, (rows1, batches1), wall1) = marks
    latencies = np.array([x for r in results for x in r["latencies"]]) * 1e3
    errors = sum(r["errors"] for r in results)
    p99 = float(np.percentile(latencies, 99)) if len(latencies) else float("inf")
    return {
        "sequences": sequences,
        "chunks_per_s": len(latencies) / max(seconds - 1.0, 1e-9),
        "p50_ms": float(np.percentile(latencies, 50)) if len(latencies) else float("inf"),
        "p99_ms": p99,
        "max_ms": float(latencies.max()) if len(latencies) else float("inf"),
        "errors": errors,
        "mean_batch": (rows1 - rows0) / max(batches1 - batches0, 1),
        "server_cores": (cpu1 - cpu0) / (wall1 - wall0),
        # The server's CPU per chunk it ran in the same window.
        "server_us_per_chunk": (cpu1 - cpu0) / max(rows1 - rows0, 1) * 1e6,
        "sender_lag_ms": max(r["sender_lag_s"] for r in results) * 1e3,
        "sender_cores": sum(r["cpu_s"] for r in results) / seconds,
        "held": p99 <= P99_LIMIT_MS and errors == 0,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sequences", type=int, nargs="+", default=[10, 50, 100, 150, 200, 400])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--senders", type=int, default=2, help="sender processes")
    parser.add_argument(
        "--workers", type=int, nargs="+", default=[1],
        help="serving processes, one sweep each (a stream, and its sequences, stay on one)",
    )  # fmt: skip
    parser.add_argument(
        "--before", help="a git revision whose server runs each level too, alternating with "
        "this tree's (one serving process; prints a before/after table, writes docs/voice_compare.json)",
    )  # fmt: skip
    parser.add_argument("--rounds", type=int, default=1, help="with --before: rounds to alternate")
    args = parser.parse_args()
    if args.before:
        return _compare(args)
    sweeps = []
    total = len(args.workers) * len(args.sequences)
    step = 0
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        build("silero_vad", Path(tmp))
        for workers in args.workers:
            extra = ["--metrics-port", "0"]
            if workers > 1:
                # --workers needs a shared job store; sequences stay in the worker that holds
                # their stream.
                redis = RedisProcess(Path(tmp) / f"redis-{workers}").start()
                stack.callback(redis.stop)
                extra += ["--workers", str(workers), "--job-store", redis.url]
            server = ServeProcess(Path(tmp), ("silero_vad",), extra_args=extra)
            rows = []
            try:
                for n in args.sequences:
                    step += 1
                    row = level(server, n, args.seconds, args.senders)
                    rows.append(row)
                    print(f"[{step}/{total}] {workers} worker(s) {n:4d} sequences: "
                          f"{row['chunks_per_s']:6.0f} chunks/s  p50 {row['p50_ms']:6.1f} ms  "
                          f"p99 {row['p99_ms']:6.1f} ms  mean batch {row['mean_batch']:5.1f}  "
                          f"server {row['server_cores']:.2f} cores  senders "
                          f"{row['sender_cores']:.2f} cores  sender lag "
                          f"{row['sender_lag_ms']:.0f} ms  errors {row['errors']}  "
                          f"{'held' if row['held'] else 'NOT held'}", flush=True)  # fmt: skip
            finally:
                server.stop()
            held = [r["sequences"] for r in rows if r["held"]]
            sweeps.append(
                {"workers": workers, "levels": rows, "largest_held": max(held, default=0)}
            )
    report = {"args": vars(args), "sweeps": sweeps}
    (DOCS / "voice.json").write_text(json.dumps(report, indent=2) + "\n")
    replace_section(DOCS / "benchmarks.md", "voice", _markdown(report))
    _plot(report, DOCS / "bench_voice.png")
    for sweep in sweeps:
        print(f"{sweep['workers']} worker(s): largest N held at p99 <= {P99_LIMIT_MS:g} ms: "
              f"{sweep['largest_held']}")  # fmt: skip
    return 0


def _compare(args: argparse.Namespace) -> int:
    """Each level on REV's server and on this tree's, alternating, --rounds times; medians."""
    results: dict[str, dict[int, list[dict[str, Any]]]] = {"before": {}, "after": {}}
    total = len(args.sequences) * args.rounds * 2
    step = 0
    with tempfile.TemporaryDirectory() as tmp, checkout(args.before, Path(tmp)) as before_root:
        build("silero_vad", Path(tmp))
        extra = ["--metrics-port", "0"]
        servers = {
            "before": ServeProcess(Path(tmp), ("silero_vad",), extra_args=extra, root=before_root),
            "after": ServeProcess(Path(tmp), ("silero_vad",), extra_args=extra),
        }
        try:
            for round_index in range(args.rounds):
                for n in args.sequences:
                    # Alternate which server goes first, so neither always meets a warmer machine.
                    order = ["before", "after"] if round_index % 2 == 0 else ["after", "before"]
                    for name in order:
                        step += 1
                        row = level(servers[name], n, args.seconds, args.senders)
                        results[name].setdefault(n, []).append(row)
                        print(f"[{step}/{total}] {name:<6} {n:4d} sequences: "
                              f"{row['server_us_per_chunk']:5.0f} µs a chunk  server "
                              f"{row['server_cores']:.2f} cores  p99 {row['p99_ms']:6.1f} ms  "
                              f"mean batch {row['mean_batch']:5.1f}  errors {row['errors']}",
                              flush=True)  # fmt: skip
        finally:
            for server in servers.values():
                server.stop()

    def median(name: str, n: int, key: str) -> float:
        return float(np.median([r[key] for r in results[name][n]]))

    lines = [
        f"`python -m bench.voice --sequences {' '.join(map(str, args.sequences))} --seconds "
        f"{args.seconds:g} --before {args.before} --rounds {args.rounds}` (medians of the rounds; "
        "before = that revision's server, after = this tree's, alternating in one run):",
        "",
        "| sequences | server µs a chunk before → after | after ÷ before | server cores before → "
        "after | p99 ms before → after | mean batch before → after |",
        "|---|---|---|---|---|---|",
    ]
    for n in args.sequences:
        b, a = median("before", n, "server_us_per_chunk"), median("after", n, "server_us_per_chunk")
        lines.append(
            f"| {n} | {b:.0f} → {a:.0f} | {a / b:.2f}× | "
            f"{median('before', n, 'server_cores'):.2f} → {median('after', n, 'server_cores'):.2f}"
            f" | {median('before', n, 'p99_ms'):.1f} → {median('after', n, 'p99_ms'):.1f} | "
            f"{median('before', n, 'mean_batch'):.1f} → {median('after', n, 'mean_batch'):.1f} |"
        )
    print("\n".join(lines))
    (DOCS / "voice_compare.json").write_text(
        json.dumps({"args": vars(args), "results": results}, indent=2) + "\n"
    )
    return 0


def _markdown(report: dict[str, Any]) -> str:
    args = report["args"]
    tables = []
    for sweep in report["sweeps"]:
        rows = "\n".join(
            f"| {r['sequences']} | {r['chunks_per_s']:.0f} | {r['p50_ms']:.1f} | "
            f"{r['p99_ms']:.1f} | {r['max_ms']:.1f} | {r['mean_batch']:.1f} | "
            f"{r['server_cores']:.2f} | {r['sender_cores']:.2f} | {r['sender_lag_ms']:.0f} | "
            f"{r['errors']} | "
            f"{'yes' if r['held'] else '**no**'} |"
            for r in sweep["levels"]
        )
        tables.append(
            f"**{sweep['workers']} serving process(es)** (`--workers {sweep['workers']}`): "
            f"largest N held **{sweep['largest_held']}**\n\n"
            "| sequences | chunks/s | p50 ms | p99 ms | max ms | mean batch | server cores | "
            "sender cores | sender lag ms | errors | held |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|\n" + rows
        )
    sequences = " ".join(map(str, args["sequences"]))
    workers = " ".join(map(str, args["workers"]))
    return (
        f"""## Voice: live sequences at real-time pace

`python -m bench.voice --seconds {args["seconds"]:g} --sequences {sequences} --workers {workers}`:
N sequences of the bundled `silero_vad`, each sending a 32 ms chunk every 32 ms over streams of
{PER_STREAM} sequences, from {args["senders"]} sender processes on the same 2-core machine as the
server (the senders' gRPC work costs about as much CPU as the server's). Latency runs from when
a chunk was due. Held: p99 <= {P99_LIMIT_MS:g} ms, no error. Mean batch: chunks (one per
sequence) per engine call; server cores: CPU time of the serving process(es) per second.

"""
        + "\n\n".join(tables)
        + """

![voice](bench_voice.png)
"""
    )


def _plot(report: dict[str, Any], path: Path) -> None:
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed (pip install -e '.[bench]'): no plot")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for sweep in report["sweeps"]:
        levels = sweep["levels"]
        n = [r["sequences"] for r in levels]
        label = f"--workers {sweep['workers']}"
        left.plot(n, [r["p50_ms"] for r in levels], "o--", label=f"p50, {label}")
        left.plot(n, [r["p99_ms"] for r in levels], "s-", label=f"p99, {label}")
        right.plot(n, [r["mean_batch"] for r in levels], "o-", label=f"mean batch, {label}")
        right.plot(n, [r["server_cores"] for r in levels], "s--", label=f"server cores, {label}")
    left.axhline(P99_LIMIT_MS, color="grey", linestyle=":", label=f"{P99_LIMIT_MS:g} ms")
    left.set_xlabel("live sequences (a 32 ms chunk each every 32 ms)")
    left.set_ylabel("chunk latency, ms (log)")
    left.set_yscale("log")
    left.legend(fontsize=8)
    left.set_title("silero_vad chunk latency")
    right.set_xlabel("live sequences")
    right.set_yscale("log")
    right.legend(fontsize=8)
    right.set_title("sequences per engine call; server CPU cores")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
