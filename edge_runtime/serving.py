"""Local serving: one worker thread runs the generator for requests taken from a bounded queue.

    event loop (API)                                worker thread
    ────────────────                                ─────────────
    LocalWorker.submit(Request) ─▶ queue.Queue ─▶  take one ─▶ generator.stream(ids, params)
    async for c in request.chunks() ◀── loop.call_soon_threadsafe(put_nowait) ◀── each Chunk

The generator is synchronous and not thread-safe, so exactly one thread drives it and the
event loop never blocks on a decode step. Requests are served one at a time for now. The
queue is where a later scheduler slots in: `submit` is the single admission point (today:
"queue full → OverloadedError → 429"), and `Request` already carries what a scheduler needs
to decide local / offload / reject and to drop abandoned work: arrival time, deadline and a
cancellation flag that the worker checks between tokens.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from edge_runtime.bundle import MANIFEST, Bundle, GenerationDefaults
from edge_runtime.errors import OverloadedError
from edge_runtime.generator import Chunk, ChunkStream
from edge_runtime.sampling import SamplingParams

log = logging.getLogger(__name__)


class TextGenerator(Protocol):
    """What serving needs of `edge_runtime.generator.Generator` (tests pass a fake)."""

    defaults: GenerationDefaults

    @property
    def context_length(self) -> int: ...

    def chat_prompt(self, messages: Sequence[Mapping[str, Any]]) -> list[int]: ...

    def text_prompt(self, text: str) -> list[int]: ...

    def resolve_max_tokens(self, prompt_len: int, max_tokens: int | None) -> int: ...

    def stream(self, prompt_ids: Sequence[int], params: SamplingParams) -> ChunkStream: ...

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


@dataclass(eq=False)
class Request:
    """One generation request on its way through the queue.

    Created on the event loop; the worker hands results back through `deliver`, which is the
    only method meant to be called from the worker thread.
    """

    id: str
    prompt_ids: list[int]
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    arrival: float = field(default_factory=time.monotonic)
    """time.monotonic() when the request was admitted."""
    deadline: float | None = None
    """time.monotonic() by which generation must have started, else OverloadedError."""
    started: float | None = None
    """time.monotonic() when the worker began generating (set by the worker)."""
    events: asyncio.Queue[Chunk | BaseException] = field(default_factory=asyncio.Queue)
    _cancelled: threading.Event = field(default_factory=threading.Event)

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def cancel(self) -> None:
        """The client went away: the worker skips this request or stops it between tokens."""
        self._cancelled.set()

    @property
    def queue_wait_s(self) -> float:
        return (self.started if self.started is not None else time.monotonic()) - self.arrival

    def deliver(self, item: Chunk | BaseException) -> None:
        """Worker thread → event loop. asyncio.Queue is not thread-safe; the loop is."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, item)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            self.cancel()

    async def chunks(self) -> AsyncIterator[Chunk]:
        """The generated chunks, ending with the one that has `finish_reason`; raises errors."""
        while True:
            item = await self.events.get()
            if isinstance(item, BaseException):
                raise item
            yield item
            if item.finish_reason is not None:
                return


class LocalWorker:
    """Loads the model, then serves queued requests on one thread, one at a time."""

    def __init__(
        self,
        load: Callable[[], TextGenerator],
        max_queued: int = 16,
        retry_after_s: float = 1.0,
        on_failure: Callable[[BaseException], None] | None = None,
    ) -> None:
        self._load = load
        self._queue: queue.Queue[Request | None] = queue.Queue(maxsize=max_queued)
        self._retry_after_s = retry_after_s
        self._on_failure = on_failure
        self._thread = threading.Thread(target=self._run, name="edge-runtime-worker", daemon=True)
        self._busy = False
        self.generator: TextGenerator | None = None
        """Set once loading and warm-up are done; the API tokenizes prompts with it."""
        self.error: BaseException | None = None
        """Why loading failed, if it did."""
        self._ready = threading.Event()

    # -- control (event loop / main thread) ----------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Finish the request in progress, fail the waiting ones, join the thread."""
        if not self._thread.is_alive():
            return
        # A full queue must not block shutdown: make room for the sentinel by failing the
        # oldest waiting request.
        while True:
            try:
                self._queue.put_nowait(None)
                break
            except queue.Full:
                self._fail_waiting(1)
        self._thread.join(timeout)

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    def wait_ready(self, timeout: float | None = None) -> bool:
        return self._ready.wait(timeout)

    @property
    def depth(self) -> int:
        """Requests waiting plus the one being generated."""
        return self._queue.qsize() + int(self._busy)

    def submit(self, request: Request) -> None:
        """Queue `request` or raise OverloadedError (the API answers 429)."""
        try:
            self._queue.put_nowait(request)
        except queue.Full:
            raise OverloadedError(
                f"the request queue is full ({self._queue.maxsize} waiting); retry later",
                self._retry_after_s,
            ) from None

    # -- worker thread ------------------------------------------------------------------

    def _run(self) -> None:
        try:
            gen = self._load()
            gen.warmup()
        except BaseException as e:
            log.error("loading the model failed: %s", e)
            self.error = e
            if self._on_failure is not None:
                self._on_failure(e)
            self._fail_waiting()
            return
        self.generator = gen
        self._ready.set()
        while (request := self._queue.get()) is not None:
            self._busy = True
            try:
                self._serve(gen, request)
            finally:
                self._busy = False
        self._fail_waiting()

    def _serve(self, gen: TextGenerator, request: Request) -> None:
        if request.cancelled:  # the client left while the request was waiting
            return
        now = time.monotonic()
        if request.deadline is not None and now > request.deadline:
            request.deliver(
                OverloadedError(
                    f"request waited {now - request.arrival:.1f}s in the queue without "
                    "starting; retry later",
                    self._retry_after_s,
                )
            )
            return
        request.started = now
        chunks = gen.stream(request.prompt_ids, request.params)
        try:
            for chunk in chunks:
                # Checked between tokens: closing the generator below ends the generation
                # without computing another step.
                if request.cancelled:
                    log.info("request %s cancelled by its client", request.id)
                    return
                request.deliver(chunk)
        except Exception as e:  # an engine failure fails this request, not the daemon
            log.exception("request %s failed", request.id)
            request.deliver(e)
        finally:
            chunks.close()

    def _fail_waiting(self, limit: int | None = None) -> None:
        n = 0
        while limit is None or n < limit:
            try:
                request = self._queue.get_nowait()
            except queue.Empty:
                return
            if request is not None:
                request.deliver(OverloadedError("the server is shutting down", 1.0))
                n += 1
