"""Engine-imposed limits come from the decode batch, not the config (one source of truth).

An engine compiled for fixed shape ranges (a TensorRT plan) makes BatchDecoder prefill whole
prompts whatever `scheduler.prefill_chunk` says; the scheduler's estimates and the engine
loop's deadline check must plan with what the batch does. The generator here is the
scripted one of the API tests with a batch that reports the limits such an engine imposes.
"""

from __future__ import annotations

import asyncio

import pytest
from live_server import FakeGenerator, StreamBatch

from edge_runtime.model.sampling import SamplingParams
from edge_runtime.serving.engine_loop import LocalWorker
from edge_runtime.serving.request import Request
from edge_runtime.serving.scheduler import (
    CloudState,
    Job,
    Pressure,
    Rates,
    Scheduler,
    SchedulerConfig,
)

NONE = CloudState(available=False, p99_s=0.0, configured=False)


class FixedShapeGenerator(FakeGenerator):
    """Its batches prefill whole prompts and decode at most two rows, as a TensorRT plan
    built for max_batch=2 does, whatever the config asks."""

    def batch(self, max_batch: int, prefill_chunk: int = 0) -> StreamBatch:
        return StreamBatch(self, min(max_batch, 2), prefill_chunk=0)


def frozen_rates() -> Rates:
    # prefill 1,000 tokens/s; a decode step 50 ms at any batch size; no online updates
    return Rates(prefill_tokens_per_s=1000.0, step_s={1: 0.05, 2: 0.05, 4: 0.05}, alpha=0.0)


def test_the_scheduler_plans_with_the_batch_limits_once_told() -> None:
    s = Scheduler(SchedulerConfig(max_batch=4, prefill_chunk=128, safety=1.0), frozen_rates())
    long = Job("long", 0.0, 60.0, prompt_tokens=1000, max_tokens=10)
    # The config's chunk: 1 s of prefill, then 8 steps waited out chunk by chunk + 9 tokens.
    assert s.admit(long, 0.0, NONE, Pressure()).estimated_finish == pytest.approx(1.85)
    s.queue.clear()
    s.limit_to(max_batch=2, prefill_chunk=0)
    assert (s.max_batch, s.prefill_chunk) == (2, 0)
    assert s.admit(long, 0.0, NONE, Pressure()).estimated_finish == pytest.approx(1.45)


def test_the_engine_loop_gives_the_scheduler_the_batch_limits() -> None:
    """Fails on the old code: the scheduler planned a 128-token chunked prefill (and four
    rows) that the engine never runs, so its estimate for a long prompt was 0.4 s late."""
    clock = [100.0]
    w = LocalWorker(FixedShapeGenerator,
                    SchedulerConfig(max_batch=4, prefill_chunk=128, safety=1.0),
                    clock=lambda: clock[0], measure_rates=False)
    w.scheduler.rates = frozen_rates()
    w.start()
    try:
        assert w.wait_ready(10)
        assert (w.scheduler.max_batch, w.scheduler.prefill_chunk) == (2, 0)

        async def submit() -> float | None:
            req = Request("long", [1] * 1000, SamplingParams(max_tokens=10, temperature=0.0),
                          asyncio.get_running_loop(), deadline=clock[0] + 60.0)
            decision = w.submit(req)
            req.cancel()
            return decision.estimated_finish

        assert asyncio.run(submit()) == pytest.approx(clock[0] + 1.45)
        # A hot swap to an engine without shape limits: its batch's limits from then on.
        w.swap(FakeGenerator())
        assert (w.scheduler.max_batch, w.scheduler.prefill_chunk) == (4, 128)
    finally:
        w.stop()
