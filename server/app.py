"""The composition root: builds every part, owns start-up and shutdown.

start:    bind the port with health NOT_SERVING → load and warm every model (off the loop) → start
          schedulers and job feeders → health SERVING. A stop that begins meanwhile wins: start
          then releases what it loaded and returns without serving.
stop:     health NOT_SERVING → keep serving for drain_delay_s, so probes and load balancers see
          it before the port closes → refuse new work → let in-flight calls and jobs finish
          within the grace period → stop gRPC → stop schedulers (what is left fails) → close
          backends → flush telemetry. It returns within the grace period plus a moment, even
          with an engine call hung forever.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import grpc
from google.longrunning import operations_proto_pb2
from grpc_health.v1 import health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from tensorgate.kserve import grpc_service_pb2
from tensorgate.server.api.auth import Authenticator, AuthInterceptor, TlsFiles, server_credentials
from tensorgate.server.api.frontend import Frontend
from tensorgate.server.api.health import HealthReporter
from tensorgate.server.api.kserve import KServeServicer
from tensorgate.server.api.messages import add_service
from tensorgate.server.api.operations import OperationsServicer
from tensorgate.server.api.servicer import InferenceServicer
from tensorgate.server.config import ConfigError, ServerConfig
from tensorgate.server.control import MODES as CONTROL_MODES
from tensorgate.server.control import ModelControl
from tensorgate.server.dataplane import DataPlane
from tensorgate.server.jobs.service import JobService
from tensorgate.server.jobs.store import JobStore, MemoryJobStore
from tensorgate.server.models import ModelSet
from tensorgate.server.repository import discover
from tensorgate.server.telemetry import Metrics, Telemetry, Tracing
from tensorgate.v1 import inference_pb2

log = logging.getLogger(__name__)

_PORT_TAKEN = (
    "cannot listen on {host}:{port} for gRPC: the port is taken or the address is not this "
    "machine's; choose another with --port"
)

# Time to stop gRPC, the schedulers and the backends after the grace period ends.
_TEARDOWN_S = 2.0
# After the grace period, jobs of a shared store running on an instance get this long to finish
# here before they are handed back to run again elsewhere.
_FINISH_RUNNING_S = 1.0
# The least time given to storing final statuses after the grace period, however short it was.
_RECORD_WAIT_S = 0.5


class TensorgateServer:
    """One gRPC server over one data plane. Construction does no I/O; call start()."""

    def __init__(self, config: ServerConfig, tracing: Tracing | None = None) -> None:
        """tracing: defaults to the standard OTEL_* environment (off unless configured)."""
        self.config = config
        self._tracing = tracing
        self.telemetry: Telemetry | None = None
        self.metrics_port = 0
        self.models = ModelSet(())
        self.port = 0
        self.health = HealthReporter()
        self._grpc: grpc.aio.Server | None = None
        self._jobs: JobService | None = None
        self.plane: DataPlane | None = None
        self.frontend: Frontend | None = None
        self.control: ModelControl | None = None
        self._stopped = asyncio.Event()
        self._started = asyncio.Event()  # start() returned, whether it served or gave up
        self._stopping = False
        self.serving = False  # start() finished and the server serves
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        try:
            await self._start()
        finally:
            self._started.set()

    async def _start(self) -> None:
        config = self.config
        store = _job_store(config)
        auth, credentials = _security(config)
        if config.model_control not in CONTROL_MODES:
            raise ConfigError(
                f"--model-control {config.model_control!r}: expected one of "
                f"{', '.join(CONTROL_MODES)}"
            )
        model_configs = await asyncio.to_thread(discover, config.model_repository, config.models)
        if self._stopping:
            return
        self.models = ModelSet(model_configs, retire_bound_s=max(config.shutdown_grace_s, 30.0))
        tracing = self._tracing if self._tracing is not None else Tracing.from_env()
        self.telemetry = Telemetry(tracing, Metrics(config.metrics_tenant_label))
        self.telemetry.metrics.watch(self._state)
        self._jobs = JobService(self.models, store, config, self.telemetry, self._on_jobs)
        self.control = ModelControl(
            self.models,
            config.model_control,
            config.model_repository,
            config.models,
            config.repository_poll_s,
            on_added=self._model_added,
            on_removed=self._model_removed,
            control_log=config.control_log,
        )
        self.plane = DataPlane(self.models, self._jobs, self.telemetry, self.control)

        # No gRPC-core limit on concurrent calls: the front ends refuse calls beyond
        # max_concurrent_rpcs themselves (RESOURCE_EXHAUSTED, retry-after-ms), which keeps the
        # health service answering however many calls and streams are open.
        server = grpc.aio.server(
            options=config.grpc_options(),
            interceptors=[AuthInterceptor(auth)] if auth.enabled else None,
        )
        frontend = self.frontend = Frontend(
            self.plane,
            config.max_inflight_per_stream,
            config.max_concurrent_rpcs,
            auth=auth,
            tenant_rate=config.tenant_rate,
            admin_tenants=config.admin_tenants,
        )
        add_service(server, InferenceServicer(frontend), inference_pb2, "Inference")
        add_service(server, KServeServicer(frontend), grpc_service_pb2, "GRPCInferenceService")
        add_service(
            server,
            OperationsServicer(frontend, config.max_result_wait_s),
            operations_proto_pb2,
            "Operations",
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health.servicer, server)
        reflection.enable_server_reflection(
            (
                inference_pb2.DESCRIPTOR.services_by_name["Inference"].full_name,
                grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name,
                OperationsServicer.SERVICE,
                "grpc.health.v1.Health",
                reflection.SERVICE_NAME,
            ),
            server,
        )
        # Every port is bound before any answers: a taken one fails the start, by name, before
        # a client could reach the other.
        if config.metrics_port >= 0:
            try:
                self.metrics_port = self.telemetry.metrics.bind(
                    config.metrics_port, config.metrics_host or config.host
                )
            except OSError as exc:
                raise ConfigError(
                    f"cannot serve metrics on {config.host}:{config.metrics_port}: "
                    f"{exc.strerror or exc}; choose another with --metrics-port (-1 = off)"
                ) from None
        try:
            self.port = self._bind(server, credentials)
        except ConfigError:
            self.telemetry.metrics.close()
            raise
        if config.metrics_port >= 0:
            self.telemetry.metrics.start()
            log.info(
                "metrics on http://%s:%d/metrics",
                config.metrics_host or config.host,
                self.metrics_port,
            )
        self._grpc = server
        await self.health.starting(list(self.models))
        await server.start()
        log.info(
            "listening on %s:%d; loading %d model(s)", config.host, self.port, len(self.models)
        )

        await self.models.load()
        if self._stopping:
            # stop() began while the models loaded: release them instead of serving.
            await self.models.close()
            return
        ready = self.models.start(self._on_ready, self.telemetry)
        if not ready:
            self._started.set()  # stop() waits for start() to finish: this is its end
            await self.stop()
            raise ConfigError(f"no model could be loaded: {self.models.failures()}")
        await self._jobs.start(ready)
        await self.control.start()
        await self.health.set_server(True)
        if config.worker_index >= 0:
            await self.health.set_worker(config.worker_index)
        self.serving = not self._stopping
        log.info("serving %s on port %d", ", ".join(ready), self.port)

    def _bind(self, server: grpc.aio.Server, credentials: grpc.ServerCredentials | None) -> int:
        """Binds the gRPC port; returns it (the one chosen, for port 0)."""
        config = self.config
        address = f"{config.host}:{config.port}"
        if config.port and not config.reuse_port and not _bindable(config.host, config.port):
            raise ConfigError(_PORT_TAKEN.format(host=config.host, port=config.port))
        try:
            if credentials is None:
                port = server.add_insecure_port(address)
            else:
                port = server.add_secure_port(address, credentials)
        except RuntimeError:
            port = 0
        if port == 0:
            raise ConfigError(_PORT_TAKEN.format(host=config.host, port=config.port))
        return int(port)

    def _on_jobs(self, available: bool) -> None:
        """The job store's availability, told to grpc.health.v1 (JOBS_SERVICE)."""
        if not self._stopping:
            self._background(self.health.set_jobs(available))

    def _background(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _model_added(self, name: str) -> None:
        """A model came to be served while running (model control): its jobs are taken."""
        if self._jobs is not None and not self._stopping:
            self._background(self._jobs.add_model(name))

    def _model_removed(self, name: str) -> None:
        """A model was unloaded: its jobs are no longer taken here (queued ones wait)."""
        if self._jobs is not None:
            self._jobs.remove_model(name)

    def _on_ready(self, model: str, ready: bool) -> None:
        """A model's readiness changed: told to grpc.health.v1 (KServe asks the model set)."""
        if self._stopping:
            return  # health is NOT_SERVING for good already
        if ready:
            log.info("model %s is ready: SERVING", model)
        elif model not in self.models:
            log.info("model %s is unloaded: NOT_SERVING", model)  # asked for: not an error
        else:
            log.error("model %s is not ready: NOT_SERVING", model)
        self._background(self.health.set_model(model, ready))

    async def stop(self, grace_s: float | None = None) -> None:
        """Graceful shutdown; safe to call more than once (later calls wait for the first).

        Health turns NOT_SERVING at once; calls keep being served for drain_delay_s, then new
        work is refused with UNAVAILABLE while the server still answers: in-flight calls and
        accepted jobs get the rest of the grace period, and GetResult keeps working so callers
        collect their results. Jobs still unfinished then turn FAILED (UNAVAILABLE), so none
        vanishes without a final status. Only then does gRPC stop, and the schedulers and
        backends after it.
        """
        if self._stopping:
            await self._stopped.wait()
            return
        self._stopping = True
        grace_s = self.config.shutdown_grace_s if grace_s is None else grace_s
        deadline = time.monotonic() + grace_s
        # Readiness turns no in both views at once: grpc.health.v1 and KServe's ServerReady and
        # ModelReady (which read the data plane).
        if self.plane is not None:
            self.plane.draining = True
        await self.health.shutting_down()
        if not self._started.is_set():
            # start() is still loading models: it notices, releases them and returns.
            await self._started.wait()
        if self.plane is not None and self._jobs is not None:
            # A shared job store gets back at once the jobs this process has not started.
            await self._jobs.quiesce()
            # At most half the grace: the rest is for finishing what was accepted.
            delay_s = min(self.config.drain_delay_s, grace_s / 2)
            if delay_s > 0 and self.models.serving():
                log.info("NOT_SERVING; still serving for the %.1f s drain delay", delay_s)
                await asyncio.sleep(delay_s)
            self.plane.accepting = False
            drained = await self.plane.drain(deadline)
            left = await self._jobs.abandon(
                "the server shut down before the job finished", finish_s=_FINISH_RUNNING_S
            )
            # Every accepted job now has its final status: long-polls and watchers see it
            # before the transport goes.
            await self._jobs.recorded(max(deadline - time.monotonic(), _RECORD_WAIT_S))
            self._jobs.close_watches()
            if not drained:
                log.warning(
                    "grace period over: %d request(s) still in flight, %d job(s) %s%s",
                    self.plane.inflight,
                    len(left),
                    "handed back" if self._jobs.store.shared else "failed unfinished",
                    ": " + ", ".join(job.id for job in left[:20]) if left else "",
                )
        if self.control is not None:
            await self.control.stop()
        if self._grpc is not None:
            # Long-polls see the final statuses set above before the transport goes.
            await self._grpc.stop(max(deadline - time.monotonic(), 0.5))
        if self._jobs is not None:
            await self._jobs.stop()
        models_deadline = max(deadline, time.monotonic() + _TEARDOWN_S)
        await self.models.stop(models_deadline)
        if self.telemetry is not None:
            self.telemetry.metrics.close()
            await asyncio.to_thread(self.telemetry.tracing.shutdown)  # flushes pending spans
        self._stopped.set()
        log.info("stopped")

    def _state(self) -> dict[str, dict[str, int]]:
        """Current state for the metrics scrape (runs on the scrape thread: reads only)."""
        load = self.models.load_now()
        jobs = self._jobs.store.count_by_status() if self._jobs is not None else {}
        return {
            "queue_depth": {name: m.queued_requests for name, m in load.items()},
            "busy_instances": {name: m.busy_instances for name, m in load.items()},
            "instances": {name: m.instances for name, m in load.items()},
            "jobs": jobs,
        }

    async def wait_stopped(self) -> None:
        await self._stopped.wait()


def _bindable(host: str, port: int) -> bool:
    """Whether host:port can be bound now (asked before gRPC, which would log a core error line
    of its own first)."""
    try:
        infos = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except OSError:
        return True  # let gRPC report it
    for family, kind, proto, _, address in infos:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(address)
            except OSError:
                return False
    return True


def _security(config: ServerConfig) -> tuple[Authenticator, grpc.ServerCredentials | None]:
    """Checks the TLS and token settings (one-line errors) and builds what enforces them."""
    credentials = None
    if config.tls_cert or config.tls_key:
        if not (config.tls_cert and config.tls_key):
            raise ConfigError("--tls-cert and --tls-key go together: give both")
        files = TlsFiles(
            Path(config.tls_cert),
            Path(config.tls_key),
            Path(config.tls_client_ca) if config.tls_client_ca else None,
        )
        credentials = server_credentials(files)
    elif config.tls_client_ca:
        raise ConfigError("--tls-client-ca needs TLS: give --tls-cert and --tls-key too")
    tokens = Path(config.auth_tokens) if config.auth_tokens else None
    return Authenticator(tokens, mutual_tls=bool(config.tls_client_ca)), credentials


def _job_store(config: ServerConfig) -> JobStore:
    """The store --job-store names: memory, or Redis shared by replicas."""
    url = config.job_store
    if url == "memory":
        return MemoryJobStore(
            config.max_pending_jobs,
            config.job_ttl_s,
            config.max_finished_jobs,
            config.max_pending_jobs_per_tenant,
        )
    if url.startswith(("redis://", "rediss://", "unix://")):
        from tensorgate.server.jobs.redis_store import RedisJobStore

        return RedisJobStore(
            url,
            max_pending=config.max_pending_jobs,
            ttl_s=config.job_ttl_s,
            max_finished=config.max_finished_jobs,
            max_attempts=config.job_max_attempts,
            lease_s=config.job_lease_s,
            max_per_tenant=config.max_pending_jobs_per_tenant,
        )
    raise ConfigError(
        f"--job-store {url!r}: expected 'memory' or a Redis URL such as "
        "redis://localhost:6379/0 (rediss:// for TLS)"
    )
