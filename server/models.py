"""The model set: the served models, and the only way to them.

The data plane (unary calls and stream items) and the job service both sit on it: they look a
model up by name, have a request admitted (checked against the request bounds and the model's
inputs, and decoded into numpy views, once), queue it and get its result future, and ask the wait
estimate and the share of a model's queue that jobs may hold. Neither knows how a model is
scheduled: the schedulers, batchers and instances behind each model are this module's business
(server/model.py holds one model's; nothing else imports it).

A job is admitted where it is submitted. The process that runs it later, perhaps another replica,
rebuilds its request from what the store holds without checking it again (`admit_stored`): the
store is ours.

Room left here for what comes next: versions of a model and the route between them (the lookup,
get(), is where a version is chosen), a response cache in front of the schedulers (enqueue() is
the one way in: an identical request in flight can share its future there), pipelines whose
steps admit and enqueue to other models through this set, and models that answer one request
with many responses (a request's result becomes a stream instead of one future).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from tensorgate.server.errors import InvalidArgument, NotFound, Unavailable, clip
from tensorgate.server.inference import InferenceRequest
from tensorgate.server.limits import check_request
from tensorgate.server.model import ModelState, ServedModel
from tensorgate.server.model_config import ModelConfig
from tensorgate.server.records import ModelInfo, ModelStatistics, Request, RequestKind
from tensorgate.server.telemetry import Telemetry

log = logging.getLogger(__name__)


@dataclass(slots=True, frozen=True)
class ModelLoad:
    """The state of one model's queue, read by the metrics scrape."""

    queued_requests: int
    busy_instances: int
    instances: int


