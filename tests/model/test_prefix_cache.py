"""The prefix cache on the real int4 graph, both cache layouts: the same tokens as without it
(single stream, continuous batch, chunked prefill on and off, after evictions), the prefill
it saves, and its byte count."""

from __future__ import annotations

import numpy as np
import pytest

from edge_runtime.model.batching import BatchDecoder
from edge_runtime.model.generator import Generator
from edge_runtime.model.prefix_cache import PrefixCache
from edge_runtime.model.sampling import SamplingParams

SYSTEM = ("# Utilities for reading configuration files\n\nimport os\nimport sys\n\n"
          "class Reader:\n    def __init__(self, path):\n        self.path = path\n")
QUESTIONS = ["    def read(self):\n        return ", "    def close(self):\n        ",
             "def main(argv):\n    ", "x = [i * 2 for i in range("]
GREEDY = SamplingParams(max_tokens=10, temperature=0.0)


@pytest.fixture
def prompts(gen) -> list[list[int]]:
    ids = [gen.text_prompt(SYSTEM + q) for q in QUESTIONS]
    system = gen.text_prompt(SYSTEM)
    assert len(system) > 16 and all(p[: len(system) - 2] == system[:-2] for p in ids)
    return ids


@pytest.fixture
def reference(gen, prompts) -> list[list[int]]:
    gen.use_prefix_cache(0)
    return [gen.generate(p, GREEDY).token_ids for p in prompts]


def _cached(gen: Generator, budget: int = 64 * 2**20) -> PrefixCache:
    gen.use_prefix_cache(budget, min_tokens=8)
    assert gen.prefix_cache is not None
    return gen.prefix_cache


def _held_bytes(cache: PrefixCache) -> int:
    """The entries' bytes as the engine holds them."""
    return sum(cache.engine.to_host(t).nbytes for e in cache._lru.values() for t in e.kv.values())


def test_single_stream_hits_give_the_same_tokens(gen, prompts, reference):
    cache = _cached(gen)
    out = [gen.generate(p, GREEDY) for p in prompts]
    assert [c.token_ids for c in out] == reference
    s = cache.stats()
    assert out[0].stats.cached_tokens == 0 and s.misses == 1
    # Every later prompt shares the system prompt with an entry: a part of it is reused.
    assert all(c.stats.cached_tokens >= len(gen.text_prompt(SYSTEM)) - 2 for c in out[1:])
    assert s.hits == len(prompts) - 1
    assert s.hit_tokens == sum(c.stats.cached_tokens for c in out)
    assert s.entries == len(prompts) and s.bytes == _held_bytes(cache)
    # The same prompt again: all but its last token come from the cache.
    again = gen.generate(prompts[2], GREEDY)
    assert again.token_ids == reference[2]
    assert again.stats.cached_tokens == len(prompts[2]) - 1


def test_a_conversation_reuses_its_whole_history_and_supersedes_it(gen):
    first = gen.text_prompt(SYSTEM)
    gen.use_prefix_cache(0)
    turn1 = gen.generate(first, GREEDY).token_ids
    second = first + turn1 + gen.text_prompt(QUESTIONS[0])
    want = gen.generate(second, GREEDY).token_ids

    cache = _cached(gen)
    assert gen.generate(first, GREEDY).token_ids == turn1
    (entry,) = cache._lru.values()
    kv = dict(entry.kv)
    out = gen.generate(second, GREEDY)
    assert out.token_ids == want and out.stats.cached_tokens == len(first)
    # The whole entry was reused as it is (no copy), then replaced by the longer history.
    (longer,) = cache._lru.values()
    assert len(longer.tokens) == len(second) and cache.stats().evictions == 0
    assert all(kv[name] is not t for name, t in longer.kv.items())
    assert cache.stats().bytes == len(second) * cache.token_bytes == _held_bytes(cache)


