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
    return OrtEngine(str(bundle.path(spec.file)), threads=threads, cache_dir=cache), spec


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
