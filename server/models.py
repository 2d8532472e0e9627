"""The model set: the served models, and the only way to them.

The data plane (unary calls and stream items) and the job service both sit on it: they look a
model up by name, have a request admitted (checked against the request bounds and the model's
inputs, and decoded into numpy views, once), queue it and get its result future, and ask the wait
estimate and the share of a model's queue that jobs may hold. Neither knows how a model is
scheduled: the schedulers, batchers and instances behind each model are this module's business
(server/model.py holds one version's, versions.py the route between a model's versions; nothing
above the model set imports them).

A job is admitted where it is submitted. The process that runs it later, perhaps another replica,
rebuilds its request from what the store holds without checking it again (`admit_stored`): the
store is ours.

Each name has versions (versions.py): a request names one, or takes the model's default route
(a weighted split for canaries); the version that admits a request is the one it runs on, however
the routes change meanwhile, so a reload (apply) or an unload (remove) never fails what was
admitted. Room left here for what comes next: a response cache in front of the schedulers
(enqueue() is the one way in: an identical request in flight can share its future there, keyed
by the version that admitted it), pipelines whose
steps admit and enqueue to other models through this set, and models that answer one request
with many responses (a request's result becomes a stream instead of one future).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from tensorgate.server.errors import InvalidArgument, NotFound, Unavailable, clip
from tensorgate.server.inference import InferenceRequest
from tensorgate.server.limits import check_request
from tensorgate.server.model import ModelState, ServedModel
from tensorgate.server.model_config import ModelConfig
from tensorgate.server.records import (
    ModelInfo,
    ModelStatistics,
    RepositoryEntry,
    Request,
    RequestKind,
)
from tensorgate.server.telemetry import Telemetry
from tensorgate.server.telemetry.tracing import RequestTrace
from tensorgate.server.versions import ModelVersions

log = logging.getLogger(__name__)


@dataclass(slots=True, frozen=True)
class ModelLoad:
    """The state of one model's queue, read by the metrics scrape."""

    queued_requests: int
    busy_instances: int
    instances: int


class ModelLoadError(Exception):
    """A model (version) could not be loaded; what served before serves on."""


