"""Concurrency from measurement: how many sequences the engine decodes together
(`max_batch`) and how many requests may wait for a slot (the queue bound), chosen when a
model is loaded (start-up, hot swap) instead of one constant for every model and machine.

    model loaded + warmed up
      ├─ memory: available now (MemAvailable; a discrete GPU's free memory)
      │          − scheduler.memory_headroom_mb − scheduler.prefix_cache_bytes
      │          ÷ one sequence's KV cache at full context          → memory limit
      ├─ measure_step_s: decode steps of 1, 2, 4, … sequences (the
      │          engine's own limit, PROBE_LIMIT at most)            → latency limit:
      │          the largest batch whose step ≤ scheduler.step_latency_target_ms
      └─ choose(): the smallest limit wins → Capacity (max_batch, queue bound, why)

Why a batch size is a trade and not a constant: a decode step reads every weight once for
the whole batch, so where a step waits on reading weights (decode on a GPU, a model larger
than the CPU's caches at a few rows) a step of 16 rows costs little more than one and 16
streams are served in about the time of one; where it waits on per-row compute (int4
kernels on two CPU cores: Qwen2-0.5B shapes 15, 19, 34, 60 ms at 1, 2, 4, 8 rows; the tiny
demo model, whose weights fit in cache: 0.15 ms at 1 row, 0.9 ms at 16) a bigger batch
makes every stream slower. A fixed `max_batch = 4` was right for neither. Each stream of a
batch gets one token per step, so the step time *is* each stream's time per token: the
target bounds it, and memory bounds how many KV caches can exist at once.

On a Jetson the GPU and the CPU share one DRAM: CUDA's free memory leaves out what the OS can
reclaim (page cache), so the memory left is read from the system (/proc/meminfo), as for the
CPU; only a discrete GPU's KV caches live in memory of its own (cudaMemGetInfo).

The probe runs the way requests run: a `DecodeBatch` of the served generator, sequences added
one by one with their own prefill, greedy steps (a batch of one decodes speculatively when
the bundle has a draft model: its time per token is the step time divided by the tokens the
step produced). It stops at the first size over the target (larger batches only take longer)
and within PROBE_BUDGET_S, taking fewer samples per size from slow models.

An explicit `scheduler.max_batch` (and `max_queue`) in the config wins: nothing is measured.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_runtime.errors import EngineError
from edge_runtime.model.sampling import SamplingParams
from edge_runtime.serving.request import TextGenerator, empty
from edge_runtime.serving.scheduler import QUEUE_WAVES, UNMEASURED_MAX_BATCH, SchedulerConfig

__all__ = [
    "Capacity",
    "MemoryReading",
    "capacity_for",
    "choose",
    "configured",
    "kv_bytes_per_sequence",
    "measure_step_s",
    "mem_available",
    "plan_capacity",
    "probe_sizes",
    "queue_bound",
    "read_memory",
]

log = logging.getLogger("edge_runtime.serving.engine_loop")  # a start-up/swap event

PROBE_LIMIT = 32
"""Largest batch measured (and so chosen) without an engine limit: past it, per-row costs
(sampling, detokenizing, delivering a chunk per stream in Python) dominate a small model's
step anyway, and the probe's prefills grow with it."""
PROBE_BUDGET_S = 3.0
"""Time the probe may take (prefills included) on top of its first size."""
PROBE_PROMPT_TOKENS = 16
"""Probe prompts: short, so that 32 prefills stay cheap, and under the prefix cache's
minimum length (model/prefix_cache.py MIN_TOKENS = 32), so none is stored there."""
SAMPLES = 8
"""Timed steps per batch size at most (fewer when the budget is short: slow models)."""
WARM_STEPS = 2
"""Untimed steps after the batch grows: the first step at a new shape allocates."""
KV_COPIES = 2
"""A step holds the past KV cache while the engine writes the present one (and a batch that
changes copies its cache): two copies at the peak."""

_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "int8": 1, "uint8": 1,
                "float8": 1, "int4": 1}


@dataclass(frozen=True)
class MemoryReading:
    """Memory a new sequence's KV cache can take, and where that figure came from."""

    available: int
    """Bytes free where the KV cache lives, before headroom and prefix cache."""
    source: str
    """`MemAvailable` (system DRAM, shared with an integrated GPU) or `cudaMemGetInfo`."""


