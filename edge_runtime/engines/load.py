"""Open a verified bundle's graph with the best engine this machine has.

    load_engine(bundle, "decoder", backend="auto")
        ├─ a TensorRT plan for this graph, GPU and TensorRT version in the plan cache
        │  and tensorrt imports ─▶ (TrtEngine, the graph the plan was built from)
        └─ else ─▶ (OrtEngine, the graph asked for)

The caller hands over the `Bundle` that `verify_bundle` returned, never a path: everything
the loader needs (which graph TensorRT takes, its SHA-256 for the plan cache key) comes from
that verified manifest, and nothing is re-read from disk after verification. The graph spec
comes back beside the engine because TensorRT may run another graph of the bundle with the
same tensors (the QDQ graph packaged for it, decomposed attention): a batch is padded the way
the graph that really runs needs.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

from edge_runtime.bundle.manifest import Bundle, GraphSpec
from edge_runtime.engines.protocol import Engine
from edge_runtime.engines.trt_cache import (
    default_cache_dir,
    find_plan,
    graph_sha256,
    ort_trt_cache_dir,
    plan_paths,
    select_graph,
)
from edge_runtime.engines.trt_plan import same_interface
from edge_runtime.errors import EngineError

if TYPE_CHECKING:
    from edge_runtime.engines.trt import TrtEngine

log = logging.getLogger(__name__)

BACKENDS = ("auto", "onnxruntime", "tensorrt")


def load_engine(
    bundle: Bundle, graph: str = "decoder", backend: str = "auto", threads: int | None = None
) -> tuple[Engine, GraphSpec]:
    """The engine for `bundle`'s graph named `graph`, and the spec of the graph it runs.

    `auto` takes TensorRT when a plan built for this GPU and TensorRT version is in the plan
    cache (`edge-runtime build-engine`) and tensorrt imports, else ONNX Runtime; tensorrt is
    never imported when no plan exists. `tensorrt` fails with the reason instead of falling
    back. `threads` sizes ONNX Runtime's CPU pool; TensorRT has none.
    """
    if backend not in BACKENDS:
        raise EngineError(f"unknown engine backend {backend!r} (known: {', '.join(BACKENDS)})")
    spec = bundle.graph(graph)
    if backend in ("auto", "tensorrt"):
        trt = open_trt(bundle, spec, required=backend == "tensorrt")
        if trt is not None:
            return trt, trt.graph_spec
    from edge_runtime.engines.ort import OrtEngine

    # The TensorRT execution provider's engine cache: outside the bundle, one per bundle.
    cache = ort_trt_cache_dir(bundle, spec)
    engine = OrtEngine(str(bundle.path(spec.file)), threads=threads, cache_dir=cache)
    warning = cpu_attention_warning(engine.providers, spec, graph)
    if warning is not None:
        log.warning("%s", warning)
    return engine, spec


GPU_EPS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")
FP16_FIX = ('rebuild the bundle with fuse.activations = "float16" in its recipe '
            "(edge-build run --recipe R.toml --set fuse.activations=float16)")


def cpu_attention_warning(providers: Sequence[str], spec: GraphSpec,
                          graph: str = "decoder") -> str | None:
    """What goes wrong, and the fix, when a fused graph with float32 activations runs under
    ONNX Runtime's CUDA (or TensorRT) provider; None when nothing does.

    `providers`: the session's active providers; `spec`: the graph's manifest entry. A fused
    graph (GroupQueryAttention: `right_padded_batch`) with a float32 KV cache has float32
    attention, and ONNX Runtime's CUDA GroupQueryAttention takes float16/bfloat16 only (nor
    does TensorRT take com.microsoft operators): every attention node is placed on the CPU,
    with Memcpy nodes around it, and the KV cache crosses PCIe every decode step. Seen on an
    H100 (Qwen2-0.5B shapes, int4): 24 of 24 attention nodes on the CPU, 97 Memcpy nodes,
    74 tok/s at batch 1 and 300 at batch 16 against the unfused graph's 77 and 903.
    """
    kv = spec.kv_cache
    if not any(p in GPU_EPS for p in providers):
        return None
    if not spec.right_padded_batch or kv is None or kv.dtype != "float32":
        return None
    return (f"graph {graph!r} ({spec.file}) is fused (GroupQueryAttention) with float32 "
            f"activations and KV cache, and ONNX Runtime's CUDA GroupQueryAttention takes "
            f"float16/bfloat16 only: on {providers[0]} its attention ({kv.num_layers} layers) "
            "runs on the CPU and the KV cache is copied between GPU and host every decode "
            "step (an H100 decoded such a graph ~3x slower at batch 16 than the unfused "
            f"one); {FP16_FIX}")


def open_trt(bundle: Bundle, requested: GraphSpec, required: bool) -> TrtEngine | None:
    """A TrtEngine for `requested` (a graph of `bundle`), from the plan cache.

    `required` (backend "tensorrt"): every obstacle is an EngineError saying what to do.
    Otherwise (backend "auto") None means "use ONNX Runtime": no plan for this graph (decided
    without importing tensorrt), no tensorrt, no plan for this GPU, or a plan that fails to
    load (logged as a warning).
    """

    def give_up(message: str, warn: bool = False) -> None:
        if required:
            raise EngineError(message)
        (log.warning if warn else log.info)("TensorRT not used: %s", message)

    manifest = bundle.manifest
    try:
        gname, graph = select_graph(manifest)
    except EngineError as e:
        give_up(str(e))
        return None
    if not same_interface(requested, graph):
        give_up(f"graph {gname!r} ({graph.file}) does not have the I/O of {requested.file}")
        return None
    sha = graph_sha256(manifest, graph)
    cache = default_cache_dir()
    build_cmd = f"edge-runtime build-engine {bundle.root}"
    if not required:
        if find_plan(cache, sha) is None:
            give_up(f"no TensorRT plan for graph {gname!r} in {cache} (build one: {build_cmd})")
            return None
        if importlib.util.find_spec("tensorrt") is None:
            from edge_runtime.engines.trt import TRT_INSTALL_HINT

            give_up(f"a plan exists in {cache} but tensorrt is not importable: {TRT_INSTALL_HINT}")
            return None
    from edge_runtime.engines.cuda_mem import import_cudart
    from edge_runtime.engines.trt import TrtEngine, current_target, import_tensorrt

    try:
        target = current_target(import_tensorrt(), import_cudart())
        record = find_plan(cache, sha, target)
        if record is None:
            raise EngineError(
                f"no TensorRT plan in {cache} for graph {gname!r} (SHA-256 {sha[:12]}…) on "
                f"{target.gpu_name} (sm {target.compute_capability}, TensorRT "
                f"{target.trt_version}): run `{build_cmd}`"
            )
        return TrtEngine(plan_paths(cache, record.key)[0], graph, record=record)
    except EngineError as e:
        give_up(str(e), warn=True)
        return None
