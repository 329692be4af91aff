"""Build a bundle's TensorRT plan on the device that will run it (`edge-runtime build-engine`).

TensorRT plans are specific to the GPU and the TensorRT version, so a bundle ships portable
ONNX and each device builds its own plan once (at first boot, or after a JetPack update) into
the plan cache (engines/trt_cache.py), where `load_engine("auto")` finds it:

    bundle (verified) ─▶ select_graph ─▶ OnnxParser ─▶ profiles (prefill, decode) from the
    GraphSpec + ProfileLimits ─▶ build_serialized_network ─▶ deserialize + check_io ─▶
    CACHE/<key>.plan (atomic) ─▶ CACHE/<key>.json (atomic, last: marks a whole plan)

A TensorRT timing cache per (GPU, TensorRT version) sits beside the plans, so rebuilding for
a new bundle of the same architecture skips most kernel timing. Needs tensorrt (JetPack) and
cuda-python; everything it decides without them is in engines/trt_plan.py and trt_cache.py.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_runtime.atomic import atomic_write_bytes
from edge_runtime.bundle.manifest import Bundle
from edge_runtime.engines.trt_cache import (
    BUILD_RECIPE,
    PlanRecord,
    Target,
    check_precision,
    default_cache_dir,
    graph_sha256,
    plan_key,
    plan_paths,
    select_graph,
    write_record,
)
from edge_runtime.engines.trt_plan import ProfileLimits, check_io, profile_shapes
from edge_runtime.errors import ConfigError, EngineError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BuildOptions:
    """How to build; `limits` and `precision` are part of the plan's cache key."""

    limits: ProfileLimits
    precision: str = "auto"
    """auto (strongly typed for a Q/DQ graph, fp16 otherwise), fp16, fp32, strongly-typed."""
    optimization_level: int = 3
    """TensorRT builder optimisation level 0..5: higher searches longer for faster kernels."""
    workspace_mb: int = 0
    """Cap on TensorRT's scratch for tactics; 0 = TensorRT's default (all device memory)."""
    force: bool = False
    """Rebuild even when the cache holds a plan for this key."""

    def __post_init__(self) -> None:
        if not 0 <= self.optimization_level <= 5:
            raise ConfigError(
                f"TensorRT optimisation level must be 0..5, got {self.optimization_level}"
            )
        if self.workspace_mb < 0:
            raise ConfigError(f"workspace_mb must be >= 0, got {self.workspace_mb}")


@dataclass(frozen=True)
class BuildResult:
    record: PlanRecord
    plan: Path
    built: bool
    """False when the cache already held the plan."""


def timing_cache_path(cache_dir: Path, target: Target) -> Path:
    tag = hashlib.sha256(repr(target).encode()).hexdigest()[:16]
    return cache_dir / f"timing-{tag}.cache"


