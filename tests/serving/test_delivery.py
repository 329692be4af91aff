"""How the engine loop hands chunks to the event loop: as they come for a stream, the whole
answer at once for a request that does not stream (one wake-up of the event loop, not one
per decode step)."""

from __future__ import annotations

import asyncio

import pytest
from live_server import FakeGenerator

from edge_runtime.model.sampling import SamplingParams
from edge_runtime.serving.engine_loop import LocalWorker
from edge_runtime.serving.request import Request
from edge_runtime.serving.scheduler import SchedulerConfig


@pytest.mark.parametrize("stream", [True, False])
def test_a_whole_answer_comes_at_once_and_a_stream_as_it_goes(stream: bool) -> None:
    gen = FakeGenerator(reply="abcdefgh", delay_s=0.02)  # 8 chunks, 20 ms apart
    w = LocalWorker(lambda: gen, SchedulerConfig(max_batch=2), measure_rates=False)
    w.start()
    try:
        assert w.wait_ready(10)

        async def run() -> tuple[int, str, int]:
            req = Request("r", [1, 2], SamplingParams(max_tokens=8), asyncio.get_running_loop(),
                          stream=stream)
            w.submit(req)
            first = await req.events.get()
            waiting = req.events.qsize()  # what came with the first chunk
            text = first.text if not isinstance(first, BaseException) else ""
            async for c in req.chunks():
                text += c.text
            return waiting, text, req.generated

        waiting, text, generated = asyncio.run(run())
    finally:
        w.stop()
    assert text == "abcdefgh" and generated == 8
    if stream:
        assert waiting < 3, "a stream's chunks must not be held back"
    else:
        assert waiting == 8, "the whole answer (7 more chunks and the finish) at once"
