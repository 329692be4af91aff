"""OpenAI completion requests → engine requests → OpenAI responses (JSON or SSE).

    body ─▶ model check ─▶ prompt ids (tokenized off the event loop) ─▶ SamplingParams
         ─▶ serving.dispatch.Dispatcher (local / cloud / refuse) ─▶ first event
         ─▶ one JSON body, or an SSE stream:

    data: {"object": "chat.completion.chunk", ... "delta": {"role": "assistant", "content": ""}}
    data: {... "delta": {"content": "Hel"}}                 one per text delta
    data: {... "delta": {}, "finish_reason": "stop"}
    data: {... "choices": [], "usage": {...}}               with stream_options.include_usage
    data: [DONE]

The response starts only once the first event is back, so a request refused in the queue
(deadline passed) still gets a real 429 rather than an error inside a 200 stream.

This module only translates: where a request is served is the dispatcher's decision, made
once (a drained device's requests go to the cloud when it is up, else 503 `drained`).
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from typing import TypeVar

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool
from starlette.types import Receive

from edge_runtime.api import schemas as s
from edge_runtime.api.errors import SERVER_ERROR, APIError, from_edge_error
from edge_runtime.api.metrics import REFUSED, Metrics
from edge_runtime.api.middleware import CLIENT_GONE, RequestContext, request_context
from edge_runtime.errors import ContextLengthError, EdgeError, GenerationError
from edge_runtime.model.sampling import SamplingParams
from edge_runtime.model.stream import Chunk, GenerationStats
from edge_runtime.offload.client import OffloadClient
from edge_runtime.serving.dispatch import CloudCall, Dispatcher, Drained, Route
from edge_runtime.serving.engine_loop import LocalWorker
from edge_runtime.serving.request import ModelChanged, ModelInfo, TextGenerator
from edge_runtime.serving.request import Request as EngineRequest

T = TypeVar("T")


@dataclass(frozen=True)
class ServingState:
    """What the completion handlers share; one per app."""

    worker: LocalWorker
    model: ModelInfo
    """The model at start-up; after a hot swap `current_model()` is the one serving."""
    metrics: Metrics
    retry_after_s: int
    offload: OffloadClient | None = None
    """The cloud path, when [offload] names a broker."""

    def current_model(self) -> ModelInfo:
        return self.worker.model or self.model

    @functools.cached_property
    def dispatcher(self) -> Dispatcher:
        """Local / cloud / refuse (serving/dispatch.py), over this app's worker and cloud."""
        return Dispatcher(self.worker, self.offload)


DEADLINE_HEADER = "x-request-deadline-ms"
"""The client's latency budget for the whole response, in milliseconds from arrival."""


def _budget_s(request: Request) -> float | None:
    """The client's latency budget in seconds (None: the dispatcher's default)."""
    raw = request.headers.get(DEADLINE_HEADER)
    if raw is None:
        return None
    try:
        budget_ms = float(raw)
    except ValueError:
        budget_ms = float("nan")
    if not 0 < budget_ms <= 86_400_000:  # also rejects nan and inf
        shown = raw if len(raw) <= 64 else f"{raw[:64]}... ({len(raw)} characters)"
        raise APIError(
            400,
            f"{DEADLINE_HEADER} must be a number of milliseconds in (0, 86400000], got "
            f"{shown!r}",
            param=DEADLINE_HEADER,
            code="invalid_deadline",
        )
    return budget_ms / 1000


async def create_completion(
    request: Request, body: s.ChatCompletionRequest | s.CompletionRequest, state: ServingState
) -> Response:
    ctx = request_context(request.scope)
    try:
        return await _create_completion(request, body, state, ctx)
    except ModelChanged:  # a deploy swapped the model while this one was tokenized: once more
        return await _create_completion(request, body, state, ctx)


