"""The serving layer's view of the cloud path: up or not, and how long a round trip takes.

    offload.client.OffloadClient ──(CloudPath: available, latency, p99_by_tokens)──▶
    cloud_state(cloud, config) ──▶ a callable the engine loop asks before each decision

The engine loop never imports the offload package: it sees the cloud only through this
protocol, which the offload client satisfies. With no cloud configured the view says so
(`NO_CLOUD`), and the scheduler never chooses to offload.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from edge_runtime.serving.scheduler import CloudState, SchedulerConfig

NO_CLOUD = CloudState(available=False, p99_s=0.0, configured=False)


class CloudPath(Protocol):
    """What the scheduler reads of the offload client (offload.client.OffloadClient)."""

    def available(self) -> bool: ...

    def latency(self) -> Any: ...

    def p99_by_tokens(self) -> tuple[tuple[int, float], ...]: ...


def cloud_state(cloud: CloudPath | None, config: SchedulerConfig) -> Callable[[], CloudState]:
    """The scheduler's view of the cloud path: up or not, and its p99 round trip (publish to
    last chunk) per generation-length bucket; over all lengths, or the configured prior
    until there are measurements, where a bucket has too few."""
    if cloud is None:
        return lambda: NO_CLOUD

    def state() -> CloudState:
        p99 = cloud.latency().last_p99_s
        return CloudState(available=cloud.available(),
                          p99_s=config.cloud_p99_prior_s if p99 is None else p99,
                          p99_by_tokens=cloud.p99_by_tokens())

    return state
