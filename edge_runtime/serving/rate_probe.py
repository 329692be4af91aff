"""A direct measurement of the engine's service rates: prefill and decode-step times at every
batch size, for the scheduler's estimates.

The scheduler serves locally only when its estimate meets a deadline, and it learns rates
only from local work: with a pessimistic rate (the generic prior of 50 ms a step, or one
measured while the CPU was busy) a tight deadline is never served locally, so the rate is
never measured again. The engine loop (engine_loop.py) therefore runs this probe at start-up,
before a hot swap (the new model's own speed) and again when the engine is idle while
requests are being sent away.

It times the engine alone: what the serving path adds per token and per request is learned
from the requests served (rates.py). Its prompts are 24 tokens: with 8 a call's fixed cost
dominated, and a rate of 8,000 tokens/s extrapolated a 40-token prompt's prefill to 5 ms
where it took 1.5 ms; below the prefix cache's 32-token minimum, so the probe's dummy prompt
never takes (or is counted as) a cache entry.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from edge_runtime.model.sampling import SamplingParams
from edge_runtime.serving.request import TextGenerator, empty


def measure_rates(
    gen: TextGenerator, max_batch: int, prompt_tokens: int = 24, steps: int = 8,
    interrupted: Callable[[], bool] | None = None,
) -> tuple[dict[int, float], float | None]:
    """(seconds per decode step by batch size, prefill tokens/s or None), timed on `gen`'s
    engine with a batch of its own (call it on the thread that owns the generator).
    `interrupted`: asked before each prefill and step; True ends the probe with the sizes
    timed so far (the engine loop's idle re-probe gives way to a request that arrives)."""
    batch = gen.batch(max_batch)
    if getattr(batch, "spec", None) is not None:
        # Plain steps: a speculative round of a batch of one makes several tokens, as many as
        # the text lets the draft guess (this prompt is not text); served requests teach the
        # rates what speculation gives per token (engine_loop.py counts a round's tokens).
        batch.spec = None  # type: ignore[attr-defined]
    warm = 2  # the first steps at a new shape are slow (allocation, thread wake-up)
    # Powers of two and the largest batch: a measured max_batch can be 32, and every size
    # from 1 would cost the start-up (and each idle re-probe) hundreds of steps at growing
    # widths; Rates.engine_step interpolates between the sizes measured.
    sizes = sorted({min(1 << i, max_batch) for i in range(max_batch.bit_length() + 1)})
    # The first sequence decodes through every size's steps: what it may generate grows with
    # the number of sizes, not with max_batch (sized by max_batch, 32 rows asked for 322
    # tokens of a 256-token model, the probe failed, and the 0.05 s/step priors stayed).
    params = SamplingParams(max_tokens=(steps + warm) * len(sizes) + 2, temperature=0.0)
    # a small model's context must still hold the prompt and the steps
    prompt_tokens = max(1, min(prompt_tokens, gen.context_length - params.max_tokens - 1))
    prompt = [0] * prompt_tokens
    prefill: list[float] = []
    step_s: dict[int, float] = {}
    keys = 0
    stop = interrupted or (lambda: False)
    try:
        for size in sizes:
            added, t = 0, time.perf_counter()
            while batch.active < size:
                if stop():
                    return step_s, _prefill_rate(prompt_tokens, prefill)
                keys += 1
                batch.add(keys, prompt, params)
                added += 1
            if added:
                prefill.append((time.perf_counter() - t) / added)
            samples: list[float] = []
            for i in range(steps + warm):
                if batch.active != size:  # a sequence finished early (EOS): stop here
                    break
                if stop():
                    samples = []  # this size half-timed: keep the sizes before it
                    break
                t = time.perf_counter()
                batch.step()
                if i >= warm:
                    samples.append(time.perf_counter() - t)
            if len(samples) < 2:
                break
            # Lower quartile: on a shared CPU, noise only ever makes a step slower.
            step_s[size] = sorted(samples)[len(samples) // 4]
    finally:
        empty(batch)
    return step_s, _prefill_rate(prompt_tokens, prefill)


def _prefill_rate(prompt_tokens: int, prefill: list[float]) -> float | None:
    return prompt_tokens / sorted(prefill)[len(prefill) // 2] if prefill else None
