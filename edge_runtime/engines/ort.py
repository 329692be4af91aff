"""`OrtEngine`: ONNX Runtime behind the `Engine` protocol.

Execution providers are taken in the order TensorRT → CUDA → CPU, keeping those this build of
ONNX Runtime has (CPU always). onnxruntime-gpu lists TensorRT among its providers whether or
not TensorRT's library is installed (seen: 1.31.1 on an H100 machine without TensorRT listed
TensorRT, CUDA, CPU), and asking for it without the library leaves the reason
to ONNX Runtime's own output, so TensorRT is only asked for when `libnvinfer` loads, and the
log says why it was left out. Runs go through IOBinding so that outputs we feed back (the KV
cache) stay `OrtValue`s owned by ONNX Runtime — on CUDA they stay on the GPU — instead of being
copied into numpy and back on every decode step.
"""

from __future__ import annotations

import ctypes
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from edge_runtime.bundle.manifest import TensorSpec
from edge_runtime.engines.protocol import DeviceTensor
from edge_runtime.engines.trt_cache import ort_trt_cache_for_path
from edge_runtime.errors import EngineError

log = logging.getLogger(__name__)

_PREFERENCE = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
_DTYPES = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(bfloat16)": "bfloat16",
    "tensor(double)": "float64",
    "tensor(int64)": "int64",
    "tensor(int32)": "int32",
    "tensor(int8)": "int8",
    "tensor(uint8)": "uint8",
    "tensor(bool)": "bool",
}


# TensorRT 10's runtime library (JetPack 6 and 7, the onnxruntime-gpu wheels of 1.19+).
TENSORRT_LIBRARY = "libnvinfer.so.10"


def tensorrt_missing(load: Callable[[str], object] = ctypes.CDLL) -> str | None:
    """Why ONNX Runtime's TensorRT provider cannot start here, or None when it can."""
    try:
        load(TENSORRT_LIBRARY)
    except OSError as e:
        return f"TensorRT is not installed ({TENSORRT_LIBRARY} does not load: {e})"
    return None


def choose_providers(
    available: Sequence[str] | None = None,
    trt_missing: Callable[[], str | None] = tensorrt_missing,
) -> list[str]:
    """The providers to ask for, best first, among those this ONNX Runtime build has and
    can start (TensorRT only when its library loads; the log line says why not)."""
    have = set(ort.get_available_providers() if available is None else available)
    chosen = [p for p in _PREFERENCE if p in have]
    if "TensorrtExecutionProvider" in chosen:
        reason = trt_missing()
        if reason is not None:
            chosen.remove("TensorrtExecutionProvider")
            log.warning(
                "ONNX Runtime's TensorrtExecutionProvider left out: %s; using %s",
                reason,
                chosen[0] if chosen else "CPUExecutionProvider",
            )
    return chosen or ["CPUExecutionProvider"]


def trt_provider_options(cache_dir: Path) -> dict[str, Any]:
    """The TensorRT execution provider's options; its engine cache goes to `cache_dir`
    (created here, owner-only), which load.py puts under the runtime cache, never in a
    bundle (trt_cache.ort_trt_cache_dir)."""
    cache_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    return {
        "trt_fp16_enable": True,
        "trt_engine_cache_enable": True,
        "trt_engine_cache_path": str(cache_dir),
        "trt_timing_cache_enable": True,
    }


def _spec(arg: Any) -> TensorSpec:
    shape = [d if isinstance(d, int) else str(d) for d in (arg.shape or [])]
    return TensorSpec(name=arg.name, dtype=_DTYPES.get(arg.type, arg.type), shape=shape)