async def _create_completion(
    request: Request,
    body: s.ChatCompletionRequest | s.CompletionRequest,
    state: ServingState,
    ctx: RequestContext,
) -> Response:
    gen, model = state.worker.served
    model = model or state.model
    if body.model != model.name:
        raise APIError(
            404,
            f"model '{body.model}' does not exist; this server serves '{model.name}'",
            param="model",
            code="model_not_found",
        )
    ctx.model = body.model
    if gen is None:
        raise APIError(
            503,
            "the model is still loading; retry shortly",
            SERVER_ERROR,
            code="model_not_ready",
            headers={"Retry-After": str(max(1, state.retry_after_s))},
        )
    # The deadline counts from arrival, on the engine loop's clock: from when the app first
    # saw the request, not from here — under a burst of 15 requests this handler ran tens of
    # ms later (reading and validating the bodies of the others), and bench_deadlines'
    # clients saw answers after their budget that the daemon thought in time.
    budget = _budget_s(request)
    if budget is not None:
        budget -= time.perf_counter() - ctx.arrived
    deadline = state.dispatcher.deadline(budget)
    chat = isinstance(body, s.ChatCompletionRequest)
    if isinstance(body, s.ChatCompletionRequest):
        messages = [m.for_template() for m in body.messages]
        prompt_ids = await run_in_threadpool(gen.chat_prompt, messages)
    else:
        prompt_ids = await run_in_threadpool(gen.text_prompt, body.prompt_text)
    params = _sampling_params(gen, body, prompt_ids)
    ctx.prompt_tokens = len(prompt_ids)

    req = EngineRequest(
        id=ctx.id,
        prompt_ids=prompt_ids,
        params=params,
        loop=asyncio.get_running_loop(),
        deadline=deadline,
        generator=gen,
        stream=bool(body.stream),
    )
    call = CloudCall(functools.partial(body.model_dump, mode="json", exclude_none=True),
                     "chat" if chat else "completions", body.stream)

    def on_cloud() -> None:
        ctx.served_by = "cloud"
        ctx.bundle_version = None  # the cloud worker's model answers, not this device's bundle

    try:
        # REJECT raises OverloadedError → 429/503 with Retry-After (errors.from_edge_error).
        route = state.dispatcher.dispatch(req, call, on_cloud)
    except Drained as e:  # not counted as an error in the fleet's telemetry
        ctx.served_by = REFUSED
        raise APIError(503, str(e), SERVER_ERROR, code="drained",
                       headers={"Retry-After": str(round(e.retry_after_s))}) from e
    if route.served_by == "local":  # a queue review may still send it away: on_cloud
        ctx.bundle_version = model.version
    fmt = _Format(chat, f"{'chatcmpl' if chat else 'cmpl'}-{ctx.id}", model)
    return await _respond(request, body, state, ctx, fmt, route)


