"""The CUDA runtime through cuda-python (`cuda.bindings`), every return code checked.

Only GPU instances and GPU backends import this module, so CPU-only machines never need it.
"""

from __future__ import annotations

import ctypes
from typing import Any

import numpy as np

try:
    from cuda.bindings import runtime as cudart
except ImportError:  # pragma: no cover - depends on the machine
    cudart = None


class CudaError(RuntimeError):
    """A CUDA runtime call failed; the message names the call and CUDA's own error name."""


def check(call: str, result: Any) -> Any:
    """Unpacks a cuda-python result tuple (error, *values), raising CudaError on failure."""
    if isinstance(result, tuple):
        error, values = result[0], result[1:]
    else:
        error, values = result, ()
    if error != cudart.cudaError_t.cudaSuccess:
        _, name = cudart.cudaGetErrorName(error)
        _, text = cudart.cudaGetErrorString(error)
        raise CudaError(f"{call} failed: {name.decode()} ({text.decode()})")
    if not values:
        return None
    return values[0] if len(values) == 1 else values


def gpu_unavailable_reason(device: int = 0) -> str | None:
    """None when CUDA device `device` can be used; otherwise why not, in one line."""
    if cudart is None:
        return "cuda-python is not installed (pip install cuda-bindings)"
    try:
        count = check("cudaGetDeviceCount", cudart.cudaGetDeviceCount())
    except CudaError as exc:
        return str(exc)
    if count <= device:
        return f"no CUDA device {device} (found {count})"
    return None


def set_device(device: int) -> None:
    check("cudaSetDevice", cudart.cudaSetDevice(device))


def device_name(device: int = 0) -> tuple[str, str]:
    """The GPU's name and compute capability, e.g. ("NVIDIA H100 80GB HBM3", "9.0")."""
    props = check("cudaGetDeviceProperties", cudart.cudaGetDeviceProperties(device))
    name = props.name.decode() if isinstance(props.name, bytes) else str(props.name)
    return name.rstrip("\x00"), f"{props.major}.{props.minor}"


class Stream:
    """A non-blocking CUDA stream (it does not synchronize with the legacy default stream)."""

    def __init__(self) -> None:
        flags = cudart.cudaStreamNonBlocking
        self.raw = check("cudaStreamCreateWithFlags", cudart.cudaStreamCreateWithFlags(flags))
        self.handle = int(self.raw)

    @classmethod
    def wrap(cls, handle: int) -> Stream:
        """A Stream object for an existing raw handle (not owned: do not destroy it)."""
        stream = cls.__new__(cls)
        stream.raw = cudart.cudaStream_t(handle)
        stream.handle = handle
        return stream

    def synchronize(self) -> None:
        check("cudaStreamSynchronize", cudart.cudaStreamSynchronize(self.raw))

    def destroy(self) -> None:
        check("cudaStreamDestroy", cudart.cudaStreamDestroy(self.raw))


class Event:
    """A CUDA event with timing, used for completion and for GPU-side stage durations."""

    def __init__(self) -> None:
        self.raw = check("cudaEventCreate", cudart.cudaEventCreate())

    def record(self, stream: Stream) -> None:
        check("cudaEventRecord", cudart.cudaEventRecord(self.raw, stream.raw))

    def synchronize(self) -> None:
        check("cudaEventSynchronize", cudart.cudaEventSynchronize(self.raw))

    def seconds_since(self, start: Event) -> float:
        ms = check("cudaEventElapsedTime", cudart.cudaEventElapsedTime(start.raw, self.raw))
        return float(ms) / 1000.0

    def destroy(self) -> None:
        check("cudaEventDestroy", cudart.cudaEventDestroy(self.raw))


class PinnedBuffer:
    """Page-locked host memory, viewed as a numpy byte array, for async copies."""

    def __init__(self, nbytes: int) -> None:
        self.nbytes = max(nbytes, 1)
        self.ptr = int(check("cudaHostAlloc", cudart.cudaHostAlloc(self.nbytes, 0)))
        raw = (ctypes.c_uint8 * self.nbytes).from_address(self.ptr)
        self.array: np.ndarray = np.ctypeslib.as_array(raw)

    def view(self, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
        """The leading bytes as an array of dtype and shape (no copy)."""
        count = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        return self.array[:count].view(dtype).reshape(shape)

    def free(self) -> None:
        """Releases the memory; a second call does nothing."""
        ptr, self.ptr = self.ptr, 0
        if ptr:
            self.array = np.empty(0, dtype=np.uint8)
            check("cudaFreeHost", cudart.cudaFreeHost(ptr))


class DeviceBuffer:
    def __init__(self, nbytes: int) -> None:
        self.nbytes = max(nbytes, 1)
        self.ptr = int(check("cudaMalloc", cudart.cudaMalloc(self.nbytes)))

    def free(self) -> None:
        """Releases the memory; a second call does nothing."""
        ptr, self.ptr = self.ptr, 0
        if ptr:
            check("cudaFree", cudart.cudaFree(ptr))


def copy_to_device(dst: int, src: int, nbytes: int, stream: Stream) -> None:
    kind = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
    check("cudaMemcpyAsync(H2D)", cudart.cudaMemcpyAsync(dst, src, nbytes, kind, stream.raw))


def copy_to_host(dst: int, src: int, nbytes: int, stream: Stream) -> None:
    kind = cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
    check("cudaMemcpyAsync(D2H)", cudart.cudaMemcpyAsync(dst, src, nbytes, kind, stream.raw))


def copy_on_device(dst: int, src: int, nbytes: int, stream: Stream) -> None:
    kind = cudart.cudaMemcpyKind.cudaMemcpyDeviceToDevice
    check("cudaMemcpyAsync(D2D)", cudart.cudaMemcpyAsync(dst, src, nbytes, kind, stream.raw))
