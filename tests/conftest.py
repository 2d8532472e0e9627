"""Fixtures: one shared server over the test repository, and factories for dedicated ones."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from client import AsyncTensorgateClient, TensorgateClient
from server.config import ServerConfig
from tests.harness import MlpReference, ServerThread, build_repository


@pytest.fixture(scope="session")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_repository(tmp_path_factory.mktemp("engines"))


@pytest.fixture(scope="session")
def reference(repository: Path) -> MlpReference:
    return MlpReference(repository / "mlp" / "model.onnx")


def _config(repository: Path, **overrides: Any) -> ServerConfig:
    overrides.setdefault("model_repository", repository)
    overrides.setdefault("drain_delay_s", 0.0)
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
