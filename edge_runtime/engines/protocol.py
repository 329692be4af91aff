"""The engine protocol: load a graph, describe its I/O, run it.

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

from edge_runtime.bundle.manifest import TensorSpec

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


__all__ = ["DeviceTensor", "Engine"]
