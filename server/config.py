"""Server settings: each a `tensorgate serve` flag with a TENSORGATE_* environment equivalent.
(A model's own settings, its config.toml, are model_config.py's.)"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_PENDING_REQUESTS = 1_000_000


class ConfigError(ValueError):
    """A configuration value is missing or out of range; the message names it."""


def flag(default: Any, help: str) -> Any:
    """A ServerConfig field that is also a `tensorgate serve` flag (--field-name) and an
    environment variable (TENSORGATE_FIELD_NAME): one declaration, so the flag's default, its help
    and the setting cannot disagree (server/cli.py builds the parser from these)."""
    return field(default=default, metadata={"help": help})


@dataclass(slots=True)
class ServerConfig:
    """Process-wide settings. Fields declared with flag() are `tensorgate serve` flags."""

    host: str = flag("0.0.0.0", "address to listen on")
    port: int = flag(50051, "gRPC port (0 = any free port)")
    model_repository: Path = flag(
        Path("engines"), "folder with one sub-folder per model (tensorgate build writes one)"
    )
    # Names of the models to serve; empty serves every model in the repository.
    models: tuple[str, ...] = flag((), "comma-separated model names to serve (empty: all)")
    max_message_bytes: int = flag(64 * 1024 * 1024, "largest gRPC message received or sent")
    max_inflight_per_stream: int = flag(
        128, "requests of one stream held at once; past it the stream is not read"
    )
    max_pending_jobs: int = flag(
        100_000, "unfinished jobs accepted at most; more get RESOURCE_EXHAUSTED"
    )
    job_ttl_s: float = flag(600.0, "how long a finished job's result is kept")
    # Finished results kept at most; beyond it the oldest go first, even before their TTL.
    max_finished_jobs: int = flag(
        100_000, "finished job results kept; the oldest go first beyond it"
    )
    # A job whose engine call fails with INTERNAL or UNAVAILABLE runs again, up to this many
    # attempts in all, after exponential backoff with jitter from job_retry_base_s.
    job_max_attempts: int = flag(
        3, "attempts of a job whose engine call fails (INTERNAL/UNAVAILABLE)"
    )
    job_retry_base_s: float = flag(0.1, "first retry delay of a failed job; doubles, with jitter")
    max_result_wait_s: float = 60.0
    # Where jobs are kept: "memory" (this process only) or redis://HOST:PORT/DB (rediss:// for
    # TLS), shared by every replica using it.
    job_store: str = flag(
        "memory",
        "where jobs are kept: memory (this process) or redis://HOST:PORT/DB, shared by replicas "
        "(rediss:// for TLS; password in the URL or REDIS_PASSWORD)",
    )
    # With a shared store: a job held by a replica that stops renewing it for this long (it died)
    # is taken over by another replica.
    job_lease_s: float = flag(
        30.0, "Redis store: jobs of a replica silent this long are taken over by another"
    )
    shutdown_grace_s: float = flag(10.0, "time to drain in-flight calls and jobs on SIGTERM")
    # On shutdown, health says NOT_SERVING while calls are still served for this long (part of
    # the grace period), so probes and load balancers move traffic away before the port closes.
    drain_delay_s: float = flag(
        2.0,
        "on SIGTERM, keep serving this long with health NOT_SERVING before refusing work "
        "(at most half of --shutdown-grace-s)",
    )
    # Prometheus scrape endpoint; -1 = off, 0 = any free port.
    metrics_port: int = flag(8002, "Prometheus scrape endpoint (-1 = off, 0 = any free port)")
    # Unary calls in progress plus streams open, over both front ends; more are refused with
    # RESOURCE_EXHAUSTED (the health service is never counted, so probes always answer). 0 = none.
    max_concurrent_rpcs: int = flag(
        10_000,
        "unary calls plus open streams served at once; more get RESOURCE_EXHAUSTED (0 = none)",
    )
    # Ping idle connections this often; drop a peer that does not answer in keepalive_timeout_s.
    keepalive_time_s: float = flag(60.0, "ping idle connections this often")
    keepalive_timeout_s: float = flag(20.0, "drop a connection whose ping is not answered in this")
    # Close connections idle this long; recycle any connection after max_connection_age_s so
    # clients re-resolve and load balancers can rebalance.
    max_connection_idle_s: float = flag(300.0, "close connections idle this long")
    max_connection_age_s: float = flag(
        1800.0, "recycle connections this old (lets balancers rebalance)"
    )
    # Several serving processes share the port (--workers): each binds it with SO_REUSEPORT and
    # serves its metrics on metrics_host (loopback) for the supervisor to add up.
    reuse_port: bool = False
    metrics_host: str = ""
    # TLS on the gRPC port (PEM files, re-read when they change); with tls_client_ca, mutual TLS:
    # clients must present a certificate that CA signed.
    tls_cert: str = flag("", "PEM certificate (chain) of the gRPC port: TLS on")
    tls_key: str = flag("", "PEM private key of --tls-cert")
    tls_client_ca: str = flag("", "PEM CA: mutual TLS, clients need a certificate it signed")
    # Callers' tokens: a file of `TENANT SHA256HEX` lines (re-read when it changes).
    auth_tokens: str = flag("", "file of 'TENANT SHA256HEX' lines: callers need a bearer token")
    # Per tenant: inference requests a second (0 = no limit) and unfinished jobs (0 = no limit).
    tenant_rate: float = flag(0.0, "inference requests per second per tenant (0 = no limit)")
    max_pending_jobs_per_tenant: int = flag(0, "unfinished jobs per tenant (0 = no limit)")
    # How the served models follow the repository while the server runs (server/control.py).
    model_control: str = flag(
        "none",
        "none: models fixed at start; poll: apply repository changes every "
        "--repository-poll-s; explicit: only the repository API loads and unloads",
    )
    repository_poll_s: float = flag(5.0, "poll mode: read the repository this often")
    # With auth on, the tenants that may use the repository API (load, unload, index).
    admin_tenants: tuple[str, ...] = flag(
        (), "tenants allowed the model repository API when auth is on (comma-separated)"
    )
    # Webhooks (SubmitRequest.callback): where the server may POST (none by default: it makes
    # requests on a caller's behalf), how they are signed, how hard it tries.
    webhook_allow: tuple[str, ...] = flag(
        (),
        "callback URLs allowed: comma-separated hosts, host:port, *.domain, IPs or CIDRs (none "
        "by default; private, loopback and link-local addresses only when named)",
    )
    webhook_secrets: str = flag(
        "", "file of 'TENANT whsec_...' lines signing webhooks (* for the rest); re-read on change"
    )
    webhook_max_attempts: int = flag(8, "webhook delivery attempts before it is dead-lettered")
    webhook_window_s: float = flag(
        3600.0, "time after the job finishes within which its webhook is retried"
    )
    webhook_max_body_bytes: int = flag(
        1 << 20, "largest webhook body; bigger results are left to GetResult"
    )
    webhook_timeout_s: float = flag(10.0, "time a webhook receiver has to answer one attempt")
    webhook_retry_base_s: float = flag(
        1.0, "first webhook retry delay; doubles, with jitter (Retry-After is honoured)"
    )
    webhook_max_connections: int = flag(
        64, "webhook requests in flight at most (a quarter of them to any one receiver)"
    )
    # Label request metrics with the tenant (a series per tenant: for a few tenants only).
    metrics_tenant_label: bool = flag(
        False, "label request metrics with the tenant (for a few tenants only)"
    )
    # This process's index among the workers (-1: the only one). A worker answers the health name
    # tensorgate.worker.<index> SERVING, which tells a client which process its connection reached.
    worker_index: int = -1
    # Under --workers: a file every worker appends its repository API changes to and follows,
    # so a load or unload that reaches one worker is applied by all (server/control.py).
    control_log: str = ""

    def grpc_options(self) -> list[tuple[str, int]]:
        """Channel arguments for the gRPC server (message sizes, keepalive, connection age)."""
        ms = 1000
        return [
            ("grpc.max_receive_message_length", self.max_message_bytes),
            ("grpc.max_send_message_length", self.max_message_bytes),
            ("grpc.so_reuseport", int(self.reuse_port)),
            # gRPC core cancels calls it has received but not yet handed to Python beyond these
            # (default 1,000): a burst would see CANCELLED, which callers read as their own
            # doing. Admission is the application's job (max_concurrent_rpcs).
            ("grpc.server.max_pending_requests", _PENDING_REQUESTS),
            ("grpc.server.max_pending_requests_hard_limit", _PENDING_REQUESTS),
            ("grpc.keepalive_time_ms", int(self.keepalive_time_s * ms)),
            ("grpc.keepalive_timeout_ms", int(self.keepalive_timeout_s * ms)),
            ("grpc.keepalive_permit_without_calls", 1),
            # Accept client keepalive pings down to every 10 s (clients' usual minimum).
            ("grpc.http2.min_recv_ping_interval_without_data_ms", 10 * ms),
            ("grpc.http2.max_ping_strikes", 2),
            ("grpc.max_connection_idle_ms", int(self.max_connection_idle_s * ms)),
            ("grpc.max_connection_age_ms", int(self.max_connection_age_s * ms)),
            ("grpc.max_connection_age_grace_ms", int(self.shutdown_grace_s * ms)),
        ]
