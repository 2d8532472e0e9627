"""Server settings (flags with TENSORGATE_* environment equivalents) and per-model config files."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MODEL_CONFIG_FILE = "config.toml"
# The backends a model's config may name (server/backends/ has one module each).
BACKENDS = ("onnxruntime", "tensorrt", "python")
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
    # Label request metrics with the tenant (a series per tenant: for a few tenants only).
    metrics_tenant_label: bool = flag(
        False, "label request metrics with the tenant (for a few tenants only)"
    )
    # This process's index among the workers (-1: the only one). A worker answers the health name
    # tensorgate.worker.<index> SERVING, which tells a client which process its connection reached.
    worker_index: int = -1

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


@dataclass(slots=True, frozen=True)
class StateSpec:
    """One piece of a sequence's state: fed to the engine as `input`, read back from `output`.

    shape is one sequence's state without the batch axis; batch_axis is where the engine wants
    the batch axis in the full tensor (Silero VAD's state is [2, batch, 128]: batch_axis 1)."""

    input: str
    output: str
    datatype: str
    shape: tuple[int, ...]
    batch_axis: int = 0
    initial: float = 0.0


@dataclass(slots=True, frozen=True)
class ConstantSpec:
    """An engine input the server supplies to every batch unchanged (a sample rate, say); it has
    no batch axis."""

    input: str
    datatype: str
    shape: tuple[int, ...]
    value: float | int


@dataclass(slots=True, frozen=True)
class SequenceConfig:
    """[sequence] of a stateful model's config.toml (batching/sequences.py)."""

    state: tuple[StateSpec, ...]
    constants: tuple[ConstantSpec, ...] = ()
    # Live sequences at most; a sequence_start beyond them is refused with RESOURCE_EXHAUSTED.
    max_sequences: int = 1000
    # A sequence that gets no chunk for this long is freed.
    idle_timeout_s: float = 60.0


@dataclass(slots=True)
class ModelConfig:
    """engines/<model>/config.toml: how one model is run and batched."""

    name: str
    path: Path
    backend: str
    max_batch_size: int = 32
    max_queue_delay_s: float = 0.002
    # A batch that reaches one of these sizes goes out without waiting for max_queue_delay_s.
    preferred_batch_sizes: tuple[int, ...] = ()
    # GPU models: pad a batch with zero rows up to the next preferred size (engines tuned for
    # those shapes run them faster than odd sizes).
    pad_to_preferred: bool = False
    # Send a batch at once while another instance is idle, instead of waiting up to
    # max_queue_delay_s for company: lower latency at low load, smaller batches near saturation.
    eager_dispatch: bool = False
    # "adaptive" (the default): wait for company only when it is coming soon enough to be worth
    # it (batching/policy.py); "static": always wait up to max_queue_delay_s.
    batching: str = "adaptive"
    # Priorities of requests that set none (higher is taken first): interactive calls, and jobs
    # (below them unless configured). A passed-over request waits at most priority_aging_s.
    default_priority: int = 0
    job_priority: int = -1
    priority_aging_s: float = 0.1
    # Adaptive batching keeps queue wait plus run time within this while the load allows; 0 = none.
    latency_budget_s: float = 0.0
    # Most requests waiting in the model's queue; more are refused with RESOURCE_EXHAUSTED.
    queue_capacity: int = 1024
    instance_count: int = 1
    # Watchdog: a batch still running after this long fails with UNAVAILABLE and its instance is
    # replaced.
    execution_timeout_s: float = 30.0
    # Deadline for unary and stream requests whose caller set none; 0 = none.
    default_timeout_s: float = 0.0
    # The backend's own table, e.g. [onnxruntime] intra_op_threads = 1.
    backend_options: dict[str, Any] = field(default_factory=dict)
    # Set for a stateful model: its requests belong to sequences whose state the server keeps.
    sequence: SequenceConfig | None = None

    @classmethod
    def load(cls, model_dir: Path) -> ModelConfig:
        """Reads and checks model_dir/config.toml."""
        path = model_dir / MODEL_CONFIG_FILE
        try:
            raw = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path} does not exist") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: {exc}") from None
        backend = raw.pop("backend", None)
        if not isinstance(backend, str):
            raise ConfigError(f"{path}: 'backend' must name a backend, e.g. \"onnxruntime\"")
        if backend not in BACKENDS:
            raise ConfigError(f"{path}: {_unknown_backend(backend)}")
        delay_ms = raw.pop("max_queue_delay_ms", 2.0)
        config = cls(
            name=model_dir.name,
            path=model_dir,
            backend=backend,
            max_batch_size=_int(raw.pop("max_batch_size", 32), "max_batch_size", path, low=1),
            max_queue_delay_s=_number(delay_ms, "max_queue_delay_ms", path) / 1000.0,
            preferred_batch_sizes=tuple(
                sorted(
                    _int(v, "preferred_batch_sizes", path, low=1)
                    for v in raw.pop("preferred_batch_sizes", [])
                )
            ),
            pad_to_preferred=_bool(raw.pop("pad_to_preferred", False), "pad_to_preferred", path),
            eager_dispatch=_bool(raw.pop("eager_dispatch", False), "eager_dispatch", path),
            batching=_choice(raw.pop("batching", "adaptive"), "batching", path, _POLICIES),
            latency_budget_s=_number(raw.pop("latency_budget_ms", 0), "latency_budget_ms", path)
            / 1000.0,
            default_priority=_int(
                raw.pop("default_priority", 0), "default_priority", path, low=-1000
            ),
            job_priority=_int(raw.pop("job_priority", -1), "job_priority", path, low=-1000),
            priority_aging_s=_number(raw.pop("priority_aging_ms", 100), "priority_aging_ms", path)
            / 1000.0,
            queue_capacity=_int(raw.pop("queue_capacity", 1024), "queue_capacity", path, low=1),
            instance_count=_int(raw.pop("instance_count", 1), "instance_count", path, low=1),
            execution_timeout_s=_number(
                raw.pop("execution_timeout_ms", 30_000), "execution_timeout_ms", path
            )
            / 1000.0,
            default_timeout_s=_number(raw.pop("default_timeout_ms", 0), "default_timeout_ms", path)
            / 1000.0,
            backend_options=dict(raw.pop(backend, {})),
            sequence=_sequence(raw.pop("sequence"), path) if "sequence" in raw else None,
        )
        if raw:
            raise ConfigError(f"{path}: {_unknown_keys(raw, backend)}")
        too_big = [s for s in config.preferred_batch_sizes if s > config.max_batch_size]
        if too_big:
            raise ConfigError(f"{path}: preferred_batch_sizes {too_big} exceed max_batch_size")
        return config