@dataclass(frozen=True)
class Capacity:
    """What was chosen, and why: logged at start-up and after a swap, served in /metrics."""

    max_batch: int
    max_queue: int
    bound: str
    """What limited max_batch: `latency`, `memory`, `engine`, `probe`, `budget` or `config`."""
    reason: str
    """The limit that bound the choice, in words."""
    step_s: Mapping[int, float] = field(default_factory=dict)
    """Measured seconds per token of one stream, by batch size."""
    target_s: float = 0.0
    kv_bytes_per_seq: int = 0
    kv_memory: int | None = None
    """Bytes left for KV caches (after the headroom and the prefix cache); None: unknown."""
    memory_source: str = ""
    probe_s: float = 0.0

    def describe(self) -> str:
        """The one start-up log line: choice, limit, measurements."""
        head = f"max_batch {self.max_batch}, queue bound {self.max_queue}: {self.reason}"
        if not self.step_s:
            return head
        steps = ", ".join(f"{b}: {1000 * s:.2f}" for b, s in sorted(self.step_s.items()))
        mem = ("unknown" if self.kv_memory is None else
               f"{self.kv_memory / 2**30:.2f} GiB ({self.memory_source}) left for KV caches")
        return (f"{head}; step ms by batch {{{steps}}} (target {1000 * self.target_s:.1f} ms); "
                f"KV cache {self.kv_bytes_per_seq / 2**20:.2f} MiB per sequence at full context, "
                f"{mem}; "
                f"probe {self.probe_s:.2f} s")


# -- pure parts -----------------------------------------------------------------------------


def kv_bytes_per_sequence(kv: Any, context: int, copies: int = KV_COPIES) -> int:
    """Bytes of one sequence's KV cache at `context` tokens: layers x kv heads x head_dim x
    dtype x 2 (key and value) x context, x `copies` alive at a step's peak. `kv` is the
    graph's bundle.KVCacheSpec."""
    size = _DTYPE_BYTES.get(str(kv.dtype).lower(), 4)
    return kv.num_layers * kv.num_kv_heads * kv.head_dim * size * 2 * context * copies


def mem_available(meminfo: Path = Path("/proc/meminfo")) -> int | None:
    """The kernel's estimate of memory available to new allocations without swapping (page
    cache it can drop included), in bytes; None where there is no /proc/meminfo."""
    try:
        text = meminfo.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        if name == "MemAvailable":
            parts = rest.split()
            if parts and parts[0].isdigit():
                return int(parts[0]) * 1024  # reported in kB
    return None


def probe_sizes(limit: int) -> list[int]:
    """1, 2, 4, … up to `limit`, and `limit` itself."""
    sizes, b = [], 1
    while b < limit:
        sizes.append(b)
        b *= 2
    return [*sizes, max(1, limit)]


def queue_bound(max_batch: int) -> int:
    return QUEUE_WAVES * max_batch


def _latency_limit(step_s: Mapping[int, float], target_s: float) -> int:
    """The largest batch whose step time, linear between measured sizes, is within the
    target; never past the largest size measured (no extrapolation); at least 1."""
    best = 1
    sizes = sorted(step_s)
    for i, b in enumerate(sizes):
        if step_s[b] > target_s:
            if i > 0:  # the target falls between the last size within it and this one
                lo = sizes[i - 1]
                slope = (step_s[b] - step_s[lo]) / (b - lo)  # > 0: lo was within the target
                best = lo + int((target_s - step_s[lo]) / slope)
            return max(1, best)
        best = b
    return best


def choose(
    step_s: Mapping[int, float],
    target_s: float,
    kv_bytes_per_seq: int,
    kv_memory: int | None,
    engine_limit: int | None,
    complete: bool = True,
) -> tuple[int, str, str]:
    """(max_batch, bound, reason) from the measurements: the smallest of the engine's (or
    the probe's) limit, the memory limit and the latency limit. `complete`: the probe
    reached its last size or one over the target (else its time ran out: `budget`)."""
    if engine_limit is not None and engine_limit <= PROBE_LIMIT:
        cap = engine_limit
        limits = [(cap, "engine", f"the engine decodes at most {cap} sequences together")]
    else:
        cap = PROBE_LIMIT
        limits = [(cap, "probe", f"every batch measured, up to {cap}, meets the step target")]
    if kv_memory is not None and kv_bytes_per_seq > 0:
        fit = kv_memory // kv_bytes_per_seq
        limits.append((max(1, fit), "memory", (
            f"{fit} sequences' KV caches at full context fit in the memory left" if fit else
            "not even one sequence's KV cache at full context fits in the memory left; "
            "one at a time")))
    over = sorted(b for b, s in step_s.items() if s > target_s)
    target_ms = 1000 * target_s
    if not step_s:
        limits.append((min(cap, UNMEASURED_MAX_BATCH), "probe",
                       f"no step could be measured: the default {UNMEASURED_MAX_BATCH}"))
    elif over:
        b = over[0]
        limits.append((_latency_limit(step_s, target_s), "latency", (
            f"a step of {b} sequences takes {1000 * step_s[b]:.1f} ms, over the target "
            f"{target_ms:.1f} ms")))
    elif not complete:
        last = max(step_s)
        limits.append((last, "budget", (
            f"the probe's time ran out after a batch of {last}, still within the target")))
    # The smallest wins; among equal ones the measured limit (listed last) says most.
    best = min(lim[0] for lim in limits)
    return [lim for lim in limits if lim[0] == best][-1]


