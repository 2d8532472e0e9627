"""The record of one request admitted for inference: its decoded inputs and the future its caller
awaits, as it waits for and passes through a batch (the model set makes it; the schedulers,
the executor and the job lanes carry it)."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tensorgate.server.records import SequenceControl
from tensorgate.server.telemetry.tracing import RequestTrace
from tensorgate.server.tensors import Outputs


@dataclass(slots=True, eq=False)
class InferenceRequest:
    """A validated request: numpy views of its inputs and the future its caller awaits.

    The future is created before the request is queued and settles exactly once: with the
    outputs, with a domain error, or by cancellation from the caller's side.
    """

    inputs: Mapping[str, np.ndarray]
    rows: int
    output_names: tuple[str, ...]
    future: asyncio.Future[Outputs]
    # time.monotonic() after which the request is not worth running; None = no deadline.
    deadline: float | None = None
    id: str = ""
    parameters: Mapping[str, Any] = field(default_factory=dict)
    priority: int = 0
    tenant: str = ""
    enqueued_at: float = 0.0
    # True while the request sits in a scheduler's queue (see RequestQueue).
    queued: bool = False
    # Called on the loop when the request is taken into a batch (a job turns RUNNING).
    on_start: Callable[[], None] | None = None
    # Set when the request is traced (sampled): its span and stage times.
    trace: RequestTrace | None = None
    # A chunk of a sequence, for a stateful model (batching/sequences.py).
    sequence: SequenceControl | None = None
    # The model version that admitted it, whose scheduler it is queued on (models.py); the
    # request keeps it across a rollout.
    target: Any = None
    # The queue's done-callback while the request waits in it (removed when it is taken, so a
    # request that runs settles with one callback fewer to schedule).
    watch: Callable[[Any], None] | None = None
    # Called on the loop with the request's share of its batch's outputs before its future is
    # settled with what it returns (a stateful model's scheduler keeps the sequence's new state
    # from them and passes the rest on); only while the caller still waits.
    keep: Callable[[Outputs], Outputs] | None = None

    def again(self, trace: RequestTrace | None = None) -> InferenceRequest:
        """The same request with a fresh future, for another attempt (a retried job)."""
        return dataclasses.replace(
            self,
            future=self.future.get_loop().create_future(),
            queued=False,
            on_start=None,
            trace=trace,
            watch=None,
        )
