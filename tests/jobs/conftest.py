"""Job tests run against both stores (the job_store fixture): the shared server and dedicated
ones use memory, or a real redis-server."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tensorgate.server.config import ServerConfig
from tests.harness import ServerThread
from tests.redisproc import RedisProcess


@pytest.fixture(scope="session")
def redis_job_server(repository: Path, redis_process: RedisProcess) -> Iterator[ServerThread]:
    with redis_process.client() as admin:
        admin.flushdb()
    config = ServerConfig(
        host="127.0.0.1",
        port=0,
        model_repository=repository,
        drain_delay_s=0.0,
        metrics_port=-1,
        job_store=redis_process.url,
    )
    running = ServerThread(config).start()
    yield running
    running.stop()


@pytest.fixture
def server(server: ServerThread, request: pytest.FixtureRequest, job_store: str) -> ServerThread:
    """The shared server of the job store under test."""
    if job_store == "memory":
        return server
    running: ServerThread = request.getfixturevalue("redis_job_server")
    return running


@pytest.fixture
def start_server(
    start_server: Callable[..., ServerThread], job_store: str
) -> Callable[..., ServerThread]:
    def start(**overrides: Any) -> ServerThread:
        overrides.setdefault("job_store", job_store)
        return start_server(**overrides)

    return start
