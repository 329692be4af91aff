"""Prometheus metrics of the daemon, in a registry of their own.

Each app instance owns one `Metrics` (and so one `CollectorRegistry`): the default global
registry would make a second app in the same process (tests, a future cloud worker beside a
local one) fail with duplicate time series. Every series that describes served work carries
`served_by` (`local` now, `cloud` once offload exists) so dashboards can split the two.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from edge_runtime.generator import GenerationStats

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


class Metrics:
    """The daemon's series; `render()` is the /metrics body."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
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
        self.queue_depth = Gauge(
            "edge_runtime_queue_depth",
            "Requests waiting or being generated.",
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

    def track_queue(self, depth: Callable[[], float], ready: Callable[[], bool]) -> None:
        """Read queue depth and readiness at scrape time, so they are never stale."""
        self.queue_depth.set_function(depth)
        self.ready.set_function(lambda: float(ready()))

    def track_offload(self, available: Callable[[], bool]) -> None:
        """Read the cloud path's availability at scrape time (offload.OffloadClient)."""
        self.offload_available.set_function(lambda: float(available()))

    def observe_request(self, endpoint: str, status: int, served_by: str, seconds: float) -> None:
        label = endpoint if endpoint in ENDPOINTS else "other"  # bounded label values
        self.requests.labels(label, str(status), served_by).inc()
        self.request_latency.labels(label, served_by).observe(seconds)

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

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
