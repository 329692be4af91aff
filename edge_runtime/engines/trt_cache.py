"""Where built TensorRT plans live on a device, and which of a bundle's graphs they come from.

A plan is valid for one (graph, TensorRT version, GPU) triple: TensorRT engines are not
portable across GPUs or TensorRT versions. The cache holds, per plan,

    CACHE/<key>.plan    the serialized engine (written atomically, edge_runtime/atomic.py)
    CACHE/<key>.json    its record: graph SHA-256, TensorRT version, GPU, profile, precision,
                        the plan's size and SHA-256 — written last, so it marks a whole plan

where `key` hashes exactly what changes the built artifact (as vLLM's `compute_hash`):
the graph's SHA-256 from the signed manifest, the TensorRT version, the GPU's name and
compute capability, the profile limits, the precision mode and BUILD_RECIPE. Metadata is read
from the record, never parsed out of the file name.

Which graph: TensorRT's ONNX parser reads standard ONNX only. The bundle's serving graph
holds ONNX Runtime contrib ops when it is 4-bit (`MatMulNBits`, `GatherBlockQuantized`) or
fused (`GroupQueryAttention`), so `select_graph` takes, in order: a graph the manifest marks
for TensorRT (`weights.format == "qdq"`: opset-21 blocked INT4 DequantizeLinear, from
`edge-build lower --format qdq`), else the serving graph when it is plain float ONNX, else it
refuses with the reason. load.py puts it together: it imports tensorrt (through trt.py) only
once a plan for the graph is known to exist.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from edge_runtime.atomic import atomic_write_json
from edge_runtime.bundle.manifest import Bundle, GraphSpec, Manifest
from edge_runtime.engines.trt_plan import ProfileLimits
from edge_runtime.errors import BundleError, ConfigError, EngineError

log = logging.getLogger(__name__)

BUILD_RECIPE = 1
"""Bump when trt_build.py changes how a plan is built (flags, profiles): old plans rebuild."""
PRECISIONS = ("fp16", "fp32", "strongly-typed")
"""fp16 / fp32: a weakly typed network with (or without) TensorRT's FP16 flag, for float
graphs. strongly-typed: every tensor keeps the graph's type; required for explicitly quantized
(Q/DQ) graphs, where TensorRT asks for no precision flags."""
TRT_WEIGHT_FORMAT = "qdq"
"""`GraphSpec.weights["format"]` of a graph written for TensorRT."""
_ORT_ONLY_FORMATS = {"MatMulNBits": "MatMulNBits / GatherBlockQuantized (ONNX Runtime contrib ops)"}
CACHE_ENV = "EDGE_RUNTIME_TRT_CACHE"
RUNTIME_CACHE_ENV = "EDGE_RUNTIME_CACHE"
ORT_TRT_DIR = "ort-trt"
"""Under the runtime cache: ONNX Runtime's TensorRT execution provider's engine caches."""


@dataclass(frozen=True)
class Target:
    """The GPU and TensorRT a plan is built for and runs on."""

    trt_version: str
    gpu_name: str
    compute_capability: str
    """`8.7` on Jetson AGX Orin."""


@dataclass(frozen=True)
class PlanRecord:
    """The sidecar of a cached plan."""

    key: str
    graph: str
    graph_sha256: str
    target: Target
    profile: dict[str, int]
    precision: str
    build_recipe: int
    plan_bytes: int
    plan_sha256: str
    build_seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: Path) -> PlanRecord:
        try:
            return cls(**{**d, "target": Target(**d["target"])})
        except (KeyError, TypeError) as e:
            raise EngineError(f"TensorRT plan record {source} is malformed: {e}") from e


def runtime_cache_dir() -> Path:
    """$EDGE_RUNTIME_CACHE, else $XDG_CACHE_HOME/edge-runtime (~/.cache/edge-runtime).

    Everything the runtime builds on a device for itself lives here, never inside a bundle:
    a bundle is verified file by file at every start, and a file it does not list makes it
    refused (the device could not restart)."""
    env = os.environ.get(RUNTIME_CACHE_ENV)
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "edge-runtime"


def default_cache_dir() -> Path:
    """The plan cache: $EDGE_RUNTIME_TRT_CACHE, else runtime_cache_dir()/trt."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env)
    return runtime_cache_dir() / "trt"


def ort_trt_cache_dir(bundle: Bundle, graph: GraphSpec) -> Path:
    """Where ONNX Runtime's TensorRT execution provider caches the engines it builds for
    `bundle`'s `graph`: runtime_cache_dir()/ort-trt/<key>.

    The provider names its cache files after the model's path, not its content, so the key
    hashes the verified manifest (every file's SHA-256, name, version) and the graph: a new
    bundle at the same path never picks up the engines of the old one, and two bundles never
    share a directory. Refuses a cache directory inside the bundle (EDGE_RUNTIME_CACHE
    pointing there), which would make the next verification fail."""
    material = bundle.manifest.to_json() + graph.file.encode("utf-8")
    key = hashlib.sha256(material).hexdigest()[:32]
    cache = runtime_cache_dir() / ORT_TRT_DIR / key
    root = bundle.root.resolve()
    resolved = cache.resolve()
    if resolved == root or root in resolved.parents:
        raise ConfigError(
            f"the engine cache {cache} is inside the bundle {bundle.root}: set "
            f"{RUNTIME_CACHE_ENV} to a directory outside it"
        )
    return cache


