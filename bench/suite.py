"""The benchmark suite: tensorgate over real gRPC on loopback, side by side with the engine's own
limit and with Seldon MLServer, one command, one run.

    python -m bench.suite                 # about 6 minutes at --seconds 5
    python -m bench.suite --seconds 10    # closer to PEERS.md's 10 s points

Rows: closed-loop concurrency sweeps for Predict (tiny and compute-bound model), Submit+GetResult
and StreamPredict; an open-loop Poisson sweep; the engine called in-process at the batch sizes the
batcher formed; MLServer and tensorgate on the same KServe v2 load; the load generator against an
empty handler. Writes docs/benchmarks.json, docs/benchmarks.md and two PNG plots beside them.
"""

from __future__ import annotations

import argparse
import json
import platform
import socket
import subprocess
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
from bench.peer import MLServerProcess  # noqa: E402
from bench.serverproc import ServeProcess  # noqa: E402
from tensorgate.server.bundled import build  # noqa: E402

DOCS = ROOT / "docs"
FEATURES = {"mlp": 256, "mlp_heavy": 1024}
P99_TARGET_MS = 50.0


class Suite:
    def __init__(self, args: argparse.Namespace, repository: Path) -> None:
        self.args = args
        self.repository = repository
        self.rows: list[dict[str, Any]] = []
        self.planned = 0
        self.done = 0

    def point(
        self, target: str, label: dict[str, Any], spec: LoadSpec, server: Any = None
    ) -> dict[str, Any]:
        self.done += 1
        before_cpu = server.cpu_seconds() if server else 0.0
        before_rows = server.batch_rows() if isinstance(server, ServeProcess) else (0.0, 0.0)
        result = run(spec)
        row = {**label, "concurrency": spec.concurrency, "rate": spec.rate, **result.as_dict()}
        if server is not None:
            row["server_cpu_s"] = round(server.cpu_seconds() - before_cpu, 2)
        if isinstance(server, ServeProcess):
            rows, batches = server.batch_rows()
            made = batches - before_rows[1]
            row["mean_batch_rows"] = round((rows - before_rows[0]) / made, 2) if made else None
        self.rows.append(row)
        print(
            f"[{self.done:>2}/{self.planned}] {label['server']:<10} {label['model']:<9} "
            f"{label['kind']:<7} c={spec.concurrency:<4} rate={spec.rate:<6g} "
            f"{result.req_per_s:8.1f} req/s  p50 {result.p50_ms:7.2f}  p99 {result.p99_ms:7.2f} ms"
            f"  batch {row.get('mean_batch_rows')}  errors {sum(result.errors.values())}",
            flush=True,
        )
        return row

    def spec(self, target: str, model: str, **fields: Any) -> LoadSpec:
        concurrency = fields.get("concurrency", 1)
        fields.setdefault("processes", 1 if concurrency <= 4 and not fields.get("rate") else 2)
        return LoadSpec(
            target, model, features=FEATURES[model], seconds=self.args.seconds, **fields
        )


