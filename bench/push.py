"""Jobs that tell their callers: how soon a caller learns a job is done, by long-poll, by
WatchJob and by webhook; how fast webhooks go out in a burst; what an idle watcher costs.

    python -m bench.push                # about 2 minutes at --seconds 5

One `tensorgate serve` (memory job store, the bundled mlp) and, in this process, the callers
and a webhook receiver (aiohttp, on a free loopback port, answering 204). In one run:

- submit → told, closed loop at 1 and 64 in flight for --seconds each: Submit, then a long-poll
  GetResult; Submit, then WatchJob to the final event; Submit with a callback, until the
  receiver has the POST. p50/p99 and the rate;
- a burst of --burst jobs with callbacks from 64 senders: webhooks delivered per second (first
  Submit to last delivery), duplicates (the same webhook-id more than once) counted;
- --watchers idle watches (of jobs a gated model holds): the server's memory (RSS) and threads
  before and with them open, per watcher.

Writes docs/push.json, the "Push" section of docs/benchmarks.md and docs/bench_push.png.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import json
import platform
import secrets
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
SECTION = "push"
MODES = ("long-poll", "watch", "webhook")

# A model whose jobs wait until a file named `open` appears beside it (idle watchers need jobs
# that stay unfinished).
_GATED = """
import os
import time

class Model:
    def load(self, config):
        self.gate = os.path.join(config["model_dir"], "open")

    def execute(self, inputs, stream):
        x = inputs["x"]
        while x.any() and not os.path.exists(self.gate):
            time.sleep(0.01)
        return {"y": x}
"""
_GATED_CONFIG = """backend = "python"
max_batch_size = 1
max_queue_delay_ms = 0.0
instance_count = 1

[python]
device = "cpu"
inputs = [{ name = "x", datatype = "FP32", shape = [-1, 4] }]
outputs = [{ name = "y", datatype = "FP32", shape = [-1, 4] }]
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="measured seconds per point")
    parser.add_argument("--burst", type=int, default=10_000, help="jobs with callbacks in a burst")
    parser.add_argument("--watchers", type=int, default=10_000, help="idle watches held at once")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        repository = Path(tmp) / "engines"
        build("mlp", repository)
        gated = repository / "gated"
        gated.mkdir()
        (gated / "model.py").write_text(_GATED)
        (gated / "config.toml").write_text(_GATED_CONFIG)
        secrets_file = Path(tmp) / "webhook-secrets"
        key = base64.b64encode(secrets.token_bytes(32)).decode()
        secrets_file.write_text(f"* whsec_{key}\n")
        flags = [
            "--drain-delay-s", "0", "--webhook-allow", "127.0.0.1", "--webhook-secrets",
            str(secrets_file), "--max-concurrent-rpcs", "0", "--max-pending-jobs", "1000000",
        ]  # fmt: skip
        server = ServeProcess(repository, models=["mlp", "gated"], extra_args=flags)
        try:
            report = asyncio.run(_measure(args, server, gated))
        finally:
            server.stop()
    report["machine"] = f"{platform.node()} ({platform.processor() or platform.machine()})"
    report["seconds"] = args.seconds
    (DOCS / "push.json").write_text(json.dumps(report, indent=2) + "\n")
    replace_section(DOCS / "benchmarks.md", SECTION, _markdown(report))
    _plot(report, DOCS / "bench_push.png")
    print(f"wrote {DOCS / 'push.json'}, the '{SECTION}' section of benchmarks.md, the plot")
    return 0


class _Receiver:
    """Records the arrival of each webhook; wakes whoever waits for a job's."""

    def __init__(self) -> None:
        self.arrivals: collections.Counter[str] = collections.Counter()
        self.last_at = 0.0
        self.waiting: dict[str, asyncio.Future[float]] = {}
        self.url = ""
        self._runner: Any = None

    async def start(self) -> None:
        from aiohttp import web

        async def hook(request: web.Request) -> web.Response:
            await request.read()
            job_id = request.headers["webhook-id"].removeprefix("msg_")
            now = time.perf_counter()
            self.arrivals[job_id] += 1
            self.last_at = now
            waiter = self.waiting.pop(job_id, None)
            if waiter is not None and not waiter.done():
                waiter.set_result(now)
            return web.Response(status=204)

        app = web.Application()
        app.router.add_post("/hook", hook)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}/hook"

    async def stop(self) -> None:
        await self._runner.cleanup()


