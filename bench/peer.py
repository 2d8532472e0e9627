"""Seldon MLServer 1.7.1 as the peer, in its own virtual environment (.venv-mlserver), serving the
same ONNX models through bench/mlserver_runtime.py with its adaptive batching (max 32 rows, 5 ms),
over its KServe v2 gRPC endpoint on 127.0.0.1."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc

from bench.serverproc import stat_cpu_seconds

ROOT = Path(__file__).resolve().parents[1]
VENV = ROOT / ".venv-mlserver"
REQUIREMENTS = ["mlserver==1.7.1", "onnxruntime", "numpy", "uvloop<0.22"]


def ensure_venv() -> Path:
    """Creates .venv-mlserver on first use (uvloop 0.22+ breaks MLServer's inference worker)."""
    mlserver = VENV / "bin" / "mlserver"
    if not mlserver.exists():
        print("installing MLServer into .venv-mlserver ...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
        subprocess.run([str(VENV / "bin" / "pip"), "install", "--quiet", *REQUIREMENTS], check=True)
    return mlserver


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class MLServerProcess:
    def __init__(self, repository: Path, models: list[str], workdir: Path) -> None:
        mlserver = ensure_venv()
        self.port = _free_port()
        workdir.mkdir(parents=True, exist_ok=True)
        settings = {
            "debug": False,
            "parallel_workers": 0,
            "host": "127.0.0.1",
            "grpc_port": self.port,
            "http_port": _free_port(),
            "metrics_port": _free_port(),
        }
        (workdir / "settings.json").write_text(json.dumps(settings))
        for name in models:
            folder = workdir / name
            folder.mkdir(exist_ok=True)
            shutil.copyfile(repository / name / "model.onnx", folder / "model.onnx")
            shutil.copyfile(ROOT / "bench" / "mlserver_runtime.py", folder / "mlserver_runtime.py")
            (folder / "model-settings.json").write_text(
                json.dumps(
                    {
                        "name": name,
                        "implementation": "mlserver_runtime.OnnxModel",
                        "parameters": {"uri": str(folder / "model.onnx")},
                        "max_batch_size": 32,
                        "max_batch_time": 0.005,
                    }
                )
            )
        self.log = open(workdir / "mlserver.log", "w")
        self.process = subprocess.Popen(
            [str(mlserver), "start", str(workdir)],
            cwd=workdir,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONPATH": ""},
        )
        self._wait_ready(models)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _wait_ready(self, models: list[str]) -> None:
        from tensorgate.kserve import grpc_service_pb2 as kpb
        from tensorgate.kserve import grpc_service_pb2_grpc as kpb_grpc

        deadline = time.monotonic() + 120
        with grpc.insecure_channel(self.target) as channel:
            stub = kpb_grpc.GRPCInferenceServiceStub(channel)
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise RuntimeError(f"MLServer exited; see {self.log.name}")
                try:
                    if all(
                        stub.ModelReady(kpb.ModelReadyRequest(name=m), timeout=2).ready
                        for m in models
                    ):
                        return
                except grpc.RpcError:
                    pass
                time.sleep(0.5)
        raise RuntimeError(f"MLServer not ready in 120 s; see {self.log.name}")

    def cpu_seconds(self) -> float:
        """CPU time of MLServer and its worker processes."""
        total = 0.0
        pids = [self.process.pid]
        children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
        if children.exists():
            pids += [int(p) for p in children.read_text().split()]
        for pid in pids:
            try:
                total += stat_cpu_seconds(Path(f"/proc/{pid}/stat"))
            except OSError:
                continue  # gone meanwhile
        return total

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()