_MODEL_KEYS = (
    "backend", "max_batch_size", "max_queue_delay_ms", "preferred_batch_sizes",
    "pad_to_preferred", "eager_dispatch", "batching", "latency_budget_ms", "default_priority",
    "job_priority", "priority_aging_ms", "queue_capacity", "instance_count",
    "execution_timeout_ms", "default_timeout_ms", "sequence",
)  # fmt: skip


_DATATYPES = ("FP32", "FP16", "FP64", "INT8", "INT16", "INT32", "INT64", "UINT8", "BOOL")


def _sequence(raw: Any, path: Path) -> SequenceConfig:
    """[sequence] with its [[sequence.state]] pairs and [[sequence.constant]] inputs."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: 'sequence' must be a table ([sequence])")
    raw = dict(raw)
    states = raw.pop("state", [])
    constants = raw.pop("constant", [])
    if not isinstance(states, list) or not isinstance(constants, list):
        raise ConfigError(
            f"{path}: state and constant entries are arrays of tables: [[sequence.state]], "
            "[[sequence.constant]]"
        )
    config = SequenceConfig(
        state=tuple(_state(dict(entry), path, i) for i, entry in enumerate(states)),
        constants=tuple(_constant(dict(entry), path, i) for i, entry in enumerate(constants)),
        max_sequences=_int(raw.pop("max_sequences", 1000), "sequence.max_sequences", path, low=1),
        idle_timeout_s=_number(raw.pop("idle_timeout_ms", 60_000), "sequence.idle_timeout_ms", path)
        / 1000.0,
    )
    if raw:
        known = "state, constant, max_sequences, idle_timeout_ms"
        raise ConfigError(f"{path}: unknown [sequence] keys {sorted(raw)}; known: {known}")
    if config.idle_timeout_s <= 0:
        raise ConfigError(f"{path}: 'sequence.idle_timeout_ms' must be > 0")
    names = [s.input for s in config.state] + [c.input for c in config.constants]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ConfigError(f"{path}: [sequence] names input {repeated[0]!r} more than once")
    return config


def _entry_keys(entry: dict[str, Any], where: str, path: Path, known: tuple[str, ...]) -> None:
    unknown = sorted(set(entry) - set(known))
    if unknown:
        raise ConfigError(f"{path}: {where}: unknown keys {unknown}; known: {', '.join(known)}")
    missing = [k for k in known[:3] if k not in entry]
    if missing:
        raise ConfigError(f"{path}: {where}: '{missing[0]}' is missing")


def _state(entry: dict[str, Any], path: Path, index: int) -> StateSpec:
    where = f"[[sequence.state]] #{index + 1}"
    _entry_keys(
        entry, where, path, ("input", "output", "datatype", "shape", "batch_axis", "initial")
    )
    shape = _shape(entry.get("shape"), f"{where} shape", path)
    axis = _int(entry.get("batch_axis", 0), f"{where} batch_axis", path, low=0)
    if axis > len(shape):
        raise ConfigError(
            f"{path}: {where} batch_axis {axis} is out of range for shape {list(shape)} "
            "plus the batch axis"
        )
    return StateSpec(
        input=_name(entry["input"], f"{where} input", path),
        output=_name(entry["output"], f"{where} output", path),
        datatype=_choice(entry["datatype"], f"{where} datatype", path, _DATATYPES),
        shape=shape,
        batch_axis=axis,
        initial=_scalar(entry.get("initial", 0.0), f"{where} initial", path),
    )


def _constant(entry: dict[str, Any], path: Path, index: int) -> ConstantSpec:
    where = f"[[sequence.constant]] #{index + 1}"
    _entry_keys(entry, where, path, ("input", "datatype", "value", "shape"))
    return ConstantSpec(
        input=_name(entry["input"], f"{where} input", path),
        datatype=_choice(entry["datatype"], f"{where} datatype", path, _DATATYPES),
        shape=_shape(entry.get("shape", []), f"{where} shape", path),
        value=_scalar(entry["value"], f"{where} value", path),
    )


def _name(value: Any, key: str, path: Path) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{path}: {key} must name a tensor, got {value!r}")
    return value


def _shape(value: Any, key: str, path: Path) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in value
    ):
        raise ConfigError(f"{path}: {key} must be a list of sizes >= 1, got {value!r}")
    return tuple(value)


def _scalar(value: Any, key: str, path: Path) -> float | int:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{path}: {key} must be a number, got {value!r}")
    return value


def _unknown_backend(backend: str) -> str:
    import difflib

    close = difflib.get_close_matches(backend, BACKENDS, n=1, cutoff=0.4)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return f"unknown backend '{backend[:100]}'{hint}; known backends: {', '.join(BACKENDS)}"


def _unknown_keys(raw: dict[str, Any], backend: str) -> str:
    """Names the unknown keys, with the known key each was probably meant to be."""
    import difflib

    known = (*_MODEL_KEYS, backend)
    parts = []
    for key in sorted(raw):
        close = difflib.get_close_matches(key, known, n=1)
        parts.append(f"'{key}' (did you mean '{close[0]}'?)" if close else f"'{key}'")
    return "unknown keys " + ", ".join(parts) + f"; known keys: {', '.join(known)}"


_POLICIES = ("adaptive", "static")


def _choice(value: Any, key: str, path: Path, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ConfigError(f"{path}: '{key}' must be one of {', '.join(allowed)}, got {value!r}")
    return str(value)


def _int(value: Any, key: str, path: Path, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{path}: '{key}' must be an integer >= {low}, got {value!r}")
    return value


def _bool(value: Any, key: str, path: Path) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{path}: '{key}' must be true or false, got {value!r}")
    return value


def _number(value: Any, key: str, path: Path) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ConfigError(f"{path}: '{key}' must be a number >= 0, got {value!r}")
    return float(value)