# -- measuring ------------------------------------------------------------------------------


def read_memory(engine_name: str, meminfo: Path = Path("/proc/meminfo")) -> MemoryReading | None:
    """Free memory where the engine keeps its KV cache: a discrete GPU's own (cudaMemGetInfo)
    for a CUDA/TensorRT engine on one, else the system's MemAvailable (the CPU, and an
    integrated GPU such as a Jetson's, which shares the DRAM)."""
    if any(w in engine_name.lower() for w in ("cuda", "tensorrt")):
        gpu = _discrete_gpu_free()
        if gpu is not None:
            return MemoryReading(gpu, "cudaMemGetInfo")
    avail = mem_available(meminfo)
    return MemoryReading(avail, "MemAvailable") if avail is not None else None


def _discrete_gpu_free() -> int | None:
    """Free bytes of the current CUDA device if it is a discrete GPU, else None (integrated
    GPU, no cuda-python, no device)."""
    try:
        from edge_runtime.engines.cuda_mem import import_cudart

        cudart = import_cudart()
        err, device = cudart.cudaGetDevice()
        if int(err) != 0:
            return None
        err, props = cudart.cudaGetDeviceProperties(device)
        if int(err) != 0 or props.integrated:
            return None
        err, free, _total = cudart.cudaMemGetInfo()
        return int(free) if int(err) == 0 else None
    except (EngineError, ImportError, AttributeError, TypeError, ValueError):
        return None


