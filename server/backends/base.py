"""The interfaces every backend implements. The executor and batcher see nothing else.

A CPU backend takes numpy batches on its instance's worker thread. A GPU backend is handed
device buffers and the instance's CUDA stream, and only enqueues work on that stream: the GPU
instance owns copies, buffers and synchronization.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import numpy as np

from tensorgate.server.tensors import TensorSpec


@dataclass(slots=True, frozen=True)
class RequestInfo:
    """One request of a batch as a backend may see it: its rows (requests are packed in this
    order), the id its caller gave it, and the parameters its caller sent (a python model reads
    them; engines ignore them)."""

    id: str
    rows: int
    parameters: Mapping[str, Any]


class BackendInstance(Protocol):
    """One loaded copy of a model that runs numpy batches (first dimension = rows)."""

    placement: Literal["cpu"]

    @property
    def inputs(self) -> Sequence[TensorSpec]: ...

    @property
    def outputs(self) -> Sequence[TensorSpec]: ...

    @property
    def max_batch_size(self) -> int | None:
        """The artifact's own limit on rows per batch, or None when it has none."""
        ...

    def execute(
        self,
        inputs: Mapping[str, np.ndarray],
        output_names: Sequence[str],
        requests: Sequence[RequestInfo] = (),
    ) -> dict[str, np.ndarray]:
        """Runs a batch; requests: the batch's requests, in the order their rows were packed
        (empty for a warm-up)."""
        ...

    def close(self) -> None: ...


@dataclass(slots=True, frozen=True)
class DeviceArray:
    """A tensor in GPU memory. CuPy and PyTorch wrap it without a copy (cp.asarray(x),
    torch.as_tensor(x, device="cuda")) through __cuda_array_interface__."""

    ptr: int
    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

    @property
    def __cuda_array_interface__(self) -> dict[str, Any]:
        return {
            "shape": self.shape,
            "typestr": self.dtype.str,
            "data": (self.ptr, False),
            "strides": None,
            "version": 3,
        }


class GpuBackendInstance(Protocol):
    """One loaded copy of a model that enqueues work on a CUDA stream."""

    placement: Literal["gpu"]
    # The CUDA device the instance runs on; the GPU instance makes it current on its thread.
    device: int

    @property
    def inputs(self) -> Sequence[TensorSpec]: ...

    @property
    def outputs(self) -> Sequence[TensorSpec]: ...

    @property
    def max_batch_size(self) -> int | None: ...

    @property
    def min_batch_size(self) -> int:
        """Fewest rows the artifact accepts (a TensorRT profile's min); smaller batches are
        padded up to it."""
        ...

    def max_shape(self, name: str, rows: int) -> tuple[int, ...]:
        """The largest shape tensor `name` takes or gives for a batch of `rows` rows, for sizing
        the instance's buffers once at load."""
        ...

    def bind(self, stream: int) -> None:
        """Called once by the GPU instance with the raw handle of its stream, before any enqueue."""
        ...

    def enqueue(
        self,
        inputs: Mapping[str, DeviceArray],
        outputs: Mapping[str, DeviceArray],
        stream: int,
        requests: Sequence[RequestInfo] = (),
    ) -> dict[str, tuple[int, ...]]:
        """Enqueues one batch on `stream`; outputs are buffers sized by max_shape. Returns the
        shape of every output as computed. requests: as for BackendInstance.execute."""
        ...

    def close(self) -> None: ...


AnyBackendInstance = BackendInstance | GpuBackendInstance
