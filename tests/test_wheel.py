"""The wheel, installed as a user installs it (not editable, outside the source tree), serves a
model: what the Dockerfile does, checked here."""

from __future__ import annotations

import signal
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from bench.serverproc import ROOT
from client import TensorgateClient


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtual environment with the wheel installed; returns its bin folder."""
    root = tmp_path_factory.mktemp("wheel")
    dist = root / "dist"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
         "--wheel-dir", str(dist), str(ROOT)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    [wheel] = dist.glob("tensorgate-*.whl")
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--no-deps",
         str(wheel)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    # The dependencies come from this environment's site-packages as a plain path: its .pth
    # files (the editable install of this checkout among them) are not read from there.
    site = Path(
        subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    )
    (site / "zz_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return venv / "bin"


def test_the_installed_wheel_imports_from_itself(installed: Path, tmp_path: Path) -> None:
    modules = "server, server.telemetry, server.jobs.redis_store, server.workers, client, "
    modules += "tensorgate_cli, tensorgate.v1.inference_pb2, tensorgate.kserve.grpc_service_pb2"
    found = subprocess.run(
        [str(installed / "python"), "-c",
         f"import {modules}; print(server.__file__, tensorgate_cli.__file__)"],
        cwd=tmp_path, check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    assert str(ROOT) not in found and str(installed.parent) in found, found


def test_the_installed_wheel_serves_a_model(
    installed: Path, repository: Path, tmp_path: Path
) -> None:
    server = subprocess.Popen(
        [str(installed / "tensorgate"), "serve", "--host", "127.0.0.1", "--port", "0",
         "--metrics-port", "-1", "--drain-delay-s", "0", "--models", "mlp",
         "--model-repository", str(repository)],
        cwd=tmp_path, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert server.stderr is not None
    port, log = 0, []
    try:
        for line in server.stderr:
            log.append(line)
            if "listening on 127.0.0.1:" in line:
                port = int(line.rsplit(":", 1)[1].split(";")[0])
            if "server.app: serving" in line:
                break
        assert port, "".join(log)
        with TensorgateClient(f"127.0.0.1:{port}", timeout_s=10) as client:
            out = client.predict("mlp", {"input": np.zeros((2, 256), np.float32)})
            assert out["logits"].shape == (2, 16)
        health = subprocess.run(
            [str(installed / "tensorgate"), "health", "--target", f"127.0.0.1:{port}"],
            cwd=tmp_path, capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert health.returncode == 0, health.stdout + health.stderr
    finally:
        server.send_signal(signal.SIGTERM)
        assert server.wait(30) == 0
