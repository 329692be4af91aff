"""Deadlines of requests that already run locally: the engine loop ends them, explicitly.

Unit level: LocalWorker with an injected clock and a scripted generator, so the deadline
passes exactly when the test says. API level: a real uvicorn server, httpx and the openai
client, a 504 for a JSON answer and an error event for a stream that has begun.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import pytest
from live_server import FakeGenerator, StreamBatch, serve_in_thread, sse_events, wait_until

from edge_runtime.api.app import create_app
from edge_runtime.config import Config, SchedulerConfig
from edge_runtime.errors import DeadlineExceededError
from edge_runtime.model.sampling import SamplingParams
from edge_runtime.model.stream import Chunk
from edge_runtime.serving.engine_loop import LocalWorker
from edge_runtime.serving.request import ModelInfo, Request

MODEL = ModelInfo(name="fake-model", version="1", created=1_700_000_000)
CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]}


class Clock:
    """A clock the test moves; the engine loop reads it through LocalWorker(clock=...)."""

    def __init__(self) -> None:
        self.t = 1000.0
        self._lock = threading.Lock()

    def __call__(self) -> float:
        with self._lock:
            return self.t

    def advance(self, dt: float) -> None:
        with self._lock:
            self.t += dt


@contextmanager
def worker(gen: FakeGenerator, clock: Clock, max_batch: int = 2) -> Iterator[LocalWorker]:
    w = LocalWorker(lambda: gen, SchedulerConfig(max_batch=max_batch, safety=1.0),
                    clock=clock, measure_rates=False)
    w.start()
    assert w.wait_ready(10)
    try:
        yield w
    finally:
        w.stop()


class PrefillingGenerator(FakeGenerator):
    """Its batches report one long prompt prefilling beside the running sequences."""

    def batch(self, max_batch: int, prefill_chunk: int = 0) -> StreamBatch:
        b = StreamBatch(self, max_batch + 1, prefill_chunk)
        b.prefilling = 1
        return b


@pytest.mark.parametrize("prefilling", [False, True])
def test_running_request_is_ended_at_its_deadline_and_the_other_one_finishes(
        prefilling: bool) -> None:
    clock = Clock()
    # 20 tokens, 20 ms apart: the test has time to act
    gen = (PrefillingGenerator if prefilling else FakeGenerator)(delay_s=0.02)
    with worker(gen, clock, max_batch=3 if prefilling else 2) as w:
        w.scheduler.rates.alpha = 0.0  # frozen 50 ms steps: the margin checked below
        w.scheduler.rates.step_s = {1: 0.05, 2: 0.05}
        # a 128-token prefill chunk takes 0.128 s at 1,000 tokens/s
        w.scheduler.rates.prefill_tokens_per_s = 1000.0

        async def scenario() -> tuple[list[Chunk], BaseException | None, list[Chunk]]:
            loop = asyncio.get_running_loop()
            params = SamplingParams(max_tokens=32, temperature=0.0)
            short = Request("short", list(b"hi"), params, loop, deadline=clock() + 5.0)
            long = Request("long", list(b"hi"), params, loop, deadline=clock() + 60.0)
            for r in (short, long):
                assert w.submit(r).action.value == "local"
            got: list[Chunk] = []
            error: BaseException | None = None
            try:
                async for c in short.chunks():
                    got.append(c)
                    if len(got) == 3:
                        # 4.96 s later: the next 50 ms step would end past the deadline.
                        # With a prefill chunk riding along (0.178 s), 4.85 s is enough.
                        clock.advance(4.85 if prefilling else 4.96)
            except DeadlineExceededError as e:
                error = e
            rest = [c async for c in long.chunks()]
            return got, error, rest

        got, error, rest = asyncio.run(scenario())
        assert isinstance(error, DeadlineExceededError)
        want = ("(0.150s left, a decode step with a prefill chunk takes ~0.178s)" if prefilling
                else "(0.040s left, a decode step takes ~0.050s)")
        assert f"deadline came during generation {want}" in str(error)
        assert 3 <= len(got) < 20 and all(c.finish_reason is None for c in got)
        assert "".join(c.text for c in rest) == gen.reply and rest[-1].finish_reason == "stop"
        # The scheduler no longer counts it: its slot is free for the queue.
        wait_until(lambda: w.depth == 0)
        assert w.scheduler.running == {}


def test_queued_request_whose_deadline_passed_is_not_started() -> None:
    clock = Clock()
    gate = threading.Event()
    gen = FakeGenerator(gate=gate)
    with worker(gen, clock, max_batch=1) as w:
        async def scenario() -> BaseException:
            loop = asyncio.get_running_loop()
            params = SamplingParams(max_tokens=4, temperature=0.0)
            first = Request("first", list(b"hi"), params, loop, deadline=clock() + 60.0)
            w.submit(first)
            await asyncio.to_thread(wait_until, gen.started.is_set)
            second = Request("second", list(b"hi"), params, loop, deadline=clock() + 10.0)
            w.submit(second)
            # Its deadline passes while it waits. review() would refuse it, but it runs at
            # most every 20 ms: a slot can free up in between. That race is what the check
            # before prefill covers, so no review happens here.
            w.scheduler.review = lambda *a, **k: []  # type: ignore[method-assign]
            clock.advance(10.0)
            gate.set()
            with pytest.raises(DeadlineExceededError, match="passed while it waited"):
                async for _ in second.chunks():
                    pass
            return DeadlineExceededError("ok")

        asyncio.run(scenario())
        assert gen.produced == 4  # only the first request generated anything


# -- through the API -------------------------------------------------------------------------


@contextmanager
def serve(gen: FakeGenerator) -> Iterator[str]:
    w = LocalWorker(lambda: gen, Config().scheduler, measure_rates=False)
    with serve_in_thread(create_app(w, MODEL, Config())) as url:
        wait_until(lambda: w.ready)
        # Optimistic, frozen rates: admission takes a deadline it cannot meet, so the
        # deadline is enforced while the request runs (what this test is about).
        w.scheduler.rates.alpha = 0.0
        w.scheduler.rates.step_s = {1: 0.001}
        yield url


def test_api_deadline_mid_generation_is_504_or_an_error_event() -> None:
    gen = FakeGenerator(reply="x" * 60, context_length=128, delay_s=0.03)
    body = {**CHAT, "max_tokens": 60}  # 60 tokens, 30 ms apart: about 1.8 s
    with serve(gen) as url:
        headers = {"x-request-deadline-ms": "300"}
        t0 = time.monotonic()
        r = httpx.post(f"{url}/v1/chat/completions", json=body, headers=headers, timeout=10)
        took = time.monotonic() - t0
        assert r.status_code == 504, r.text
        assert r.json()["error"]["code"] == "deadline_exceeded"
        assert r.headers["x-served-by"] == "local"
        assert 0.25 < took < 1.0  # at the deadline (+ a loaded CI machine), not at ~1.8 s

        t0 = time.monotonic()
        with httpx.stream("POST", f"{url}/v1/chat/completions", json={**body, "stream": True},
                          headers=headers, timeout=10) as s:
            assert s.status_code == 200
            events = sse_events(s.iter_lines())
        assert time.monotonic() - t0 < 1.0
        assert events[-1] == "[DONE]" and events[-2]["error"]["code"] == "deadline_exceeded"
        deltas = [e for e in events[:-2] if e["choices"]]
        assert deltas and all(e["choices"][0]["finish_reason"] is None for e in deltas)
        wait_until(gen.closed.is_set)  # the generation was stopped, not left running

        import openai

        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
        with pytest.raises(openai.APIError, match="deadline"):
            for _ in client.chat.completions.create(
                model="fake-model", messages=CHAT["messages"], stream=True,  # type: ignore[arg-type]
                max_tokens=60, extra_headers=headers,
            ):
                pass
        with pytest.raises(openai.InternalServerError) as e:
            client.chat.completions.create(
                model="fake-model", messages=CHAT["messages"],  # type: ignore[arg-type]
                max_tokens=60, extra_headers=headers,
            )
        assert e.value.status_code == 504


class SpeculatingBatch(StreamBatch):
    """A lone sequence advances `burst` chunks per step, as a speculative round does."""

    burst = 4

    def step(self) -> dict:
        if len(self._its) != 1:
            return super().step()
        self.prefill_work = (0, 0.0)
        (key, it), = self._its.items()
        out: list[Chunk] = []
        for _ in range(self.burst):
            chunk = next(it)
            out.append(chunk)
            if chunk.finish_reason is not None:
                self._its.pop(key).close()
                break
        return {key: out}


class SpeculatingGenerator(FakeGenerator):
    def batch(self, max_batch: int, prefill_chunk: int = 0) -> StreamBatch:
        return SpeculatingBatch(self, max_batch, prefill_chunk)


def test_a_speculative_step_counts_as_the_tokens_it_made() -> None:
    """Each token costs the generator 5 ms; alone, a step makes 4 of them (20 ms). The rates
    are per token: counted as one step, the batch-1 step was learned 4x too slow, and every
    request that would run alone was refused for it. The scheduler's count of the tokens a
    running request has left moves by 4 a step too."""
    gen = SpeculatingGenerator(reply="abcdefghijklmnopqrstuvwx", delay_s=0.005)
    w = LocalWorker(lambda: gen, SchedulerConfig(max_batch=2, safety=1.0), measure_rates=False)
    w.scheduler.rates.alpha = 1.0  # learn (LocalWorker without a probe keeps the priors)
    left: list[int] = []

    async def run() -> str:
        req = Request("r", [1, 2, 3], SamplingParams(max_tokens=24), asyncio.get_running_loop())
        w.submit(req)
        text = ""
        async for c in req.chunks():
            text += c.text
            r = w.scheduler.running.get("r")
            if r is not None:
                left.append(r.remaining)
        return text

    w.start()
    try:
        assert w.wait_ready(10)
        assert asyncio.run(run()) == "abcdefghijklmnopqrstuvwx"
        step = w.scheduler.rates.step_s[1]
    finally:
        w.stop()
    assert 0.004 < step < 0.009, f"batch-1 step learned as {step * 1000:.1f} ms, not ~5 ms"
    assert min(left) <= 4, f"the scheduler still counted {min(left)} tokens left"


class LoggingBatch(StreamBatch):
    """Notes when each sequence joins and leaves the batch."""

    def __init__(self, gen: FakeGenerator, max_batch: int, prefill_chunk: int = 0) -> None:
        super().__init__(gen, max_batch, prefill_chunk)
        self.log: list[tuple[str, object]] = []

    def add(self, key, prompt_ids, params):  # type: ignore[no-untyped-def]
        self.log.append(("join", key))
        return super().add(key, prompt_ids, params)

    def step(self) -> dict:
        out = super().step()
        self.log += [("leave", key) for key, chunks in out.items()
                     if chunks and chunks[-1].finish_reason is not None]
        return out


class LoggingGenerator(FakeGenerator):
    batches: list[LoggingBatch]

    def batch(self, max_batch: int, prefill_chunk: int = 0) -> StreamBatch:
        b = LoggingBatch(self, max_batch, prefill_chunk)
        self.batches = [*getattr(self, "batches", []), b]
        return b


def test_a_deferred_request_joins_once_the_request_it_waits_for_is_done() -> None:
    """The engine loop keeps the scheduler's deferral: a request admitted to start after
    another (joining at once would push that one past its deadline) does not join the batch
    while a slot is free, and is served once the other has left."""
    clock = Clock()  # frozen: nobody reaches a deadline, the decisions are the rates'
    gen = LoggingGenerator(reply="abcdefghij", delay_s=0.005)
    with worker(gen, clock, max_batch=2) as w:
        w.scheduler.rates.alpha = 0.0
        w.scheduler.rates.step_s = {1: 0.05, 2: 0.1}  # a pair steps twice as slowly
        w.scheduler.rates.prefill_tokens_per_s = 1000.0

        async def scenario() -> tuple[str, str, str]:
            loop = asyncio.get_running_loop()
            params = SamplingParams(max_tokens=10, temperature=0.0)
            # alone: 9 steps of 0.05 s = 0.45 s; beside another, 0.9 s: past 0.6 s
            first = Request("first", list(b"hi"), params, loop, deadline=clock() + 0.6)
            second = Request("second", list(b"hi"), params, loop, deadline=clock() + 5.0)
            assert w.submit(first).action.value == "local"
            decision = w.submit(second)
            texts = []
            for r in (first, second):  # py3.10: no async comprehension inside a comprehension
                texts.append("".join([c.text async for c in r.chunks()]))
            return decision.reason, texts[0], texts[1]

        reason, a, b = asyncio.run(scenario())
    assert "starting after 1 admitted request" in reason
    assert a == b == "abcdefghij"
    log = gen.batches[-1].log
    assert log == [("join", "first"), ("leave", "first"), ("join", "second"),
                   ("leave", "second")], log