class ModelSet:
    """The served models. Construction does no I/O: load() (off the loop), then start()."""

    def __init__(self, configs: Sequence[ModelConfig]) -> None:
        self._models = {config.name: ServedModel(config) for config in configs}

    # --- lifecycle (the composition root's) ---------------------------------------------------

    def __len__(self) -> int:
        return len(self._models)

    def __iter__(self) -> Iterator[str]:
        return iter(self._models)

    def __contains__(self, name: object) -> bool:
        return name in self._models

    def __getitem__(self, name: str) -> ServedModel:
        """The served model itself, for the composition root and tests; requests go through
        admit() and enqueue()."""
        return self._models[name]

    async def load(self) -> None:
        """Loads and warms every model, in parallel, off the loop. A model that fails to load is
        left FAILED with the reason (the others serve)."""
        await asyncio.gather(*(self._load(model) for model in self._models.values()))

    async def _load(self, model: ServedModel) -> None:
        try:
            await asyncio.to_thread(model.load)
        except Exception as exc:
            log.error("model %s failed to load: %s", model.name, exc)
            model.fail(str(exc))
            await asyncio.to_thread(model.close)

    def start(
        self, on_ready: Callable[[str, bool], None], telemetry: Telemetry | None = None
    ) -> list[str]:
        """Starts the schedulers of the loaded models on the running loop; on_ready(name, ready)
        hears every change of a model's readiness. Returns the models that serve."""
        for name, model in self._models.items():
            if model.state is ModelState.LOADING:
                model.start(lambda ready, name=name: on_ready(name, ready), telemetry)  # type: ignore[misc]
        return self.serving()

    def serving(self) -> list[str]:
        """The models started and not stopped (ready or recovering)."""
        return [name for name, m in self._models.items() if m.state is ModelState.READY]

    def failures(self) -> str:
        return "; ".join(m.failure for m in self._models.values() if m.failure)

    async def stop(self, deadline: float) -> None:
        """Finishes queued and running work until the monotonic deadline, then releases every
        model (what is left fails with UNAVAILABLE)."""
        await asyncio.gather(
            *(m.stop(deadline) for m in self._models.values() if m.state is ModelState.READY)
        )

    async def close(self) -> None:
        """Releases models that never started (a stop during start-up)."""
        for model in self._models.values():
            await asyncio.to_thread(model.close)

    # --- requests ---------------------------------------------------------------------------

    def admit(self, request: Request, kind: RequestKind) -> InferenceRequest:
        """Checks a request against the bounds and its model, and decodes it (zero-copy) into
        the record the schedulers take, with the future its result will settle. Raises the
        domain error that names what is wrong."""
        check_request(request)
        return self._taking(request.model).admit(request, kind)

    def admit_stored(self, payload: Request) -> InferenceRequest:
        """A job's request as the store holds it, admitted when it was submitted: decoded again
        (it may have crossed processes), not checked again."""
        return self._taking(payload.model).admit_stored(payload)

    def enqueue(self, request: InferenceRequest, model: str) -> None:
        """Queues an admitted request on its model; RESOURCE_EXHAUSTED when the queue is full,
        UNAVAILABLE when the model cannot take work."""
        self._taking(model).scheduler.put(request)

    def end_sequences(self, owner: str) -> None:
        """A stream ended: frees the sequences it was driving, on every stateful model."""
        for model in self._models.values():
            model.end_sequences(owner)

    # --- questions ----------------------------------------------------------------------------

    def takes_jobs(self, name: str) -> bool:
        """Whether a model's requests may run as jobs (stateful models' sequences may not)."""
        return self.get(name).config.sequence is None

    def wait_estimate_s(self, name: str, extra_rows: int = 0) -> float:
        """Time to work through the model's queued rows plus extra_rows at its observed rate."""
        model = self._models.get(name)
        if model is None or model.state is not ModelState.READY:
            return 0.0
        return model.estimated_wait_s(extra_rows)

    def job_capacity(self, name: str) -> int:
        """Requests of jobs that one process holds for a model at once: a few batches ahead of
        its instances, so a burst of jobs neither fills the queue interactive callers share nor
        is refused (the rest wait in the job store)."""
        model = self.get(name)
        return 2 * model.max_batch_size * model.config.instance_count

    def ready(self, name: str) -> bool:
        return self.get(name).ready

    def all_ready(self) -> bool:
        return all(m.ready for m in self._models.values())

    def info(self, name: str) -> ModelInfo:
        model = self.get(name)
        config = model.config
        return ModelInfo(
            name=model.name,
            backend=config.backend,
            ready=model.ready,
            inputs=model.inputs,
            outputs=model.outputs,
            max_batch_size=model.max_batch_size,
            instance_count=config.instance_count,
            max_queue_delay_s=config.max_queue_delay_s,
            preferred_batch_sizes=config.preferred_batch_sizes,
            reason="" if model.ready else model.not_ready_message(),
        )

    def infos(self) -> list[ModelInfo]:
        return [self.info(name) for name in self._models]

    def statistics(self, name: str = "") -> list[ModelStatistics]:
        """Counters of one model, or of every model that has served."""
        if name:
            model = self.get(name)
            if model.state is not ModelState.READY:
                raise Unavailable(model.not_ready_message())
            return [model.statistics()]
        return [m.statistics() for m in self._models.values() if m.state is ModelState.READY]

    def load_now(self) -> dict[str, ModelLoad]:
        """Each serving model's queue and instances now (read by the metrics scrape, from its own
        thread: reads only)."""
        return {
            name: ModelLoad(m.queued_requests, m.busy_instances, m.instance_total)
            for name, m in list(self._models.items())
            if m.state is ModelState.READY
        }

    def metric_label(self, name: str) -> str:
        """The model label for metrics: unknown names collapse into one, so callers cannot grow
        the label set."""
        return name if name in self._models else "_unknown"

    def get(self, name: str) -> ServedModel:
        """The served model of that name, or NOT_FOUND naming the served ones."""
        model = self._models.get(name)
        if model is None:
            known = ", ".join(self._models) or "none"
            raise NotFound(f"model '{clip(name)}' is not served; served models: {known}")
        return model

    def _taking(self, name: str) -> ServedModel:
        """The model, if it takes requests now (one whose engine keeps failing still does: a
        success is how it recovers)."""
        model = self.get(name)
        model.check_taking()
        return model


def stateful_job_error(name: str) -> InvalidArgument:
    return InvalidArgument(
        f"model '{name}' is stateful: its sequences run through Predict or StreamPredict, not as "
        "jobs"
    )
