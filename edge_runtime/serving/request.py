"""One request's way through the engine loop, and the types on both sides of it.

    api (event loop)                          serving.LocalWorker (engine-loop thread)
    Request(prompt_ids, params, loop, ...) ─▶ submit ─▶ a decode batch of a TextGenerator
    async for c in request.chunks()        ◀─ Request.deliver(Chunk | error)

`TextGenerator` and `DecodeBatch` are what the engine loop needs of a model
(generator.Generator, batching.BatchDecoder; tests pass fakes); `ModelInfo` is what the API
says of the served model; `OffloadRequested`, `QueueFull` and `ModelChanged` are the ways a
submitted request comes back unserved on purpose.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from edge_runtime.bundle.manifest import MANIFEST, Bundle, GenerationDefaults
from edge_runtime.errors import OverloadedError
from edge_runtime.model.sampling import SamplingParams
from edge_runtime.model.stream import Chunk, ChunkStream
from edge_runtime.serving.scheduler import Decision


class DecodeBatch(Protocol):
    """What the engine loop drives (edge_runtime.model.batching.BatchDecoder)."""

    @property
    def active(self) -> int:
        """Sequences in the batch, prefilling ones included."""
        ...

    @property
    def prefilling(self) -> int:
        """Sequences whose prompt is still being prefilled (chunked prefill)."""
        ...

    @property
    def keys(self) -> list[Hashable]: ...

    @property
    def max_batch(self) -> int:
        """Sequences it decodes together at most."""
        ...

    @property
    def prefill_chunk(self) -> int:
        """Prompt tokens prefilled per step (0: whole prompts in add()): the batch's own
        value, which an engine with fixed shape ranges forces to 0 whatever was asked."""
        ...

    @property
    def prefill_work(self) -> tuple[int, float]:
        """(prompt tokens, seconds) of prefill done by the last add() or step() call."""
        ...

    @property
    def prefill_batched(self) -> bool:
        """The last add_many() ran several prompts in one prefill: its prefill_work is not
        what one prompt costs alone."""
        ...

    def add(
        self, key: Hashable, prompt_ids: Sequence[int], params: SamplingParams
    ) -> list[Chunk]: ...

    def add_many(
        self, items: Sequence[tuple[Hashable, Sequence[int], SamplingParams]]
    ) -> dict[Hashable, list[Chunk] | Exception]:
        """add() for several new sequences (prefilled together where the engine can); per
        key its chunks or the exception it failed with alone."""
        ...

    def step(self) -> dict[Hashable, list[Chunk]]: ...

    def remove(self, key: Hashable) -> bool: ...


class TextGenerator(Protocol):
    """What serving needs of `edge_runtime.model.generator.Generator` (tests pass a fake)."""

    defaults: GenerationDefaults

    @property
    def context_length(self) -> int: ...

    def chat_prompt(self, messages: Sequence[Mapping[str, Any]]) -> list[int]: ...

    def text_prompt(self, text: str) -> list[int]: ...

    def resolve_max_tokens(self, prompt_len: int, max_tokens: int | None) -> int: ...

    def stream(self, prompt_ids: Sequence[int], params: SamplingParams) -> ChunkStream: ...

    def batch(self, max_batch: int, prefill_chunk: int = 0) -> DecodeBatch: ...

    def warmup(self) -> None: ...


@dataclass(frozen=True)
class ModelInfo:
    """What the API says about the served model (`/v1/models`, the `model` field)."""

    name: str
    version: str
    created: int
    """Unix time the bundle was signed (its manifest's mtime)."""

    @classmethod
    def from_bundle(cls, bundle: Bundle) -> ModelInfo:
        m = bundle.manifest
        mtime = int(bundle.path(MANIFEST).stat().st_mtime)
        return cls(name=m.name, version=m.version, created=mtime)


class OffloadRequested(OverloadedError):
    """Delivered to a queued request that the scheduler sent to the cloud after all. The API
    carries it out; where nothing does, it is an honest 503 rather than a 500."""

    def __init__(self, decision: Decision) -> None:
        super().__init__(decision.reason, decision.retry_after_s or 1.0, status=503)
        self.decision = decision


class QueueFull(OverloadedError):
    """A refusal because the queue had no room (scheduler.Decision.queue_full): the server
    is busy, whatever this request asked. An OverloadedError like any refusal."""


class ModelChanged(OverloadedError):
    """The generator that tokenized a request was swapped out and released before it was
    submitted (a deploy happened meanwhile). The API tokenizes again with the new one."""

    def __init__(self) -> None:
        super().__init__("the model was replaced while the request was prepared", 0.1, 503)


@dataclass(eq=False)
class Request:
    """One generation request on its way through the engine loop.

    Created on the event loop; the worker hands results back through `deliver`, which is the
    only method meant to be called from the worker thread.
    """

    id: str
    prompt_ids: list[int]
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    arrival: float = field(default_factory=time.monotonic)
    """time.monotonic() when the request arrived."""
    deadline: float | None = None
    """time.monotonic() by which the response must be complete (None: the config's default)."""
    started: float | None = None
    """time.monotonic() when its prefill began (set by the worker)."""
    events: asyncio.Queue[Chunk | BaseException] = field(default_factory=asyncio.Queue)
    generator: TextGenerator | None = None
    """The generator whose tokenizer made `prompt_ids` (None: the one serving at submit)."""
    stream: bool = True
    """The client reads the chunks as they come (SSE). False: only the whole answer is
    used, so the engine loop holds the chunks back and hands them over with the last one —
    one wake-up of the event loop per request instead of one per decode step, each of which
    cost the engine loop the GIL while the event loop ran (demo bundle: a request alone 13.1
    → 11.1 ms, a round of 15 concurrent ones 97 → 88 ms)."""
    held: list[Chunk] = field(default_factory=list)
    """Chunks held back for a request that does not stream (worker thread only)."""
    generated: int = 0
    """Tokens generated so far (worker thread; read by the event loop for a 499's log)."""
    _cancelled: threading.Event = field(default_factory=threading.Event)

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def cancel(self) -> None:
        """The client went away: the worker drops this request or stops it between tokens."""
        self._cancelled.set()

    @property
    def queue_wait_s(self) -> float:
        return (self.started if self.started is not None else time.monotonic()) - self.arrival

    def deliver(self, item: Chunk | BaseException) -> None:
        """Worker thread → event loop (asyncio.Queue is not thread-safe; the loop is): one
        item, as deliver_all hands over many."""
        deliver_all([(self, item)])

    def put(self, item: Chunk | BaseException) -> None:
        """On the event loop: hand `item` to whoever reads `chunks()`."""
        self.events.put_nowait(item)

    async def chunks(self) -> AsyncIterator[Chunk]:
        """The generated chunks, ending with the one that has `finish_reason`; raises errors."""
        while True:
            item = await self.events.get()
            if isinstance(item, BaseException):
                raise item
            yield item
            if item.finish_reason is not None:
                return


def deliver_all(items: Sequence[tuple[Request, Chunk | BaseException]]) -> None:
    """Worker thread → event loops: many deliveries, one wake-up per event loop (a closed
    loop has nobody listening: its requests are cancelled).
    `call_soon_threadsafe` writes to the loop's self-pipe on every call (a system call and a
    wake-up of the loop's thread, which then competes for the GIL with the engine loop): a
    decode step of 15 streams made 15 of them, one step of the engine loop's serving cost."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Request, Chunk | BaseException]]] = {}
    for req, item in items:
        by_loop.setdefault(req.loop, []).append((req, item))
    for loop, batch in by_loop.items():
        try:
            loop.call_soon_threadsafe(_put_all, batch)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            for req, _ in batch:
                req.cancel()


def _put_all(batch: list[tuple[Request, Chunk | BaseException]]) -> None:
    for req, item in batch:
        req.put(item)


def empty(batch: DecodeBatch) -> None:
    """Drop every sequence of a probe's own batch (rate_probe.py, capacity.py): at once where
    the batch can (BatchDecoder.clear), else one by one. A request that arrives during the
    idle re-probe waits for this."""
    clear = getattr(batch, "clear", None)
    if clear is not None:
        clear()
        return
    for key in batch.keys:
        batch.remove(key)
