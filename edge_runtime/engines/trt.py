"""`TrtEngine`: a TensorRT 10 plan behind the `Engine` protocol, KV cache kept on the GPU.

    host feeds (ids, mask, positions) ──H2D──▶ ┐
    past KV (CudaTensor, last step's present) ─┼─▶ execute_async_v3 ─▶ present KV (CudaTensor)
                                               ┘                     └─▶ logits ─D2H─▶ caller

One CUDA stream, one execution context per optimisation profile (prefill, decode; see
trt_plan.py) sharing one scratch block — they never run at the same time. Output shapes
follow from input shapes (present = past + new), so outputs are allocated after
`set_input_shape`, from the engine's buffer pool, without an IOutputAllocator. Present
tensors are returned as they are and fed back as the next step's past: the cache never
crosses to the host between decode steps; only cache surgery (`to_host` / `from_host`,
when a batch changes) copies it.

tensorrt and cuda-python are imported when an engine is opened, never at module import:
the daemon runs without them (Python 3.10 base install) and `load_engine("auto")` falls back
to ONNX Runtime. This module runs only where a GPU is: scripts/trt_selftest.py checks it.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edge_runtime.bundle.manifest import GraphSpec, TensorSpec
from edge_runtime.engines.cuda_mem import BufferPool, CudaTensor, PinnedBuffer, check, import_cudart
from edge_runtime.engines.protocol import DeviceTensor
from edge_runtime.engines.trt_cache import PlanRecord, Target
from edge_runtime.engines.trt_plan import (
    PAD,
    EngineIO,
    ShapeRange,
    check_io,
    choose_profile,
    needs_pad,
    numpy_dtype,
    padded_mask,
    plan_limits,
)
from edge_runtime.errors import EngineError

log = logging.getLogger(__name__)

MASK = "attention_mask"
TRT_INSTALL_HINT = (
    "TensorRT's Python bindings come with JetPack, for the system Python "
    "(`sudo apt install python3-libnvinfer`; a venv needs --system-site-packages); on an "
    "x86-64 machine with an NVIDIA GPU, `pip install tensorrt-cu12`"
)


def import_tensorrt() -> Any:
    """The tensorrt module (10.x), or EngineError saying what to install."""
    try:
        import tensorrt
    except ImportError as e:
        raise EngineError(f"the TensorRT backend needs tensorrt ({e}): {TRT_INSTALL_HINT}") from e
    major = int(str(tensorrt.__version__).split(".")[0])
    if major < 10:
        raise EngineError(
            f"tensorrt {tensorrt.__version__} is too old: this backend uses the TensorRT 10 API "
            "(JetPack 6.1+ ships 10.3)"
        )
    return tensorrt


def current_target(trt: Any, cudart: Any, device: int = 0) -> Target:
    """This machine's TensorRT version and GPU, as a plan's cache key records them."""
    check(cudart.cudaSetDevice(device), "cudaSetDevice")
    prop = check(cudart.cudaGetDeviceProperties(device), "cudaGetDeviceProperties")
    name = prop.name.decode(errors="replace") if isinstance(prop.name, bytes) else str(prop.name)
    return Target(
        trt_version=str(trt.__version__),
        gpu_name=name.rstrip("\x00").strip(),
        compute_capability=f"{prop.major}.{prop.minor}",
    )


def engine_io(trt: Any, engine: Any) -> list[EngineIO]:
    """A deserialized engine's I/O tensors, in the terms `check_io` compares."""
    io = []
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        is_input = engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
        dtype = numpy_dtype(engine.get_tensor_dtype(name).name, name)
        io.append(EngineIO(name, is_input, dtype, tuple(engine.get_tensor_shape(name))))
    return io


