"""`tensorgate serve --workers N`: N serving processes behind one port, under one supervisor.

Each worker is a whole server (its own gRPC front end, batchers and instances) bound to the same
port with SO_REUSEPORT, so the kernel spreads connections over them. Why full servers rather than
front-end processes feeding one engine process: the per-call gRPC work, which is what a single
process runs out of, is then spread with nothing in between, and a worker that dies takes only
its own connections with it; the price is that batches form per worker (fewer rows per batch at
the same load) and each worker holds its own copy of every model (on a GPU, its own CUDA context
and engine memory). docs/workers.md has the figures.

The supervisor holds no gRPC port itself. It starts the workers, waits until each serves, serves
one /metrics adding up theirs (telemetry/combined.py), replaces a worker that dies, and on
SIGTERM/SIGINT/SIGHUP passes SIGTERM on to every worker and waits for their drains. Jobs must be
shared by the workers, so --workers > 1 needs the Redis job store.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import multiprocessing
import os
import queue
import signal
import socket
import tempfile
import time
from dataclasses import dataclass
from multiprocessing.process import BaseProcess
from typing import Any

from tensorgate.server import logs
from tensorgate.server.config import ConfigError, ServerConfig
from tensorgate.server.launch import loop_factory, run_server

log = logging.getLogger(__name__)

_POLL_S = 0.2
# A worker that dies sooner than this after starting is restarted after a growing pause.
_STABLE_S = 10.0
_MAX_RESTART_PAUSE_S = 30.0
_START_TIMEOUT_S = 300.0


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@dataclass(slots=True)
class _Worker:
    index: int
    process: BaseProcess
    started_at: float
    pid: int = 0
    metrics_port: int = 0
    ready: bool = False
    restarts: int = 0


class Supervisor:
    def __init__(
        self,
        config: ServerConfig,
        workers: int,
        log_level: str,
        event_loop: str,
        log_format: str = "text",
    ) -> None:
        if config.job_store == "memory":
            raise ConfigError(
                f"--workers {workers} needs a job store the workers share: a job submitted to one "
                "process must be found by the others; add --job-store redis://HOST:PORT/DB "
                "(or use --workers 1)"
            )
        self._config = config
        self._count = workers
        self._log_level = log_level
        self._log_format = log_format
        self._event_loop = event_loop
        self._context = multiprocessing.get_context("spawn")
        self._events: Any = self._context.Queue()
        self._workers: dict[int, _Worker] = {}
        self._stopping = False
        self._reservation: socket.socket | None = None
        self._metrics: Any = None

    def run(self) -> int:
        """Serves until a signal; returns the exit code (0 when every worker drained cleanly)."""
        config = self._config
        port = self._reserve_port()
        # Repository API changes (explicit model control) reach every worker through this file.
        control = tempfile.NamedTemporaryFile(prefix="tensorgate-control-", delete=False)
        control.close()
        self._control_log = control.name
        child = dataclasses.replace(
            config,
            port=port,
            reuse_port=True,
            metrics_port=0 if config.metrics_port >= 0 else -1,
            metrics_host="127.0.0.1",
            control_log=control.name,
        )
        self._child = child
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, self._on_signal)
        if config.metrics_port >= 0:
            self._serve_metrics()
        for index in range(self._count):
            self._start(index)
        try:
            self._wait_ready()
        except ConfigError:
            self._stop_all()
            raise
        if not self._stopping:
            log.info("serving on port %d with %d workers", port, self._count)
        while not self._stopping:
            self._poll()
        try:
            return self._stop_all()
        finally:
            with contextlib.suppress(OSError):
                os.unlink(self._control_log)

    # --- start-up -----------------------------------------------------------------------------

    def _reserve_port(self) -> int:
        """The port every worker binds. With --port 0 one is chosen here and held (bound, not
        listening, SO_REUSEPORT) so it stays ours while workers come and go."""
        config = self._config
        if config.port != 0:
            return config.port
        family, address = _address(config.host)
        reservation = socket.socket(family, socket.SOCK_STREAM)
        reservation.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        reservation.bind((address, 0))
        self._reservation = reservation
        port: int = reservation.getsockname()[1]
        return port

    def _serve_metrics(self) -> None:
        from tensorgate.server.telemetry.combined import CombinedMetrics

        self._metrics = CombinedMetrics(self._metric_endpoints)
        config = self._config
        try:
            port = self._metrics.serve(config.metrics_port, config.host)
        except OSError as exc:
            raise ConfigError(
                f"cannot serve metrics on {config.host}:{config.metrics_port}: "
                f"{exc.strerror or exc}; choose another with --metrics-port (-1 = off)"
            ) from None
        log.info("metrics of all workers on http://%s:%d/metrics", config.host, port)

    def _metric_endpoints(self) -> list[str]:
        return [
            f"http://127.0.0.1:{w.metrics_port}/metrics"
            for w in list(self._workers.values())
            if w.ready and w.metrics_port
        ]

    def _start(self, index: int, restarts: int = 0) -> None:
        config = dataclasses.replace(self._child, worker_index=index)
        process = self._context.Process(
            target=_worker_main,
            args=(
                config,
                index,
                self._events,
                self._log_level,
                self._event_loop,
                os.getpid(),
                self._log_format,
            ),
            name=f"tensorgate-worker-{index}",
        )
        process.start()
        self._workers[index] = _Worker(index, process, time.monotonic(), restarts=restarts)

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + _START_TIMEOUT_S
        while not self._stopping and not all(w.ready for w in self._workers.values()):
            if time.monotonic() > deadline:
                raise ConfigError("the workers did not start serving within 5 minutes")
            self._read_events(starting=True)
            for worker in self._workers.values():
                if not worker.ready and worker.process.exitcode is not None:
                    raise ConfigError(f"worker {worker.index} exited while starting; see above")

    def _read_events(self, starting: bool = False) -> None:
        try:
            event = self._events.get(timeout=_POLL_S)
        except queue.Empty:
            return
        kind, index, *rest = event
        worker = self._workers.get(index)
        if kind == "failed" and starting:
            raise ConfigError(rest[0])
        if kind == "ready" and worker is not None:
            worker.pid, worker.metrics_port = rest
            worker.ready = True
            if worker.restarts:
                log.info("worker %d (pid %d) is serving again", index, worker.pid)

    # --- serving ------------------------------------------------------------------------------

    def _poll(self) -> None:
        self._read_events()
        for worker in list(self._workers.values()):
            code = worker.process.exitcode
            if code is None or self._stopping:
                continue
            lived_s = time.monotonic() - worker.started_at
            restarts = worker.restarts + 1
            pause_s = 0.0 if lived_s >= _STABLE_S else min(2.0**restarts, _MAX_RESTART_PAUSE_S)
            log.error(
                "worker %d (pid %d) exited with %s; starting a new one%s",
                worker.index,
                worker.process.pid,
                _describe(code),
                f" in {pause_s:.0f} s" if pause_s else "",
            )
            worker.ready = False
            worker.process.join()
            self._pause(pause_s)
            if not self._stopping:
                self._start(worker.index, restarts if lived_s < _STABLE_S else 1)

    def _pause(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while not self._stopping and time.monotonic() < deadline:
            time.sleep(_POLL_S)

    def _on_signal(self, signum: int, _: Any) -> None:
        if not self._stopping:
            log.info("%s: stopping the workers", signal.Signals(signum).name)
        self._stopping = True

    def _stop_all(self) -> int:
        """SIGTERM to every worker; waits for their drains (grace + a margin), then kills."""
        self._stopping = True
        for worker in self._workers.values():
            if worker.process.exitcode is None and worker.process.pid is not None:
                os.kill(worker.process.pid, signal.SIGTERM)
        deadline = time.monotonic() + self._config.shutdown_grace_s + 5.0
        for worker in self._workers.values():
            worker.process.join(max(deadline - time.monotonic(), 0.1))
            if worker.process.exitcode is None:
                log.error("worker %d did not stop in time; killing it", worker.index)
                worker.process.kill()
                worker.process.join()
        if self._metrics is not None:
            self._metrics.close()
        if self._reservation is not None:
            self._reservation.close()
        codes = [w.process.exitcode for w in self._workers.values()]
        log.info("stopped (%d workers, exit codes %s)", len(codes), codes)
        return 0 if all(code == 0 for code in codes) else 1


def _worker_main(
    config: ServerConfig,
    index: int,
    events: Any,
    log_level: str,
    event_loop: str,
    supervisor: int,
    log_format: str = "text",
) -> None:
    """A worker process: one whole server, telling the supervisor when it serves."""
    logs.configure(log_level, log_format, f"worker {index} pid %(process)d")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor decides; it sends SIGTERM
    _stop_with_parent(supervisor)

    def ready(metrics_port: int) -> None:
        events.put(("ready", index, os.getpid(), metrics_port))

    try:
        with asyncio.Runner(loop_factory=loop_factory(event_loop)) as runner:
            runner.run(run_server(config, ready))
    except ConfigError as exc:
        logging.getLogger("tensorgate").error("%s", exc)
        events.put(("failed", index, str(exc)))
        raise SystemExit(1) from None


def _stop_with_parent(supervisor: int) -> None:
    """A worker whose supervisor dies (even by SIGKILL) gets SIGTERM and drains, instead of
    serving on as an orphan nobody supervises (Linux: PR_SET_PDEATHSIG)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):
        log.warning("cannot ask to be stopped with the supervisor on this system")
    if os.getppid() != supervisor:  # it died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


def _address(host: str) -> tuple[socket.AddressFamily, str]:
    if host in ("", "0.0.0.0"):
        return socket.AF_INET, "0.0.0.0"
    family, _, _, _, address = socket.getaddrinfo(host, 0, type=socket.SOCK_STREAM)[0]
    return family, str(address[0])


def _describe(code: int) -> str:
    if code < 0:
        return f"signal {signal.Signals(-code).name}"
    return f"code {code}"
