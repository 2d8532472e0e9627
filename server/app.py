"""The composition root: builds every part, owns start-up and shutdown.

start:    bind the port with health NOT_SERVING → load and warm every model (off the loop) → start
          batchers and job feeders → health SERVING.
stop:     health NOT_SERVING and refuse new work → let in-flight calls finish within the grace
          period → drain batchers → close backends.
"""

from __future__ import annotations

import asyncio
import logging

import grpc
from grpc_health.v1 import health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from tensorgate.v1 import inference_pb2, inference_pb2_grpc

from server.api.health import HealthReporter
from server.api.servicer import InferenceServicer
from server.config import ConfigError, ServerConfig
from server.dataplane import DataPlane
from server.jobs.runner import JobRunner
from server.model import ModelState, ServedModel
from server.repository import discover

log = logging.getLogger(__name__)


class TensorgateServer:
    """One gRPC server over one data plane. Construction does no I/O; call start()."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.models: dict[str, ServedModel] = {}
        self.port = 0
        self.health = HealthReporter()
        self._grpc: grpc.aio.Server | None = None
        self._jobs: JobRunner | None = None
        self.plane: DataPlane | None = None
        self._stopped = asyncio.Event()

    async def start(self) -> None:
        config = self.config
        model_configs = await asyncio.to_thread(discover, config.model_repository, config.models)
        self.models = {c.name: ServedModel(c) for c in model_configs}
        self._jobs = JobRunner(
            self.models, config.max_pending_jobs, config.job_ttl_s, config.max_result_wait_s
        )
        self.plane = DataPlane(self.models, self._jobs)

        server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", config.max_message_bytes),
                ("grpc.max_send_message_length", config.max_message_bytes),
                ("grpc.so_reuseport", 0),
            ]
        )
        inference_pb2_grpc.add_InferenceServicer_to_server(
            InferenceServicer(self.plane, config.max_inflight_per_stream), server
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health.servicer, server)
        reflection.enable_server_reflection(
            (
                inference_pb2.DESCRIPTOR.services_by_name["Inference"].full_name,
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
        model.start()
        await self.health.set_model(model.name, True)

    async def stop(self, grace_s: float | None = None) -> None:
        """Graceful shutdown; safe to call more than once."""
        if self._stopped.is_set():
            return
        grace_s = self.config.shutdown_grace_s if grace_s is None else grace_s
        await self.health.shutting_down()
        if self.plane is not None:
            self.plane.accepting = False
        if self._grpc is not None:
            await self._grpc.stop(grace_s)
        if self._jobs is not None:
            await self._jobs.stop()
        for model in self.models.values():
            if model.state is ModelState.READY:
                await model.stop()
        self._stopped.set()
        log.info("stopped")

    async def wait_stopped(self) -> None:
        await self._stopped.wait()
