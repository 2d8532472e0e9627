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
from tensorgate.client import TensorgateClient


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
    modules = "tensorgate.server, tensorgate.server.telemetry, tensorgate.server.jobs.redis_store, "
    modules += "tensorgate.server.workers, tensorgate.client, tensorgate.server.bundled.command, "
    modules += "tensorgate.command, tensorgate.v1.inference_pb2, tensorgate.kserve.grpc_service_pb2"
    found = subprocess.run(
        [str(installed / "python"), "-c",
         f"import {modules}; print(tensorgate.server.__file__, tensorgate.command.__file__)"],
        cwd=tmp_path, check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    assert str(ROOT) not in found and str(installed.parent) in found, found


def _serve(installed: Path, cwd: Path, *flags: str) -> tuple[subprocess.Popen[str], int, str]:
    """`tensorgate serve` of the installed wheel on a free port; (process, port, the line that
    said it serves) once it serves."""
    server = subprocess.Popen(
        [str(installed / "tensorgate"), "serve", "--host", "127.0.0.1", "--port", "0",
         "--metrics-port", "-1", "--drain-delay-s", "0", *flags],
        cwd=cwd, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert server.stderr is not None
    port, log = 0, []
    for line in server.stderr:
        log.append(line)
        if "listening on 127.0.0.1:" in line:
            port = int(line.rsplit(":", 1)[1].split(";")[0])
        if "server.app: serving" in line:
            assert port, "".join(log)
            return server, port, line
    server.kill()
    raise AssertionError("the server did not start:\n" + "".join(log))


def test_the_installed_wheel_serves_a_model(
    installed: Path, repository: Path, tmp_path: Path
) -> None:
    server, port, _ = _serve(
        installed, tmp_path, "--models", "mlp", "--model-repository", str(repository)
    )
    try:
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


def test_a_wheel_only_user_builds_the_bundled_models_and_serves_them(
    installed: Path, tmp_path: Path
) -> None:
    """Outside a checkout: serve first says how to get a repository; tensorgate build writes it
    (every bundled model, configs included) and serve serves it."""
    refused = subprocess.run(
        [str(installed / "tensorgate"), "serve", "--port", "0", "--metrics-port", "-1"],
        cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert refused.returncode == 1
    assert "model repository engines is not a directory" in refused.stderr
    assert "tensorgate build --out engines" in refused.stderr
    assert "build_engines" not in refused.stderr
    built = subprocess.run(
        [str(installed / "tensorgate"), "build"], cwd=tmp_path, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert built.returncode == 0, built.stderr
    for name in ("mlp", "mlp_python", "silero_vad"):
        assert (tmp_path / "engines" / name / "config.toml").exists(), built.stdout
    assert (tmp_path / "engines" / "mlp_python" / "model.py").exists()
    server, port, serving = _serve(installed, tmp_path)
    try:
        assert "serving mlp, mlp_python, silero_vad" in serving, serving
        with TensorgateClient(f"127.0.0.1:{port}", timeout_s=10) as client:
            x = np.ones((2, 256), np.float32)
            by_onnx = client.predict("mlp", {"input": x})
            by_python = client.predict("mlp_python", {"input": x})
        np.testing.assert_allclose(by_python["logits"], by_onnx["logits"], rtol=1e-4, atol=1e-4)
    finally:
        server.send_signal(signal.SIGTERM)
        assert server.wait(30) == 0


def test_every_package_folder_is_in_the_wheels_package_list() -> None:
    """server/, client/ and command/ ship as tensorgate.server, tensorgate.client and
    tensorgate.command (package-dir in pyproject.toml): every folder with an __init__.py under
    them is listed under its tensorgate.* name, so none is left out of the wheel."""
    import tomllib

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    folders = {"server": "tensorgate.server", "client": "tensorgate.client",
               "command": "tensorgate.command"}  # fmt: skip
    for folder, name in folders.items():
        assert config["package-dir"][name] == folder
        for init in sorted((ROOT / folder).rglob("__init__.py")):
            package = ".".join([name, *init.parent.relative_to(ROOT / folder).parts])
            assert package in listed, f"{package} ({init.parent}) is not in pyproject's packages"