def engine_limit(repository: Path, model: str, batch: int, instances: int, seconds: float) -> float:
    """Rows per second of the model called in-process: `instances` ONNX Runtime sessions on their
    own threads (as the server runs them), at a fixed batch size, with no gRPC."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    path = str(repository / model / "model.onnx")
    sessions = [ort.InferenceSession(path, options) for _ in range(instances)]
    x = np.random.default_rng(0).standard_normal((batch, FEATURES[model])).astype(np.float32)
    counts = [0] * instances
    stop = time.perf_counter() + seconds

    def work(i: int) -> None:
        while time.perf_counter() < stop:
            sessions[i].run(None, {"input": x})
            counts[i] += 1

    threads = [threading.Thread(target=work, args=(i,)) for i in range(instances)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(counts) * batch / (time.perf_counter() - started)


def echo_server() -> tuple[subprocess.Popen[str], str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    process = subprocess.Popen(
        [sys.executable, "-m", "bench.echo_server", str(port)], cwd=ROOT,
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert process.stdout is not None
    process.stdout.readline()
    return process, f"127.0.0.1:{port}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="measured seconds per point")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64, 256])
    parser.add_argument("--no-peer", action="store_true", help="skip MLServer")
    args = parser.parse_args()
    conc = args.concurrency
    peer_conc = [c for c in (1, 16, 64) if c in conc] or conc[:1]
    rates = [1000, 2000, 4000, 5000, 6000, 7000]
    with tempfile.TemporaryDirectory() as tmp:
        repository = Path(tmp) / "engines"
        for name in ("mlp", "mlp_heavy"):
            build(name, repository)
        suite = Suite(args, repository)
        suite.planned = (
            2 * len(conc) + 2 * len(peer_conc) + 4 + len(rates)
            + (0 if args.no_peer else 2 * len(peer_conc)) + 2 * len(peer_conc) + 2
        )  # fmt: skip
        echo, echo_target = echo_server()
        try:
            for c in (1, 64):
                spec = LoadSpec(echo_target, "mlp", concurrency=c, seconds=args.seconds,
                                processes=1 if c == 1 else 2)  # fmt: skip
                suite.point(echo_target, {"server": "empty", "model": "mlp", "kind": "unary"}, spec)
        finally:
            echo.terminate()

        server = ServeProcess(repository, ("mlp", "mlp_heavy"), extra_args=["--metrics-port", "0"])
        try:
            target = server.target
            for model in ("mlp", "mlp_heavy"):
                for c in conc:
                    suite.point(target, {"server": "tensorgate", "model": model, "kind": "unary"},
                                suite.spec(target, model, concurrency=c), server)  # fmt: skip
            for c in peer_conc:
                suite.point(target, {"server": "tensorgate", "model": "mlp", "kind": "job"},
                            suite.spec(target, "mlp", concurrency=c, mode="job"), server)  # fmt: skip
                suite.point(target, {"server": "tensorgate", "model": "mlp_heavy", "kind": "job"},
                            suite.spec(target, "mlp_heavy", concurrency=c, mode="job"), server)  # fmt: skip
            for streams, c in ((1, 64), (4, 16), (4, 64), (4, 256)):
                suite.point(target, {"server": "tensorgate", "model": "mlp", "kind": "stream",
                                     "streams": streams},
                            suite.spec(target, "mlp", concurrency=c, mode="stream",
                                       streams=streams), server)  # fmt: skip
            for rate in rates:
                suite.point(target, {"server": "tensorgate", "model": "mlp", "kind": "open"},
                            suite.spec(target, "mlp", rate=rate), server)  # fmt: skip
            for model in ("mlp", "mlp_heavy"):
                for c in peer_conc:
                    suite.point(target, {"server": "tensorgate", "model": model, "kind": "kserve"},
                                suite.spec(target, model, concurrency=c, protocol="kserve"),
                                server)  # fmt: skip
        finally:
            server.stop()

        if not args.no_peer:
            peer = MLServerProcess(repository, ["mlp", "mlp_heavy"], Path(tmp) / "mlserver")
            try:
                for model in ("mlp", "mlp_heavy"):
                    for c in peer_conc:
                        suite.point(peer.target, {"server": "mlserver", "model": model, "kind": "kserve"},
                                    suite.spec(peer.target, model, concurrency=c, protocol="kserve"),
                                    peer)  # fmt: skip
            finally:
                peer.stop()

        print("engine limit (in-process, no gRPC) at the batch sizes formed ...", flush=True)
        for row in suite.rows:
            if (
                row["server"] == "tensorgate"
                and row["kind"] == "unary"
                and row.get("mean_batch_rows")
            ):
                batch = max(1, round(row["mean_batch_rows"]))
                engine_rows_s = engine_limit(repository, row["model"], batch, 2, 2.0)
                row["engine_rows_per_s"] = round(engine_rows_s, 1)
                row["server_over_engine"] = round(row["req_per_s"] / engine_rows_s, 3)
        report = {
            "machine": {"cpus": __import__("os").cpu_count(), "python": platform.python_version()},
            "seconds_per_point": args.seconds,
            "rows": suite.rows,
        }
    DOCS.mkdir(exist_ok=True)
    (DOCS / "benchmarks.json").write_text(json.dumps(report, indent=2) + "\n")
    from bench.report import write_report

    write_report(report, DOCS)
    print(f"wrote {DOCS / 'benchmarks.md'}, benchmarks.json and the plots")
    return 0


if __name__ == "__main__":
    sys.exit(main())
