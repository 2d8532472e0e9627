"""Process start-up: the event loop a server runs on, and one server serving until a signal stops
it. `tensorgate serve` (cli.py) and each worker process (workers.py) start servers through it."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable

from tensorgate.server.app import TensorgateServer
from tensorgate.server.config import ConfigError, ServerConfig

log = logging.getLogger("tensorgate")


def loop_factory(name: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop when asked for ("auto": when installed), else asyncio's own loop."""
    if name == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if name == "uvloop":
            raise ConfigError("--event-loop uvloop: uvloop is not installed") from None
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def run(config: ServerConfig, event_loop: str = "auto") -> None:
    """Serves in this process until a signal stops the server."""
    with asyncio.Runner(loop_factory=loop_factory(event_loop)) as runner:
        runner.run(run_server(config))


async def run_server(config: ServerConfig, on_ready: Callable[[int], None] | None = None) -> None:
    """Serves until a signal stops the server. on_ready(metrics port) once it serves."""
    server = TensorgateServer(config)
    loop = asyncio.get_running_loop()
    stopping: list[asyncio.Task[None]] = []

    def on_signal(signum: int) -> None:
        if not stopping:
            log.info(
                "%s: shutting down (grace %.1f s)",
                signal.Signals(signum).name,
                config.shutdown_grace_s,
            )
            stopping.append(asyncio.create_task(server.stop()))

    # SIGHUP (a closed terminal, some supervisors' reload) drains like SIGTERM instead of killing
    # the process with jobs pending.
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        loop.add_signal_handler(signum, on_signal, signum)
    await server.start()
    if on_ready is not None and server.serving:
        on_ready(server.metrics_port)
    await server.wait_stopped()