def measure_step_s(
    gen: TextGenerator,
    sizes: list[int],
    target_s: float,
    budget_s: float = PROBE_BUDGET_S,
    clock: Callable[[], float] = time.perf_counter,
) -> tuple[dict[int, float], bool]:
    """(seconds per token of one stream at each batch size measured, complete): one batch
    grown through `sizes`, stopping at the first size over `target_s` (complete) or once
    `budget_s` is spent (not complete). Call it on the thread that owns the generator."""
    batch = gen.batch(max(sizes))  # EngineError: the engine cannot batch that many
    context = getattr(gen, "context_length", 0) or 10**9
    steps = (WARM_STEPS + SAMPLES) * (len(sizes) + 1) + 8
    params = SamplingParams(max_tokens=max(2, min(steps, context - PROBE_PROMPT_TOKENS - 1)),
                            temperature=0.0)
    added = [0]

    def grow(size: int) -> bool:
        """Fill the batch to `size`, topping it up after an early EOS a bounded number of
        times (a model that ends every prompt at once cannot be timed)."""
        while batch.active < size and added[0] < 4 * max(sizes):
            prompt = [(added[0] * 7 + j) % 97 + 3 for j in range(PROBE_PROMPT_TOKENS)]
            batch.add(("capacity-probe", added[0]), prompt, params)
            added[0] += 1
        return batch.active >= size

    def time_size(size: int, share_s: float) -> float | None:
        """Lower quartile of the step times at `size` (noise only ever makes a step slower on
        a shared CPU); at most SAMPLES steps, fewer once `share_s` is spent (slow models)."""
        samples: list[float] = []
        spent = 0.0
        for n in range(WARM_STEPS + SAMPLES):
            if not grow(size):
                break
            t = clock()
            result = batch.step()
            elapsed = clock() - t
            if n < WARM_STEPS:
                continue
            # A batch of one may decode speculatively: several tokens in one step.
            tokens = [sum(len(c.token_ids) for c in cs) for cs in result.values()]
            samples.append(elapsed / max(1.0, sum(tokens) / max(1, len(tokens))))
            spent += elapsed
            if len(samples) >= 2 and spent > share_s:
                break
        return sorted(samples)[len(samples) // 4] if len(samples) >= 2 else None

    out: dict[int, float] = {}
    start = clock()
    try:
        for i, size in enumerate(sizes):
            share = (budget_s - (clock() - start)) / (len(sizes) - i)
            step = time_size(size, share)
            if step is not None and step > target_s:
                # Over the target decides max_batch: a second look, lest a burst of other
                # work on the machine decide it (the faster of the two is the engine's).
                again = time_size(size, share)
                step = min(step, again) if again is not None else step
            if step is None:
                return out, False
            out[size] = step
            if step > target_s:
                return out, True
            if clock() - start > budget_s and i + 1 < len(sizes):
                return out, False
        return out, True
    finally:
        empty(batch)


def plan_capacity(
    gen: TextGenerator,
    target_s: float,
    headroom_bytes: int,
    prefix_cache_bytes: int,
    memory: MemoryReading | None = None,
    budget_s: float = PROBE_BUDGET_S,
) -> Capacity:
    """Measure and choose for `gen` (loaded and warmed up; on its owning thread). `memory`:
    a reading taken before (default: now, which counts `gen`'s weights as used)."""
    t0 = time.perf_counter()
    engine = getattr(gen, "engine", None)
    engine_limit: int | None = getattr(engine, "max_batch", None)
    kv = getattr(getattr(gen, "graph", None), "kv_cache", None)
    per_seq = kv_bytes_per_sequence(kv, gen.context_length) if kv is not None else 0
    if memory is None:
        memory = read_memory(str(getattr(engine, "name", "")))
    kv_memory = (max(0, memory.available - headroom_bytes - prefix_cache_bytes)
                 if memory is not None else None)
    cap = min(PROBE_LIMIT, engine_limit) if engine_limit is not None else PROBE_LIMIT
    if kv_memory is not None and per_seq > 0:
        cap = max(1, min(cap, kv_memory // per_seq))  # never probe what cannot fit
    try:
        step_s, complete = measure_step_s(gen, probe_sizes(cap), target_s, budget_s)
    except EngineError as e:  # a graph that cannot batch: one sequence at a time
        log.warning("decoding %d sequences together failed (%s); measuring one", cap, e)
        step_s, complete = measure_step_s(gen, [1], target_s, budget_s)
        engine_limit = 1
    batch, bound, why = choose(step_s, target_s, per_seq, kv_memory, engine_limit, complete)
    return Capacity(
        max_batch=batch, max_queue=queue_bound(batch), bound=bound, reason=why,
        step_s=step_s, target_s=target_s, kv_bytes_per_seq=per_seq, kv_memory=kv_memory,
        memory_source=memory.source if memory is not None else "",
        probe_s=time.perf_counter() - t0,
    )


def configured(max_batch: int, max_queue: int | None, bound: str = "config",
               reason: str = "scheduler.max_batch is set in the config") -> Capacity:
    """A capacity that nothing measured: an explicit `scheduler.max_batch`, or the default."""
    return Capacity(
        max_batch=max_batch,
        max_queue=max_queue if max_queue is not None else queue_bound(max_batch),
        bound=bound, reason=reason,
    )


def capacity_for(gen: TextGenerator, config: SchedulerConfig, measure: bool = True) -> Capacity:
    """max_batch and the queue bound for `gen` (loaded and warmed up; on its owning thread):
    the config's when it sets max_batch, else measured; logged either way. `measure` off: a
    scripted test generator, whose timing is the test's own."""
    if config.max_batch is not None:
        capacity = configured(config.max_batch, config.max_queue)
    elif not measure:
        capacity = configured(UNMEASURED_MAX_BATCH, config.max_queue, "default",
                              "not measured (rate measurement off)")
    else:
        try:
            capacity = plan_capacity(
                gen, config.step_latency_target_ms / 1000, config.memory_headroom_mb * 2**20,
                config.prefix_cache_bytes)
        except Exception as e:  # serve with the default rather than not at all
            log.warning("could not measure the decode batch's capacity (%s); max_batch %d",
                        e, UNMEASURED_MAX_BATCH)
            capacity = configured(UNMEASURED_MAX_BATCH, config.max_queue, "default",
                                  f"measuring failed: {e}")
    log.info("capacity: %s", capacity.describe())
    return capacity
