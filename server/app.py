"""The composition root: builds every part, owns start-up and shutdown.

start:    bind the port with health NOT_SERVING → load and warm every model (off the loop) → start
          batchers and job feeders → health SERVING.
stop:     health NOT_SERVING and refuse new work → let in-flight calls finish within the grace
          period → drain batchers → close backends.
"""

from __future__ import annotations

import asyncio
import logging
import time

import grpc
from grpc_health.v1 import health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from server.api.health import HealthReporter
from server.api.kserve import KServeServicer
from server.api.rpc import Frontend
from server.api.servicer import InferenceServicer
from server.config import ConfigError, ServerConfig
from server.dataplane import DataPlane
from server.jobs.runner import JobRunner
from server.model import ModelState, ServedModel
from server.repository import discover
from server.telemetry import Metrics, Telemetry, Tracing
from tensorgate.kserve import grpc_service_pb2, grpc_service_pb2_grpc
from tensorgate.v1 import inference_pb2, inference_pb2_grpc

log = logging.getLogger(__name__)


class TensorgateServer:
    """One gRPC server over one data plane. Construction does no I/O; call start()."""

    def __init__(self, config: ServerConfig, tracing: Tracing | None = None) -> None:
        """tracing: defaults to the standard OTEL_* environment (off unless configured)."""
        self.config = config
        self._tracing = tracing
        self.telemetry: Telemetry | None = None
        self.metrics_port = 0
        self.models: dict[str, ServedModel] = {}
        self.port = 0
        self.health = HealthReporter()
        self._grpc: grpc.aio.Server | None = None
        self._jobs: JobRunner | None = None
        self.plane: DataPlane | None = None
        self._stopped = asyncio.Event()
        self._stopping = False
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        config = self.config
        model_configs = await asyncio.to_thread(discover, config.model_repository, config.models)
        self.models = {c.name: ServedModel(c) for c in model_configs}
        tracing = self._tracing if self._tracing is not None else Tracing.from_env()
        self.telemetry = Telemetry(tracing, Metrics())
        self.telemetry.metrics.watch(self._state)
        self._jobs = JobRunner(
            self.models,
            config.max_pending_jobs,
            config.job_ttl_s,
            config.max_result_wait_s,
            config.job_max_attempts,
            config.job_retry_base_s,
            config.max_finished_jobs,
            self.telemetry,
        )
        self.plane = DataPlane(self.models, self._jobs, self.telemetry)

        server = grpc.aio.server(
            options=config.grpc_options(),
            maximum_concurrent_rpcs=config.max_concurrent_rpcs or None,
        )
        frontend = Frontend(self.plane, config.max_inflight_per_stream)
        inference_pb2_grpc.add_InferenceServicer_to_server(InferenceServicer(frontend), server)
        grpc_service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(
            KServeServicer(frontend), server
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health.servicer, server)
        reflection.enable_server_reflection(
            (
                inference_pb2.DESCRIPTOR.services_by_name["Inference"].full_name,
                grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name,
                "grpc.health.v1.Health",
                reflection.SERVICE_NAME,
            ),
            server,
        )
        self.port = server.add_insecure_port(f"{config.host}:{config.port}")
        if self.port == 0:
            raise ConfigError(f"cannot listen on {config.host}:{config.port}")
        self._grpc = server
        await self.health.starting(self.models)
        await server.start()
        log.info(
            "listening on %s:%d; loading %d model(s)", config.host, self.port, len(self.models)
        )

        await asyncio.gather(*(self._load(model) for model in self.models.values()))
        ready = [m for m in self.models.values() if m.state is ModelState.READY]
        if not ready:
            await self.stop()
            failures = "; ".join(m.failure for m in self.models.values())
            raise ConfigError(f"no model could be loaded: {failures}")
        self._jobs.start()
        if config.metrics_port >= 0:
            self.metrics_port = self.telemetry.metrics.serve(config.metrics_port, config.host)
            log.info("metrics on http://%s:%d/metrics", config.host, self.metrics_port)
        await self.health.set_server(True)
        log.info("serving %s on port %d", ", ".join(m.name for m in ready), self.port)

    async def _load(self, model: ServedModel) -> None:
        try:
            await asyncio.to_thread(model.load)
        except Exception as exc:
            log.error("model %s failed to load: %s", model.name, exc)
            model.fail(str(exc))
            await asyncio.to_thread(model.close)
            return
        model.start(lambda healthy: self._model_health(model, healthy), self.telemetry)
        await self.health.set_model(model.name, True)

    def _model_health(self, model: ServedModel, healthy: bool) -> None:
        if healthy:
            log.info("model %s works again: SERVING", model.name)
        else:
            log.error("model %s: its engine keeps failing: NOT_SERVING", model.name)
        task = asyncio.create_task(self.health.set_model(model.name, healthy))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def stop(self, grace_s: float | None = None) -> None:
        """Graceful shutdown; safe to call more than once (later calls wait for the first).

        Health turns NOT_SERVING and new work is refused with UNAVAILABLE at once, while the
        server still answers: in-flight calls and accepted jobs get the grace period to finish,
        and GetResult keeps working so callers collect their results. Jobs still unfinished then
        turn FAILED (UNAVAILABLE), so none vanishes without a final status. Only then does gRPC
        stop, and the batchers and backends after it.
        """
        if self._stopping:
            await self._stopped.wait()
            return
        self._stopping = True
        grace_s = self.config.shutdown_grace_s if grace_s is None else grace_s
        deadline = time.monotonic() + grace_s
        await self.health.shutting_down()
        if self.plane is not None:
            self.plane.accepting = False
            drained = await self.plane.drain(deadline)
            assert self._jobs is not None
            left = self._jobs.fail_unfinished("the server shut down before the job finished")
            if not drained:
                log.warning(
                    "grace period over: %d request(s) still in flight, %d job(s) failed "
                    "unfinished%s",
                    self.plane.inflight,
                    len(left),
                    ": " + ", ".join(job.id for job in left[:20]) if left else "",
                )
        if self._grpc is not None:
            # Long-polls see the final statuses set above before the transport goes.
            await self._grpc.stop(max(deadline - time.monotonic(), 0.5))
        if self._jobs is not None:
            await self._jobs.stop()
        for model in self.models.values():
            if model.state is ModelState.READY:
                await model.stop()
        if self.telemetry is not None:
            self.telemetry.metrics.close()
            await asyncio.to_thread(self.telemetry.tracing.shutdown)  # flushes pending spans
        self._stopped.set()
        log.info("stopped")

    def _state(self) -> dict[str, dict[str, int]]:
        """Current state for the metrics scrape (runs on the scrape thread: reads only)."""
        queue_depth, busy, instances = {}, {}, {}
        for name, model in list(self.models.items()):
            if model.state is ModelState.READY:
                batcher = model.batcher
                queue_depth[name] = batcher.queued_requests
                busy[name] = model.busy_instances
                instances[name] = model.instance_total
        jobs = self._jobs.store.count_by_status() if self._jobs is not None else {}
        return {
            "queue_depth": queue_depth,
            "busy_instances": busy,
            "instances": instances,
            "jobs": jobs,
        }

    async def wait_stopped(self) -> None:
        await self._stopped.wait()
