"""A GPU instance: a CUDA stream, an execution context (the backend), pinned host staging buffers
and device buffers sized for the largest batch, all allocated once at load and reused.

One batch on the instance's worker thread: pack the requests into pinned memory → async H2D →
backend enqueue → async D2H → event; the thread waits on the event (the event loop never does),
copies the outputs out of the pinned buffers and returns. Several instances overlap their copies
and compute on their own streams. Stage durations come from CUDA events, so they are GPU time.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np

from tensorgate.server.backends import cuda
from tensorgate.server.backends.base import DeviceArray, GpuBackendInstance, RequestInfo
from tensorgate.server.datatypes import NUMPY_BY_DATATYPE
from tensorgate.server.executor.batch import Batch, BatchPart
from tensorgate.server.executor.instance import BatchResult, Instance
from tensorgate.server.tensors import Outputs, TensorSpec


class _Staging:
    """A tensor's pinned host buffer and device buffer, sized for its largest shape."""

    def __init__(self, spec: TensorSpec, max_shape: tuple[int, ...]) -> None:
        self.spec = spec
        self.dtype = NUMPY_BY_DATATYPE[spec.datatype]
        self.row_shape = tuple(max_shape[1:])
        nbytes = int(np.prod(max_shape, dtype=np.int64)) * self.dtype.itemsize
        self.host = cuda.PinnedBuffer(nbytes)
        try:
            self.device = cuda.DeviceBuffer(nbytes)
        except BaseException:
            self.host.free()
            raise

    def free(self) -> None:
        _release_all((self.host.free, self.device.free))


class GpuInstance(Instance):
    def __init__(
        self,
        model: str,
        index: int,
        backend: GpuBackendInstance,
        max_rows: int,
        pad_to: Sequence[int] = (),
    ) -> None:
        # cudaSetDevice is per thread: the worker thread, where every CUDA call of this instance
        # runs, makes the backend's device current before its first call.
        super().__init__(model, index, lambda: cuda.set_device(backend.device))
        self.backend = backend
        self.max_rows = max_rows
        # Batch sizes the engine is tuned for: a smaller batch is padded with zero rows up to the
        # next one (and to the engine's minimum).
        self._pad_to = sorted(pad_to)
        self._inputs: dict[str, _Staging] = {}
        self._outputs: dict[str, _Staging] = {}
        self._events: list[cuda.Event] = []
        self.stream: cuda.Stream | None = None
        try:
            self._worker.call(self._allocate)
        except BaseException:
            # What was allocated before the failure is freed; the backend stays the caller's.
            try:
                self._worker.call(self._free_cuda)
            finally:
                self._worker.close()
            raise

    def _allocate(self) -> None:
        """Stream, staging buffers and events, on the worker thread (the right device)."""
        backend, max_rows = self.backend, self.max_rows
        stream = self.stream = cuda.Stream()
        backend.bind(stream.handle)
        for specs, staging in ((backend.inputs, self._inputs), (backend.outputs, self._outputs)):
            for spec in specs:
                staging[spec.name] = _Staging(spec, backend.max_shape(spec.name, max_rows))
        for _ in range(4):
            self._events.append(cuda.Event())

    def padded_rows(self, rows: int) -> int:
        padded = max(rows, self.backend.min_batch_size)
        for size in self._pad_to:
            if size >= padded:
                return size
        return padded

    def run(self, inputs: Mapping[str, np.ndarray], output_names: Sequence[str]) -> Outputs:
        rows = next(iter(inputs.values())).shape[0]
        outputs, _ = self._worker.call(lambda: self._run(rows, [dict(inputs)], output_names))
        return outputs

    def run_batch(self, batch: Batch[BatchPart]) -> BatchResult:
        parts = [request.inputs for request in batch.requests]
        outputs, stage_s = self._run(batch.rows, parts, batch.output_names, batch.infos())
        return BatchResult(batch.split(outputs), stage_s)

    def _run(
        self,
        rows: int,
        parts: Sequence[Mapping[str, np.ndarray]],
        output_names: Sequence[str],
        requests: Sequence[RequestInfo] = (),
    ) -> tuple[Outputs, dict[str, float]]:
        padded = self.padded_rows(rows)
        stream = self.stream
        assert stream is not None
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
        start.record(stream)
        for name, device in device_inputs.items():
            cuda.copy_to_device(device.ptr, self._inputs[name].host.ptr, device.nbytes, stream)
        copied_in.record(stream)
        device_outputs = {
            name: DeviceArray(staging.device.ptr, (padded, *staging.row_shape), staging.dtype)
            for name, staging in self._outputs.items()
        }
        shapes = self.backend.enqueue(device_inputs, device_outputs, stream.handle, requests)
        computed.record(stream)
        for name in output_names:
            staging = self._outputs[name]
            nbytes = int(np.prod(shapes[name], dtype=np.int64)) * staging.dtype.itemsize
            cuda.copy_to_host(staging.host.ptr, staging.device.ptr, nbytes, stream)
        copied_out.record(stream)
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
        """Releases everything on the worker thread (the instance's device), going on past a
        failed release so one error does not leak the rest; the first error is raised after."""
        if self.abandoned:
            return
        try:
            self._worker.call(self._release)
        finally:
            super().close()

    def _release(self) -> None:
        stream = self.stream
        _release_all(
            (
                *((stream.synchronize,) if stream is not None else ()),
                self.backend.close,
                self._free_cuda,
            )
        )

    def _free_cuda(self) -> None:
        stream, self.stream = self.stream, None
        stagings = (*self._inputs.values(), *self._outputs.values())
        events, self._events = self._events, []
        self._inputs, self._outputs = {}, {}
        _release_all(
            (
                *(staging.free for staging in stagings),
                *(event.destroy for event in events),
                *((stream.destroy,) if stream is not None else ()),
            )
        )


def _release_all(steps: Sequence[Callable[[], None]]) -> None:
    """Runs every step even when some fail; raises the first failure afterwards."""
    first: BaseException | None = None
    for step in steps:
        try:
            step()
        except Exception as exc:
            first = first or exc
    if first is not None:
        raise first
