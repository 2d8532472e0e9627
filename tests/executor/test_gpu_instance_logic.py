"""The GPU instance's bookkeeping, on the CPU: packing requests into the staging buffers,
padding to the engine's minimum and to preferred sizes, per-output byte counts, and splitting the
outputs back per request, through the `python` backend's GPU path (__cuda_array_interface__ and
device-to-device copies).

CUDA itself is replaced by host memory here (copies are memmove, events read the clock), so this
checks our logic, not the GPU: tests/executor/test_gpu_instances.py does that on a GPU.
"""

from __future__ import annotations

import asyncio
import ctypes
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tensorgate.server.backends import python as python_backend
from tensorgate.server.backends.base import DeviceArray
from tensorgate.server.executor import gpu
from tensorgate.server.executor.batch import Batch
from tensorgate.server.inference import InferenceRequest
from tensorgate.server.model_config import ModelConfig
from tensorgate.server.tensors import TensorSpec
from tests.harness import write_config


class _HostMemory:
    def __init__(self, nbytes: int) -> None:
        self.nbytes = nbytes
        self._buffer = (ctypes.c_uint8 * nbytes)()
        self.ptr = ctypes.addressof(self._buffer)
        self.array = np.ctypeslib.as_array(self._buffer)

    def view(self, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
        count = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        return self.array[:count].view(dtype).reshape(shape)

    def free(self) -> None:
        pass


class _Stream:
    handle = 1

    @classmethod
    def wrap(cls, handle: int) -> _Stream:
        return cls()

    def synchronize(self) -> None:
        pass

    def destroy(self) -> None:
        pass


# A fake GPU clock that only copies advance, by one nanosecond a byte: stage durations then say
# exactly how many bytes each stage moved.
_CLOCK = [0.0]


class _Event:
    def __init__(self) -> None:
        self.at = 0.0

    def record(self, stream: _Stream) -> None:
        self.at = _CLOCK[0]

    def synchronize(self) -> None:
        pass

    def seconds_since(self, start: _Event) -> float:
        return self.at - start.at

    def destroy(self) -> None:
        pass


def _copy(dst: int, src: int, nbytes: int, stream: _Stream) -> None:
    ctypes.memmove(dst, src, nbytes)
    _CLOCK[0] += nbytes * 1e-9


HOST_CUDA = types.SimpleNamespace(
    Stream=_Stream,
    Event=_Event,
    PinnedBuffer=_HostMemory,
    DeviceBuffer=_HostMemory,
    copy_to_device=_copy,
    copy_to_host=_copy,
    copy_on_device=_copy,
    gpu_unavailable_reason=lambda device=0: None,
    set_device=lambda device: None,
)

# A user model for the GPU path: reads its "device" input through __cuda_array_interface__ and
# returns an object exposing one, as a CuPy array would.
USER_MODEL = """
import ctypes
import numpy as np

class _Out:
    def __init__(self, array):
        self.array = array
        self.__cuda_array_interface__ = {
            "shape": array.shape, "typestr": array.dtype.str,
            "data": (array.ctypes.data, False), "strides": None, "version": 3,
        }

def _read(device_array):
    cai = device_array.__cuda_array_interface__
    count = int(np.prod(cai["shape"]))
    raw = (ctypes.c_float * count).from_address(cai["data"][0])
    return np.ctypeslib.as_array(raw).reshape(cai["shape"])

class Model:
    def load(self, config):
        self.calls = []

    def execute(self, inputs, stream):
        assert stream is not None
        x = _read(inputs["x"])
        self.calls.append(x.shape[0])
        return {"double": _Out(x * 2), "total": _Out(x.sum(axis=1, keepdims=True))}
"""


@pytest.fixture
def gpu_instance(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    import tensorgate.server.backends

    monkeypatch.setattr(gpu, "cuda", HOST_CUDA)
    monkeypatch.setattr(tensorgate.server.backends, "cuda", HOST_CUDA)
    write_config(
        tmp_path / "double",
        backend="python",
        max_batch_size=16,
        python={
            "device": "gpu",
            "inputs": '[{ name = "x", datatype = "FP32", shape = [-1, 3] }]',
            "outputs": '[{ name = "double", datatype = "FP32", shape = [-1, 3] }, '
            '{ name = "total", datatype = "FP32", shape = [-1, 1] }]',
        },
    )
    (tmp_path / "double" / "model.py").write_text(USER_MODEL)
    backend = python_backend.load(ModelConfig.load(tmp_path / "double"), 0)
    assert backend.placement == "gpu"
    instance = gpu.GpuInstance("double", 0, backend, max_rows=16, pad_to=(4, 8, 16))
    yield instance
    instance.close()


def _request(x: np.ndarray, outputs: tuple[str, ...] = ("double", "total")) -> InferenceRequest:
    future = asyncio.new_event_loop().create_future()
    return InferenceRequest(inputs={"x": x}, rows=x.shape[0], output_names=outputs, future=future)


def test_requests_are_packed_padded_computed_and_split_back(gpu_instance: Any) -> None:
    xs = [np.arange(3 * n, dtype=np.float32).reshape(n, 3) + 10 * n for n in (1, 2, 2)]
    requests = [_request(xs[0]), _request(xs[1], ("total",)), _request(xs[2], ("double",))]
    batch = Batch("double", requests, rows=5, output_names=("double", "total"))
    result = gpu_instance.run_batch(batch)
    # 5 rows were padded to the preferred size 8 for the engine...
    assert gpu_instance.backend._model.obj.calls == [8]
    # ...and every request got its own rows, only the outputs it asked for, unpadded.
    assert set(result.outputs[0]) == {"double", "total"}
    np.testing.assert_array_equal(result.outputs[0]["double"], xs[0] * 2)
    np.testing.assert_array_equal(result.outputs[0]["total"], xs[0].sum(axis=1, keepdims=True))
    assert set(result.outputs[1]) == {"total"}
    np.testing.assert_array_equal(result.outputs[1]["total"], xs[1].sum(axis=1, keepdims=True))
    assert set(result.outputs[2]) == {"double"}
    np.testing.assert_array_equal(result.outputs[2]["double"], xs[2] * 2)
    # Stage times come from the events around each stage: on the fake clock, bytes moved.
    # h2d: 8 padded rows of x (8×3 FP32); compute: the model's device copies of both outputs
    # (8×3 + 8×1 FP32); d2h: both outputs, as computed (8 rows), back to the host.
    assert result.stage_s == pytest.approx({"h2d": 96e-9, "compute": 128e-9, "d2h": 128e-9})


def test_outputs_do_not_alias_the_reused_staging_buffers(gpu_instance: Any) -> None:
    first = gpu_instance.run({"x": np.ones((2, 3), np.float32)}, ["double"])
    gpu_instance.run({"x": np.full((2, 3), 7, np.float32)}, ["double"])
    np.testing.assert_array_equal(first["double"], np.full((2, 3), 2, np.float32))


def test_padding_rows_are_zeroed_between_batches(gpu_instance: Any) -> None:
    gpu_instance.run({"x": np.full((8, 3), 5, np.float32)}, ["total"])
    out = gpu_instance.run({"x": np.ones((3, 3), np.float32)}, ["total"])
    assert out["total"].shape == (3, 1)
    staged = gpu_instance._inputs["x"].host.view(np.dtype(np.float32), (4, 3))
    np.testing.assert_array_equal(staged[3], 0)  # the padding row, not the last batch's 5s


def test_device_array_describes_itself_for_cupy() -> None:
    array = DeviceArray(1234, (2, 3), np.dtype(np.float16))
    assert array.nbytes == 12
    assert array.__cuda_array_interface__ == {
        "shape": (2, 3),
        "typestr": "<f2",
        "data": (1234, False),
        "strides": None,
        "version": 3,
    }


class _FakeCuda:
    """Counts allocations and releases; allocation number `fail_at` fails, as does every
    release named in `broken`."""

    def __init__(self, fail_at: int = 0, broken: tuple[str, ...] = ()) -> None:
        self.fail_at, self.broken = fail_at, broken
        self.allocated = 0
        self.live: set[str] = set()
        self.log: list[str] = []
        self.device_threads: dict[int, int] = {}
        fake = self

        class Buffer:
            def __init__(self, nbytes: int) -> None:
                fake.allocated += 1
                if fake.allocated == fake.fail_at:
                    raise RuntimeError("cudaMalloc failed: out of memory")
                self.name = f"buffer{fake.allocated}"
                self.ptr = fake.allocated
                fake.live.add(self.name)

            def free(self) -> None:
                fake.release(self.name)

        class Stream(_Stream):
            def destroy(self) -> None:
                fake.release("stream")

        class Event(_Event):
            def destroy(self) -> None:
                fake.release("event")

        self.PinnedBuffer = self.DeviceBuffer = Buffer
        self.Stream, self.Event = Stream, Event

    def set_device(self, device: int) -> None:
        import threading

        self.device_threads[threading.get_ident()] = device

    def release(self, name: str) -> None:
        self.log.append(name)
        if name in self.broken:
            raise RuntimeError(f"release of {name} failed")
        self.live.discard(name)


class _Backend:
    placement = "gpu"
    inputs = (TensorSpec("x", "FP32", (-1, 3)),)
    outputs = (TensorSpec("y", "FP32", (-1, 3)), TensorSpec("z", "FP32", (-1, 1)))
    min_batch_size = 1

    def __init__(self, device: int = 0) -> None:
        self.device = device
        self.closed = False
        self.bound_on: int | None = None

    def max_shape(self, name: str, rows: int) -> tuple[int, ...]:
        return (rows, 3)

    def bind(self, stream: int) -> None:
        import threading

        self.bound_on = threading.get_ident()

    def close(self) -> None:
        self.closed = True


def test_gpu_instance_makes_its_device_current_on_the_thread_that_runs_its_cuda_calls(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake = _FakeCuda()
    monkeypatch.setattr(gpu, "cuda", fake)
    backend = _Backend(device=3)
    instance = gpu.GpuInstance("m", 0, backend, max_rows=4)  # type: ignore[arg-type]
    try:
        # The worker thread set device 3 before the stream was made and bound on it.
        assert fake.device_threads == {backend.bound_on: 3}
    finally:
        instance.close()


def test_gpu_instance_frees_a_partial_allocation_when_one_fails(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake = _FakeCuda(fail_at=4)  # x's two buffers and y's pinned one succeed; y's device fails
    monkeypatch.setattr(gpu, "cuda", fake)
    with pytest.raises(RuntimeError, match="out of memory"):
        gpu.GpuInstance("m", 0, _Backend(), max_rows=4)  # type: ignore[arg-type]
    assert fake.allocated == 4
    assert fake.live == set()  # buffers 1-3 freed
    assert "stream" in fake.log  # and the stream destroyed


def test_gpu_instance_close_releases_everything_past_a_failing_release(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake = _FakeCuda(broken=("buffer1",))
    monkeypatch.setattr(gpu, "cuda", fake)
    backend = _Backend()
    instance = gpu.GpuInstance("m", 0, backend, max_rows=4)  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match="release of buffer1 failed"):
        instance.close()
    assert backend.closed
    assert fake.live == {"buffer1"}  # only the one whose release failed
    assert fake.log.count("event") == 4 and "stream" in fake.log


def test_cuda_buffers_free_once_however_often_free_is_called(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from tensorgate.server.backends import cuda

    freed: list[int] = []
    fake_runtime = types.SimpleNamespace(
        cudaError_t=types.SimpleNamespace(cudaSuccess=0),
        cudaMalloc=lambda nbytes: (0, 4096),
        cudaFree=lambda ptr: freed.append(ptr) or (0,),
    )
    monkeypatch.setattr(cuda, "cudart", fake_runtime)
    buffer = cuda.DeviceBuffer(16)
    buffer.free()
    buffer.free()
    assert freed == [4096]
