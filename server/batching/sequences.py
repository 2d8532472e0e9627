"""The sequence scheduler: stateful models, such as a voice model that carries an LSTM state and
a window of past audio from one chunk to the next.

Every request to a stateful model is a chunk of a sequence (sequence_id; sequence_start on the
first, sequence_end on the last). The server keeps each live sequence's state: it feeds the state
in with the chunk and keeps what comes back, so callers send only their chunk. Chunks of one
sequence run strictly in order, one at a time; chunks of different sequences share batches.

Batching itself is the dynamic batcher's (batcher.py), with its policy and latency budget: this
scheduler sits in front of it and hands it at most one chunk per sequence at a time, with the
sequence's state attached as extra inputs, batch-major (backends/stateful.py moves each state's
batch axis to where the engine wants it, and supplies the constant inputs).

Lifecycle: sequence_start creates a sequence (or restarts a live one from the initial state);
sequence_end frees it after that chunk; a sequence with no chunk for idle_timeout_s is freed; a
stream that ends frees the sequences it was driving (end_owner). Beyond max_sequences a new
sequence is refused with RESOURCE_EXHAUSTED. Sequences are scoped by tenant.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from tensorgate.server.batching.batcher import DynamicBatcher
from tensorgate.server.datatypes import NUMPY_BY_DATATYPE
from tensorgate.server.errors import (
    FailedPrecondition,
    InvalidArgument,
    ResourceExhausted,
    TensorgateError,
)
from tensorgate.server.futures import settle_error
from tensorgate.server.inference import InferenceRequest
from tensorgate.server.model_config import ModelConfig, SequenceConfig
from tensorgate.server.records import SequenceControl
from tensorgate.server.tensors import Outputs

# Freed sequences remembered, to tell a late chunk why its sequence is gone.
_REMEMBERED = 10_000


@dataclass(slots=True, eq=False)
class _Sequence:
    key: tuple[str, str]  # (tenant, sequence_id)
    state: dict[str, np.ndarray]
    owner: str
    last_used: float
    # Chunks accepted and not yet handed to the batcher, in order.
    waiting: collections.deque[InferenceRequest] = field(default_factory=collections.deque)
    # The chunk in the batcher now, if any.
    running: InferenceRequest | None = None
    # A chunk with sequence_end was accepted: no more chunks, unless one restarts it.
    ending: bool = False


class SequenceScheduler:
    """A Scheduler (scheduler.py) for a model with [sequence] in its config."""

    def __init__(
        self,
        config: ModelConfig,
        batcher: DynamicBatcher,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        assert config.sequence is not None
        self._model = config.name
        self._spec: SequenceConfig = config.sequence
        self._batcher = batcher
        self._clock = clock
        self.stats = batcher.stats
        self._live: dict[tuple[str, str], _Sequence] = {}
        self._freed: collections.OrderedDict[tuple[str, str], str] = collections.OrderedDict()
        self._state_outputs = tuple(s.output for s in self._spec.state)
        self._initial = {
            s.input: np.full((1, *s.shape), s.initial, dtype=NUMPY_BY_DATATYPE[s.datatype])
            for s in self._spec.state
        }

    # --- what callers see ----------------------------------------------------------------

    @property
    def live_sequences(self) -> int:
        return len(self._live)

    def holds(self, key: tuple[str, str]) -> bool:
        """Whether the sequence (tenant, id) is live here."""
        return key in self._live

    def put(self, request: InferenceRequest) -> None:
        control = request.sequence
        if control is None or not control.sequence_id:
            raise InvalidArgument(
                f"model '{self._model}' is stateful: each request is a chunk of a sequence and "
                "needs a sequence_id (with sequence_start on the first chunk)"
            )
        if request.rows != 1:
            raise InvalidArgument(
                f"model '{self._model}': a chunk of a sequence is one row; this one has "
                f"{request.rows}"
            )
        key = (request.tenant, control.sequence_id)
        sequence = self._live.get(key)
        if sequence is None:
            if not control.start:
                raise FailedPrecondition(self._not_live(key))
            sequence = self._open(key, control)
        elif sequence.ending and not control.start:
            raise FailedPrecondition(
                f"sequence '{control.sequence_id[:200]}' of model '{self._model}' ended with "
                "sequence_end; start it again with sequence_start"
            )
        sequence.owner = control.owner or sequence.owner
        sequence.ending = control.end
        sequence.last_used = self._clock()
        sequence.waiting.append(request)
        if sequence.running is None:
            self._next(sequence)

    def end_owner(self, owner: str) -> int:
        """Frees the sequences a stream was driving (the stream ended); returns how many."""
        ended = [s for s in self._live.values() if s.owner == owner]
        for sequence in ended:
            self._free(sequence, "its stream ended")
        return len(ended)

    # --- the Scheduler protocol ----------------------------------------------------------

    async def run(self) -> None:
        async with asyncio.TaskGroup() as group:
            group.create_task(self._batcher.run())
            group.create_task(self._expire_idle())

    async def drain(self, deadline: float) -> bool:
        """Waits for every accepted chunk: a sequence's next chunk reaches the batcher only when
        the one before it has run, so the batcher drains once per chunk still waiting."""
        while True:
            if not await self._batcher.drain(deadline):
                return False
            await asyncio.sleep(0)  # let finished chunks hand their successors to the batcher
            if not any(_busy(s) for s in self._live.values()):
                return True
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.005)

    def fail_all(self, error: TensorgateError) -> None:
        for sequence in list(self._live.values()):
            while sequence.waiting:
                settle_error(sequence.waiting.popleft().future, error)
        self._batcher.fail_all(error)

    @property
    def healthy(self) -> bool:
        return self._batcher.healthy

    @property
    def queued_requests(self) -> int:
        return self._batcher.queued_requests + sum(len(s.waiting) for s in self._live.values())

    @property
    def queued_rows(self) -> int:
        return self.queued_requests  # one row a chunk

    @property
    def busy_instances(self) -> int:
        return self._batcher.busy_instances

    @property
    def running_requests(self) -> int:
        return self._batcher.running_requests

    @property
    def rows_per_s(self) -> float:
        return self._batcher.rows_per_s

    # --- sequences -----------------------------------------------------------------------

    def _open(self, key: tuple[str, str], control: SequenceControl) -> _Sequence:
        if len(self._live) >= self._spec.max_sequences:
            raise ResourceExhausted(
                f"model '{self._model}' has {self._spec.max_sequences} live sequences, its "
                f"max_sequences; end one (sequence_end) or let idle ones time out "
                f"({self._spec.idle_timeout_s:g} s)"
            )
        sequence = _Sequence(key, dict(self._initial), control.owner, self._clock())
        self._live[key] = sequence
        self._freed.pop(key, None)
        return sequence

    def _free(self, sequence: _Sequence, why: str) -> None:
        """Forgets a sequence. Chunks still waiting are refused; a running one finishes."""
        if self._live.get(sequence.key) is not sequence:
            return
        del self._live[sequence.key]
        self._freed[sequence.key] = why
        self._freed.move_to_end(sequence.key)
        while len(self._freed) > _REMEMBERED:
            self._freed.popitem(last=False)
        while sequence.waiting:
            chunk = sequence.waiting.popleft()
            settle_error(chunk.future, FailedPrecondition(self._not_live(sequence.key)))

    def _not_live(self, key: tuple[str, str]) -> str:
        name = key[1][:200]
        why = self._freed.get(key)
        if why is not None:
            return (
                f"sequence '{name}' of model '{self._model}' was freed ({why}); start it again "
                "with sequence_start"
            )
        return (
            f"sequence '{name}' is not live on model '{self._model}': its first chunk must set "
            "sequence_start"
        )

    def _next(self, sequence: _Sequence) -> None:
        """Hands the sequence's next chunk, with its state, to the batcher. The chunk goes as it
        is, its state added to its inputs and its outputs: the batch settles the caller's future
        through _keep, which takes the new state out."""
        while sequence.waiting:
            chunk = sequence.waiting.popleft()
            if chunk.future.done():  # its caller went away while it waited
                continue
            control = chunk.sequence
            assert control is not None
            if control.start:
                sequence.state = dict(self._initial)
            wanted = chunk.output_names
            chunk.inputs = {**chunk.inputs, **sequence.state}
            chunk.output_names = (*wanted, *self._state_outputs)
            chunk.keep = functools.partial(self._keep, sequence, wanted)
            try:
                self._batcher.put(chunk)
            except TensorgateError as error:
                settle_error(chunk.future, error)
                continue
            sequence.running = chunk
            chunk.future.add_done_callback(functools.partial(self._ran, sequence))
            return
        if sequence.ending:
            self._free(sequence, "it ended with sequence_end")

    def _keep(self, sequence: _Sequence, wanted: tuple[str, ...], outputs: Outputs) -> Outputs:
        """The chunk ran: its sequence's state is what the engine returned (a chunk that failed
        or whose caller went away leaves the state as it was: it did not happen)."""
        # Copies: a view would keep the whole batch's output alive for as long as the sequence
        # lives.
        sequence.state = {s.input: outputs[s.output].copy() for s in self._spec.state}
        return {name: outputs[name] for name in wanted}

    def _ran(self, sequence: _Sequence, _: asyncio.Future[Outputs]) -> None:
        """The running chunk settled (ran, failed or cancelled): the next one may go."""
        sequence.running = None
        sequence.last_used = self._clock()
        if self._live.get(sequence.key) is sequence:
            self._next(sequence)

    async def _expire_idle(self) -> None:
        timeout = self._spec.idle_timeout_s
        while True:
            await asyncio.sleep(min(timeout / 4, 1.0))
            now = self._clock()
            for sequence in list(self._live.values()):
                if (
                    sequence.running is None
                    and not sequence.waiting
                    and now - sequence.last_used >= timeout
                ):
                    self._free(
                        sequence,
                        f"no chunk for {timeout:g} s, the model's sequence idle_timeout_ms",
                    )


def _busy(sequence: _Sequence) -> bool:
    """A chunk of the sequence runs, or waits with its caller still there."""
    return sequence.running is not None or any(not c.future.done() for c in sequence.waiting)
