"""The standard grpc.health.v1 service, reporting the server and each model.

Service names: "" and "tensorgate.v1.Inference" for the server as a whole; each model under its own
name; "tensorgate.jobs" for the job store. Everything starts NOT_SERVING (the library's default for
"" is SERVING); the server turns SERVING only once the models are loaded and warm, the job store
once it can accept jobs.
"""

from __future__ import annotations

from collections.abc import Iterable

from grpc_health.v1 import health, health_pb2

SERVER_SERVICES = ("", "tensorgate.v1.Inference")
# The job store: NOT_SERVING while Submit cannot accept jobs (Redis unreachable).
JOBS_SERVICE = "tensorgate.jobs"
# With several serving processes, each answers SERVING for its own name only.
WORKER_SERVICE_PREFIX = "tensorgate.worker."

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class HealthReporter:
    def __init__(self) -> None:
        self.servicer = health.aio.HealthServicer()

    async def starting(self, models: Iterable[str]) -> None:
        for service in (*SERVER_SERVICES, JOBS_SERVICE, *models):
            await self.servicer.set(service, NOT_SERVING)

    async def set_model(self, model: str, serving: bool) -> None:
        await self.servicer.set(model, SERVING if serving else NOT_SERVING)

    async def set_jobs(self, serving: bool) -> None:
        await self.servicer.set(JOBS_SERVICE, SERVING if serving else NOT_SERVING)

    async def set_worker(self, index: int) -> None:
        """Names this process among several (--workers): tensorgate.worker.<index>."""
        await self.servicer.set(f"{WORKER_SERVICE_PREFIX}{index}", SERVING)

    async def set_server(self, serving: bool) -> None:
        for service in SERVER_SERVICES:
            await self.servicer.set(service, SERVING if serving else NOT_SERVING)

    async def shutting_down(self) -> None:
        """Every service NOT_SERVING, for good."""
        await self.servicer.enter_graceful_shutdown()