class OrtEngine:
    """One ONNX graph in an `InferenceSession`."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        threads: int | None = None,
        providers: Sequence[str] | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        profile_prefix: str | None = None,
    ) -> None:
        opts = ort.SessionOptions()
        if profile_prefix:  # ONNX Runtime's per-node trace (provider, op, time) of every run
            opts.enable_profiling = True
            opts.profile_file_prefix = profile_prefix
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # One decode step is a chain of small ops: parallelism inside ops, not across them.
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.inter_op_num_threads = 1
        if threads:
            opts.intra_op_num_threads = threads
        chosen = list(providers) if providers else choose_providers()
        provider_args: list[Any] = []
        for p in chosen:
            if p == "TensorrtExecutionProvider":
                trt_dir = Path(cache_dir) if cache_dir else ort_trt_cache_for_path(Path(path))
                provider_args.append((p, trt_provider_options(trt_dir)))
            else:
                provider_args.append(p)
        try:
            self._sess = ort.InferenceSession(str(path), opts, providers=provider_args)
        except Exception as e:  # ORT raises its own untyped exceptions (Fail, InvalidGraph…)
            raise EngineError(f"ONNX Runtime could not load {path}: {e}") from e
        active = self._sess.get_providers()
        self._providers = list(active)
        dropped = [p for p in chosen if p not in active]
        if dropped:  # ONNX Runtime fell back (it says why on stdout, not through logging)
            log.warning("ONNX Runtime did not start %s for %s; running on %s",
                        ", ".join(dropped), path, active)
        self._device = "cuda" if active[0] in _PREFERENCE[:2] else "cpu"
        self._name = f"onnxruntime:{active[0]}"
        log.info("loaded %s with providers %s", path, active)
        self._inputs = [_spec(a) for a in self._sess.get_inputs()]
        self._outputs = [_spec(a) for a in self._sess.get_outputs()]

    @property
    def name(self) -> str:
        return self._name

    @property
    def providers(self) -> list[str]:
        """The session's active execution providers, best first."""
        return self._providers

    @property
    def inputs(self) -> Sequence[TensorSpec]:
        return self._inputs

    @property
    def outputs(self) -> Sequence[TensorSpec]:
        return self._outputs

    def empty(self, shape: Sequence[int], dtype: str) -> DeviceTensor:
        return ort.OrtValue.ortvalue_from_numpy(np.zeros(tuple(shape), dtype=dtype))

    def to_host(self, value: DeviceTensor) -> np.ndarray:
        return np.asarray(value.numpy())

    def from_host(self, array: np.ndarray) -> DeviceTensor:
        # On CPU the OrtValue wraps the array's memory (and keeps a reference to it).
        return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), self._device)

    def run(
        self,
        feeds: Mapping[str, np.ndarray | DeviceTensor],
        host_outputs: Sequence[str],
        device_outputs: Sequence[str] = (),
        out: Mapping[str, np.ndarray] | None = None,
    ) -> tuple[dict[str, np.ndarray], dict[str, DeviceTensor]]:
        # A fresh binding per run: outputs of the last run (this step's `past` inputs) are
        # owned by the binding that produced them, and clearing a reused binding frees them
        # with ONNX Runtime 1.23, the newest wheel for Python 3.10 (seen: a segfault).
        binding = self._sess.io_binding()
        for name, value in feeds.items():
            if isinstance(value, np.ndarray):
                binding.bind_cpu_input(name, value)
            else:
                binding.bind_ortvalue_input(name, value)
        out = out or {}
        for name in host_outputs:
            buf = out.get(name)
            if buf is None:
                binding.bind_output(name, "cpu")
            else:  # ORT writes straight into the caller's buffer: no per-step allocation
                binding.bind_output(name, "cpu", 0, buf.dtype, list(buf.shape), buf.ctypes.data)
        for name in device_outputs:
            binding.bind_output(name, self._device)
        try:
            self._sess.run_with_iobinding(binding)
        except Exception as e:
            raise EngineError(f"ONNX Runtime run failed: {e}") from e
        values = binding.get_outputs()
        n = len(host_outputs)
        host = {
            name: out[name] if name in out else values[i].numpy()
            for i, name in enumerate(host_outputs)
        }
        device = {name: values[n + i] for i, name in enumerate(device_outputs)}
        return host, device

    def end_profiling(self) -> str:
        """Stop the trace started by `profile_prefix`; the path of its JSON file."""
        return str(self._sess.end_profiling())

    def close(self) -> None:
        # InferenceSession frees its memory when the last reference goes.
        del self._sess