async def _measure(args: argparse.Namespace, server: ServeProcess, gated: Path) -> dict[str, Any]:
    from tensorgate.client import AsyncTensorgateClient

    receiver = _Receiver()
    await receiver.start()
    x = np.random.default_rng(0).standard_normal((1, 256)).astype(np.float32)
    rows: list[dict[str, Any]] = []
    plan = [(mode, c) for c in (1, 64) for mode in MODES]
    steps = len(plan) + 2
    try:
        async with AsyncTensorgateClient(server.target, timeout_s=120) as client:
            for step, (mode, concurrency) in enumerate(plan, 1):
                print(f"[{step}/{steps}] {mode} at {concurrency} in flight", flush=True)
                rows.append(await _loop(client, receiver, x, mode, concurrency, args.seconds))
            print(f"[{steps - 1}/{steps}] burst of {args.burst} jobs with callbacks", flush=True)
            burst = await _burst(client, receiver, x, args.burst)
        print(f"[{steps}/{steps}] {args.watchers} idle watchers", flush=True)
        watchers = await _idle_watchers(server, gated, args.watchers)
    finally:
        await receiver.stop()
    return {"rows": rows, "burst": burst, "watchers": watchers}


async def _loop(
    client: Any, receiver: _Receiver, x: np.ndarray, mode: str, concurrency: int, seconds: float
) -> dict[str, Any]:
    """Closed loop: each caller submits, learns the job is done (by `mode`), repeats."""
    latencies: list[float] = []
    errors = 0
    warmup_s = min(1.0, seconds / 4)
    start = time.perf_counter()
    measure_from, end = start + warmup_s, start + warmup_s + seconds

    async def caller() -> None:
        nonlocal errors
        while time.perf_counter() < end:
            began = time.perf_counter()
            try:
                if mode == "webhook":
                    job = await client.submit("mlp", {"input": x}, callback_url=receiver.url)
                    waiter = asyncio.get_running_loop().create_future()
                    receiver.waiting[job.job_id] = waiter
                    if receiver.arrivals[job.job_id]:  # arrived before we waited
                        receiver.waiting.pop(job.job_id, None)
                        told = time.perf_counter()
                    else:
                        told = await asyncio.wait_for(waiter, 30)
                elif mode == "watch":
                    job = await client.submit("mlp", {"input": x})
                    async for event in client.watch(job.job_id):
                        final = event.final
                    assert final
                    told = time.perf_counter()
                else:
                    job = await client.submit("mlp", {"input": x})
                    result = await client.get_result(job.job_id, wait_timeout_s=30)
                    assert result.finished
                    told = time.perf_counter()
            except Exception:
                errors += 1
                continue
            if began >= measure_from and told <= end:
                latencies.append(told - began)

    await asyncio.gather(*(caller() for _ in range(concurrency)))
    ms = np.array(latencies) * 1000
    return {
        "mode": mode,
        "concurrency": concurrency,
        "per_s": len(latencies) / seconds,
        "p50_ms": float(np.percentile(ms, 50)) if len(ms) else 0.0,
        "p99_ms": float(np.percentile(ms, 99)) if len(ms) else 0.0,
        "count": len(latencies),
        "errors": errors,
    }


async def _burst(client: Any, receiver: _Receiver, x: np.ndarray, count: int) -> dict[str, Any]:
    before = set(receiver.arrivals)
    ids: list[str] = []
    left = iter(range(count))

    async def sender() -> None:
        for _ in left:
            ids.append((await client.submit("mlp", {"input": x}, callback_url=receiver.url)).job_id)

    started = time.perf_counter()
    await asyncio.gather(*(sender() for _ in range(64)))
    accepted_s = time.perf_counter() - started
    wanted = set(ids)
    deadline = time.perf_counter() + 300
    while not wanted <= set(receiver.arrivals) and time.perf_counter() < deadline:
        await asyncio.sleep(0.05)
    delivered = wanted & set(receiver.arrivals)
    duplicates = sum(receiver.arrivals[i] - 1 for i in delivered if i not in before)
    span_s = receiver.last_at - started
    return {
        "jobs": count,
        "accepted": len(ids),
        "accept_s": accepted_s,
        "delivered": len(delivered),
        "delivered_per_s": len(delivered) / span_s,
        "all_delivered_s": span_s,
        "duplicates": duplicates,
        "missing": len(wanted - delivered),
    }


