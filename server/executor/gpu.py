"""A GPU instance: a CUDA stream, an execution context (the backend), pinned host staging buffers
and device buffers sized for the largest batch, all allocated once at load and reused.

One batch on the instance's worker thread: pack the requests into pinned memory → async H2D →
backend enqueue → async D2H → event; the thread waits on the event (the event loop never does),
copies the outputs out of the pinned buffers and returns. Several instances overlap their copies
and compute on their own streams. Stage durations come from CUDA events, so they are GPU time.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from server.backends.base import DeviceArray, GpuBackendInstance
from server.batching.batch import Batch
from server.batching.request import Outputs
from server.datatypes import NUMPY_BY_DATATYPE
from server.executor import cuda
from server.executor.instance import BatchResult, Instance
from server.tensors import TensorSpec


class _Staging:
    """A tensor's pinned host buffer and device buffer, sized for its largest shape."""

    def __init__(self, spec: TensorSpec, max_shape: tuple[int, ...]) -> None:
        self.spec = spec
        self.dtype = NUMPY_BY_DATATYPE[spec.datatype]
        self.row_shape = tuple(max_shape[1:])
        nbytes = int(np.prod(max_shape, dtype=np.int64)) * self.dtype.itemsize
        self.host = cuda.PinnedBuffer(nbytes)
        self.device = cuda.DeviceBuffer(nbytes)

    def free(self) -> None:
        self.host.free()
        self.device.free()


class GpuInstance(Instance):
    def __init__(
        self,
        model: str,
        index: int,
        backend: GpuBackendInstance,
        max_rows: int,
        pad_to: Sequence[int] = (),
    ) -> None:
        super().__init__(model, index)
        self.backend = backend
        self.max_rows = max_rows
        # Batch sizes the engine is tuned for: a smaller batch is padded with zero rows up to the
        # next one (and to the engine's minimum).
        self._pad_to = sorted(pad_to)
        self.stream = cuda.Stream()
        backend.bind(self.stream.handle)
        self._inputs = {
            s.name: _Staging(s, backend.max_shape(s.name, max_rows)) for s in backend.inputs
        }
        self._outputs = {
            s.name: _Staging(s, backend.max_shape(s.name, max_rows)) for s in backend.outputs
        }
        self._events = [cuda.Event() for _ in range(4)]

    def padded_rows(self, rows: int) -> int:
        padded = max(rows, self.backend.min_batch_size)
        for size in self._pad_to:
            if size >= padded:
                return size
        return padded

    def run(self, inputs: Mapping[str, np.ndarray], output_names: Sequence[str]) -> Outputs:
        rows = next(iter(inputs.values())).shape[0]
        outputs, _ = self._run(rows, [dict(inputs)], output_names)
        return outputs

    def run_batch(self, batch: Batch) -> BatchResult:
        parts = [request.inputs for request in batch.requests]
        outputs, stage_s = self._run(batch.rows, parts, batch.output_names)
        return BatchResult(batch.split(outputs), stage_s)

    def _run(
        self,
        rows: int,
        parts: Sequence[Mapping[str, np.ndarray]],
        output_names: Sequence[str],
    ) -> tuple[Outputs, dict[str, float]]:
        padded = self.padded_rows(rows)
        start, copied_in, computed, copied_out = self._events
        device_inputs = {}
        for name, staging in self._inputs.items():
            shape = (padded, *parts[0][name].shape[1:])
            host = staging.host.view(staging.dtype, shape)
            offset = 0
            for part in parts:  # pack straight into pinned memory: one copy per request
                array = part[name]
                host[offset : offset + array.shape[0]] = array
                offset += array.shape[0]
            if padded > rows:
                host[rows:] = 0
            device_inputs[name] = DeviceArray(staging.device.ptr, shape, staging.dtype)
        start.record(self.stream)
        for name, device in device_inputs.items():
            cuda.copy_to_device(device.ptr, self._inputs[name].host.ptr, device.nbytes, self.stream)
        copied_in.record(self.stream)
        device_outputs = {
            name: DeviceArray(staging.device.ptr, (padded, *staging.row_shape), staging.dtype)
            for name, staging in self._outputs.items()
        }
        shapes = self.backend.enqueue(device_inputs, device_outputs, self.stream.handle)
        computed.record(self.stream)
        for name in output_names:
            staging = self._outputs[name]
            nbytes = int(np.prod(shapes[name], dtype=np.int64)) * staging.dtype.itemsize
            cuda.copy_to_host(staging.host.ptr, staging.device.ptr, nbytes, self.stream)
        copied_out.record(self.stream)
        copied_out.synchronize()
        outputs = {
            # Copied out of the pinned buffer, which the next batch reuses; padding rows dropped.
            name: self._outputs[name]
            .host.view(self._outputs[name].dtype, shapes[name])[:rows]
            .copy()
            for name in output_names
        }
        stage_s = {
            "h2d": copied_in.seconds_since(start),
            "compute": computed.seconds_since(copied_in),
            "d2h": copied_out.seconds_since(computed),
        }
        return outputs, stage_s

    def close(self) -> None:
        super().close()
        self.stream.synchronize()
        self.backend.close()
        for staging in (*self._inputs.values(), *self._outputs.values()):
            staging.free()
        for event in self._events:
            event.destroy()
        self.stream.destroy()
