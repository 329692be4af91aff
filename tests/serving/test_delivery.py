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


def test_a_daemon_process_freezes_its_heap_once_the_model_is_warm() -> None:
    """`freeze_heap` (the CLI's serve): what is alive once the model is warm leaves the
    cyclic collector's sight, so a full collection no longer stalls every request for 10-20
    ms. Off by default: a test process must not freeze its own heap."""
    import gc

    gc.unfreeze()
    try:
        plain = LocalWorker(FakeGenerator, measure_rates=False)
        plain.start()
        assert plain.wait_ready(10)
        plain.stop()
        assert gc.get_freeze_count() == 0
        daemon = LocalWorker(FakeGenerator, measure_rates=False, freeze_heap=True)
        daemon.start()
        assert daemon.wait_ready(10)
        daemon.stop()
        assert gc.get_freeze_count() > 1000
        gc.unfreeze()
        # The cloud-worker command's engine loop, the same way.
        from edge_runtime.cloud.worker import CloudWorker

        cloud = CloudWorker("mqtt://127.0.0.1:1", FakeGenerator, freeze_heap=True)
        assert cloud.engine is not None
        cloud.engine.start()
        assert cloud.engine.wait_ready(10)
        cloud.engine.stop()
        assert gc.get_freeze_count() > 1000
    finally:
        gc.unfreeze()