class ModelSet:
    """The served models, each with its versions. Construction does no I/O: load() (off the
    loop), then start(). apply() and remove() change a model while the server runs."""

    def __init__(self, configs: Sequence[ModelConfig], retire_bound_s: float = 60.0) -> None:
        """configs: one per version (several of one name are its versions). retire_bound_s: the
        longest a replaced or unloaded version is given to finish what it was given (and its
        sequences) before it is released anyway."""
        self._models: dict[str, ModelVersions] = {}
        for config in configs:
            versions = self._models.setdefault(config.name, ModelVersions(config.name))
            versions.route_to(
                {**versions.serving, config.version: ServedModel(config)}, config.traffic
            )
        self._retire_bound_s = retire_bound_s
        self._on_ready: Callable[[str, bool], None] = lambda name, ready: None
        self._reported: dict[str, bool] = {}
        self._telemetry: Telemetry | None = None
        self._locks: dict[str, asyncio.Lock] = collections.defaultdict(asyncio.Lock)
        self._retiring: set[asyncio.Task[None]] = set()
        # Why a model that is not served could not be loaded (the repository index shows it).
        self.load_failures: dict[str, str] = {}

    # --- lifecycle (the composition root's) ---------------------------------------------------

    def __len__(self) -> int:
        return len(self._models)

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._models))

    def __contains__(self, name: object) -> bool:
        return name in self._models

    def __getitem__(self, name: str) -> ServedModel:
        """The served model itself (its highest version), for the composition root and tests;
        requests go through admit() and enqueue()."""
        return self._models[name].primary

    def versions(self, name: str) -> list[str]:
        """The versions of a model that requests are routed to."""
        return list(self._versions(name).serving)

    async def load(self) -> None:
        """Loads and warms every version, in parallel, off the loop. A version that fails to load
        is left FAILED with the reason (the others serve)."""
        await asyncio.gather(*(self._load(m) for v in self._models.values() for m in v.every()))

    async def _load(self, model: ServedModel) -> bool:
        try:
            await asyncio.to_thread(model.load)
            return True
        except Exception as exc:
            log.error("model %s version %s failed to load: %s", model.name, model.version, exc)
            model.fail(str(exc))
            await asyncio.to_thread(model.close)
            return False

    def start(
        self, on_ready: Callable[[str, bool], None], telemetry: Telemetry | None = None
    ) -> list[str]:
        """Starts the schedulers of the loaded versions on the running loop; on_ready(name,
        ready) hears every change of a model's readiness (ready: a served version is). Returns
        the models that serve."""
        self._on_ready, self._telemetry = on_ready, telemetry
        for versions in self._models.values():
            for model in versions.serving.values():
                if model.state is ModelState.LOADING:
                    self._start(model)
        return self.serving()

    def _start(self, model: ServedModel) -> None:
        model.start(lambda ready, name=model.name: self._notify(name), self._telemetry)  # type: ignore[misc]

    def _notify(self, name: str) -> None:
        versions = self._models.get(name)
        ready = versions is not None and versions.ready
        if self._reported.get(name) != ready:
            self._reported[name] = ready
            self._on_ready(name, ready)

    def serving(self) -> list[str]:
        """The models with a version started and not stopped (ready or recovering)."""
        return [
            name
            for name, versions in self._models.items()
            if any(m.state is ModelState.READY for m in versions.serving.values())
        ]

    def failures(self) -> str:
        return "; ".join(
            m.failure for v in self._models.values() for m in v.serving.values() if m.failure
        )

    async def stop(self, deadline: float) -> None:
        """Finishes queued and running work until the monotonic deadline, then releases every
        version (what is left fails with UNAVAILABLE)."""
        for task in list(self._retiring):
            task.cancel()
        await asyncio.gather(
            *(
                m.stop(deadline)
                for v in self._models.values()
                for m in v.every()
                if m.state is ModelState.READY
            )
        )

    async def close(self) -> None:
        """Releases models that never started (a stop during start-up)."""
        for versions in self._models.values():
            for model in versions.every():
                await asyncio.to_thread(model.close)

    # --- changes while serving (model control) --------------------------------------------------

    async def apply(self, name: str, configs: Sequence[ModelConfig]) -> list[str]:
        """Makes the served versions of `name` those of configs (the repository as it is now):
        the new and changed ones are loaded and warmed beside what serves, and requests move to
        them only once all are ready; the versions they replace retire. A version that fails to
        load raises ModelLoadError with the cause and leaves what served untouched. Returns the
        versions loaded."""
        async with self._locks[name]:
            current = self._models.get(name)
            kept: dict[str, ServedModel] = {}
            fresh: list[ServedModel] = []
            for config in configs:
                old = current.serving.get(config.version) if current is not None else None
                if old is not None and old.config.stamp == config.stamp and old.ready:
                    kept[config.version] = old
                else:
                    fresh.append(ServedModel(config))
            loaded = await asyncio.gather(*(self._load(model) for model in fresh))
            if not all(loaded):
                causes = "; ".join(
                    f"version {m.version}: {m.failure}"
                    for m, ok in zip(fresh, loaded, strict=True)
                    if not ok
                )
                for model in fresh:
                    await asyncio.to_thread(model.close)
                self.load_failures[name] = causes
                serving = "the versions serving keep serving" if current else "it is not served"
                raise ModelLoadError(f"model '{name}' failed to load ({causes}); {serving}")
            for model in fresh:
                self._start(model)
            versions = current or ModelVersions(name)
            replaced = [m for m in versions.serving.values() if m not in kept.values()]
            traffic = configs[-1].traffic if configs else {}
            versions.route_to({**kept, **{m.version: m for m in fresh}}, traffic)
            self._models[name] = versions
            self.load_failures.pop(name, None)
            for model in replaced:
                self._retire(versions, model)
            self._notify(name)
            if fresh or replaced:
                log.info(
                    "model %s: serving version(s) %s%s",
                    name,
                    ", ".join(versions.serving),
                    f"; retiring {', '.join(m.version for m in replaced)}" if replaced else "",
                )
            return [m.version for m in fresh]

    async def remove(self, name: str) -> None:
        """Unloads a model: no new request reaches it (NOT_FOUND), and its versions retire."""
        async with self._locks[name]:
            versions = self._versions(name)
            del self._models[name]
            for model in list(versions.serving.values()):
                self._retire(versions, model)
            versions.route_to({}, {})
            self._reported[name] = False
            self._on_ready(name, False)
            log.info("model %s: unloaded; its versions finish what they were given", name)

    def _retire(self, versions: ModelVersions, model: ServedModel) -> None:
        versions.retiring.append(model)
        task = asyncio.create_task(self._release(versions, model), name=f"retire-{model.name}")
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def _release(self, versions: ModelVersions, model: ServedModel) -> None:
        """Waits until a retiring version has finished what it was given (bounded), then stops
        and releases it."""
        deadline = time.monotonic() + self._retire_bound_s
        while not model.idle and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        if not model.idle:
            log.warning(
                "model %s version %s: released with %d request(s) and %d sequence(s) unfinished "
                "after %.0f s",
                model.name, model.version, model.admitted, model.live_sequences,
                self._retire_bound_s,
            )  # fmt: skip
        if model.state is ModelState.READY:
            await model.stop(time.monotonic() + 2.0)
        else:
            await asyncio.to_thread(model.close)
        if model in versions.retiring:
            versions.retiring.remove(model)

    # --- requests ---------------------------------------------------------------------------

    def admit(self, request: Request, kind: RequestKind) -> InferenceRequest:
        """Checks a request against the bounds and its model version, and decodes it (zero-copy)
        into the record the schedulers take, with the future its result will settle. Raises the
        domain error that names what is wrong."""
        check_request(request)
        model = self._route(request)
        if kind is not RequestKind.JOB:
            # The caller's metrics name the version that took (or refused) it. (A job's payload
            # keeps what was asked for: it is routed again when it runs.)
            request.model_version = model.version
        return model.admit(request, kind)

    def admit_stored(self, payload: Request) -> InferenceRequest:
        """A job's request as the store holds it, admitted when it was submitted: decoded again
        (it may have crossed processes), not checked again."""
        return self._route(payload).admit_stored(payload)

    def enqueue(self, request: InferenceRequest, model: str) -> None:
        """Queues an admitted request on the version that admitted it; RESOURCE_EXHAUSTED when
        its queue is full, UNAVAILABLE when it cannot take work."""
        target: ServedModel | None = request.target
        if target is None:
            target = self._taking(model)
        elif target.state is not ModelState.READY:
            raise Unavailable(target.not_ready_message())
        target.scheduler.put(request)

    def again(self, request: InferenceRequest, trace: RequestTrace | None) -> InferenceRequest:
        """The same admitted request for another attempt (a retried job), on the same version,
        which counts it as its own until it settles (a retiring version waits for it)."""
        retry = request.again(trace)
        target: ServedModel | None = retry.target
        if target is not None:
            target.track(retry)
        return retry

    def end_sequences(self, owner: str) -> None:
        """A stream ended: frees the sequences it was driving, on every stateful model."""
        for versions in self._models.values():
            for model in versions.every():
                model.end_sequences(owner)

    def _route(self, request: Request) -> ServedModel:
        model = self._versions(request.model).route(
            request.model_version, request.tenant, request.sequence
        )
        model.check_taking()
        return model

    # --- questions ----------------------------------------------------------------------------

    def takes_jobs(self, name: str) -> bool:
        """Whether a model's requests may run as jobs (stateful models' sequences may not)."""
        return self.get(name).config.sequence is None

    def wait_estimate_s(self, name: str, extra_rows: int = 0) -> float:
        """Time to work through the model's queued rows plus extra_rows at its observed rate."""
        versions = self._models.get(name)
        if versions is None or not versions.serving:
            return 0.0
        model = versions.primary
        if model.state is not ModelState.READY:
            return 0.0
        return model.estimated_wait_s(extra_rows)

    def job_capacity(self, name: str) -> int:
        """Requests of jobs that one process holds for a model at once: a few batches ahead of
        its instances, so a burst of jobs neither fills the queue interactive callers share nor
        is refused (the rest wait in the job store)."""
        model = self.get(name)
        return 2 * model.max_batch_size * model.config.instance_count

    def ready(self, name: str, version: str = "") -> bool:
        if version:
            return self.get(name, version).ready
        return self._versions(name).ready

    def all_ready(self) -> bool:
        return all(v.ready for v in self._models.values())

    def info(self, name: str, version: str = "") -> ModelInfo:
        versions = self._versions(name)
        model = versions.version(version) if version else versions.primary
        config = model.config
        return ModelInfo(
            name=model.name,
            backend=config.backend,
            ready=model.ready if version else versions.ready,
            inputs=model.inputs,
            outputs=model.outputs,
            max_batch_size=model.max_batch_size,
            instance_count=config.instance_count,
            max_queue_delay_s=config.max_queue_delay_s,
            preferred_batch_sizes=config.preferred_batch_sizes,
            reason="" if model.ready else model.not_ready_message(),
            version=model.version,
            versions=tuple(versions.serving),
            traffic=dict(versions.traffic),
        )

    def infos(self) -> list[ModelInfo]:
        return [self.info(name) for name in list(self._models)]

    def statistics(self, name: str = "", version: str = "") -> list[ModelStatistics]:
        """Counters of one version, of every version of one model, or of every model's versions
        that have served."""
        if name:
            versions = self._versions(name)
            chosen = [versions.version(version)] if version else list(versions.serving.values())
            for model in chosen:
                if model.state is not ModelState.READY:
                    raise Unavailable(model.not_ready_message())
            return [model.statistics() for model in chosen]
        return [
            m.statistics()
            for v in self._models.values()
            for m in v.serving.values()
            if m.state is ModelState.READY
        ]

    def load_now(self) -> dict[str, ModelLoad]:
        """Each serving model's queue and instances now, over its versions (read by the metrics
        scrape, from its own thread: reads only)."""
        load = {}
        for name, versions in list(self._models.items()):
            started = [m for m in versions.every() if m.state is ModelState.READY]
            if started:
                load[name] = ModelLoad(
                    sum(m.queued_requests for m in started),
                    sum(m.busy_instances for m in started),
                    sum(m.instance_total for m in started),
                )
        return load

    def states(self) -> list[RepositoryEntry]:
        """Every version loaded or retiring (the repository index)."""
        rows = []
        for name, versions in list(self._models.items()):
            for model in versions.serving.values():
                reason = "" if model.ready else model.not_ready_message()
                state = "READY" if model.ready else "UNAVAILABLE"
                rows.append(RepositoryEntry(name, model.version, state, reason))
            for model in versions.retiring:
                rows.append(RepositoryEntry(name, model.version, "UNLOADING", "finishing its work"))
        return rows

    def stamps(
        self, name: str
    ) -> tuple[dict[str, tuple[tuple[str, int, int], ...]], dict[str, int]]:
        """What a model serves now: {version: stamp} and its traffic split (empty when it is not
        served)."""
        versions = self._models.get(name)
        if versions is None:
            return {}, {}
        return {v: m.config.stamp for v, m in versions.serving.items()}, dict(versions.traffic)

    def metric_label(self, name: str) -> str:
        """The model label for metrics: unknown names collapse into one, so callers cannot grow
        the label set."""
        return name if name in self._models else "_unknown"

    def get(self, name: str, version: str = "") -> ServedModel:
        """The named version of a model (its highest when none is named), or NOT_FOUND naming
        the served models or versions."""
        versions = self._versions(name)
        return versions.version(version) if version else versions.primary

    def _versions(self, name: str) -> ModelVersions:
        versions = self._models.get(name)
        if versions is None or not versions.serving:
            known = ", ".join(self._models) or "none"
            raise NotFound(f"model '{clip(name)}' is not served; served models: {known}")
        return versions

    def _taking(self, name: str) -> ServedModel:
        """The model's default version, if it takes requests now (one whose engine keeps
        failing still does: a success is how it recovers)."""
        model = self.get(name)
        model.check_taking()
        return model


def stateful_job_error(name: str) -> InvalidArgument:
    return InvalidArgument(
        f"model '{name}' is stateful: its sequences run through Predict or StreamPredict, not as "
        "jobs"
    )
