"""Concurrency from measurement (serving/capacity.py): the pure choice from hand-built step
times and memory, the probe on the real tiny bundle (a fake clock where the test needs exact
step times, the real one where it needs the real cost), and the engine loop that sizes its
batch with it at start-up and at a hot swap, unless the config sets max_batch."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from edge_runtime.bundle.manifest import KVCacheSpec, verify_bundle
from edge_runtime.model.generator import Generator
from edge_runtime.model.sampling import SamplingParams
from edge_runtime.serving.capacity import (
    PROBE_LIMIT,
    MemoryReading,
    capacity_for,
    choose,
    kv_bytes_per_sequence,
    measure_step_s,
    mem_available,
    plan_capacity,
    probe_sizes,
    queue_bound,
    read_memory,
)
from edge_runtime.serving.engine_loop import LocalWorker
from edge_runtime.serving.request import ModelInfo, Request
from edge_runtime.serving.scheduler import Scheduler, SchedulerConfig
from edge_runtime.signing import trusted_keys

MiB = 2**20


# -- the pure choice ------------------------------------------------------------------------


def test_kv_cache_of_one_sequence_from_the_graph_s_spec() -> None:
    # Qwen2-0.5B: 24 layers, 2 KV heads of 64, fp32 cache, 4,096 tokens: 96 MiB of keys and
    # values, twice over at a step's peak (past held while present is written).
    qwen = KVCacheSpec(num_layers=24, num_kv_heads=2, head_dim=64, dtype="float32")
    assert kv_bytes_per_sequence(qwen, 4096, copies=1) == 96 * MiB
    assert kv_bytes_per_sequence(qwen, 4096) == 192 * MiB
    half = KVCacheSpec(num_layers=24, num_kv_heads=2, head_dim=64, dtype="float16")
    assert kv_bytes_per_sequence(half, 4096) == 96 * MiB


def test_mem_available_is_read_from_meminfo(tmp_path: Path) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       32000000 kB\nMemFree:          100000 kB\n"
                       "MemAvailable:   20000000 kB\nBuffers:           1000 kB\n")
    assert mem_available(meminfo) == 20_000_000 * 1024  # page cache the kernel can drop counts
    meminfo.write_text("MemTotal:       32000000 kB\nMemAvailable:   lots\n")
    assert mem_available(meminfo) is None
    assert mem_available(tmp_path / "absent") is None
    # The CPU engine (and a Jetson's integrated GPU) reads the system's figure.
    reading = read_memory("onnxruntime:CPUExecutionProvider", meminfo=tmp_path / "absent")
    assert reading is None
    here = read_memory("onnxruntime:CPUExecutionProvider")
    assert here is not None and here.source == "MemAvailable" and here.available > 0


def test_probe_sizes_double_up_to_the_limit() -> None:
    assert probe_sizes(32) == [1, 2, 4, 8, 16, 32]
    assert probe_sizes(12) == [1, 2, 4, 8, 12]
    assert probe_sizes(1) == [1]


def test_the_largest_batch_within_the_step_target_wins() -> None:
    # A CPU-bound model: steps grow with the batch. 8 rows take 40 ms, 16 take 120 ms: with a
    # 60 ms target the limit lies between, where the line from 8 to 16 crosses it (10).
    steps = {1: 0.010, 2: 0.014, 4: 0.022, 8: 0.040, 16: 0.120}
    batch, bound, why = choose(steps, 0.060, MiB, 10**12, None)
    assert (batch, bound) == (10, "latency")
    assert "a step of 16 sequences takes 120.0 ms, over the target 60.0 ms" in why
    # Exactly on a measured size's time: that size.
    assert choose(steps, 0.040, MiB, 10**12, None)[:2] == (8, "latency")
    # Even one sequence is over the target: one at a time.
    assert choose({1: 0.2}, 0.1, MiB, 10**12, None)[:2] == (1, "latency")


def test_memory_engine_and_probe_limits() -> None:
    flat = {b: 0.001 for b in probe_sizes(PROBE_LIMIT)}  # a GPU: steps barely grow
    assert choose(flat, 0.1, 0, None, None)[:2] == (PROBE_LIMIT, "probe")
    # 5.5 sequences' KV caches fit: 5.
    batch, bound, why = choose(flat, 0.1, 100 * MiB, 550 * MiB, None)
    assert (batch, bound) == (5, "memory") and "5 sequences' KV caches" in why
    assert choose(flat, 0.1, 100 * MiB, 50 * MiB, None)[:2] == (1, "memory")
    # A TensorRT plan built for 8 rows.
    assert choose({1: 0.001, 2: 0.001, 4: 0.001, 8: 0.001}, 0.1, MiB, 10**12, 8)[:2] == \
        (8, "engine")
    # The probe's time ran out after 4, all within the target: 4, no extrapolation.
    assert choose({1: 0.01, 2: 0.01, 4: 0.01}, 0.1, MiB, 10**12, None, complete=False)[:2] \
        == (4, "budget")
    # Nothing measured: the old default, said so.
    assert choose({}, 0.1, MiB, 10**12, None)[:2] == (4, "probe")


def test_queue_bound_follows_the_batch_unless_configured() -> None:
    s = Scheduler(SchedulerConfig())
    assert (s.max_batch, s.max_queue) == (4, 64)  # before a model is measured
    s.limit_to(12, 128, queue_bound(12))
    assert (s.max_batch, s.max_queue) == (12, 192)
    s.config = SchedulerConfig(max_queue=5)  # a live set-config of max_queue wins
    assert s.max_queue == 5
    assert Scheduler(SchedulerConfig(max_batch=2)).max_batch == 2


# -- the probe on the real tiny bundle --------------------------------------------------------


def _generator(tiny_bundle: Any) -> Generator:
    gen = Generator.from_bundle(verify_bundle(tiny_bundle.path, trusted_keys([tiny_bundle.pubkey])),
                                threads=1)
    gen.warmup()
    return gen


class _Timed:
    """The real generator, its batches' steps charged to a fake clock by `cost(rows)`: the
    probe runs the real batch and tokens, with step times the test chooses."""

    def __init__(self, gen: Generator, cost: Callable[[int], float]) -> None:
        self.gen, self.cost, self.now, self.rows_seen = gen, cost, 0.0, [0]

    def __getattr__(self, name: str) -> Any:
        return getattr(self.gen, name)

    def clock(self) -> float:
        return self.now

    def batch(self, max_batch: int, prefill_chunk: int = 0) -> Any:
        batch = self.gen.batch(max_batch, prefill_chunk)
        step = batch.step

        def charged() -> Any:
            rows = batch.active
            self.rows_seen.append(rows)
            self.now += self.cost(rows)
            return step()

        batch.step = charged  # type: ignore[method-assign]
        return batch


def test_the_probe_stops_at_the_first_size_over_the_target(tiny_bundle: Any) -> None:
    timed = _Timed(_generator(tiny_bundle), lambda rows: 0.010 * rows)
    steps, complete = measure_step_s(timed, [1, 2, 4, 8, 16, 32], 0.055, budget_s=60,
                                     clock=timed.clock)
    assert complete and steps == pytest.approx({1: 0.01, 2: 0.02, 4: 0.04, 8: 0.08})
    assert max(timed.rows_seen) == 8  # 16 and 32 were never run
    assert choose(steps, 0.055, 0, None, None)[:2] == (5, "latency")


def test_the_probe_keeps_to_its_budget(tiny_bundle: Any) -> None:
    timed = _Timed(_generator(tiny_bundle), lambda rows: 0.5)
    steps, complete = measure_step_s(timed, [1, 2, 4, 8], 10.0, budget_s=1.0, clock=timed.clock)
    # 0.25 s for each of 4 sizes: 2 warm-up + 2 timed steps (the least) of 0.5 s at size 1.
    assert not complete and list(steps) == [1] and len(timed.rows_seen) - 1 == 4
    assert choose(steps, 10.0, 0, None, None, complete)[:2] == (1, "budget")


def test_plan_capacity_on_the_tiny_bundle(tiny_bundle: Any) -> None:
    gen = _generator(tiny_bundle)
    gen.use_prefix_cache(8 * MiB)
    cap = plan_capacity(gen, 10.0, 0, 0)  # every batch is within 10 s a step
    assert (cap.max_batch, cap.bound) == (PROBE_LIMIT, "probe")
    assert list(cap.step_s) == probe_sizes(PROBE_LIMIT) and all(s > 0 for s in cap.step_s.values())
    assert cap.probe_s < 30  # bounded: PROBE_BUDGET_S and at least two steps per size
    assert gen.prefix_cache is not None and gen.prefix_cache.stats().entries == 0  # untouched
    kv = gen.graph.kv_cache
    assert kv is not None and cap.kv_bytes_per_seq == kv_bytes_per_sequence(kv, gen.context_length)
    # The memory left after the headroom and the prefix cache holds 3.5 sequences: 3 — and
    # nothing larger is even probed.
    per_seq = cap.kv_bytes_per_seq
    reading = MemoryReading(available=100 * MiB + 8 * MiB + 7 * per_seq // 2, source="test")
    cap = plan_capacity(gen, 10.0, 100 * MiB, 8 * MiB, memory=reading)
    assert (cap.max_batch, cap.bound, cap.max_queue) == (3, "memory", 48)
    assert max(cap.step_s) == 3
    assert "3 sequences' KV caches at full context fit" in cap.describe()


# -- the engine loop --------------------------------------------------------------------------


def _fixed_length(gen: Generator) -> Generator:
    gen._eos = frozenset()  # every answer runs to max_tokens, so that they overlap for sure
    return gen


def _run_together(worker: LocalWorker, gen: Generator, n: int) -> list[str]:
    params = SamplingParams(max_tokens=24, temperature=0.0)

    async def run() -> list[str]:
        loop = asyncio.get_running_loop()
        reqs = [Request(f"r{i}", gen.text_prompt(f"x{i} = "), params, loop, generator=gen)
                for i in range(n)]
        for r in reqs:
            worker.submit(r)
        texts = []
        for r in reqs:
            texts.append("".join([c.text async for c in r.chunks()]))
        return texts

    return asyncio.run(run())


def test_the_worker_sizes_its_batch_by_measurement(
    tiny_bundle: Any, caplog: pytest.LogCaptureFixture
) -> None:
    gen = _fixed_length(_generator(tiny_bundle))
    caplog.set_level(logging.INFO, logger="edge_runtime.serving.engine_loop")
    worker = LocalWorker(lambda: gen, SchedulerConfig())
    worker.start()
    try:
        assert worker.wait_ready(60)
        cap = worker.capacity
        assert cap is not None and cap.bound in ("probe", "latency", "memory", "budget")
        assert cap.step_s and cap.max_batch >= 2  # the tiny model batches cheaply
        assert worker.scheduler.max_batch == cap.max_batch
        assert worker.scheduler.max_queue == 16 * cap.max_batch
        line = next(r.getMessage() for r in caplog.records
                    if r.getMessage().startswith("capacity: "))
        assert f"max_batch {cap.max_batch}" in line and "step ms by batch {1: " in line
        assert "per sequence at full context" in line and "MemAvailable" in line
        n = min(cap.max_batch, 6)
        texts = _run_together(worker, gen, n)
        assert len(texts) == n and all(texts)
        assert worker.peak_batch == n  # all in one batch, not in waves of 4
    finally:
        worker.stop()


def test_an_explicit_max_batch_wins(tiny_bundle: Any) -> None:
    gen = _fixed_length(_generator(tiny_bundle))
    worker = LocalWorker(lambda: gen, SchedulerConfig(max_batch=2, max_queue=7))
    worker.start()
    try:
        assert worker.wait_ready(60)
        cap = worker.capacity
        assert cap is not None and (cap.max_batch, cap.bound, cap.step_s) == (2, "config", {})
        assert (worker.scheduler.max_batch, worker.scheduler.max_queue) == (2, 7)
        _run_together(worker, gen, 4)
        assert worker.peak_batch == 2
    finally:
        worker.stop()


class _LimitedEngine:
    """The real engine, declaring a batch limit as a TensorRT plan does."""

    def __init__(self, engine: Any, max_batch: int) -> None:
        self._engine, self.max_batch = engine, max_batch

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)


def test_a_swap_measures_the_new_model(tiny_bundle: Any) -> None:
    old = _fixed_length(_generator(tiny_bundle))
    worker = LocalWorker(lambda: old, SchedulerConfig())
    worker.start()
    try:
        assert worker.wait_ready(60)
        before = worker.capacity
        assert before is not None and before.max_batch > 2
        new = Generator(_LimitedEngine(old.engine, 2), old.graph, old.tokenizer,  # type: ignore[arg-type]
                        old.defaults)
        _fixed_length(new)
        worker.swap(new, ModelInfo("m", "2", 0))
        after = worker.capacity
        assert after is not None and after is not before
        assert (after.max_batch, after.bound) == (2, "engine") and after.step_s
        assert (worker.scheduler.max_batch, worker.scheduler.max_queue) == (2, 32)
        assert worker.peak_batch == 0  # the probes' batches are not the served ones
        _run_together(worker, new, 3)
        assert worker.peak_batch == 2
    finally:
        worker.stop()


def test_capacity_for_falls_back_to_the_default_when_measuring_fails() -> None:
    class Broken:
        context_length = 64

        def batch(self, max_batch: int, prefill_chunk: int = 0) -> Any:
            raise RuntimeError("no engine")

    cap = capacity_for(Broken(), SchedulerConfig())  # type: ignore[arg-type]
    assert (cap.max_batch, cap.bound) == (4, "default") and "no engine" in cap.reason
    assert capacity_for(Broken(), SchedulerConfig(), measure=False).bound == "default"  # type: ignore[arg-type]
