"""Where a request is served: here, in the cloud, or nowhere (refused), decided in one place.

    api (OpenAI body → Request + CloudCall) ─▶ Dispatcher.dispatch
        drained device ─▶ cloud (offload on and up) │ Drained (503, retry later)
        LocalWorker.submit (scheduler.admit) ─▶ LOCAL   ─▶ Route: the engine loop's chunks
                                             ─▶ OFFLOAD ─▶ Route: the cloud's chunks
                                             ─▶ REJECT  ─▶ OverloadedError (429 / 503)
        queued, then sent away by scheduler.review ─▶ the same Route goes on in the cloud
                                                      before its first chunk

The API layer only translates: OpenAI request → Request + CloudCall, Route's chunks →
OpenAI response, errors → HTTP errors. It never learns of a queue review: a request the
engine loop hands back (OffloadRequested) continues in the cloud inside Route.chunks().

One deadline default, on one clock: `deadline(budget_s)` is LocalWorker.deadline, the engine
loop's clock (time.monotonic() in the daemon), which the cloud path's deadlines also use.
The cloud path is reached only through cloud_view.CloudPath, which the offload client
satisfies; serving imports neither offload/ nor api/.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from edge_runtime.errors import OverloadedError
from edge_runtime.model.stream import Chunk, GenerationStats
from edge_runtime.serving.cloud_view import CloudPath, CloudStream
from edge_runtime.serving.engine_loop import LocalWorker
from edge_runtime.serving.request import OffloadRequested, Request
from edge_runtime.serving.scheduler import Action

__all__ = ["CloudCall", "Dispatcher", "Drained", "Route"]

DRAINED_RETRY_AFTER_S = 30.0
"""Retry-After of a drained device's refusal: a drain is maintenance (a deploy, a reboot)."""


class Drained(OverloadedError):
    """The fleet drained this device and no cloud path can take the request: 503, retry
    later or elsewhere (not an error of this device: nobody tried to serve it)."""

    def __init__(self) -> None:
        super().__init__(
            "this device is drained by its fleet (maintenance) and no cloud path is "
            "available; retry later or on another device", DRAINED_RETRY_AFTER_S, 503)


@dataclass(frozen=True)
class CloudCall:
    """What the cloud needs to serve a request as this device would: its OpenAI body."""

    body: Callable[[], Mapping[str, Any]]
    """Builds the JSON body, only when the cloud serves the request."""
    endpoint: str
    """"chat" or "completions"."""
    stream: bool


class Route:
    """A dispatched request: who serves it, its chunks, and how to stop it."""

    def __init__(self, req: Request, served_by: str) -> None:
        self.req = req
        self.served_by = served_by
        """"local" or "cloud" (final once the first chunk is out)."""
        self.stream: CloudStream | None = None
        self.chunks: AsyncIterator[Chunk]

    @property
    def queue_wait_s(self) -> float:
        return self.req.queue_wait_s

    def cancel(self) -> None:
        """The client went away: stop the work, wherever it runs."""
        if self.stream is not None:
            self.stream.cancel()
        self.req.cancel()


class Dispatcher:
    """Local / cloud / refuse for each request, over one engine loop and an optional cloud
    path. `on_cloud` (per dispatch) lets the front door note that the cloud serves it."""

    def __init__(self, worker: LocalWorker, cloud: CloudPath | None = None) -> None:
        self.worker = worker
        self.cloud = cloud

    def deadline(self, budget_s: float | None) -> float:
        """The deadline of a request arriving now: `budget_s` from now, else the default."""
        return self.worker.deadline(budget_s)

    def dispatch(self, req: Request, call: CloudCall,
                 on_cloud: Callable[[], None] | None = None) -> Route:
        """Serve `req` here or in the cloud (a Route), or refuse it: OverloadedError (429 /
        503, Drained while drained), ModelChanged (tokenize again), or the cloud path's own
        errors when it cannot take the request at once."""
        if req.deadline is None:
            req.deadline = self.deadline(None)
        if self.worker.drained:
            if not self._cloud_up():
                raise Drained()
            return self._to_cloud(Route(req, "cloud"), call, on_cloud)
        # REJECT raises OverloadedError; ModelChanged asks for the prompt again
        decision = self.worker.submit(req)
        if decision.action is Action.OFFLOAD:
            return self._to_cloud(Route(req, "cloud"), call, on_cloud)
        route = Route(req, "local")
        route.chunks = self._local(route, call, on_cloud)
        return route

    def _cloud_up(self) -> bool:
        cloud = self.cloud
        return cloud is not None and self.worker.config.offload_enabled and cloud.available()

    async def _local(self, route: Route, call: CloudCall,
                     on_cloud: Callable[[], None] | None) -> AsyncIterator[Chunk]:
        """The engine loop's chunks; if a queue review sends the request away before its
        first chunk, the cloud's."""
        try:
            async for chunk in route.req.chunks():
                yield chunk
            return
        except OffloadRequested:
            self._to_cloud(route, call, on_cloud)
        async for chunk in route.chunks:
            yield chunk

    def _to_cloud(self, route: Route, call: CloudCall,
                  on_cloud: Callable[[], None] | None) -> Route:
        """Publish the request to the cloud (on the event loop); its answer as chunks."""
        if self.cloud is None:  # the scheduler offloads only when a cloud path is wired
            raise OverloadedError("no cloud path is configured", 1.0, status=503)
        req = route.req
        assert req.deadline is not None
        route.served_by = "cloud"
        if on_cloud is not None:
            on_cloud()
        req.started = time.monotonic()
        route.stream = self.cloud.submit(
            call.body(), call.endpoint, req.deadline, stream=call.stream, request_id=req.id,
            max_tokens=req.params.max_tokens,  # the cloud's p99 is looked up by length
        )
        route.chunks = _cloud_chunks(route.stream, len(req.prompt_ids))
        return route


async def _cloud_chunks(stream: CloudStream, prompt_tokens: int) -> AsyncIterator[Chunk]:
    async for c in stream:
        if c.finish_reason is None:
            yield Chunk(c.text, [])
            continue
        u = c.usage
        stats = GenerationStats(
            prompt_tokens=u.prompt_tokens if u else prompt_tokens,
            completion_tokens=u.completion_tokens if u else 0,
        )
        yield Chunk(c.text, [], c.finish_reason, stats)
        return
