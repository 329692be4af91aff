"""Estimates a user can rely on: robust rates, the serving path's costs in every estimate,
refusals that say when capacity returns and whether retrying can help, and rates the engine
loop learns from the requests it serves (a real LocalWorker on a scripted generator)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Hashable, Iterator, Sequence
from contextlib import contextmanager

import pytest
from live_server import FakeGenerator, StreamBatch, wait_until

from edge_runtime.errors import OverloadedError
from edge_runtime.model.sampling import SamplingParams
from edge_runtime.model.stream import Chunk
from edge_runtime.serving.engine_loop import LocalWorker
from edge_runtime.serving.rates import (
    REQUEST_MAX_AGE_S,
    REQUEST_WINDOW,
    STEP_WINDOW,
    Rates,
    robust_mean,
)
from edge_runtime.serving.request import Request
from edge_runtime.serving.scheduler import (
    Action,
    CloudState,
    Job,
    Pressure,
    Scheduler,
    SchedulerConfig,
)

NONE = CloudState(available=False, p99_s=0.0, configured=False)
OK = Pressure()


def job(key: str, budget: float, max_tokens: int = 11, prompt: int = 10) -> Job:
    return Job(key=key, arrival=0.0, deadline=budget, prompt_tokens=prompt,
               max_tokens=max_tokens)


# -- the rates --------------------------------------------------------------------------


def test_robust_mean_ignores_outliers_and_follows_the_middle() -> None:
    assert robust_mean([1.0] * 7 + [1000.0]) == pytest.approx(1.0)
    assert robust_mean([1.0, 2.0, 3.0, 4.0]) == pytest.approx(2.5)  # the middle two
    assert robust_mean([5.0]) == 5.0


def test_one_outlier_counts_for_little_and_a_sustained_change_is_followed() -> None:
    r = Rates()
    r.seed({1: 0.001}, 1000.0)
    for _ in range(STEP_WINDOW):
        r.observe_step(1, 0.001)
    r.observe_step(1, 1.0)  # a 1 s hiccup (page fault, GC): the old EWMA took 0.2 s from it
    assert r.step_time(1) == pytest.approx(0.001)
    for _ in range(STEP_WINDOW // 2 + 1):  # the machine really got 3x slower
        r.observe_step(1, 0.003)
    assert r.step_time(1) > 0.002

    for _ in range(REQUEST_WINDOW):
        r.observe_request(actual_s=0.105, modeled_s=0.1)
    assert r.per_request_s == pytest.approx(0.005)
    r.observe_request(actual_s=3.0, modeled_s=0.1)  # one request stuck behind a swap
    assert r.per_request_s == pytest.approx(0.005)
    n = 0
    while n < REQUEST_WINDOW:  # from now on every request costs 20 ms more
        n += 1
        r.observe_request(actual_s=0.12, modeled_s=0.1)
        if r.per_request_s > 0.015:
            break
    assert n <= REQUEST_WINDOW // 2 + 1, "a sustained change is followed within a few requests"


def test_a_probe_seeds_the_engine_step_but_keeps_the_serving_paths_cost() -> None:
    r = Rates()
    for _ in range(4):
        r.observe_overhead(rows=2, seconds=0.0006)  # 0.3 ms per token beyond the engine
    r.seed({1: 0.0001, 2: 0.00015}, 2000.0)
    assert r.per_token_s == pytest.approx(0.0003)
    assert r.step_time(1) == pytest.approx(0.0001 + 0.0003)  # 0.1 ms engine, 0.4 ms served
    assert r.step_time(2) == pytest.approx(0.00015 + 2 * 0.0003)
    snap = r.snapshot()
    assert snap.engine_step_s == {1: 0.0001, 2: 0.00015}
    assert snap.step_s[1] == pytest.approx(0.0004)


def test_frozen_rates_do_not_learn() -> None:
    r = Rates(step_s={1: 0.05}, alpha=0.0)
    r.observe_step(1, 1.0)
    r.observe_overhead(1, 1.0)
    r.observe_request(1.0, 0.0)
    assert (r.step_s, r.per_token_s, r.per_request_s) == ({1: 0.05}, 0.0, 0.0)


# -- the scheduler uses all of it -----------------------------------------------------------


def rates() -> Rates:
    # prefill 100 tok/s; an engine step of 0.1 s alone, 0.15 s in pairs; 0.01 s per token
    # of serving work; 0.05 s a request.
    return Rates(prefill_tokens_per_s=100.0, step_s={1: 0.1, 2: 0.15}, per_token_s=0.01,
                 per_request_s=0.05)


def test_the_estimate_is_end_to_end() -> None:
    s = Scheduler(SchedulerConfig(max_batch=2, safety=1.0), rates())
    d = s.admit(job("a", budget=10.0), 0.0, NONE, OK)
    # 0.1 s prefill, 10 steps of 0.1 + 0.01 s, 0.05 s fixed
    assert d.estimated_finish == pytest.approx(0.1 + 10 * 0.11 + 0.05)
    assert s.alone_s(job("x", budget=1.0)) == pytest.approx(1.25)


def test_each_request_beside_another_costs_both_a_little() -> None:
    r = Rates(prefill_tokens_per_s=100.0, step_s={1: 0.1, 2: 0.15})
    r.observe_request(actual_s=1.25, modeled_s=1.2)  # alone: 0.05 s beyond its steps
    r.observe_request(actual_s=1.29, modeled_s=1.2, others=2)  # two beside it: 0.02 s each
    assert (r.per_request_s, r.per_concurrent_s) == (pytest.approx(0.05), pytest.approx(0.02))
    s = Scheduler(SchedulerConfig(max_batch=2, safety=1.0), r)
    assert s.admit(job("a", budget=10.0), 0.0, NONE, OK).estimated_finish == \
        pytest.approx(0.1 + 10 * 0.1 + 0.05)
    s.next_batch(2)
    # b beside a: both 0.02 s later; b: prefill 0.1 s, then 10 steps of a pair
    d = s.admit(job("b", budget=10.0), 0.0, NONE, OK)
    assert d.estimated_finish == pytest.approx(0.1 + 10 * 0.15 + 0.05 + 0.02)
    # a, running with 11 tokens to go, would end beside c at 0.1 (c's prefill) + 10 x 0.15
    # + 0.1 (its last step alone) + 0.05 + 0.02 = 1.77 s — 1.75 s without the pair's cost:
    # with a deadline of 1.76 s, c may not join a. With 10 s to spare it is deferred: it
    # starts when a's last step ends (1.1 s), then 0.1 s prefill + 10 steps alone + 0.05 =
    # 2.25 s (a, which it waits for, is not beside it).
    s2 = Scheduler(SchedulerConfig(max_batch=2, safety=1.0), r)
    s2.admit(Job("a", 0.0, 1.76, 10, 11), 0.0, NONE, OK)
    s2.next_batch(2)
    d = s2.admit(job("c", budget=10.0), 0.0, NONE, OK)
    assert d.action is Action.LOCAL and "starting after 1 admitted request" in d.reason
    assert d.estimated_finish == pytest.approx(2.25)
    assert s2.queue[0].waits_for == {"a"} and s2.queue[0].waits_until == 1.76
    assert s2.next_batch(2, now=1.0) == []  # a runs: c waits though a slot is free
    # With 2 s it cannot wait that long: refused for a's sake, not admitted to make it late.
    d = s2.admit(job("d", budget=2.0), 0.0, NONE, OK)
    assert d.action is Action.REJECT and "push an admitted request" in d.reason
    assert "waiting for it would make this one miss its own" in d.reason
    s2.finished("a")
    assert [j.key for j in s2.next_batch(2, now=1.0)] == ["c"]  # a gone: c starts


def test_a_refusal_says_when_capacity_returns_and_whether_to_retry() -> None:
    s = Scheduler(SchedulerConfig(max_batch=2, max_queue=8, safety=1.0), rates())
    for key in ("a", "b"):
        assert s.admit(job(key, budget=10.0), 0.0, NONE, OK).action is Action.LOCAL
    s.next_batch(2)
    # a and b: 11 tokens each at 0.15 + 2 x 0.01 s = 1.87 s, + 0.05 s: both done at 1.92 s.
    tight = s.admit(job("tight", budget=1.0), 0.0, NONE, OK)
    assert (tight.action, tight.status) == (Action.REJECT, 429)
    assert tight.retry_after_s == pytest.approx(1.92)  # a slot frees when a finishes
    # 1.25 s alone > its 1 s budget: no retry can ever serve it.
    assert tight.should_retry is False
    # 2.5 s would do alone, and the work ahead delays it past that (also 'would push'),
    # but a retry at 1.92 s would finish at 3.17 s, past the caller's 2.5 s: pointless too.
    late = s.admit(job("late", budget=2.5), 0.0, NONE, OK)
    assert late.action is Action.REJECT and late.should_retry is False
    # A full queue with a generous deadline: retrying once capacity returns can help.
    full = Scheduler(SchedulerConfig(max_batch=1, max_queue=1, safety=1.0), rates())
    full.admit(job("a", budget=30.0), 0.0, NONE, OK)
    full.next_batch(1)
    full.admit(job("b", budget=30.0), 0.0, NONE, OK)
    d = full.admit(job("c", budget=30.0), 0.0, NONE, OK)
    assert d.queue_full and d.should_retry is None
    # a's 11 steps, then b's prefill and 10 steps, + b's fixed cost: both done
    assert d.retry_after_s == pytest.approx(11 * 0.11 + 0.1 + 10 * 0.11 + 0.05)


# -- learned the way requests run ------------------------------------------------------------


class FixedCostBatch(StreamBatch):
    """Each add() costs `fixed_s` that it does not report as prefill: a per-request cost
    the probe never sees (as the hand-off and first delivery are in the daemon)."""

    fixed_s = 0.03

    def add(self, key: Hashable, prompt_ids: Sequence[int], params: SamplingParams
            ) -> list[Chunk]:
        time.sleep(self.fixed_s)
        return super().add(key, prompt_ids, params)


class FixedCostGenerator(FakeGenerator):
    def batch(self, max_batch: int, prefill_chunk: int = 0) -> StreamBatch:
        return FixedCostBatch(self, max_batch, prefill_chunk)


@contextmanager
def running(worker: LocalWorker) -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    worker.start()
    try:
        assert worker.wait_ready(30)
        yield loop
    finally:
        worker.stop()
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)


def serve_one(worker: LocalWorker, loop: asyncio.AbstractEventLoop, n: int, tokens: int,
              budget_s: float = 30.0) -> float:
    """Submit one request, wait for its last chunk; its duration."""
    req = Request(id=f"r{n}", prompt_ids=[1, 2, 3], params=SamplingParams(max_tokens=tokens),
                  loop=loop, deadline=time.monotonic() + budget_s)
    t = time.monotonic()
    worker.submit(req)

    async def drain() -> None:
        async for _ in req.chunks():
            pass

    asyncio.run_coroutine_threadsafe(drain(), loop).result(10)
    return time.monotonic() - t


def test_the_engine_loop_learns_what_requests_really_cost() -> None:
    gen = FixedCostGenerator(reply="x" * 40, context_length=128, delay_s=0.002)
    worker = LocalWorker(lambda: gen, SchedulerConfig(max_batch=2, safety=1.0),
                         measure_rates=False)
    with running(worker) as loop:
        # The start-up probe's view: a fast engine and nothing else.
        with worker._lock:
            worker.scheduler.rates.seed({1: 0.0001, 2: 0.0001}, 100_000.0)
        actual = [serve_one(worker, loop, n, tokens=20) for n in range(REQUEST_WINDOW)]
        est = worker.estimates()
        assert est.requests_observed == REQUEST_WINDOW
        assert est.per_request_s > 0.02  # the 30 ms add() the rates did not predict
        assert est.step_s[1] > 0.002  # each token's 2 ms, learned from the steps served
        estimate = worker.scheduler.alone_s(job("next", budget=30.0, max_tokens=20, prompt=3))
        typical = sorted(actual)[len(actual) // 2]
        assert 0.8 * typical < estimate < 2.0 * typical, (estimate, actual)
        # So a budget the request meets alone is admitted, one it cannot meet is refused
        # at once, saying that no retry will help.
        serve_one(worker, loop, 100, tokens=20, budget_s=3 * typical)
        with pytest.raises(OverloadedError) as refused:
            serve_one(worker, loop, 101, tokens=20, budget_s=0.3 * typical)
        assert refused.value.should_retry is False
    wait_until(lambda: not worker._thread.is_alive())


def test_review_does_not_take_back_an_admission_over_a_small_drift() -> None:
    s = Scheduler(SchedulerConfig(max_batch=1, safety=1.2), rates())
    s.admit(job("a", budget=10.0), 0.0, NONE, OK)
    s.next_batch(1)
    # b waits for a (11 x 0.11 s) and needs 1.2 s itself: 2.46 s plain, 2.95 s padded.
    b = s.admit(job("b", budget=3.0), 0.0, NONE, OK)
    assert b.action is Action.LOCAL
    s.rates.step_s = {1: 0.11, 2: 0.16}  # one more slow sample: 2.67 s plain, 3.2 padded
    assert s.review(0.0, NONE, OK) == []  # still on time by the plain estimate: kept
    s.rates.step_s = {1: 0.13, 2: 0.18}  # a real slowdown: 3.09 s plain
    (gone, d), = s.review(0.0, NONE, OK)
    assert gone.key == "b" and d.action is Action.REJECT


def test_a_cost_learned_too_high_is_forgotten_when_the_engine_is_re_measured() -> None:
    r = Rates()
    for _ in range(REQUEST_WINDOW):  # e.g. requests stuck behind a model swap
        r.observe_request(actual_s=1.5, modeled_s=0.2, now=100.0)
    assert r.per_request_s == pytest.approx(1.3)  # every request now refused: none to learn from
    r.expire(now=100.0 + REQUEST_MAX_AGE_S / 2)
    assert r.per_request_s == pytest.approx(1.3)
    r.expire(now=101.0 + REQUEST_MAX_AGE_S)  # the idle re-probe while refusing
    assert r.per_request_s == 0.0 and r.per_concurrent_s == 0.0


def test_engine_steps_are_learned_only_without_other_requests_waiting() -> None:
    """Beside waiting requests a step also waits for the GIL while the event loop serves
    them (what per_concurrent_s charges): learned from such steps, the batch-1 step of the
    demo bundle rose from 0.14 to 1.2 ms through the tails of bursts, and quiet requests
    were refused for it. Two requests, one slot: the first decodes while the second waits
    (not learned), then the second alone (learned)."""
    gen = FakeGenerator(reply="y" * 20, context_length=128, delay_s=0.001)
    worker = LocalWorker(lambda: gen, SchedulerConfig(max_batch=1, safety=1.0),
                         measure_rates=False)
    with running(worker) as loop:
        with worker._lock:
            worker.scheduler.rates.seed({1: 0.001}, 100_000.0)

        async def both() -> None:
            reqs = [Request(id=f"q{n}", prompt_ids=[1, 2], params=SamplingParams(max_tokens=20),
                            loop=asyncio.get_running_loop(),
                            deadline=time.monotonic() + 30.0) for n in range(2)]
            for r in reqs:
                worker.submit(r)
            for r in reqs:
                async for _ in r.chunks():
                    pass

        asyncio.run_coroutine_threadsafe(both(), loop).result(30)
        learned = len(worker.scheduler.rates._steps[1])
    assert 15 <= learned - 1 <= 21, learned  # the second request's ~19 steps, not ~38
    wait_until(lambda: not worker._thread.is_alive())
