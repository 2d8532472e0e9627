"""A model's settings: engines/<model>/config.toml, read and checked (every mistake named by its
key and file). The repository (repository.py) finds the model folders; this reads each one."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tensorgate.server.config import ConfigError

MODEL_CONFIG_FILE = "config.toml"
# The backends a model's config may name (server/backends/ has one module each).
BACKENDS = ("onnxruntime", "tensorrt", "python")


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


@dataclass(slots=True, frozen=True)
class VersionPolicy:
    """Which of a model's version folders are served (Triton's version_policy): the `latest` N
    (by number), `all` of them, or the `specific` ones named."""

    kind: str = "latest"  # latest | all | specific
    latest: int = 1
    specific: tuple[str, ...] = ()

    def select(self, versions: list[str]) -> list[str]:
        """The versions served, of those present (numbers as strings), in ascending order."""
        ordered = sorted(versions, key=int)
        if self.kind == "all":
            return ordered
        if self.kind == "specific":
            return [v for v in ordered if v in self.specific]
        return ordered[-self.latest :]


@dataclass(slots=True)
class ModelConfig:
    """engines/<model>/config.toml: how one model is run and batched. One ModelConfig is one
    version: path is the folder its artifact is in (engines/<model>/<version>, or the model's
    folder itself for a flat layout, which is version 1)."""

    name: str
    path: Path
    backend: str
    version: str = "1"
    # Model-wide: which versions are served, and how the default route splits between them
    # ({version: weight}; empty: the highest version takes it all).
    version_policy: VersionPolicy = field(default_factory=VersionPolicy)
    traffic: dict[str, int] = field(default_factory=dict)
    # Changes whenever the version's files or the model's config.toml change (repository.py):
    # a reload replaces the versions whose stamp changed.
    stamp: tuple[tuple[str, int, int], ...] = ()
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
        """Reads and checks model_dir/config.toml (as version 1, its artifact beside it; the
        repository makes the versions of a model with numbered folders from it)."""
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
            version_policy=_version_policy(raw.pop("version_policy", None), path),
            traffic=_traffic(raw.pop("traffic", None), path),
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
    "backend", "version_policy", "traffic", "max_batch_size", "max_queue_delay_ms",
    "preferred_batch_sizes", "pad_to_preferred", "eager_dispatch", "batching",
    "latency_budget_ms", "default_priority", "job_priority", "priority_aging_ms",
    "queue_capacity", "instance_count", "execution_timeout_ms", "default_timeout_ms", "sequence",
)  # fmt: skip


_DATATYPES = ("FP32", "FP16", "FP64", "INT8", "INT16", "INT32", "INT64", "UINT8", "BOOL")


def _version_policy(raw: Any, path: Path) -> VersionPolicy:
    """version_policy = { latest = N } (default N = 1), "all", or { specific = [1, 3] }."""
    where = f"{path}: version_policy"
    if raw is None:
        return VersionPolicy()
    if raw == "all":
        return VersionPolicy("all")
    if isinstance(raw, dict) and set(raw) == {"latest"}:
        return VersionPolicy(
            "latest", latest=_int(raw["latest"], "version_policy.latest", path, low=1)
        )
    if isinstance(raw, dict) and set(raw) == {"specific"} and isinstance(raw["specific"], list):
        versions = raw["specific"]
        if not versions or not all(isinstance(v, int) and v >= 1 for v in versions):
            raise ConfigError(f"{where}: specific must list version numbers (1 and up)")
        return VersionPolicy("specific", specific=tuple(str(v) for v in versions))
    raise ConfigError(
        f'{where} must be {{ latest = N }}, "all" or {{ specific = [1, 3] }}; got {raw!r}'
    )


def _traffic(raw: Any, path: Path) -> dict[str, int]:
    """[traffic] weights = { "1" = 90, "2" = 10 }: how the default route splits by version."""
    if raw is None:
        return {}
    if not isinstance(raw, dict) or set(raw) != {"weights"} or not isinstance(raw["weights"], dict):
        raise ConfigError(f'{path}: [traffic] takes one key, weights = {{ "1" = 90, "2" = 10 }}')
    weights: dict[str, int] = {}
    for version, weight in raw["weights"].items():
        if not str(version).isdigit() or int(version) < 1:
            raise ConfigError(f"{path}: traffic.weights: {version!r} is not a version number")
        weights[str(int(version))] = _int(weight, f"traffic.weights.{version}", path, low=0)
    if not any(weights.values()):
        raise ConfigError(f"{path}: traffic.weights must give some version a weight above 0")
    return weights


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
