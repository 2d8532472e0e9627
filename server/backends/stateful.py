"""A stateful model's backend instance, seen batch-major with its constants supplied.

The sequence scheduler (batching/sequences.py) hands each chunk to the dynamic batcher with its
sequence's state as extra inputs. The batcher concatenates every input along axis 0, so here each
state tensor is presented with its batch axis first; this adapter moves it to the axis the engine
wants (Silero VAD's state is [2, batch, 128]) before the engine runs, moves the new state's batch
axis back to the front after, and adds the constant inputs (a sample rate), which have no batch
axis at all.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import numpy as np

from tensorgate.server.backends.base import BackendInstance, RequestInfo
from tensorgate.server.config import ConfigError
from tensorgate.server.datatypes import NUMPY_BY_DATATYPE
from tensorgate.server.model_config import ModelConfig, StateSpec
from tensorgate.server.tensors import TensorSpec, format_shape


class StatefulBackend:
    placement: Literal["cpu"] = "cpu"

    def __init__(self, inner: BackendInstance, config: ModelConfig) -> None:
        assert config.sequence is not None
        self._inner = inner
        self._sequence = sequence = config.sequence
        engine_inputs = {spec.name: spec for spec in inner.inputs}
        engine_outputs = {spec.name: spec for spec in inner.outputs}
        for state in sequence.state:
            for name, table, kind in (
                (state.input, engine_inputs, "input"),
                (state.output, engine_outputs, "output"),
            ):
                _check(
                    config.name, table, name, kind, state.datatype, state.shape, state.batch_axis
                )
        for constant in sequence.constants:
            _check(config.name, engine_inputs, constant.input, "input", constant.datatype,
                   constant.shape, None)  # fmt: skip
        declared = {n for s in sequence.state for n in (s.input, s.output)}
        declared |= {c.input for c in sequence.constants}
        for spec in (*inner.inputs, *inner.outputs):
            if spec.name not in declared and (not spec.shape or spec.shape[0] != -1):
                raise ConfigError(
                    f"model '{config.name}': tensor '{spec.name}' has shape "
                    f"{format_shape(spec.shape)}; its first dimension must be the dynamic batch "
                    "dimension, or [sequence] must declare it as state or a constant"
                )
        self._constants = {
            c.input: np.full(c.shape, c.value, dtype=NUMPY_BY_DATATYPE[c.datatype])
            for c in sequence.constants
        }
        moved = {s.input: s for s in sequence.state} | {s.output: s for s in sequence.state}
        self._inputs = [
            _batch_major(spec, moved.get(spec.name))
            for spec in inner.inputs
            if spec.name not in self._constants
        ]
        self._outputs = [_batch_major(spec, moved.get(spec.name)) for spec in inner.outputs]

    @property
    def inputs(self) -> Sequence[TensorSpec]:
        return self._inputs

    @property
    def outputs(self) -> Sequence[TensorSpec]:
        return self._outputs

    @property
    def max_batch_size(self) -> int | None:
        return self._inner.max_batch_size

    def execute(
        self,
        inputs: Mapping[str, np.ndarray],
        output_names: Sequence[str],
        requests: Sequence[RequestInfo] = (),
    ) -> dict[str, np.ndarray]:
        feed = dict(inputs)
        for state in self._sequence.state:
            if state.batch_axis and state.input in feed:
                feed[state.input] = np.moveaxis(feed[state.input], 0, state.batch_axis)
        feed.update(self._constants)
        outputs = self._inner.execute(feed, output_names, requests)
        for state in self._sequence.state:
            if state.batch_axis and state.output in outputs:
                outputs[state.output] = np.moveaxis(outputs[state.output], state.batch_axis, 0)
        return outputs

    def close(self) -> None:
        self._inner.close()


def _check(
    model: str,
    table: Mapping[str, TensorSpec],
    name: str,
    kind: str,
    datatype: str,
    shape: tuple[int, ...],
    batch_axis: int | None,
) -> None:
    """The engine's tensor matches what [sequence] declares (a batch axis inserted, if any)."""
    spec = table.get(name)
    if spec is None:
        raise ConfigError(
            f"model '{model}': [sequence] names {kind} '{name}', which the engine does not have; "
            f"its {kind}s are: {', '.join(table)}"
        )
    expected = list(shape)
    if batch_axis is not None:
        expected.insert(batch_axis, -1)
    # The batch axis must be dynamic in the engine; another dim fits when the engine fixes it to
    # the declared size or leaves it dynamic.
    fits = len(spec.shape) == len(expected) and all(
        got == -1 if want == -1 else got in (-1, want)
        for got, want in zip(spec.shape, expected, strict=True)
    )
    if spec.datatype != datatype or not fits:
        where = "" if batch_axis is None else f" (batch axis {batch_axis})"
        raise ConfigError(
            f"model '{model}': [sequence] declares {kind} '{name}' as {datatype} "
            f"{format_shape(tuple(expected))}{where}, but the engine has {spec.describe()}"
        )


def _batch_major(spec: TensorSpec, state: StateSpec | None) -> TensorSpec:
    """The spec as the batcher sees it: a state tensor with its batch axis first."""
    if state is None:
        return spec
    shape = list(spec.shape)
    shape.insert(0, shape.pop(state.batch_axis))
    return TensorSpec(spec.name, spec.datatype, tuple(shape))
