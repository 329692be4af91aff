"""Prometheus metrics of the daemon, in a registry of their own.

Each app instance owns one `Metrics` (and so one `CollectorRegistry`): the default global
registry would make a second app in the same process (tests, a future cloud worker beside a
local one) fail with duplicate time series. Every series that describes served work carries
`served_by` (`local` now, `cloud` once offload exists) so dashboards can split the two.

`RecentWindow` keeps the last minute of completions for the fleet agent's telemetry: exact
p95s and rates over a recent window, which cumulative Prometheus histograms cannot give. Its
snapshot's names are telemetry.RUNTIME_FIELDS, the names a rollout's abort rule reads.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from edge_runtime.model.prefix_cache import PrefixCacheStats
from edge_runtime.model.stream import GenerationStats
from edge_runtime.serving.capacity import Capacity
from edge_runtime.serving.rates import RateSnapshot

# Latency buckets for an edge device: from a cached short answer (tens of ms) to a long
# generation on a busy CPU (a minute).
_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_TOKENS_PER_S_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000)

ENDPOINTS = (
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/models",
    "/healthz",
    "/readyz",
    "/metrics",
)


COMPLETION_ENDPOINTS = ("/v1/chat/completions", "/v1/completions")
REFUSED = "none"
"""`served_by` of a request no path served on purpose (the device is drained)."""


class RecentWindow:
    """Completion requests and generations of the last `window_s` seconds."""

    def __init__(self, window_s: float = 60.0, maxlen: int = 20_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.window_s = window_s
        self._clock = clock
        self._lock = threading.Lock()
        # (time, status, served_by, seconds) / (time, ttft_s incl. queue, decode tokens, s)
        # served_by "none": refused unserved on purpose (a drained device), not an error.
        self._requests: deque[tuple[float, int, str, float]] = deque(maxlen=maxlen)
        self._generations: deque[tuple[float, float, int, float]] = deque(maxlen=maxlen)

    def request(self, status: int, served_by: str, seconds: float) -> None:
        with self._lock:
            self._requests.append((self._clock(), status, served_by, seconds))

    def generation(self, ttft_s: float, decode_tokens: int, decode_s: float) -> None:
        with self._lock:
            self._generations.append((self._clock(), ttft_s, decode_tokens, decode_s))

    def snapshot(self) -> dict[str, Any]:
        """Rates and p95s over the window (None where nothing was measured)."""
        since = self._clock() - self.window_s
        with self._lock:
            reqs = [r for r in self._requests if r[0] >= since]
            gens = [g for g in self._generations if g[0] >= since]
        n = len(reqs)
        ok = sorted(r[3] for r in reqs if r[1] < 400)
        errors = sum(r[1] >= 500 and r[2] != REFUSED for r in reqs)
        tokens = sum(g[2] for g in gens)
        decode_s = sum(g[3] for g in gens)
        return {
            "window_s": self.window_s,
            "requests": n,
            "error_rate": errors / n if n else 0.0,
            "rejected_rate": sum(r[1] == 429 for r in reqs) / n if n else 0.0,
            "offload_share": sum(r[2] == "cloud" for r in reqs) / n if n else 0.0,
            "p95_latency_ms": _ms(_p95(ok)),
            "ttft_p95_ms": _ms(_p95(sorted(g[1] for g in gens))),
            "tokens_per_s": round(tokens / decode_s, 2) if decode_s > 0 else None,
        }


def _p95(values: list[float]) -> float | None:
    """Nearest-rank 95th percentile of sorted values."""
    return values[max(0, math.ceil(0.95 * len(values)) - 1)] if values else None


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(1000 * seconds, 2)


class _PrefixCacheCollector(Collector):
    """edge_runtime_prefix_cache_*, read from the served model's cache at scrape time (its
    counters restart with a model swap: the new model's cache starts empty; Prometheus
    takes a counter that goes down as a reset). Absent while no model has a cache."""

    def __init__(self, read: Callable[[], PrefixCacheStats | None]) -> None:
        self._read = read

    def collect(self) -> Iterator[Metric]:
        s = self._read()
        if s is None:
            return
        p = "edge_runtime_prefix_cache"
        for name, doc, value in (
            ("hits", "Prompts that reused the KV cache of a cached prefix.", s.hits),
            ("misses", "Prompts long enough to reuse a cached prefix that found none.",
             s.misses),
            ("hit_tokens", "Prompt tokens not prefilled thanks to the prefix cache.",
             s.hit_tokens),
            ("evictions", "Cached prefixes evicted (least recently used) to stay within "
             "scheduler.prefix_cache_bytes.", s.evictions),
        ):
            yield CounterMetricFamily(f"{p}_{name}", doc, value=value)
        for name, doc, value in (
            ("bytes", "KV cache bytes held by cached prefixes.", s.bytes),
            ("budget_bytes", "The prefix cache's budget (scheduler.prefix_cache_bytes).",
             s.budget_bytes),
            ("entries", "Cached prefixes.", s.entries),
        ):
            yield GaugeMetricFamily(f"{p}_{name}", doc, value=value)


class _RatesCollector(Collector):
    """edge_runtime_estimate_*: the rates the scheduler admits requests with
    (serving/rates.py), read at scrape time — what an operator compares with the measured
    latencies when requests are refused or cut off at their deadline."""

    def __init__(self, read: Callable[[], RateSnapshot]) -> None:
        self._read = read

    def collect(self) -> Iterator[Metric]:
        s = self._read()
        p = "edge_runtime_estimate"
        for name, doc, values in (
            ("step_seconds", "A decode step as requests live it, by batch size: the "
             "engine's step plus the serving path's work per token.", s.step_s),
            ("engine_step_seconds", "The engine's own decode step time, by batch size.",
             s.engine_step_s),
        ):
            g = GaugeMetricFamily(f"{p}_{name}", doc, labels=["batch"])
            for batch, seconds in values.items():
                g.add_metric([str(batch)], seconds)
            yield g
        for name, doc, value in (
            ("per_token_seconds", "The serving path's work per generated token beyond the "
             "engine step (hand-off, streaming, GIL).", s.per_token_s),
            ("per_request_seconds", "A request's fixed cost beyond its prefill and steps, "
             "learned from completed requests.", s.per_request_s),
            ("per_concurrent_seconds", "What each other request in the daemon at the same "
             "time adds to a request's time (its HTTP work holds the engine back).",
             s.per_concurrent_s),
            ("prefill_tokens_per_second", "Prompt tokens prefilled per second.",
             s.prefill_tokens_per_s),
            ("requests_observed", "Completed requests the estimates learned from.",
             float(s.requests_observed)),
        ):
            yield GaugeMetricFamily(f"{p}_{name}", doc, value=value)


class _CapacityCollector(Collector):
    """edge_runtime_max_batch (labelled with what bound it), edge_runtime_max_queue and the
    measurements behind them (serving/capacity.py), read at scrape time: a model swap
    measures and chooses again."""

    def __init__(self, read: Callable[[], Capacity | None], max_queue: Callable[[], int]) -> None:
        self._read = read
        self._max_queue = max_queue

    def collect(self) -> Iterator[Metric]:
        c = self._read()
        if c is None:
            return
        batch = GaugeMetricFamily(
            "edge_runtime_max_batch", "Sequences decoded together; `bound`: what limited it "
            "(latency, memory, engine, probe, budget, config, default).", labels=("bound",))
        batch.add_metric((c.bound,), c.max_batch)
        yield batch
        yield GaugeMetricFamily("edge_runtime_max_queue", "Requests that may wait for a slot.",
                                value=self._max_queue())
        if c.step_s:
            step = GaugeMetricFamily(
                "edge_runtime_capacity_step_seconds", "Decode step time per token of one "
                "stream measured at each batch size when max_batch was chosen.",
                labels=("batch",))
            for size, seconds in sorted(c.step_s.items()):
                step.add_metric((str(size),), seconds)
            yield step
            yield GaugeMetricFamily(
                "edge_runtime_capacity_step_target_seconds",
                "scheduler.step_latency_target_ms, in seconds.", value=c.target_s)
        if c.kv_bytes_per_seq:
            yield GaugeMetricFamily(
                "edge_runtime_kv_cache_bytes_per_sequence",
                "KV cache memory of one sequence at full context (peak copies included).",
                value=c.kv_bytes_per_seq)
        if c.kv_memory is not None:
            yield GaugeMetricFamily(
                "edge_runtime_kv_cache_memory_bytes", "Memory left for KV caches when "
                "max_batch was chosen (available - headroom - prefix cache budget).",
                value=c.kv_memory)


class Metrics:
    """The daemon's series; `render()` is the /metrics body."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.recent = RecentWindow()
        """The last minute of completions, for fleet telemetry (not exported to Prometheus)."""
        r = self.registry
        self.requests = Counter(
            "edge_runtime_requests",
            "HTTP requests by endpoint, status code and where they were served.",
            ("endpoint", "status", "served_by"),
            registry=r,
        )
        self.request_latency = Histogram(
            "edge_runtime_request_duration_seconds",
            "Time from request received to last byte sent.",
            ("endpoint", "served_by"),
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "edge_runtime_time_to_first_token_seconds",
            "Time from request queued to first generated token (queue wait included).",
            ("served_by",),
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "edge_runtime_queue_wait_seconds",
            "Time a request waited in the queue before generation started.",
            ("served_by",),
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter(
            "edge_runtime_prompt_tokens",
            "Prompt tokens processed.",
            ("served_by",),
            registry=r,
        )
        self.generated_tokens = Counter(
            "edge_runtime_generation_tokens",
            "Tokens generated.",
            ("served_by",),
            registry=r,
        )
        self.decode_rate = Histogram(
            "edge_runtime_decode_tokens_per_second",
            "Decode speed of each generation (tokens after the first, per second).",
            ("served_by",),
            buckets=_TOKENS_PER_S_BUCKETS,
            registry=r,
        )
        # Speculative decoding (model/speculative.py): acceptance rate = accepted / drafted.
        self.draft_tokens = Counter(
            "edge_runtime_speculative_draft_tokens",
            "Tokens the draft model proposed (speculative decoding at batch 1).",
            registry=r,
        )
        self.accepted_tokens = Counter(
            "edge_runtime_speculative_accepted_tokens",
            "Drafted tokens the served model accepted; / draft_tokens = the acceptance rate.",
            registry=r,
        )
        self.queue_depth = Gauge(
            "edge_runtime_queue_depth",
            "Requests waiting or being generated.",
            registry=r,
        )
        self.prefilling = Gauge(
            "edge_runtime_prefilling",
            "Long prompts being prefilled a chunk per decode step (scheduler.prefill_chunk).",
            registry=r,
        )
        self.ready = Gauge(
            "edge_runtime_model_ready", "1 once the model is loaded and warmed up.", registry=r
        )
        self.offload_available = Gauge(
            "edge_runtime_offload_available",
            "1 while an offload would go out (broker connected, circuit breaker not open); "
            "absent without a cloud path.",
            registry=r,
        )

    def track_queue(self, depth: Callable[[], float], ready: Callable[[], bool],
                    prefilling: Callable[[], float]) -> None:
        """Read queue depth, readiness and prefilling prompts at scrape time, so they are
        never stale."""
        self.queue_depth.set_function(depth)
        self.prefilling.set_function(prefilling)
        self.ready.set_function(lambda: float(ready()))

    def track_prefix_cache(self, read: Callable[[], PrefixCacheStats | None]) -> None:
        """Export the prefix cache's counters, read at scrape time (engine_loop.LocalWorker
        .prefix_cache)."""
        self.registry.register(_PrefixCacheCollector(read))

    def track_rates(self, read: Callable[[], RateSnapshot]) -> None:
        """Export the scheduler's estimates, read at scrape time (LocalWorker.estimates)."""
        self.registry.register(_RatesCollector(read))

    def track_capacity(self, read: Callable[[], Capacity | None],
                       max_queue: Callable[[], int]) -> None:
        """Export max_batch, the queue bound and why (engine_loop.LocalWorker.capacity)."""
        self.registry.register(_CapacityCollector(read, max_queue))

    def track_offload(self, available: Callable[[], bool]) -> None:
        """Read the cloud path's availability at scrape time (offload.OffloadClient)."""
        self.offload_available.set_function(lambda: float(available()))

    def observe_request(self, endpoint: str, status: int, served_by: str, seconds: float) -> None:
        label = endpoint if endpoint in ENDPOINTS else "other"  # bounded label values
        self.requests.labels(label, str(status), served_by).inc()
        self.request_latency.labels(label, served_by).observe(seconds)
        if endpoint in COMPLETION_ENDPOINTS:
            self.recent.request(status, served_by, seconds)

    def observe_generation(
        self, stats: GenerationStats, queue_wait_s: float, served_by: str
    ) -> None:
        self.queue_wait.labels(served_by).observe(queue_wait_s)
        self.prompt_tokens.labels(served_by).inc(stats.prompt_tokens)
        self.generated_tokens.labels(served_by).inc(stats.completion_tokens)
        if stats.completion_tokens > 0:
            self.ttft.labels(served_by).observe(queue_wait_s + stats.ttft_s)
        if stats.decode_tokens_per_s > 0:
            self.decode_rate.labels(served_by).observe(stats.decode_tokens_per_s)
        if stats.draft_tokens:
            self.draft_tokens.inc(stats.draft_tokens)
            self.accepted_tokens.inc(stats.accepted_tokens)
        if served_by == "local" and stats.completion_tokens > 0:
            self.recent.generation(queue_wait_s + stats.ttft_s, stats.completion_tokens - 1,
                                   stats.decode_s)

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