async def _respond(
    request: Request,
    body: s.ChatCompletionRequest | s.CompletionRequest,
    state: ServingState,
    ctx: RequestContext,
    fmt: _Format,
    work: Route,
) -> Response:
    """One JSON body, or an SSE stream, from chunks produced here or in the cloud."""
    chunks = work.chunks
    if not body.stream:
        collected = await _unless_disconnected(request.receive, work, _collect(chunks, ctx), ctx)
        if collected is None:
            return Response(status_code=CLIENT_GONE)
        text, last = collected
        stats = _finished(last, work, state.metrics, ctx)
        usage = s.Usage.of(stats.prompt_tokens, stats.completion_tokens)
        assert last.finish_reason is not None
        return JSONResponse(fmt.complete(text, last.finish_reason, usage).model_dump())
    first = await _unless_disconnected(request.receive, work, anext(chunks), ctx)
    if first is None:
        return Response(status_code=CLIENT_GONE)
    events = _sse(fmt, first, chunks, work, state.metrics, ctx, body.include_usage)
    return StreamingResponse(
        events,
        media_type="text/event-stream",
        # No proxy or client cache may hold tokens back.
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


def _sampling_params(
    gen: TextGenerator, body: s.ChatCompletionRequest | s.CompletionRequest, prompt_ids: list[int]
) -> SamplingParams:
    """Validate against the model (context length) and fill in the bundle's defaults."""
    prompt_param = "messages" if isinstance(body, s.ChatCompletionRequest) else "prompt"
    max_tokens, max_param = body.requested_max_tokens()
    if not prompt_ids:
        raise APIError(400, "the prompt encodes to no tokens", param=prompt_param)
    try:
        resolved = gen.resolve_max_tokens(len(prompt_ids), max_tokens)
        return body.sampling_params(gen.defaults, resolved)
    except ContextLengthError as e:
        # The generator names the chat field and OpenAI's older max_tokens; answer in the
        # caller's terms.
        param = prompt_param if e.field == "messages" else max_param
        raise APIError(400, str(e), param=param, code="context_length_exceeded") from e
    except GenerationError as e:
        raise APIError(400, str(e), param=e.field) from e


async def _collect(chunks: AsyncIterator[Chunk], ctx: RequestContext) -> tuple[str, Chunk]:
    parts: list[str] = []
    ctx.completion_tokens = 0
    async for chunk in chunks:
        ctx.completion_tokens += len(chunk.token_ids)  # so far: what a 499 logs
        parts.append(chunk.text)
        if chunk.finish_reason is not None:
            return "".join(parts), chunk
    raise AssertionError("generation ended without a finish chunk")


async def _unless_disconnected(
    receive: Receive, req: Route, work: Awaitable[T], ctx: RequestContext
) -> T | None:
    """`work`'s result, or None (and the generation cancelled) if the client goes away first."""

    async def disconnected() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        # The watcher must be gone before a StreamingResponse starts reading `receive`.
        watcher.cancel()
    if task.done():
        return task.result()
    req.cancel()
    task.cancel()
    # What a 499 logs, as for a stream cut mid-way (middleware.py): why, and the tokens made
    # so far (a request that does not stream gets its chunks only at the end).
    ctx.error = ctx.error or "client_disconnected"
    ctx.completion_tokens = max(ctx.completion_tokens or 0, req.req.generated)
    return None


def _finished(
    last: Chunk, req: Route, metrics: Metrics, ctx: RequestContext
) -> GenerationStats:
    assert last.stats is not None
    ctx.completion_tokens = last.stats.completion_tokens
    metrics.observe_generation(last.stats, req.queue_wait_s, ctx.served_by)
    return last.stats


async def _sse(
    fmt: _Format,
    first: Chunk,
    chunks: AsyncIterator[Chunk],
    req: Route,
    metrics: Metrics,
    ctx: RequestContext,
    include_usage: bool,
) -> AsyncIterator[str]:
    try:
        if fmt.chat:
            yield _event(fmt.chunk(s.Delta(role="assistant", content="")))
        chunk = first
        ctx.completion_tokens = 0
        while True:
            ctx.completion_tokens += len(chunk.token_ids)  # so far: what a 499 logs
            if chunk.text:
                yield _event(fmt.chunk(s.Delta(content=chunk.text), text=chunk.text))
            if chunk.finish_reason is not None:
                stats = _finished(chunk, req, metrics, ctx)
                yield _event(fmt.chunk(s.Delta(), finish_reason=chunk.finish_reason))
                if include_usage:
                    usage = s.Usage.of(stats.prompt_tokens, stats.completion_tokens)
                    yield _event(fmt.usage_chunk(usage))
                break
            chunk = await anext(chunks)
    except EdgeError as e:
        # Headers are sent: the error travels as an event, which OpenAI's clients raise.
        err = from_edge_error(e)
        ctx.error = err.code or err.type
        yield "data: " + bytes(err.response().body).decode() + "\n\n"
    finally:
        # Normal end: a no-op. Client gone (this generator is closed): stop the worker.
        req.cancel()
    yield "data: [DONE]\n\n"


def _event(payload: BaseModel) -> str:
    return f"data: {payload.model_dump_json()}\n\n"


class _Format:
    """Chat or text-completion response objects for one request."""

    def __init__(self, chat: bool, id: str, model: ModelInfo) -> None:
        self.chat = chat
        self.id = id
        self.created = int(time.time())
        self.model = model.name

    def complete(self, text: str, finish: str, usage: s.Usage) -> BaseModel:
        if self.chat:
            msg = s.AssistantMessage(content=text)
            return s.ChatCompletion(
                id=self.id,
                created=self.created,
                model=self.model,
                choices=[s.ChatChoice(message=msg, finish_reason=finish)],
                usage=usage,
            )
        return self._text([s.TextChoice(text=text, finish_reason=finish)], usage)

    def chunk(self, delta: s.Delta, text: str = "", finish_reason: str | None = None) -> BaseModel:
        if self.chat:
            return self._chat_chunk([s.ChunkChoice(delta=delta, finish_reason=finish_reason)])
        return self._text([s.TextChoice(text=text, finish_reason=finish_reason)])

    def usage_chunk(self, usage: s.Usage) -> BaseModel:
        return self._chat_chunk([], usage) if self.chat else self._text([], usage)

    def _chat_chunk(
        self, choices: list[s.ChunkChoice], usage: s.Usage | None = None
    ) -> s.ChatCompletionChunk:
        return s.ChatCompletionChunk(
            id=self.id, created=self.created, model=self.model, choices=choices, usage=usage
        )

    def _text(self, choices: list[s.TextChoice], usage: s.Usage | None = None) -> s.TextCompletion:
        return s.TextCompletion(
            id=self.id, created=self.created, model=self.model, choices=choices, usage=usage
        )