async def _idle_watchers(server: ServeProcess, gated: Path, count: int) -> dict[str, Any]:
    from tensorgate.client import AsyncTensorgateClient

    row = np.ones((1, 4), np.float32)
    channels = 10
    clients = [AsyncTensorgateClient(server.target) for _ in range(channels)]
    try:
        jobs = [(await clients[0].submit("gated", {"x": row})).job_id for _ in range(4)]
        await asyncio.sleep(0.5)
        rss_before, threads_before = server.rss_mib(), server.threads()
        opened = 0
        all_open = asyncio.Event()

        async def watch(i: int) -> str:
            nonlocal opened
            last = ""
            async for event in clients[i % channels].watch(jobs[i % len(jobs)]):
                if not last:
                    opened += 1
                    if opened == count:
                        all_open.set()
                last = event.status
            return last

        tasks = [asyncio.create_task(watch(i)) for i in range(count)]
        await asyncio.wait_for(all_open.wait(), 120)
        await asyncio.sleep(1.0)
        rss_with, threads_with = server.rss_mib(), server.threads()
        (gated / "open").touch()
        finals = await asyncio.wait_for(asyncio.gather(*tasks), 120)
    finally:
        for client in clients:
            await client.close()
    return {
        "watchers": count,
        "rss_before_mib": rss_before,
        "rss_with_mib": rss_with,
        "kib_per_watcher": (rss_with - rss_before) * 1024 / count,
        "threads_before": threads_before,
        "threads_with": threads_with,
        "all_saw_the_end": finals.count("SUCCEEDED") == count,
    }


def _markdown(report: dict[str, Any]) -> str:
    lines = [
        "## Push: long-poll, WatchJob and webhooks (python -m bench.push)",
        "",
        f"One `tensorgate serve` (memory job store, mlp), {report['seconds']:g} s a point, on "
        f"{report['machine']}; callers and the webhook receiver (aiohttp) in one process on the "
        "same machine. Submit → told: Submit, then learning that the job is done by a long-poll "
        "GetResult, by WatchJob's final event, or by the webhook's arrival at the receiver.",
        "",
        "| told by | in flight | jobs/s | p50 ms | p99 ms | errors |",
        "|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        lines.append(
            f"| {r['mode']} | {r['concurrency']} | {r['per_s']:.0f} | {r['p50_ms']:.2f} | "
            f"{r['p99_ms']:.2f} | {r['errors']} |"
        )
    b, w = report["burst"], report["watchers"]
    lines += [
        "",
        f"Burst: {b['jobs']:,} jobs with callbacks from 64 senders, accepted in "
        f"{b['accept_s']:.1f} s; **{b['delivered']:,} webhooks delivered at "
        f"{b['delivered_per_s']:.0f}/s** (first Submit to last delivery "
        f"{b['all_delivered_s']:.1f} s), duplicates {b['duplicates']}, missing {b['missing']}.",
        "",
        f"Idle watchers: {w['watchers']:,} WatchJob streams open (10 client channels): server "
        f"RSS {w['rss_before_mib']:.0f} → {w['rss_with_mib']:.0f} MiB, **"
        f"{w['kib_per_watcher']:.1f} KiB per watcher**; threads {w['threads_before']} → "
        f"{w['threads_with']}; every watcher saw the final event: {w['all_saw_the_end']}.",
        "",
        "![push](bench_push.png)",
        "",
    ]
    return "\n".join(lines)


def _plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["rows"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, concurrency in zip(axes, (1, 64), strict=True):
        for i, mode in enumerate(MODES):
            [row] = [r for r in rows if r["mode"] == mode and r["concurrency"] == concurrency]
            ax.bar(i, row["p99_ms"], 0.6, color=f"C{i}", alpha=0.35)
            ax.bar(i, row["p50_ms"], 0.6, color=f"C{i}", label=f"{mode}: {row['per_s']:.0f}/s")
        ax.set_xticks(range(len(MODES)), MODES)
        ax.set_title(f"Submit → told, ms at {concurrency} in flight (solid p50, pale p99)")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