def read_plan(path: Path, record: PlanRecord | None) -> bytes:
    """The plan's bytes, checked against its record: a truncated or altered plan is refused
    here, not handed to the deserializer."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise EngineError(f"cannot read TensorRT plan {path}: {e}") from e
    if record is not None:
        digest = hashlib.sha256(data).hexdigest()
        if len(data) != record.plan_bytes or digest != record.plan_sha256:
            raise EngineError(
                f"TensorRT plan {path} is {len(data)} bytes with SHA-256 {digest[:16]}…; its "
                f"record says {record.plan_bytes} bytes, {record.plan_sha256[:16]}… — rebuild "
                "it (edge-runtime build-engine --force)"
            )
    return data


class TrtEngine:
    """One deserialized plan on one GPU."""

    def __init__(
        self,
        plan: str | os.PathLike[str],
        graph: GraphSpec,
        record: PlanRecord | None = None,
        device: int = 0,
    ) -> None:
        trt = import_tensorrt()
        rt = import_cudart()
        self._rt, self._device = rt, device
        check(rt.cudaSetDevice(device), "cudaSetDevice")
        data = read_plan(Path(plan), record)
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        engine = self._runtime.deserialize_cuda_engine(data)
        if engine is None:
            raise EngineError(
                f"TensorRT could not deserialize {plan} (built by another TensorRT version or "
                "for another GPU?); rebuild it with edge-runtime build-engine --force"
            )
        self._engine = engine
        io = engine_io(trt, engine)
        check_io(io, graph)  # refuse a plan that is not this graph's before running it
        self.graph_spec = graph
        """The bundle graph this plan was built from (Generator batches by its padding)."""
        self._dtypes = {t.name: np.dtype(t.dtype) for t in io}
        self._input_names = [t.name for t in io if t.is_input]
        self._output_names = [t.name for t in io if not t.is_input]
        kv = graph.kv_cache
        if kv is None or MASK not in self._input_names:
            raise EngineError(
                f"the TensorRT backend needs a decoder with a kv_cache spec and an {MASK} "
                f"input (an empty cache is one masked column); {graph.file} has inputs "
                f"{self._input_names}"
            )
        layers = range(kv.num_layers)
        self._past = [t.format(layer=i) for i in layers for t in (kv.past_key, kv.past_value)]
        self._present = [
            t.format(layer=i) for i in layers for t in (kv.present_key, kv.present_value)
        ]
        by_name = {s.name: s for s in (*graph.inputs, *graph.outputs)}
        self._inputs = [by_name[n] for n in self._input_names]
        self._outputs = [by_name[n] for n in self._output_names]
        self._profiles: list[dict[str, ShapeRange]] = [
            {
                n: tuple(tuple(s) for s in engine.get_tensor_profile_shape(n, p))  # type: ignore[misc]
                for n in self._input_names
            }
            for p in range(engine.num_optimization_profiles)
        ]
        self._stream = check(
            rt.cudaStreamCreateWithFlags(rt.cudaStreamNonBlocking), "cudaStreamCreateWithFlags"
        )
        self._stream_handle = int(self._stream)
        self._pool = BufferPool(
            lambda n: int(check(rt.cudaMalloc(n), "cudaMalloc")),
            lambda p: check(rt.cudaFree(p), "cudaFree"),
        )
        self._pinned = PinnedBuffer(rt)
        self._scratch = 0
        self._contexts = self._create_contexts(trt, engine)
        target = record.target if record is not None else None
        precision = record.precision if record is not None else "unknown precision"
        self._name = f"tensorrt:{target.gpu_name if target else f'cuda:{device}'}"
        log.info("loaded TensorRT plan %s (%s, %d profiles)", plan, precision, len(self._profiles))

    def _create_contexts(self, trt: Any, engine: Any) -> list[Any]:
        """One context per profile. They share one scratch block when this TensorRT lets us
        (10.0+: USER_MANAGED): they run one after another on one stream, and the prefill
        profile's scratch (activations of a whole prompt) is the large one."""
        strategy = getattr(trt, "ExecutionContextAllocationStrategy", None)
        size = int(getattr(engine, "device_memory_size_v2", 0) or engine.device_memory_size)
        contexts = []
        for p in range(engine.num_optimization_profiles):
            if strategy is not None:
                ctx = engine.create_execution_context(strategy.USER_MANAGED)
            else:
                ctx = engine.create_execution_context()
            if ctx is None:
                raise EngineError(f"TensorRT could not create an execution context (profile {p})")
            if strategy is not None:
                if not self._scratch:
                    self._scratch = int(check(self._rt.cudaMalloc(max(size, 256)), "cudaMalloc"))
                if hasattr(ctx, "set_device_memory"):
                    ctx.set_device_memory(self._scratch, size)
                else:
                    ctx.device_memory = self._scratch
            if not ctx.set_optimization_profile_async(p, self._stream_handle):
                raise EngineError(f"TensorRT refused optimisation profile {p}")
            contexts.append(ctx)
        self._sync()
        return contexts

    # -- Engine protocol -----------------------------------------------------------------

    @property
    def name(self) -> str:
        return self._name

    @property
    def inputs(self) -> Sequence[TensorSpec]:
        return self._inputs

    @property
    def outputs(self) -> Sequence[TensorSpec]:
        return self._outputs

    @property
    def profiles(self) -> list[dict[str, ShapeRange]]:
        """Per profile, input name → (min, opt, max) shape, as the plan reports them."""
        return self._profiles

    @property
    def max_batch(self) -> int:
        """The widest batch the plan decodes (BatchDecoder refuses a wider max_batch)."""
        return plan_limits(self._profiles, self._past[0])[0]

    @property
    def max_context(self) -> int:
        """The longest context the plan holds (Generator.from_bundle caps the model's)."""
        return plan_limits(self._profiles, self._past[0])[1]

    def empty(self, shape: Sequence[int], dtype: str) -> DeviceTensor:
        t = CudaTensor(self._pool, shape, dtype)
        if t.nbytes:
            check(self._rt.cudaMemsetAsync(t.ptr, 0, t.nbytes, self._stream), "cudaMemsetAsync")
        return t

    def to_host(self, value: DeviceTensor) -> np.ndarray:
        t = self._own(value, "to_host")
        out = np.empty(t.shape, dtype=t.dtype)
        if t.nbytes:
            self._d2h([(t, out)])
        return out

    def from_host(self, array: np.ndarray) -> DeviceTensor:
        return self._upload(array)

    def run(
        self,
        feeds: Mapping[str, np.ndarray | DeviceTensor],
        host_outputs: Sequence[str],
        device_outputs: Sequence[str] = (),
        out: Mapping[str, np.ndarray] | None = None,
    ) -> tuple[dict[str, np.ndarray], dict[str, DeviceTensor]]:
        if not self._contexts:
            raise EngineError("the TensorRT engine is closed")
        missing = [n for n in self._input_names if n not in feeds]
        unknown = [n for n in feeds if n not in self._dtypes or n in self._output_names]
        bad_out = [n for n in (*host_outputs, *device_outputs) if n not in self._output_names]
        if missing or unknown or bad_out:
            raise EngineError(
                f"TensorRT run: missing inputs {missing}, unknown inputs {unknown}, unknown "
                f"outputs {bad_out} (inputs {self._input_names}, outputs {self._output_names})"
            )
        pad = needs_pad({n: tuple(v.shape) for n, v in feeds.items()}, self._past)
        if pad:  # an empty cache: one masked stand-in column instead (trt_plan.py)
            mask = feeds[MASK]
            host_mask = mask if isinstance(mask, np.ndarray) else self.to_host(mask)
            feeds = {**feeds, MASK: padded_mask(host_mask)}
            for name in self._past:
                b, h, _, d = feeds[name].shape
                feeds[name] = self.empty((b, h, PAD, d), self._dtypes[name].name)
        tensors = {name: self._device_input(name, value) for name, value in feeds.items()}
        profile = choose_profile(self._profiles, {n: t.shape for n, t in tensors.items()})
        ctx = self._contexts[profile]
        for name, t in tensors.items():
            if not ctx.set_input_shape(name, t.shape):
                raise EngineError(f"TensorRT refused shape {list(t.shape)} for input {name!r}")
            ctx.set_tensor_address(name, t.ptr)
        results: dict[str, CudaTensor] = {}
        for name in self._output_names:  # TensorRT needs an address for every output
            shape = tuple(ctx.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise EngineError(f"TensorRT could not infer the shape of output {name!r}: {shape}")
            results[name] = t = CudaTensor(self._pool, shape, self._dtypes[name].name)
            ctx.set_tensor_address(name, t.ptr)
        if not ctx.execute_async_v3(self._stream_handle):
            raise EngineError(f"TensorRT execute_async_v3 failed (profile {profile})")
        if pad:
            for name in self._present:
                results[name] = self._drop_pad(results[name])
        out = out or {}
        host: dict[str, np.ndarray] = {}
        for name in host_outputs:
            t = results[name]
            buf = out.get(name)
            if buf is None:
                buf = np.empty(t.shape, dtype=t.dtype)
            elif buf.shape != t.shape or buf.dtype != t.dtype or not buf.flags.c_contiguous:
                raise EngineError(
                    f"out[{name!r}] is {buf.dtype}{list(buf.shape)}; the output is "
                    f"{t.dtype}{list(t.shape)} (C-contiguous)"
                )
            host[name] = buf
        self._d2h([(results[n], host[n]) for n in host_outputs])  # synchronises the stream
        return host, {name: results[name] for name in device_outputs}

    def close(self) -> None:
        self._sync()
        self._contexts.clear()
        self._engine = None
        self._pool.close()
        self._pinned.close()
        if self._scratch:
            check(self._rt.cudaFree(self._scratch), "cudaFree")
            self._scratch = 0
        check(self._rt.cudaStreamDestroy(self._stream), "cudaStreamDestroy")

    # -- transfers -----------------------------------------------------------------------

    def _own(self, value: Any, what: str) -> CudaTensor:
        if not isinstance(value, CudaTensor) or value.pool is not self._pool:
            raise EngineError(
                f"TensorRT {what}: {type(value).__name__} is not a tensor of this engine"
            )
        return value

    def _device_input(self, name: str, value: Any) -> CudaTensor:
        want = self._dtypes[name]
        if isinstance(value, np.ndarray):
            if value.dtype != want:
                raise EngineError(f"input {name!r} is {value.dtype}; the plan takes {want}")
            return self._upload(value)
        t = self._own(value, f"input {name!r}")
        if t.dtype != want:
            raise EngineError(f"input {name!r} is {t.dtype}; the plan takes {want}")
        return t

    def _upload(self, array: np.ndarray) -> CudaTensor:
        arr = np.ascontiguousarray(array)
        t = CudaTensor(self._pool, arr.shape, arr.dtype.name)
        # From pageable memory the call returns once `arr` is staged: the caller may reuse it.
        if t.nbytes:
            kind = self._rt.cudaMemcpyKind.cudaMemcpyHostToDevice
            check(
                self._rt.cudaMemcpyAsync(t.ptr, arr.ctypes.data, t.nbytes, kind, self._stream),
                "cudaMemcpyAsync(H2D)",
            )
        return t

    def _drop_pad(self, t: CudaTensor) -> CudaTensor:
        """[B, H, PAD + L, D] → [B, H, L, D] on the device: one strided copy (B·H rows)."""
        b, h, width, d = t.shape
        row = d * t.dtype.itemsize
        out = CudaTensor(self._pool, (b, h, width - PAD, d), t.dtype.name)
        if out.nbytes:
            kind = self._rt.cudaMemcpyKind.cudaMemcpyDeviceToDevice
            check(
                self._rt.cudaMemcpy2DAsync(
                    out.ptr, (width - PAD) * row, t.ptr + PAD * row, width * row,
                    (width - PAD) * row, b * h, kind, self._stream,
                ),
                "cudaMemcpy2DAsync",
            )
        return out

    def _d2h(self, pairs: Sequence[tuple[CudaTensor, np.ndarray]]) -> None:
        """Copy device tensors into host arrays through the pinned staging buffer."""
        offsets, total = [], 0
        for t, _ in pairs:
            offsets.append(total)
            total += -(-t.nbytes // 256) * 256
        ptr, staging = self._pinned.view(max(total, 1))
        kind = self._rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        for (t, _), off in zip(pairs, offsets, strict=True):
            if t.nbytes:
                check(
                    self._rt.cudaMemcpyAsync(ptr + off, t.ptr, t.nbytes, kind, self._stream),
                    "cudaMemcpyAsync(D2H)",
                )
        self._sync()
        for (t, dst), off in zip(pairs, offsets, strict=True):
            if t.nbytes:
                dst.reshape(-1).view(np.uint8)[:] = staging[off : off + t.nbytes]

    def _sync(self) -> None:
        check(self._rt.cudaStreamSynchronize(self._stream), "cudaStreamSynchronize")