def ort_trt_cache_for_path(graph_file: Path) -> Path:
    """The engine cache of a graph opened by path, outside any bundle (OrtEngine without a
    cache_dir): keyed by the file's resolved path."""
    key = hashlib.sha256(str(graph_file.resolve()).encode("utf-8")).hexdigest()[:32]
    return runtime_cache_dir() / ORT_TRT_DIR / f"path-{key}"


def check_precision(precision: str, graph: GraphSpec) -> str:
    """The precision mode to build `graph` with (`auto` resolved), or ConfigError."""
    qdq = graph.weights.get("format") == TRT_WEIGHT_FORMAT
    if precision == "auto":
        return "strongly-typed" if qdq else "fp16"
    if precision not in PRECISIONS:
        raise ConfigError(f"precision {precision!r} is not one of auto, {', '.join(PRECISIONS)}")
    if qdq and precision != "strongly-typed":
        raise ConfigError(
            f"graph {graph.file} is explicitly quantized (Q/DQ INT4): TensorRT builds it "
            f"strongly typed, not with precision {precision!r} (use --precision auto)"
        )
    return precision


def plan_key(
    graph_sha256: str, target: Target, limits: ProfileLimits, precision: str
) -> str:
    """A hash of what changes the built plan; the cache file stem."""
    material = json.dumps(
        {
            "graph_sha256": graph_sha256,
            "target": asdict(target),
            "profile": limits.as_dict(),
            "precision": precision,
            "build_recipe": BUILD_RECIPE,
        },
        sort_keys=True,
    )
    return hashlib.sha256(material.encode()).hexdigest()[:32]


def plan_paths(cache_dir: Path, key: str) -> tuple[Path, Path]:
    """(plan file, record file) of `key`."""
    return cache_dir / f"{key}.plan", cache_dir / f"{key}.json"


def write_record(cache_dir: Path, record: PlanRecord) -> Path:
    _, path = plan_paths(cache_dir, record.key)
    atomic_write_json(path, record.to_dict())
    return path


def records(cache_dir: Path) -> Iterator[PlanRecord]:
    """Every readable record in the cache whose plan file exists (skips foreign files)."""
    if not cache_dir.is_dir():
        return
    for path in sorted(cache_dir.glob("*.json")):
        try:
            raw = json.loads(path.read_text())
            record = PlanRecord.from_dict(raw, path)
        except (OSError, ValueError, EngineError):
            continue  # a record another version wrote, or a stray file: not ours to use
        if record.key == path.stem and plan_paths(cache_dir, record.key)[0].is_file():
            yield record


def find_plan(
    cache_dir: Path, graph_sha256: str, target: Target | None = None
) -> PlanRecord | None:
    """The best cached plan of a graph (for `target`, when given): the widest profile, then
    the newest build recipe. Without `target` this only says whether any plan exists — a
    check `load_engine("auto")` makes before it imports tensorrt at all."""
    found = [
        r
        for r in records(cache_dir)
        if r.graph_sha256 == graph_sha256
        and r.build_recipe == BUILD_RECIPE
        and (target is None or r.target == target)
    ]
    if not found:
        return None
    return max(
        found, key=lambda r: (r.profile.get("max_batch", 0), r.profile.get("max_context", 0))
    )


def select_graph(manifest: Manifest) -> tuple[str, GraphSpec]:
    """The graph TensorRT builds from (see the module docstring), or EngineError saying why
    none of this bundle's graphs can be."""
    graphs = manifest.graphs
    marked = [
        (n, g) for n, g in sorted(graphs.items()) if g.weights.get("format") == TRT_WEIGHT_FORMAT
    ]
    if marked:
        return marked[0]
    serving = graphs.get("decoder")
    if serving is None:
        raise EngineError(f"bundle has no decoder graph (has {sorted(graphs)})")
    fmt = str(serving.weights.get("format", ""))
    if fmt in _ORT_ONLY_FORMATS:
        raise EngineError(
            f"bundle {manifest.name} {manifest.version} ships only an ONNX Runtime graph: "
            f"{serving.file} holds {_ORT_ONLY_FORMATS[fmt]}, which TensorRT's ONNX parser "
            "does not read. Package the opset-21 QDQ graph beside it (edge-build lower "
            "--format qdq; see docs/TENSORRT.md) or a float graph"
        )
    if serving.right_padded_batch and not serving.left_padded_batch:
        raise EngineError(
            f"bundle {manifest.name} {manifest.version}: {serving.file} is a fused "
            "GroupQueryAttention graph (an ONNX Runtime contrib op); TensorRT needs the "
            "unfused export"
        )
    return "decoder", serving


def graph_sha256(manifest: Manifest, graph: GraphSpec) -> str:
    entry = manifest.files.get(graph.file)
    if entry is None:
        raise BundleError(f"graph file {graph.file} is not listed in the manifest")
    return entry.sha256
