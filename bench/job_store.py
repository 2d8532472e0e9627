"""The job stores side by side: memory (one process) vs Redis (shared by replicas).

    python -m bench.job_store                 # about 5 minutes: 3 rounds of 5 s a point

For each store, one `tensorgate serve` on the bundled mlp, both running at once: Submit→result
(Submit, then long-poll GetResult) and Submit alone (accept rate), closed loop at 1 and 64 in
flight, each point measured on one store and then the other, over --rounds rounds; then into
each store a burst of 10,000 jobs from 64 senders: the accept rate, and every accepted job's final
status (none may be lost); and, through Redis with MONITOR on (a separate short run: MONITOR costs
throughput), the Redis commands the server sends per finished job, end to end (Submit, run,
finish, one long-poll waiter), by command, apart from the commands its scripts run inside Redis.
Writes docs/job_store.json, the "Job stores" section of docs/benchmarks.md and
docs/bench_job_store.png.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "protos")]

from bench.loadgen import LoadSpec, run  # noqa: E402
from bench.report import replace_section  # noqa: E402
from bench.serverproc import ServeProcess  # noqa: E402
from tensorgate.server.bundled import build  # noqa: E402
from tests.redisproc import RedisProcess  # noqa: E402

DOCS = ROOT / "docs"
SECTION = "job-store"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="measured seconds per point")
    parser.add_argument("--burst", type=int, default=10_000, help="jobs in each store's burst")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of every point, alternating")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        repository = Path(tmp) / "engines"
        build("mlp", repository)
        redis = RedisProcess(Path(tmp) / "redis").start()
        try:
            rows, burst = _measure(args, repository, redis)
            commands = _commands_per_job(args, repository, redis)
            ceiling = asyncio.run(_ceiling(redis, args.seconds))
        finally:
            redis.stop()
    report = {
        "machine": f"{platform.node()} ({platform.processor() or platform.machine()})",
        "seconds": args.seconds,
        "rounds": args.rounds,
        "rows": rows,
        "burst": burst,
        "commands": commands,
        "ceiling": ceiling,
    }
    (DOCS / "job_store.json").write_text(json.dumps(report, indent=2) + "\n")
    replace_section(DOCS / "benchmarks.md", SECTION, _markdown(report))
    _plot(rows, DOCS / "bench_job_store.png")
    print(f"wrote {DOCS / 'job_store.json'}, the '{SECTION}' section of benchmarks.md, the plot")
    return 0


def _measure(
    args: argparse.Namespace, repository: Path, redis: RedisProcess
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Both servers run at once; every point is measured on one and then the other (the order
    swapped each round), over --rounds rounds, so each ratio compares measurements seconds
    apart on the same machine. Rows hold each point's medians (by rate) and its rounds."""
    plan = [(mode, c) for mode in ("job", "submit") for c in (1, 64)]
    stores = ("memory", "redis")
    servers: dict[str, ServeProcess] = {}
    rounds: dict[tuple[str, str, int], list[dict[str, Any]]] = collections.defaultdict(list)
    burst: dict[str, Any] = {}
    total = args.rounds * len(plan) * len(stores) + 2
    step = 0
    try:
        for store in stores:
            store_flag = redis.url if store == "redis" else "memory"
            flags = ["--job-store", store_flag, "--drain-delay-s", "0"]
            servers[store] = ServeProcess(repository, models=["mlp"], extra_args=flags)
        for round_index in range(args.rounds):
            order = stores if round_index % 2 == 0 else stores[::-1]
            for mode, concurrency in plan:
                for store in order:
                    step += 1
                    print(f"[{step}/{total}] round {round_index + 1} {store}: {mode} at "
                          f"{concurrency} in flight", flush=True)  # fmt: skip
                    spec = LoadSpec(
                        target=servers[store].target,
                        model="mlp",
                        mode=mode,
                        concurrency=concurrency,
                        seconds=args.seconds,
                        processes=2 if concurrency > 1 else 1,
                    )
                    rounds[store, mode, concurrency].append(run(spec).as_dict())
                    _wait_idle(servers[store])
        for store in stores:
            step += 1
            print(f"[{step}/{total}] {store}: burst of {args.burst} jobs", flush=True)
            burst[store] = asyncio.run(_burst(servers[store].target, args.burst))
    finally:
        for server in servers.values():
            server.stop()
    rows = []
    for (store, mode, concurrency), measured in rounds.items():
        median = sorted(measured, key=lambda r: r["req_per_s"])[len(measured) // 2]
        rows.append({"store": store, "mode": mode, "concurrency": concurrency, **median,
                     "rounds": measured})  # fmt: skip
    return rows, burst


def _commands_per_job(
    args: argparse.Namespace, repository: Path, redis: RedisProcess
) -> list[dict[str, Any]]:
    """Submit→result through Redis at 1 and 64 in flight with MONITOR on: the commands the
    server sent per finished job (a pipeline's commands count one each; a script call counts
    once, and the commands it runs inside Redis are counted apart)."""
    flags = ["--job-store", redis.url, "--drain-delay-s", "0"]
    server = ServeProcess(repository, models=["mlp"], extra_args=flags)
    found: list[dict[str, Any]] = []
    try:
        for concurrency in (1, 64):
            print(f"redis: commands per job at {concurrency} in flight (MONITOR)", flush=True)
            monitor = _Monitor(redis)
            with redis.client() as admin:
                before = int(admin.hget("tg:count", "SUCCEEDED") or 0)
            monitor.start()
            run(LoadSpec(target=server.target, model="mlp", mode="job", concurrency=concurrency,
                         seconds=min(args.seconds, 3.0), processes=1))  # fmt: skip
            _wait_idle(server)
            with redis.client() as admin:
                jobs = int(admin.hget("tg:count", "SUCCEEDED") or 0) - before
            sent, scripted = monitor.stop()
            sent.pop("monitor", None)
            sent.subtract({"hget": 1, "ping": 1})  # the bench's own read and wake-up
            sent = +sent  # drop what is left at zero
            found.append({
                "concurrency": concurrency,
                "jobs": jobs,
                "sent_per_job": sum(sent.values()) / max(jobs, 1),
                "sent_by_command": {k: v / max(jobs, 1) for k, v in sent.most_common()},
                "in_scripts_per_job": sum(scripted.values()) / max(jobs, 1),
            })  # fmt: skip
            print(f"  {jobs} jobs: {found[-1]['sent_per_job']:.2f} commands sent per job "
                  f"({found[-1]['in_scripts_per_job']:.1f} more run inside scripts)", flush=True)  # fmt: skip
    finally:
        server.stop()
    return found


class _Monitor:
    """Redis MONITOR on a thread: counts the commands clients send, and apart from them the
    commands scripts run inside Redis."""

    def __init__(self, redis: RedisProcess) -> None:
        self._redis = redis
        self.sent: collections.Counter[str] = collections.Counter()
        self.scripted: collections.Counter[str] = collections.Counter()
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def start(self) -> None:
        self._thread.start()
        self._ready.wait(10)

    def stop(self) -> tuple[collections.Counter[str], collections.Counter[str]]:
        self._stop.set()
        with self._redis.client() as admin:
            admin.ping()  # one more line, so the watcher sees the stop
        self._thread.join(10)
        return self.sent, self.scripted

    def _watch(self) -> None:
        with self._redis.client() as client, client.monitor() as monitor:
            self._ready.set()
            for line in monitor.listen():
                if self._stop.is_set():
                    return
                name = str(line.get("command", "")).split(" ", 1)[0].lower()
                if line.get("client_type") == "lua":
                    self.scripted[name] += 1
                else:
                    self.sent[name] += 1


async def _ceiling(redis: RedisProcess, seconds: float) -> dict[str, Any]:
    """The bound: what a bare redis-py client pipelining the least a job needs written (its hash
    and its stream entry), 64 jobs a pipeline, pushes through the same Redis per second."""
    import redis.asyncio as aioredis

    print("redis: the ceiling (a bare pipelined client)", flush=True)
    client = aioredis.from_url(redis.url)
    blob = b"x" * 1100  # about one mlp request's inputs
    jobs = 0
    try:
        end = time.perf_counter() + seconds
        started = time.perf_counter()
        while time.perf_counter() < end:
            async with client.pipeline(transaction=False) as pipe:
                for i in range(64):
                    key = f"ceiling:job:{jobs + i}"
                    pipe.hset(key, mapping={"status": "PENDING", "request": blob})
                    pipe.xadd("ceiling:q", {"id": key})
                await pipe.execute()
            jobs += 64
        elapsed = time.perf_counter() - started
        await client.flushdb()
    finally:
        await client.aclose()
    return {"jobs_per_s": jobs / elapsed, "pipeline": 64}


def _wait_idle(server: ServeProcess) -> None:
    """Lets the jobs a submit-only run left behind finish before the next point."""
    from tensorgate.client import TensorgateClient

    with TensorgateClient(server.target, timeout_s=120) as client:
        probe = client.submit("mlp", {"input": np.zeros((1, 256), np.float32)})
        client.get_result(probe.job_id, wait_timeout_s=120)


async def _burst(target: str, count: int, senders: int = 64) -> dict[str, Any]:
    import grpc

    from tensorgate.client import AsyncTensorgateClient

    x = np.random.default_rng(0).standard_normal((1, 256)).astype(np.float32)
    accepted: list[str] = []
    refused: dict[str, int] = {}
    async with AsyncTensorgateClient(target, timeout_s=120) as client:
        left = iter(range(count))

        async def sender() -> None:
            for _ in left:
                try:
                    accepted.append((await client.submit("mlp", {"input": x})).job_id)
                except grpc.RpcError as exc:  # counted: the figure is what was accepted
                    refused[exc.code().name] = refused.get(exc.code().name, 0) + 1

        started = time.perf_counter()
        await asyncio.gather(*(sender() for _ in range(senders)))
        accept_s = time.perf_counter() - started
        statuses: dict[str, int] = {}
        ids = iter(accepted)

        async def collector() -> None:
            for job_id in ids:
                result = await client.get_result(job_id, wait_timeout_s=60)
                statuses[result.status] = statuses.get(result.status, 0) + 1

        await asyncio.gather(*(collector() for _ in range(senders)))
        done_s = time.perf_counter() - started
    return {
        "jobs": count,
        "accepted": len(accepted),
        "refused": refused,
        "accept_per_s": len(accepted) / accept_s,
        "all_finished_s": done_s,
        "statuses": statuses,
        "lost": len(accepted) - statuses.get("SUCCEEDED", 0),
    }


def _markdown(report: dict[str, Any]) -> str:
    lines = [
        "## Job stores: memory vs Redis (python -m bench.job_store)",
        "",
        f"One `tensorgate serve` per store on mlp, both running, each point measured on one "
        f"then the other, {report.get('rounds', 1)} round(s) of {report['seconds']:g} s "
        f"(medians by rate), on {report['machine']}; the load generator on the same machine. "
        "Submit→result is Submit then a long-poll GetResult; Submit alone is the accept rate "
        "(the jobs run meanwhile).",
        "",
        "| store | measured | in flight | per s | p50 ms | p99 ms | errors |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        what = "Submit→result" if r["mode"] == "job" else "Submit alone"
        errors = sum(r["errors"].values())
        lines.append(
            f"| {r['store']} | {what} | {r['concurrency']} | {r['req_per_s']:.0f} | "
            f"{r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {errors} |"
        )
    bursts = report["burst"]
    if "redis" in bursts:
        b, m = bursts["redis"], bursts.get("memory")
        lines += [
            "",
            f"Burst through Redis: {b['jobs']:,} jobs from 64 senders: {b['accepted']:,} "
            f"accepted at {b['accept_per_s']:.0f}/s, refused {b['refused'] or 'none'}; all "
            f"finished {b['all_finished_s']:.1f} s after the first Submit; final statuses "
            f"{b['statuses']}; **lost: {b['lost']}**."
            + (
                f" The same burst into the memory store: {m['accept_per_s']:.0f}/s accepted "
                f"(Redis {b['accept_per_s'] / m['accept_per_s']:.2f}x), lost {m['lost']}."
                if m
                else ""
            ),
        ]
    ceiling = report.get("ceiling")
    if ceiling:
        submit = next(
            r["req_per_s"] for r in report["rows"]
            if r["store"] == "redis" and r["mode"] == "submit" and r["concurrency"] == 64
        )  # fmt: skip
        memory = {
            (r["mode"], r["concurrency"]): r for r in report["rows"] if r["store"] == "memory"
        }
        redis_rows = {
            (r["mode"], r["concurrency"]): r for r in report["rows"] if r["store"] == "redis"
        }
        lines += [
            "",
            f"The ceiling: a bare redis-py client pipelining the least a job needs written (its "
            f"hash and stream entry, 64 jobs a pipeline) pushes {ceiling['jobs_per_s']:.0f} jobs/s "
            f"through the same Redis; the store's Submit alone at 64 in flight is "
            f"{submit / ceiling['jobs_per_s']:.2f}x of it. Redis vs memory in this run at 64 in "
            f"flight, the median of the rounds' ratios (each round measures both stores seconds "
            f"apart): Submit alone {_ratio(memory, redis_rows, 'submit', 'req_per_s')}, "
            f"Submit→result {_ratio(memory, redis_rows, 'job', 'req_per_s')}, p99 "
            f"Submit→result {_ratio(memory, redis_rows, 'job', 'p99_ms')}.",
        ]
    if report.get("commands"):
        lines += [
            "",
            "Redis commands the server sends per finished job, Submit→result with one long-poll "
            "waiter (MONITOR on, a separate short run; a script call counts once, a pipeline's "
            "commands one each). On the job's path every command is one round trip (no "
            "pipelines there), so these are its round trips too:",
            "",
            "| in flight | jobs | commands sent per job | by command | run inside scripts per job |",
            "|---|---|---|---|---|",
        ]
        for c in report["commands"]:
            top = ", ".join(f"{k} {v:.2f}" for k, v in list(c["sent_by_command"].items())[:6])
            lines.append(
                f"| {c['concurrency']} | {c['jobs']} | {c['sent_per_job']:.2f} | {top} | "
                f"{c['in_scripts_per_job']:.1f} |"
            )
    lines += ["", "![job stores](bench_job_store.png)", ""]
    return "\n".join(lines)


def _ratio(
    memory: dict[tuple[str, int], Any], redis: dict[tuple[str, int], Any], mode: str, key: str
) -> str:
    """Redis ÷ memory at 64 in flight: the median of the rounds' ratios, and their range."""
    pairs = zip(memory[mode, 64].get("rounds", [memory[mode, 64]]),
                redis[mode, 64].get("rounds", [redis[mode, 64]]), strict=True)  # fmt: skip
    ratios = sorted(r[key] / m[key] for m, r in pairs)
    return f"{statistics.median(ratios):.2f}x ({ratios[0]:.2f}-{ratios[-1]:.2f})"


def _plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (rate_ax, latency_ax) = plt.subplots(1, 2, figsize=(11, 4))
    stores = ["memory", "redis"]
    width = 0.38
    for i, store in enumerate(stores):
        accept = [
            next(r["req_per_s"] for r in rows if r["store"] == store and r["mode"] == "submit"
                 and r["concurrency"] == c)
            for c in (1, 64)
        ]  # fmt: skip
        rate_ax.bar(np.arange(2) + i * width, accept, width, label=store)
        for j, c in enumerate((1, 64)):
            [row] = [r for r in rows if r["store"] == store and r["mode"] == "job"
                     and r["concurrency"] == c]  # fmt: skip
            x = j + i * width
            latency_ax.bar(x, row["p99_ms"], width, color=f"C{i}", alpha=0.35)
            latency_ax.bar(x, row["p50_ms"], width, color=f"C{i}",
                           label=store if j == 0 else None)  # fmt: skip
    for ax in (rate_ax, latency_ax):
        ax.set_xticks(np.arange(2) + width / 2, ["1 in flight", "64 in flight"])
        ax.legend()
    rate_ax.set_title("Submit alone: accepted jobs per second")
    latency_ax.set_title("Submit→result latency, ms (solid p50, pale p99)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
