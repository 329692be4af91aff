"""LocalWorker.swap: new requests go to the new generator at once, running ones finish on
the old one, which is released afterwards; a request tokenized by a released model is sent
back to be tokenized again (ModelChanged), never run on the wrong vocabulary."""

from __future__ import annotations

import asyncio
import threading

import pytest
from live_server import FakeGenerator, wait_until

from edge_runtime.model.sampling import SamplingParams
from edge_runtime.serving.engine_loop import LocalWorker
from edge_runtime.serving.request import ModelChanged, ModelInfo, Request


async def _text(req: Request) -> str:
    return "".join([c.text async for c in req.chunks()])


def test_swap_while_a_request_runs() -> None:
    old = FakeGenerator(reply="the old model answers slowly", delay_s=0.02)
    new = FakeGenerator(reply="new")
    worker = LocalWorker(lambda: old, measure_rates=False, model=ModelInfo("m", "1", 0))
    worker.start()
    assert worker.wait_ready(10)
    params = SamplingParams(max_tokens=64, temperature=0.0)

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        a = Request("a", [1], params, loop, generator=worker.generator)
        worker.submit(a)
        running = asyncio.ensure_future(_text(a))
        await asyncio.to_thread(old.started.wait, 5)
        await asyncio.to_thread(worker.swap, new, ModelInfo("m", "2", 0))
        assert not running.done()  # adopted between two steps of `a`, not after it
        gen, model = worker.served
        assert gen is new and model is not None and model.version == "2"
        b = Request("b", [1], params, loop, generator=gen)
        worker.submit(b)
        assert await _text(b) == "new"
        assert await running == "the old model answers slowly"
        await asyncio.to_thread(wait_until, lambda: not worker._draining, 5)
        stale = Request("c", [1], params, loop, generator=old)
        with pytest.raises(ModelChanged):
            worker.submit(stale)

    try:
        asyncio.run(scenario())
        assert worker.model is not None and worker.model.version == "2"
    finally:
        worker.stop()


def test_swap_before_loading_finishes_and_after_stop() -> None:
    gate = threading.Event()
    first = FakeGenerator(reply="first", warmup_gate=gate)
    second = FakeGenerator(reply="second")
    worker = LocalWorker(lambda: first, measure_rates=False, model=ModelInfo("m", "1", 0))
    worker.start()
    t = threading.Thread(target=worker.swap, args=(second,))
    t.start()  # waits for the engine loop, which is still warming up `first`
    gate.set()
    t.join(10)
    assert not t.is_alive() and worker.generator is second
    assert worker.model is not None and worker.model.version == "1"  # no model given: kept
    worker.stop()
    with pytest.raises(Exception, match="shutting down"):
        worker.swap(first)
