"""The serving layer's view of the cloud path: up or not, how long a round trip takes, and
how to send it a request.

    offload.client.OffloadClient ──(CloudPath: available, latency, p99_by_tokens)──▶
    cloud_state(cloud, config) ──▶ a callable the engine loop asks before each decision
    OffloadClient ──(CloudPath.submit ─▶ CloudStream of CloudChunk)──▶ dispatch.Dispatcher

Serving never imports the offload package: it sees the cloud only through these
protocols, which the offload client satisfies. With no cloud configured the view says so
(`NO_CLOUD`), and the scheduler never chooses to offload.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any, Protocol

from edge_runtime.serving.scheduler import CloudState, SchedulerConfig

NO_CLOUD = CloudState(available=False, p99_s=0.0, configured=False)


class CloudUsage(Protocol):
    @property
    def prompt_tokens(self) -> int: ...

    @property
    def completion_tokens(self) -> int: ...


class CloudChunk(Protocol):
    """One piece of a cloud answer (offload.messages.OffloadChunk), in order."""

    @property
    def text(self) -> str: ...

    @property
    def finish_reason(self) -> str | None: ...

    @property
    def usage(self) -> CloudUsage | None: ...


class CloudStream(Protocol):
    """The answer of one offloaded request (offload.client.OffloadStream): its chunks, in
    order, ending with the one that has `finish_reason`; errors are raised (EdgeErrors)."""

    def __aiter__(self) -> AsyncIterator[CloudChunk]: ...

    def cancel(self) -> None: ...


class CloudPath(Protocol):
    """What serving uses of the offload client (offload.client.OffloadClient): the
    scheduler reads its state, the dispatcher sends it requests."""

    def available(self) -> bool: ...

    def latency(self) -> Any: ...

    def p99_by_tokens(self) -> tuple[tuple[int, float], ...]: ...

    def submit(
        self,
        body: Mapping[str, Any],
        endpoint: str,
        deadline: float,
        stream: bool = True,
        request_id: str | None = None,
        max_tokens: int | None = None,
    ) -> CloudStream:
        """Publish one request (its OpenAI `body` for `endpoint`, "chat" or "completions")
        due by `deadline` (time.monotonic()); on the event loop that consumes the stream."""
        ...


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
