"""Inference engines behind one small protocol: load a graph, describe its I/O, run it.

The generator never touches backend types. Inputs are numpy arrays or values an engine
returned earlier (`DeviceTensor`, opaque: an `OrtValue` for ONNX Runtime, a device buffer
for TensorRT). Outputs the caller needs on the host (logits) come back as numpy; outputs it
only feeds back in (the KV cache) stay where the engine keeps them, so a GPU backend never
copies the cache through host memory between decode steps.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

from edge_runtime.bundle import TensorSpec

DeviceTensor = Any
"""An engine-owned tensor; only the engine that made it may read it."""


@runtime_checkable
class Engine(Protocol):
    """A loaded graph.

    An engine compiled for fixed shape ranges (TensorRT) also has `max_batch` and
    `max_context` properties: BatchDecoder refuses a wider batch and Generator.from_bundle
    caps the model's context to what the engine holds. Engines without them take any shape.
    """

    @property
    def name(self) -> str:
        """Backend and device, for logs and /metrics (`onnxruntime:CPUExecutionProvider`)."""
        ...

    @property
    def inputs(self) -> Sequence[TensorSpec]: ...

    @property
    def outputs(self) -> Sequence[TensorSpec]: ...

    def run(
        self,
        feeds: Mapping[str, np.ndarray | DeviceTensor],
        host_outputs: Sequence[str],
        device_outputs: Sequence[str] = (),
        out: Mapping[str, np.ndarray] | None = None,
    ) -> tuple[dict[str, np.ndarray], dict[str, DeviceTensor]]:
        """Run once; return (host outputs as numpy, device outputs as engine tensors).

        `out` may give preallocated, C-contiguous host buffers of the exact output shape for
        some host outputs: the engine writes into them instead of allocating (the decode
        loop's logits buffer). An engine is used by one thread at a time.
        """
        ...

    def empty(self, shape: Sequence[int], dtype: str) -> DeviceTensor:
        """A zero-size or zero-filled engine tensor (the empty KV cache of a first step)."""
        ...

    def to_host(self, value: DeviceTensor) -> np.ndarray:
        """A host copy of an engine tensor (cache surgery when a batch changes)."""
        ...

    def from_host(self, array: np.ndarray) -> DeviceTensor:
        """An engine tensor holding `array` (on the engine's device)."""
        ...

    def close(self) -> None: ...


def load_engine(path: str, backend: str = "auto", threads: int | None = None) -> Engine:
    """Open `path` with the best backend available here (`auto`), or the one named.

    `auto` takes TensorRT when a plan built for this GPU and TensorRT version is in the plan
    cache (`edge-runtime build-engine`) and tensorrt imports, else ONNX Runtime; tensorrt is
    never imported when no plan exists. `tensorrt` fails with the reason instead of falling
    back. `threads` sizes ONNX Runtime's CPU pool; TensorRT has none.
    """
    if backend in ("auto", "tensorrt"):
        from edge_runtime.engines.trt_cache import open_trt

        engine = open_trt(path, required=backend == "tensorrt")
        if engine is not None:
            return engine
    if backend in ("auto", "onnxruntime"):
        from edge_runtime.engines.ort import OrtEngine

        return OrtEngine(path, threads=threads)
    from edge_runtime.errors import EngineError

    raise EngineError(
        f"unknown engine backend {backend!r} (known: auto, onnxruntime, tensorrt)"
    )


__all__ = ["DeviceTensor", "Engine", "load_engine"]