def build_engine(
    bundle: Bundle,
    options: BuildOptions,
    cache_dir: Path | None = None,
    progress: Callable[[str], None] = log.info,
) -> BuildResult:
    """Build (or find) the plan of `bundle` for this GPU; return where it is."""
    from edge_runtime.engines.cuda_mem import import_cudart
    from edge_runtime.engines.trt import current_target, engine_io, import_tensorrt

    manifest = bundle.manifest
    gname, graph = select_graph(manifest)
    precision = check_precision(options.precision, graph)
    limits = options.limits
    ctx = manifest.generation.context_length
    if limits.max_context > ctx:
        raise ConfigError(
            f"profile max_context {limits.max_context} exceeds the bundle's context length {ctx}"
        )
    sha = graph_sha256(manifest, graph)
    trt = import_tensorrt()
    target = current_target(trt, import_cudart())
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    key = plan_key(sha, target, limits, precision)
    plan_path, record_path = plan_paths(cache, key)
    if record_path.is_file() and plan_path.is_file() and not options.force:
        import json

        record = PlanRecord.from_dict(json.loads(record_path.read_text()), record_path)
        progress(f"plan cached: {plan_path}")
        return BuildResult(record, plan_path, built=False)

    started = time.time()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if precision == "strongly-typed":
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    onnx_path = bundle.path(graph.file)
    progress(f"parsing {onnx_path} (graph {gname!r}, {precision})")
    if not parser.parse_from_file(str(onnx_path)):
        errors = [_parser_error(parser.get_error(i)) for i in range(parser.num_errors)]
        raise EngineError(
            f"TensorRT's ONNX parser rejected {graph.file}: " + "; ".join(errors[:5])
            + (f" (+{len(errors) - 5} more)" if len(errors) > 5 else "")
        )
    parsed = {network.get_input(i).name for i in range(network.num_inputs)}
    declared = {s.name for s in graph.inputs}
    if parsed != declared:
        raise EngineError(
            f"{graph.file} has inputs {sorted(parsed)}; the manifest declares {sorted(declared)}"
        )
    config = _builder_config(trt, builder, options, precision, progress)
    timing_path = timing_cache_path(cache, target)
    timing = config.create_timing_cache(timing_path.read_bytes() if timing_path.is_file() else b"")
    if not config.set_timing_cache(timing, False):  # unreadable or foreign: start afresh
        progress(f"ignoring timing cache {timing_path} (does not match this TensorRT/GPU)")
        config.set_timing_cache(config.create_timing_cache(b""), False)
    for index, ranges in enumerate(profile_shapes(graph, limits)):
        profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in ranges.items():
            profile.set_shape(name, lo, opt, hi)
        if config.add_optimization_profile(profile) != index:
            raise EngineError(f"TensorRT refused optimisation profile {index}: {ranges}")
    progress(f"building for {target.gpu_name} (sm {target.compute_capability}, TensorRT "
             f"{target.trt_version}), profile {limits.as_dict()}: this takes minutes")
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineError(
            f"TensorRT could not build {graph.file} (see the TensorRT log above); try "
            "--precision fp32 or a smaller --profile"
        )
    data = bytes(memoryview(serialized))
    # Check what was built before it enters the cache: it deserializes, and it is this graph.
    engine = trt.Runtime(logger).deserialize_cuda_engine(data)
    if engine is None:
        raise EngineError("TensorRT built a plan it cannot deserialize")
    check_io(engine_io(trt, engine), graph)
    atomic_write_bytes(plan_path, data)
    atomic_write_bytes(timing_path, bytes(memoryview(config.get_timing_cache().serialize())))
    record = PlanRecord(
        key=key,
        graph=gname,
        graph_sha256=sha,
        target=target,
        profile=limits.as_dict(),
        precision=precision,
        build_recipe=BUILD_RECIPE,
        plan_bytes=len(data),
        plan_sha256=hashlib.sha256(data).hexdigest(),
        build_seconds=round(time.time() - started, 1),
    )
    write_record(cache, record)  # last: a plan without its record is never used
    progress(f"wrote {plan_path} ({len(data) / 2**20:.1f} MiB) in {record.build_seconds} s")
    return BuildResult(record, plan_path, built=True)


def _builder_config(
    trt: Any, builder: Any, options: BuildOptions, precision: str, progress: Callable[[str], None]
) -> Any:
    config = builder.create_builder_config()
    config.builder_optimization_level = options.optimization_level
    if options.workspace_mb:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, options.workspace_mb << 20)
    if precision == "fp16":
        if not getattr(builder, "platform_has_fast_fp16", True):  # deprecated in 10.x
            progress("this GPU has no fast FP16: building fp16 anyway, expect fp32 speed")
        config.set_flag(trt.BuilderFlag.FP16)
    return config


def _parser_error(err: Any) -> str:
    """One ONNX parser error as text: the node and operator when TensorRT names them."""
    desc = err.desc() if hasattr(err, "desc") else str(err)
    node = err.node_name() if hasattr(err, "node_name") else ""
    op = err.node_operator() if hasattr(err, "node_operator") else ""
    where = f" at node {node!r} ({op})" if node or op else ""
    return f"{desc}{where}"
