"""`tensorgate serve`: flags (each with a TENSORGATE_* environment equivalent) → ServerConfig →
the server, with signals wired to a graceful stop."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
from collections.abc import Callable
from pathlib import Path

from server.config import ConfigError, ServerConfig

log = logging.getLogger("tensorgate")


def _env(name: str, default: str) -> str:
    return os.environ.get(f"TENSORGATE_{name}", default)


def add_serve_command(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    defaults = ServerConfig()
    serve = commands.add_parser(
        "serve",
        help="serve the models of a repository over gRPC",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Each flag also reads TENSORGATE_<FLAG> from the environment "
        "(e.g. TENSORGATE_PORT=50052).",
    )
    serve.add_argument("--host", default=_env("HOST", defaults.host), help="address to listen on")
    serve.add_argument(
        "--port",
        type=int,
        default=int(_env("PORT", str(defaults.port))),
        help="gRPC port (0 = any free port)",
    )
    serve.add_argument(
        "--model-repository",
        type=Path,
        default=Path(_env("MODEL_REPOSITORY", str(defaults.model_repository))),
        help="folder with one sub-folder per model (default: engines)",
    )
    serve.add_argument(
        "--models",
        default=_env("MODELS", ""),
        help="comma-separated model names to serve (default: all in the repository)",
    )
    serve.add_argument(
        "--max-message-bytes",
        type=int,
        default=int(_env("MAX_MESSAGE_BYTES", str(defaults.max_message_bytes))),
        help="largest gRPC message received or sent",
    )
    serve.add_argument(
        "--max-inflight-per-stream",
        type=int,
        default=int(_env("MAX_INFLIGHT_PER_STREAM", str(defaults.max_inflight_per_stream))),
        help="requests of one stream held at once; past it the stream is not read",
    )
    serve.add_argument(
        "--max-pending-jobs",
        type=int,
        default=int(_env("MAX_PENDING_JOBS", str(defaults.max_pending_jobs))),
        help="unfinished jobs accepted at most; more get RESOURCE_EXHAUSTED",
    )
    serve.add_argument(
        "--job-ttl-s",
        type=float,
        default=float(_env("JOB_TTL_S", str(defaults.job_ttl_s))),
        help="how long a finished job's result is kept",
    )
    serve.add_argument(
        "--job-store",
        default=_env("JOB_STORE", defaults.job_store),
        help="where jobs are kept: memory (this process) or redis://HOST:PORT/DB, shared by "
        "replicas (rediss:// for TLS; password in the URL or REDIS_PASSWORD)",
    )
    for flag, help_text in (
        ("tls_cert", "PEM certificate (chain) of the gRPC port: TLS on"),
        ("tls_key", "PEM private key of --tls-cert"),
        ("tls_client_ca", "PEM CA: mutual TLS, clients need a certificate it signed"),
        ("auth_tokens", "file of 'TENANT SHA256HEX' lines: callers need a bearer token"),
    ):
        serve.add_argument(
            "--" + flag.replace("_", "-"), default=_env(flag.upper(), ""), help=help_text
        )
    serve.add_argument(
        "--metrics-tenant-label",
        action="store_true",
        default=_env("METRICS_TENANT_LABEL", "") not in ("", "0", "false"),
        help="label request metrics with the tenant (for a few tenants only)",
    )
    for flag, kind, help_text in (
        ("tenant_rate", float, "inference requests per second per tenant (0 = no limit)"),
        (
            "max_pending_jobs_per_tenant",
            int,
            "unfinished jobs per tenant (0 = no limit)",
        ),
        (
            "job_lease_s",
            float,
            "Redis store: jobs of a replica silent this long are taken over by another",
        ),
        ("max_finished_jobs", int, "finished job results kept; the oldest go first beyond it"),
        (
            "job_max_attempts",
            int,
            "attempts of a job whose engine call fails (INTERNAL/UNAVAILABLE)",
        ),
        ("job_retry_base_s", float, "first retry delay of a failed job; doubles, with jitter"),
        ("shutdown_grace_s", float, "time to drain in-flight calls and jobs on SIGTERM"),
        (
            "drain_delay_s",
            float,
            "on SIGTERM, keep serving this long with health NOT_SERVING before refusing work",
        ),
        (
            "max_concurrent_rpcs",
            int,
            "unary calls plus open streams served at once; more get RESOURCE_EXHAUSTED (0 = none)",
        ),
        ("keepalive_time_s", float, "ping idle connections this often"),
        ("keepalive_timeout_s", float, "drop a connection whose ping is not answered in this"),
        ("max_connection_idle_s", float, "close connections idle this long"),
        ("max_connection_age_s", float, "recycle connections this old (lets balancers rebalance)"),
    ):
        serve.add_argument(
            "--" + flag.replace("_", "-"),
            type=kind,
            default=kind(_env(flag.upper(), str(getattr(defaults, flag)))),
            help=help_text,
        )
    serve.add_argument(
        "--metrics-port",
        type=int,
        default=int(_env("METRICS_PORT", "8002")),
        help="Prometheus scrape endpoint (-1 = off)",
    )
    serve.add_argument(
        "--event-loop",
        choices=["auto", "uvloop", "asyncio"],
        default=_env("EVENT_LOOP", "auto"),
        help="auto: uvloop where installed, else asyncio",
    )
    serve.add_argument(
        "--workers",
        type=_workers,
        default=_env("WORKERS", "1"),
        help="serving processes sharing the port: a number, or auto (one per usable core); "
        "more than 1 needs --job-store redis://",
    )
    serve.add_argument(
        "--log-level", default=_env("LOG_LEVEL", "INFO"), help="DEBUG, INFO, WARNING or ERROR"
    )
    serve.set_defaults(func=_serve)


def _workers(value: str) -> int:
    if value == "auto":
        from server.workers import usable_cores

        return usable_cores()
    try:
        count = int(value)
    except ValueError:
        count = 0
    if count < 1:
        raise argparse.ArgumentTypeError(f"expected a number >= 1 or auto, got {value!r}")
    return count


def configure_logging(level: str, process: str = "") -> None:
    """Log lines name the process that wrote them when there are several (--workers)."""
    tag = f"[{process}] " if process else ""
    logging.basicConfig(
        level=level.upper(),
        format=f"%(asctime)s %(levelname)s {tag}%(name)s: %(message)s",
    )


def _serve(args: argparse.Namespace) -> int:
    workers: int = args.workers
    configure_logging(args.log_level, "supervisor pid %(process)d" if workers > 1 else "")
    config = ServerConfig(
        host=args.host,
        port=args.port,
        model_repository=args.model_repository,
        models=tuple(name for name in args.models.split(",") if name),
        max_message_bytes=args.max_message_bytes,
        max_inflight_per_stream=args.max_inflight_per_stream,
        max_pending_jobs=args.max_pending_jobs,
        job_ttl_s=args.job_ttl_s,
        job_store=args.job_store,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        tls_client_ca=args.tls_client_ca,
        auth_tokens=args.auth_tokens,
        tenant_rate=args.tenant_rate,
        max_pending_jobs_per_tenant=args.max_pending_jobs_per_tenant,
        metrics_tenant_label=args.metrics_tenant_label,
        job_lease_s=args.job_lease_s,
        max_finished_jobs=args.max_finished_jobs,
        metrics_port=args.metrics_port,
        job_max_attempts=args.job_max_attempts,
        job_retry_base_s=args.job_retry_base_s,
        shutdown_grace_s=args.shutdown_grace_s,
        drain_delay_s=args.drain_delay_s,
        max_concurrent_rpcs=args.max_concurrent_rpcs,
        keepalive_time_s=args.keepalive_time_s,
        keepalive_timeout_s=args.keepalive_timeout_s,
        max_connection_idle_s=args.max_connection_idle_s,
        max_connection_age_s=args.max_connection_age_s,
    )
    try:
        if workers > 1:
            from server.workers import Supervisor

            return Supervisor(config, workers, args.log_level, args.event_loop).run()
        with asyncio.Runner(loop_factory=loop_factory(args.event_loop)) as runner:
            runner.run(run_server(config))
    except ConfigError as exc:
        log.error("%s", exc)
        return 1
    return 0


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


async def run_server(config: ServerConfig, on_ready: Callable[[int], None] | None = None) -> None:
    """Serves until a signal stops the server. on_ready(metrics port) once it serves."""
    from server.app import TensorgateServer  # imports grpc and the backends' registry

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
