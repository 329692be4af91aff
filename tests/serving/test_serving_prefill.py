"""Chunked prefill in the daemon's engine loop, on the real tiny bundle: a long prompt that
arrives while other requests stream is prefilled a chunk per step, every answer is the one
the request gets alone, and the loop's rate estimates see prefill and steps apart."""

from __future__ import annotations

import asyncio
import threading

from edge_runtime.bundle.manifest import verify_bundle
from edge_runtime.model.generator import Generator
from edge_runtime.model.sampling import SamplingParams
from edge_runtime.serving.engine_loop import LocalWorker
from edge_runtime.serving.request import Request
from edge_runtime.serving.scheduler import SchedulerConfig
from edge_runtime.signing import load_public_key

LONG = ("import os\nimport sys\n\n\ndef main(argv):\n    for path in argv[1:]:\n"
        "        with open(path) as f:\n            for line in f:\n"
        "                print(line.rstrip())\n    return 0\n")


def test_a_long_prompt_joins_running_streams_chunk_by_chunk(tiny_bundle) -> None:
    gen = Generator.from_bundle(
        verify_bundle(tiny_bundle.path, [load_public_key(tiny_bundle.pubkey)]))
    gen._eos = frozenset()  # fixed lengths, so that the streams overlap for sure
    params = SamplingParams(max_tokens=40, temperature=0.0)
    prompts = [gen.text_prompt("x = "), gen.text_prompt("def f("), gen.text_prompt(LONG)]
    assert len(prompts[2]) > 4 * 8
    want = [gen.generate(p, params).text for p in prompts]
    widths: list[int] = []  # tokens per engine run, from here on
    forward = gen.forward

    seen_prefilling: list[int] = []  # what /metrics would read, sampled at each engine run

    def recording(ids, *args, **kwargs):  # the real forward, its input widths noted
        widths.append(ids.shape[1])
        seen_prefilling.append(worker.prefilling)
        return forward(ids, *args, **kwargs)

    gen.forward = recording  # type: ignore[method-assign]
    worker = LocalWorker(lambda: gen, SchedulerConfig(max_batch=3, prefill_chunk=8),
                         measure_rates=False)
    worker.start()
    try:
        assert worker.wait_ready(30)
        widths.clear()  # the warm-up's chat prompt is prefilled whole, outside the batch
        seen_prefilling.clear()
        prior = worker.scheduler.rates.prefill_tokens_per_s

        async def run() -> list[str]:
            loop = asyncio.get_running_loop()
            reqs = [Request(f"r{i}", p, params, loop, generator=gen)
                    for i, p in enumerate(prompts)]
            texts = []
            first = []
            for r in reqs[:2]:  # one after the other: each prefill alone is a rate sample
                worker.submit(r)
                first.append(await anext(r.chunks()))  # both are streaming
            worker.submit(reqs[2])
            for f, r in zip([*first, None], reqs, strict=True):
                rest = "".join([c.text async for c in r.chunks()])
                texts.append((f.text if f is not None else "") + rest)
            return texts

        assert asyncio.run(run()) == want
        assert max(widths) == 8  # no engine run prefilled more than a chunk
        assert sum(w > 1 for w in widths) >= len(prompts[2]) // 8
        assert max(seen_prefilling) == 1 and worker.prefilling == 0
        assert worker.scheduler.rates.prefill_tokens_per_s != prior  # chunks were observed
    finally:
        worker.stop()


def test_requests_that_arrive_together_are_prefilled_in_one_run(tiny_bundle) -> None:
    """Requests that arrive while the engine is busy are handed to the batch together and
    one engine run prefills them all (the decomposed graph, left-padded); each answer is the
    one it gets alone; the rates do not learn from the shared run (one prompt alone is what
    a later newcomer costs). A prompt the engine cannot run fails alone: the shared run
    fails, the others are prefilled one by one and answered."""
    gen = Generator.from_bundle(
        verify_bundle(tiny_bundle.path, [load_public_key(tiny_bundle.pubkey)]))
    gen._eos = frozenset()
    params = SamplingParams(max_tokens=12, temperature=0.0)
    prompts = [gen.text_prompt(t) for t in ("x = ", "def f(", "import ", "class A:", "# ")]
    poison, blocker = gen.text_prompt("poison"), gen.text_prompt("wait")
    want = [gen.generate(p, params).text for p in prompts]
    rows: list[int] = []  # rows of each engine run with more than one position (prefills)
    held, release = threading.Event(), threading.Event()
    forward = gen.forward

    def recording(ids, *args, **kwargs):  # type: ignore[no-untyped-def]
        if ids.shape[1] > 1:
            rows.append(ids.shape[0])
        if ids.shape[1] > 1 and list(ids[0, -len(blocker):]) == blocker:
            held.set()  # the engine loop is busy here until the others are submitted
            assert release.wait(30)
        if any(list(r[-len(poison):]) == poison for r in ids.tolist()):
            raise RuntimeError("the engine cannot run this prompt")
        return forward(ids, *args, **kwargs)

    gen.forward = recording  # type: ignore[method-assign]
    worker = LocalWorker(lambda: gen, SchedulerConfig(max_batch=8), measure_rates=False)
    worker.start()
    try:
        assert worker.wait_ready(30)
        learned: list[int] = []  # prompt tokens of each prefill the rates learned from
        observe = worker.scheduler.rates.observe_call

        def noting(size, seconds, prefill=(0, 0.0)):  # type: ignore[no-untyped-def]
            if prefill[0]:
                learned.append(prefill[0])
            return observe(size, seconds, prefill)

        worker.scheduler.rates.observe_call = noting  # type: ignore[method-assign]

        async def run(batch: list[list[int]]) -> list[str | Exception]:
            loop = asyncio.get_running_loop()
            held.clear()
            release.clear()
            rows.clear()
            first = Request(f"b{len(batch)}", blocker, params, loop, generator=gen)
            worker.submit(first)
            await asyncio.to_thread(held.wait, 30)
            reqs = [Request(f"r{len(batch)}-{i}", p, params, loop, generator=gen)
                    for i, p in enumerate(batch)]
            for r in reqs:
                worker.submit(r)
            release.set()

            async def text(r: Request) -> str | Exception:
                try:
                    return "".join([c.text async for c in r.chunks()])
                except Exception as e:
                    return e
            return list(await asyncio.gather(*(text(r) for r in [first, *reqs])))[1:]

        assert asyncio.run(run(prompts)) == want
        assert rows == [1, len(prompts)]  # the blocker alone, then one run for the five
        assert learned == [len(blocker)]  # the blocker's prefill alone, not the shared run
        got = asyncio.run(run([prompts[0], poison, prompts[1]]))
        assert got[0] == want[0] and got[2] == want[1]
        assert isinstance(got[1], Exception) and "cannot run this prompt" in str(got[1])
        assert rows[:2] == [1, 3] and sorted(rows[2:]) == [1, 1, 1]  # shared, then alone
    finally:
        release.set()
        worker.stop()
