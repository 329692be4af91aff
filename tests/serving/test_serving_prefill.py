"""Chunked prefill in the daemon's engine loop, on the real tiny bundle: a long prompt that
arrives while other requests stream is prefilled a chunk per step, every answer is the one
the request gets alone, and the loop's rate estimates see prefill and steps apart."""

from __future__ import annotations

import asyncio

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
            for r in reqs[:2]:
                worker.submit(r)
            first = [await anext(r.chunks()) for r in reqs[:2]]  # both are streaming
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
