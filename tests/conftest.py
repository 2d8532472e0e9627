"""Fixtures: one shared server over the test repository, and factories for dedicated ones."""

from __future__ import annotations

import itertools
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tensorgate.client import AsyncTensorgateClient, TensorgateClient
from tensorgate.server.config import ServerConfig
from tests.harness import MlpReference, ServerThread, build_repository
from tests.redisproc import RedisProcess

TRITON_VENV = Path(__file__).resolve().parents[1] / ".venv-triton"
TRITONCLIENT = "tritonclient[grpc]==2.73.0"


@pytest.fixture(scope="session")
def triton_python() -> Path:
    """A virtual environment with tritonclient, which pins protobuf < 7 (ours needs 7) and
    registers the same `inference.*` protobuf names as our stubs: it runs in its own process."""
    python = TRITON_VENV / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(TRITON_VENV)], check=True, timeout=300)
        subprocess.run(
            [str(python), "-m", "pip", "install", "--quiet", TRITONCLIENT], check=True, timeout=900
        )
    return python


@pytest.fixture(scope="session")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_repository(tmp_path_factory.mktemp("engines"))


@pytest.fixture(scope="session")
def reference(repository: Path) -> MlpReference:
    return MlpReference(repository / "mlp" / "model.onnx")


def _config(repository: Path, **overrides: Any) -> ServerConfig:
    overrides.setdefault("model_repository", repository)
    overrides.setdefault("drain_delay_s", 0.0)
    overrides.setdefault("metrics_port", -1)
    return ServerConfig(host="127.0.0.1", port=0, **overrides)


@pytest.fixture(scope="session")
def server(repository: Path) -> Iterator[ServerThread]:
    running = ServerThread(_config(repository)).start()
    yield running
    running.stop()


@pytest.fixture
def start_server(repository: Path) -> Iterator[Callable[..., ServerThread]]:
    """Starts a dedicated server with ServerConfig overrides; stopped after the test."""
    started: list[ServerThread] = []

    def start(tracing: Any = None, **overrides: Any) -> ServerThread:
        running = ServerThread(_config(repository, **overrides), tracing).start()
        started.append(running)
        return running

    yield start
    for running in started:
        running.stop()


@pytest.fixture
def client(server: ServerThread) -> Iterator[TensorgateClient]:
    with TensorgateClient(server.target, timeout_s=30) as c:
        yield c


@pytest.fixture
async def aclient(server: ServerThread) -> Any:
    async with AsyncTensorgateClient(server.target, timeout_s=30) as c:
        yield c


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


# Database 0 is the shared Redis-backed server's; tests take 1..15 in turn.
_DATABASES = itertools.cycle(range(1, 16))


@pytest.fixture(scope="session")
def redis_process(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisProcess]:
    running = RedisProcess(tmp_path_factory.mktemp("redis")).start()
    yield running
    running.stop()


@pytest.fixture
def redis_db(redis_process: RedisProcess) -> Callable[[], str]:
    """Returns the URL of a fresh (flushed) database on the shared Redis."""

    def fresh() -> str:
        db = next(_DATABASES)
        with redis_process.client() as admin:
            admin.execute_command("SELECT", db)
            admin.flushdb()
        return f"redis://127.0.0.1:{redis_process.port}/{db}"

    return fresh


@pytest.fixture(params=["memory", "redis"])
def job_store(request: pytest.FixtureRequest) -> str:
    """Which store a test's dedicated servers use ("memory", or a fresh Redis database)."""
    if request.param == "memory":
        return "memory"
    fresh: Callable[[], str] = request.getfixturevalue("redis_db")
    return fresh()