def _run_batched(gen, prompts, max_batch, chunk, join_every=2):
    dec = BatchDecoder(gen, max_batch=max_batch, prefill_chunk=chunk)
    out: dict[int, list[int]] = {i: [] for i in range(len(prompts))}
    cached: dict[int, int] = {}
    waiting = list(enumerate(prompts))
    steps = 0

    def take(key, chunks):
        for c in chunks:
            out[key].extend(c.token_ids)
            if c.finish_reason:
                cached[key] = c.stats.cached_tokens

    while waiting or dec.active:
        if waiting and dec.active < max_batch and steps % join_every == 0:
            key, ids = waiting.pop(0)
            take(key, dec.add(key, ids, GREEDY))
        for key, chunks in dec.step().items():
            take(key, chunks)
        steps += 1
        assert steps < 10_000
    return [out[i] for i in range(len(prompts))], cached


@pytest.mark.parametrize("chunk", [0, 5])
def test_batched_hits_give_the_same_tokens(gen, prompts, reference, chunk):
    cache = _cached(gen)
    gen.generate(prompts[0], GREEDY)  # the system prompt is cached before the batch starts
    batched, cached = _run_batched(gen, prompts, max_batch=3, chunk=chunk)
    assert batched == reference
    assert all(n > 0 for n in cached.values())
    assert cache.stats().bytes == _held_bytes(cache)


def test_evictions_keep_the_budget_and_the_tokens(gen, prompts, reference):
    probe = _cached(gen)
    # Room for one prompt's KV and a half: each new prompt evicts the one before.
    budget = int(1.5 * max(len(p) for p in prompts) * probe.token_bytes)
    cache = _cached(gen, budget)
    rounds = [0, 1, 0, 2, 3, 1]
    out = [gen.generate(prompts[i], GREEDY).token_ids for i in rounds]
    assert out == [reference[i] for i in rounds]
    s = cache.stats()
    assert s.evictions == len(rounds) - 1 and s.entries == 1
    assert s.bytes <= budget and s.bytes == _held_bytes(cache)
    assert s.hits == len(rounds) - 1  # each new prompt still shares the last one's prefix


def test_short_prompts_and_measurements_leave_the_cache_alone(gen, prompts):
    cache = _cached(gen)
    gen.generate(prompts[0][:5], GREEDY)  # below min_tokens: neither stored nor a miss
    assert cache.stats() == cache.stats().__class__(0, 0, 0, 0, 0, 0, cache.budget_bytes)
    dec = gen.batch(1, reuse_prefixes=False)
    dec.add("probe", prompts[0], SamplingParams(max_tokens=1, temperature=0.0))
    assert cache.stats().entries == 0 and cache.stats().misses == 0
    gen.use_prefix_cache(0)
    assert gen.prefix_cache is None


def test_a_partial_hit_is_the_prefix_of_the_entry(gen, prompts):
    cache = _cached(gen)
    gen.generate(prompts[0], GREEDY)
    (entry,) = cache._lru.values()
    k, kv = cache.take(np.asarray(prompts[1], dtype=np.int64))
    assert 8 <= k < len(entry.tokens) and kv is not None
    for name, t in kv.items():
        part, whole = cache.engine.to_host(t), cache.engine.to_host(entry.kv[name])
        assert part.shape == (*whole.shape[:2], k, whole.shape[3])
        np.testing.assert_array_equal(part, whole[:, :, :k])


def test_logits_after_a_hit_match_a_full_prefill(gen, prompts):
    """Sharper than greedy tokens: the first token's logits, with and without the cache (a
    KV shifted by one token moves them by ~5e-3 on this model; the tiny model's greedy tokens
    do not notice)."""
    cache = _cached(gen)
    gen.generate(prompts[0], GREEDY)
    ids = np.asarray([prompts[1]], dtype=np.int64)
    n = ids.shape[1]
    full, _ = gen.forward(ids, gen.ones[:, :n], gen.positions[:, :n], gen.empty_cache(1))
    k, kv = cache.take(ids[0])
    assert kv is not None and k > 8
    hit, _ = gen.forward(ids[:, k:], gen.ones[:, :n], gen.positions[:, k:n], kv)
    np.testing.assert_allclose(hit[0, -1], full[0, -1], rtol=0, atol=1e-5)
