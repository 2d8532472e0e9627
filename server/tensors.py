"""Tensor descriptions and the validation of request inputs against a model's inputs.

Transport-independent: a front end turns its wire tensors into TensorInput and gets numpy views of
the request bytes back, or an InvalidArgument naming what was wrong.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from tensorgate.server.datatypes import NUMPY_BY_DATATYPE
from tensorgate.server.errors import InvalidArgument, clip

# A request's (or a batch's) outputs by name.
Outputs = dict[str, np.ndarray]


@dataclass(slots=True, frozen=True)
class TensorSpec:
    """A model input or output. shape includes the batch dimension first; -1 marks a dynamic dim."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    def describe(self) -> str:
        return f"{self.datatype} {format_shape(self.shape)}"


@dataclass(slots=True)
class TensorInput:
    """A tensor as a request carries it: raw little-endian row-major bytes."""

    name: str
    datatype: str
    shape: Sequence[int]
    contents: bytes | memoryview


def format_shape(shape: Sequence[int]) -> str:
    """A shape for messages; a caller's absurd shape is cut short."""
    if len(shape) > _SHOWN_DIMS:
        shown = ",".join(str(d) for d in shape[:_SHOWN_DIMS])
        return f"[{shown},…({len(shape)} dims)]"
    return "[" + ",".join(str(d) for d in shape) + "]"


_SHOWN_DIMS = 16


def decode_inputs(
    model: str,
    specs: Sequence[TensorSpec] | Mapping[str, TensorSpec],
    inputs: Sequence[TensorInput],
    max_batch_size: int,
) -> tuple[dict[str, np.ndarray], int]:
    """Checks inputs against the model's specs (a model passes them by name, made once);
    returns zero-copy arrays and the batch size.

    Every problem raises InvalidArgument naming the input and what the model expects.
    """
    by_name = specs if isinstance(specs, Mapping) else {spec.name: spec for spec in specs}
    arrays: dict[str, np.ndarray] = {}
    rows: int | None = None
    rows_from = ""
    if len(inputs) > len(specs):
        names = [t.name for t in inputs[: len(specs) + 1]]
        repeated = next((n for n in names if names.count(n) > 1), None)
        if repeated is not None:
            raise InvalidArgument(f"input '{clip(repeated)}' is given more than once")
        raise InvalidArgument(
            f"request has {len(inputs)} input tensors; model '{model}' takes {len(specs)}"
        )
    for tensor in inputs:
        spec = by_name.get(tensor.name)
        if spec is None:
            expected = ", ".join(by_name) or "none"
            raise InvalidArgument(
                f"model '{model}' has no input '{clip(tensor.name)}'; its inputs are: {expected}"
            )
        if tensor.name in arrays:
            raise InvalidArgument(f"input '{tensor.name}' is given more than once")
        array = _decode_one(tensor, spec)
        batch = array.shape[0]
        if rows is None:
            rows, rows_from = batch, tensor.name
        elif batch != rows:
            raise InvalidArgument(
                f"input '{tensor.name}' has batch size {batch} but input '{rows_from}' has {rows}; "
                "all inputs must share the first dimension"
            )
        arrays[tensor.name] = array
    # Every name given is known and given once, so only fewer arrays than specs can miss one.
    if len(arrays) < len(by_name):
        missing = [spec for spec in by_name.values() if spec.name not in arrays]
        raise InvalidArgument(
            f"model '{model}' is missing input "
            + ", ".join(f"'{s.name}' ({s.describe()})" for s in missing)
        )
    assert rows is not None  # a model has at least one input
    if rows > max_batch_size:
        raise InvalidArgument(
            f"batch of {rows} rows exceeds model '{model}' max_batch_size {max_batch_size}; "
            "split the request"
        )
    return arrays, rows


def _decode_one(tensor: TensorInput, spec: TensorSpec) -> np.ndarray:
    name = tensor.name
    dtype = NUMPY_BY_DATATYPE.get(tensor.datatype)
    if dtype is None:
        supported = ", ".join(NUMPY_BY_DATATYPE)
        raise InvalidArgument(
            f"input '{name}' has unsupported datatype '{clip(tensor.datatype, 40)}'; "
            f"supported: {supported}"
        )
    if tensor.datatype != spec.datatype:
        raise InvalidArgument(
            f"input '{name}' has datatype {tensor.datatype}, model expects {spec.datatype}"
        )
    if len(tensor.shape) != len(spec.shape):  # checked first: a shape may claim a million dims
        raise InvalidArgument(
            f"input '{name}' has shape {format_shape(tensor.shape)}, model expects "
            f"{format_shape(spec.shape)} (-1 = any size)"
        )
    shape = tuple(map(int, tensor.shape))
    for got, want in zip(shape, spec.shape, strict=True):  # a loop: no frame per check
        if got < 0:
            raise InvalidArgument(
                f"input '{name}' has shape {format_shape(shape)} with a negative dimension"
            )
        if want != -1 and got != want:
            if any(d < 0 for d in shape):  # a negative dimension later on is named first
                raise InvalidArgument(
                    f"input '{name}' has shape {format_shape(shape)} with a negative dimension"
                )
            raise InvalidArgument(
                f"input '{name}' has shape {format_shape(shape)}, model expects "
                f"{format_shape(spec.shape)} (-1 = any size)"
            )
    if shape[0] == 0:
        raise InvalidArgument(f"input '{name}' has an empty batch (first dimension is 0)")
    # Python ints do not overflow, so a huge claimed shape simply fails this comparison.
    needed = dtype.itemsize * _product(shape)
    if len(tensor.contents) != needed:
        raise InvalidArgument(
            f"input '{name}' has {len(tensor.contents)} bytes of contents; shape "
            f"{format_shape(shape)} of {tensor.datatype} needs {needed}"
        )
    if tensor.datatype == "BOOL" and np.frombuffer(tensor.contents, dtype=np.uint8).max() > 1:
        # numpy would read any nonzero byte as True, and engines may read it as is.
        raise InvalidArgument(f"input '{name}' is BOOL but has bytes other than 0 and 1")
    return np.frombuffer(tensor.contents, dtype=dtype).reshape(shape)


def _product(shape: Iterable[int]) -> int:
    result = 1
    for d in shape:
        result *= d
    return result


def view_inputs(inputs: Sequence[TensorInput]) -> tuple[dict[str, np.ndarray], int]:
    """Zero-copy arrays of inputs that decode_inputs accepted before (a job's, as its store holds
    them), and their batch size: not checked again."""
    arrays = {
        tensor.name: np.frombuffer(
            tensor.contents, dtype=NUMPY_BY_DATATYPE[tensor.datatype]
        ).reshape(tuple(tensor.shape))
        for tensor in inputs
    }
    return arrays, next(iter(arrays.values())).shape[0]
