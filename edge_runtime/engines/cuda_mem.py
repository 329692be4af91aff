"""CUDA memory for the TensorRT engine: device tensors, a buffer pool, one stream.

The binding is NVIDIA's `cuda-python` (`cuda.bindings.runtime`; `cuda.cudart` before 12.6),
not pycuda: it is a pip package with no build step, it imports without a GPU, and its calls
return `(cudaError_t, *values)` tuples, which `check` turns into EngineError naming the CUDA
error — the TensorRT samples' `cuda_call` helper, with our exception tree.

A decode step reads the last step's KV cache and writes a new one one column wider, so every
step needs 2 x layers fresh buffers while the previous ones are still held. `BufferPool`
recycles them by size class (powers of two): in steady state a step reuses the buffers the
step before last released, and cudaMalloc/cudaFree — which synchronise the device — stay out
of the decode loop. A `CudaTensor` returns its buffer to the pool when it is garbage.
"""

from __future__ import annotations

import ctypes
import threading
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from edge_runtime.errors import EngineError

_MIN_CLASS = 256  # TensorRT wants 256-byte aligned tensors; cudaMalloc gives that and more

CUDA_INSTALL_HINT = (
    "install NVIDIA's CUDA Python bindings matching the device's CUDA: "
    "`pip install 'cuda-python>=12.6,<13'` on JetPack 6 (CUDA 12.6), "
    "`pip install 'cuda-python>=13,<14'` on JetPack 7 (CUDA 13)"
)


def import_cudart() -> Any:
    """The CUDA runtime module of cuda-python, or EngineError saying what to install."""
    try:
        from cuda.bindings import runtime

        return runtime
    except ImportError:
        pass
    try:
        from cuda import cudart

        return cudart
    except ImportError as e:
        raise EngineError(
            f"the TensorRT backend needs cuda-python ({e}): {CUDA_INSTALL_HINT}"
        ) from e


def check(result: Any, call: str) -> Any:
    """`(err, *values)` from a cuda-python call → values, or EngineError naming the error."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        name = getattr(err, "name", None) or f"error {int(err)}"
        raise EngineError(f"CUDA {call} failed: {name} ({int(err)})")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


def size_class(nbytes: int) -> int:
    """The pooled capacity for a request of `nbytes`: the next power of two, at least 256."""
    if nbytes < 0:
        raise ValueError(f"negative buffer size {nbytes}")
    return max(_MIN_CLASS, 1 << max(0, nbytes - 1).bit_length())


class BufferPool:
    """Device buffers by size class. `malloc(n) -> ptr` and `free(ptr)` are the CUDA calls;
    at most `max_idle_bytes` of released buffers are kept for reuse, the rest freed."""

    def __init__(
        self,
        malloc: Callable[[int], int],
        free: Callable[[int], None],
        max_idle_bytes: int = 1 << 30,
    ) -> None:
        self._malloc, self._free = malloc, free
        self._idle: dict[int, list[int]] = {}
        self._idle_bytes = 0
        self.max_idle_bytes = max_idle_bytes
        self.live = 0
        """Buffers handed out and not yet released."""
        self._closed = False
        self._lock = threading.Lock()  # finalizers run on whichever thread drops a tensor

    @property
    def idle_bytes(self) -> int:
        return self._idle_bytes

    def acquire(self, nbytes: int) -> tuple[int, int]:
        """(device pointer, capacity) holding at least `nbytes`."""
        cap = size_class(nbytes)
        with self._lock:
            if self._closed:
                raise EngineError("the TensorRT engine is closed")
            free = self._idle.get(cap)
            if free:
                self._idle_bytes -= cap
                self.live += 1
                return free.pop(), cap
        ptr = self._malloc(cap)
        with self._lock:
            self.live += 1
        return ptr, cap

    def release(self, ptr: int, cap: int) -> None:
        with self._lock:
            self.live -= 1
            if not self._closed and self._idle_bytes + cap <= self.max_idle_bytes:
                self._idle.setdefault(cap, []).append(ptr)
                self._idle_bytes += cap
                return
        self._free(ptr)

    def close(self) -> None:
        """Free every idle buffer; buffers still held are freed when released."""
        with self._lock:
            self._closed = True
            idle = [p for ptrs in self._idle.values() for p in ptrs]
            self._idle.clear()
            self._idle_bytes = 0
        for ptr in idle:
            self._free(ptr)


class CudaTensor:
    """A device tensor owned by one engine (its `pool`); opaque to everything else."""

    __slots__ = ("__weakref__", "dtype", "nbytes", "pool", "ptr", "shape")

    def __init__(self, pool: BufferPool, shape: Sequence[int], dtype: str) -> None:
        self.shape = tuple(int(d) for d in shape)
        self.dtype = np.dtype(dtype)
        self.nbytes = int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize
        self.pool = pool
        self.ptr, cap = pool.acquire(self.nbytes)
        weakref.finalize(self, pool.release, self.ptr, cap)

    def __repr__(self) -> str:
        return f"CudaTensor(shape={list(self.shape)}, dtype={self.dtype.name})"


class PinnedBuffer:
    """Page-locked host memory, grown on demand: the staging area of device→host copies
    (asynchronous copies from pageable memory are not asynchronous)."""

    def __init__(self, cudart: Any) -> None:
        self._rt = cudart
        self._ptr = 0
        self._size = 0

    def view(self, nbytes: int) -> tuple[int, np.ndarray]:
        """(pointer, uint8 array over it) of at least `nbytes`."""
        if nbytes > self._size:
            self.close()
            size = size_class(nbytes)
            self._ptr = int(check(self._rt.cudaMallocHost(size), "cudaMallocHost"))
            self._size = size
        raw = (ctypes.c_uint8 * self._size).from_address(self._ptr)
        return self._ptr, np.ctypeslib.as_array(raw)[:nbytes]

    def close(self) -> None:
        if self._ptr:
            check(self._rt.cudaFreeHost(self._ptr), "cudaFreeHost")
            self._ptr, self._size = 0, 0
