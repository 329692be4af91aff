"""Continuous batching on the real int4 graph: joining, leaving, identical tokens."""

from __future__ import annotations

import pytest

from edge_runtime.errors import GenerationError
from edge_runtime.model.batching import BatchDecoder
from edge_runtime.model.sampling import SamplingParams

PROMPTS = [
    "def main(argv):\n    ",
    "import os\nimport sys\n\nclass Reader:\n    def __init__(self, path):\n        self.",
    "    return ",
    "# Copyright 2001 Python Software Foundation\n\n\"\"\"Utilities for",
    "x = [i * 2 for i in range(",
]


def _run_batched(gen, jobs, max_batch, join_every=3):
    """jobs: (key, prompt ids, params). New sequences join every `join_every` steps."""
    dec = BatchDecoder(gen, max_batch=max_batch)
    out = {key: [] for key, _, _ in jobs}
    finished = {}
    waiting = list(jobs)
    steps = 0
    while waiting or dec.active:
        if waiting and dec.active < max_batch and steps % join_every == 0:
            key, ids, params = waiting.pop(0)
            for c in dec.add(key, ids, params):
                out[key].extend(c.token_ids)
                if c.finish_reason:
                    finished[key] = c
        for key, chunks in dec.step().items():
            for c in chunks:
                out[key].extend(c.token_ids)
                if c.finish_reason:
                    finished[key] = c
        steps += 1
        assert steps < 10_000
    return out, finished


@pytest.mark.parametrize("max_batch", [2, 4])
def test_batched_tokens_equal_single_stream_greedy(gen, max_batch):
    jobs = [(i, gen.text_prompt(p), SamplingParams(max_tokens=12 + 7 * i, temperature=0.0))
            for i, p in enumerate(PROMPTS)]
    single = {key: gen.generate(ids, params).token_ids for key, ids, params in jobs}
    batched, finished = _run_batched(gen, jobs, max_batch)
    assert batched == single
    assert {k: c.finish_reason for k, c in finished.items()} == dict.fromkeys(single, "length")
    assert all(finished[k].stats.completion_tokens == len(single[k]) for k in single)


def test_seeded_sampling_is_independent_of_batch_neighbours(gen):
    jobs = [(i, gen.text_prompt(p), SamplingParams(max_tokens=15, temperature=0.9, seed=i))
            for i, p in enumerate(PROMPTS[:3])]
    single = {key: gen.generate(ids, params).token_ids for key, ids, params in jobs}
    batched, _ = _run_batched(gen, jobs, max_batch=3, join_every=1)
    assert batched == single


def test_remove_leaves_the_others_untouched(gen):
    ids = [gen.text_prompt(p) for p in PROMPTS[:3]]
    params = SamplingParams(max_tokens=20, temperature=0.0)
    ref = gen.generate(ids[2], params).token_ids
    dec = BatchDecoder(gen, max_batch=3)
    got: list[int] = []
    for k in range(3):
        for c in dec.add(k, ids[k], params):
            if k == 2:
                got.extend(c.token_ids)
    for step in range(30):
        if step == 2:
            assert dec.remove(0) and dec.remove(1)
            assert not dec.remove(1)
        for c in dec.step().get(2, []):
            got.extend(c.token_ids)
        if not dec.active:
            break
    assert got == ref
    assert dec.active == 0


def test_clear_empties_the_batch_at_once_and_it_serves_again(gen):
    ids = [gen.text_prompt(p) for p in PROMPTS[:3]]
    params = SamplingParams(max_tokens=12, temperature=0.0)
    dec = BatchDecoder(gen, max_batch=3, prefill_chunk=4)
    for k in range(3):
        dec.add(k, ids[k], params)  # some of them still prefilling, chunk by chunk
    dec.step()
    dec.clear()
    assert dec.active == 0 and dec.prefilling == 0 and dec.keys == []
    assert dec.step() == {}
    again = [t for c in dec.add("again", ids[1], params) for t in c.token_ids]
    while dec.active:
        again += [t for c in dec.step().get("again", []) for t in c.token_ids]
    assert again == gen.generate(ids[1], params).token_ids


def test_full_batch_and_empty_prompt_are_refused(gen):
    dec = BatchDecoder(gen, max_batch=1)
    dec.add("a", gen.text_prompt("x"), SamplingParams(max_tokens=5))
    with pytest.raises(GenerationError, match="batch is full"):
        dec.add("b", gen.text_prompt("y"), SamplingParams(max_tokens=5))
    with pytest.raises(GenerationError, match="empty"):
        BatchDecoder(gen, max_batch=2).add("c", [], SamplingParams(max_tokens=5))


def test_a_graph_without_a_batch_layout_is_refused(gen):
    """A fused bundle packaged before right-padded batching declares neither layout: it
    serves one sequence at a time instead of decoding a batch wrongly."""
    from dataclasses import replace

    from edge_runtime.errors import EngineError

    saved = gen.graph
    try:
        gen.graph = replace(saved, left_padded_batch=False, right_padded_batch=False)
        with pytest.raises(EngineError, match="max_batch = 1"):
            BatchDecoder(gen, max_batch=2)
        assert BatchDecoder(gen, max_batch=1).max_batch == 1
    finally:
        gen.graph = saved


# -- chunked prefill -----------------------------------------------------------------------

LONG = ("import os\nimport sys\n\n\ndef main(argv):\n    for path in argv[1:]:\n"
        "        with open(path) as f:\n            for line in f:\n"
        "                print(line.rstrip())\n    return 0\n")


@pytest.mark.parametrize("chunk", [1, 7, 16])
def test_chunked_prefill_gives_the_same_tokens(gen, chunk):
    """A prompt prefilled a chunk per step over its own growing cache decodes exactly as one
    prefilled whole, and so do the sequences it joins."""
    jobs = [(i, gen.text_prompt(p), SamplingParams(max_tokens=10 + 3 * i, temperature=0.0))
            for i, p in enumerate([*PROMPTS[:3], LONG])]
    assert len(jobs[-1][1]) > 2 * 16
    single = {key: gen.generate(ids, params).token_ids for key, ids, params in jobs}
    dec = BatchDecoder(gen, max_batch=4, prefill_chunk=chunk)
    out: dict = {key: [] for key, _, _ in jobs}
    waiting = list(jobs)
    for _ in range(1_000):
        if waiting and dec.active < 4:
            key, ids, params = waiting.pop(0)
            out[key].extend(t for c in dec.add(key, ids, params) for t in c.token_ids)
        for key, chunks in dec.step().items():
            out[key].extend(t for c in chunks for t in c.token_ids)
        if not waiting and not dec.active:
            break
    assert out == single


def test_running_streams_advance_while_a_long_prompt_prefills(gen):
    params = SamplingParams(max_tokens=100, temperature=0.0)
    dec = BatchDecoder(gen, max_batch=3, prefill_chunk=8)
    for k in range(2):
        dec.add(k, gen.text_prompt(PROMPTS[k]), params)
    while dec.prefilling:  # the two running streams' own prompts may take a few chunks
        dec.step()
    done_before = dec._seqs[0].stats.completion_tokens
    long_ids = gen.text_prompt(LONG)
    assert dec.add("long", long_ids, params) == []  # queued: no engine run, no token yet
    assert dec.prefill_work == (0, 0.0)
    assert (dec.active, dec.prefilling) == (3, 1) and "long" in dec.keys
    chunks_left = -(-len(long_ids) // 8)
    for i in range(chunks_left):
        out = dec.step()
        # every running stream got its token in this step; the prefill moved one chunk on
        assert 0 < dec.prefill_work[0] <= 8 and dec.prefill_work[1] > 0
        assert dec._seqs[0].stats.completion_tokens == done_before + i + 1
        assert ("long" in out) == (i == chunks_left - 1)
    assert dec.prefilling == 0 and dec.active == 3
    with pytest.raises(GenerationError, match="batch is full"):
        dec.add("x", long_ids, params)


def test_a_prefilling_sequence_can_be_removed_and_counts_against_the_batch(gen):
    params = SamplingParams(max_tokens=5, temperature=0.0)
    dec = BatchDecoder(gen, max_batch=1, prefill_chunk=4)
    dec.add("long", gen.text_prompt(LONG), params)
    with pytest.raises(GenerationError, match="batch is full"):
        dec.add("b", gen.text_prompt("x"), params)
    assert dec.remove("long") and not dec.remove("long")
    assert dec.active == 0 and dec.step() == {}
    ref = gen.generate(gen.text_prompt("x = "), params).token_ids
    got = [t for c in dec.add("b", gen.text_prompt("x = "), params) for t in c.token_ids]
    while dec.active:
        got.extend(t for c in dec.step().get("b", []) for t in c.token_ids)
    assert got == ref


# -- prompts prefilled together ------------------------------------------------------------


def _drain(dec: BatchDecoder, first: dict) -> dict:
    """Every key's tokens: what add_many returned, then every step's."""
    out = {key: [t for c in chunks for t in c.token_ids] for key, chunks in first.items()}
    for _ in range(1_000):
        if not dec.active:
            return out
        for key, chunks in dec.step().items():
            out[key].extend(t for c in chunks for t in c.token_ids)
    raise AssertionError("did not finish")


def _together_case(gen, dec: BatchDecoder) -> None:
    # Different lengths (within the spread: one run), one finishing on its first token
    # (max_tokens 1: never joins), and the rest of different lengths of answer.
    jobs = [(i, gen.text_prompt(p), SamplingParams(max_tokens=1 if i == 2 else 9 + 4 * i,
                                                   temperature=0.0))
            for i, p in enumerate([PROMPTS[0], PROMPTS[2], PROMPTS[4], PROMPTS[0] + "pass"])]
    lengths = [len(ids) for _, ids, _ in jobs]
    assert len(set(lengths)) > 1 and max(lengths) - min(lengths) <= 16, lengths
    single = {key: gen.generate(ids, params).token_ids for key, ids, params in jobs}
    first = dec.add_many(jobs)
    assert not any(isinstance(v, Exception) for v in first.values())
    assert first[2][-1].finish_reason == "length" and 2 not in dec.keys
    assert dec.prefill_work[0] == sum(lengths) and dec.active == 3
    assert _drain(dec, first) == single  # type: ignore[arg-type]


def test_prompts_added_together_decode_as_single_streams(gen):
    """The decomposed graph prefills them in one left-padded run, the fused one in one
    right-padded run when it returns a logits window (packaged since the window came to
    every fused graph), else one by one (its last column is padding for shorter rows). The
    tokens are a single stream's either way."""
    dec = BatchDecoder(gen, max_batch=4)
    _together_case(gen, dec)
    assert dec.prefill_batched == (gen.windowed or not gen.graph.right_padded_batch)
    apart = BatchDecoder(gen, max_batch=4)
    apart._together = False  # a fused bundle packaged before every fused graph had a window
    _together_case(gen, apart)
    assert not apart.prefill_batched


@pytest.fixture(scope="module", params=["decomposed", "fused"])
def windowed(request, spec_bundles, tiny_bundle):
    """The tiny model's graphs that return a window of last positions (bundles with a draft):
    the fused one prefills right-padded prompts together too. Speculation off: batch rows."""
    from edge_runtime.bundle.manifest import verify_bundle
    from edge_runtime.model.generator import Generator
    from edge_runtime.signing import load_public_key

    b = verify_bundle(spec_bundles[request.param], [load_public_key(tiny_bundle.pubkey)])
    g = Generator.from_bundle(b, speculative=False)
    assert g.windowed
    g._eos = frozenset()
    return g


def test_prompts_added_together_on_a_windowed_graph_share_one_run(windowed):
    dec = BatchDecoder(windowed, max_batch=4)
    _together_case(windowed, dec)
    assert dec.prefill_batched


def test_a_lone_row_of_a_run_is_unpadded_and_far_apart_prompts_run_apart(windowed):
    gen = windowed
    params = SamplingParams(max_tokens=6, temperature=0.0)
    short, long = gen.text_prompt(PROMPTS[2]), gen.text_prompt(LONG)
    assert len(long) - len(short) > 16
    dec = BatchDecoder(gen, max_batch=4)
    # short and its twin finish at once (max_tokens 1); the long one alone joins.
    jobs = [("s", short, SamplingParams(max_tokens=1)), ("t", short + short[-1:],
            SamplingParams(max_tokens=1)), ("long", long, params)]
    first = dec.add_many(jobs)
    assert dec.keys == ["long"] and dec._width == len(long)  # unpadded, its own length
    assert dec.prefill_batched  # the two short ones shared a run; the long one ran alone
    out = _drain(dec, first)
    assert out["long"] == gen.generate(long, params).token_ids


def test_add_many_mixes_cached_chunked_and_fresh_prompts(gen):
    """A prompt with a prefix-cache hit and one longer than the prefill chunk go their own
    way; the fresh ones run together; every stream's tokens are a single stream's."""
    gen.use_prefix_cache(1 << 24, min_tokens=4)
    try:
        params = SamplingParams(max_tokens=8, temperature=0.0)
        base = gen.text_prompt(PROMPTS[1])
        BatchDecoder(gen, max_batch=1).add("warm", base, SamplingParams(max_tokens=1))
        jobs = [("hit", base + gen.text_prompt(" x"), params),
                ("long", gen.text_prompt(LONG), params),
                ("a", gen.text_prompt(PROMPTS[0]), params),
                ("b", gen.text_prompt(PROMPTS[4]), params)]
        gen.use_prefix_cache(0)
        single = {key: gen.generate(ids, p).token_ids for key, ids, p in jobs}
        gen.use_prefix_cache(1 << 24, min_tokens=4)
        BatchDecoder(gen, max_batch=1).add("warm", base, SamplingParams(max_tokens=1))
        chunk = max(len(jobs[2][1]), len(jobs[3][1]), len(jobs[0][1]) - len(base)) + 1
        assert len(jobs[1][1]) > chunk
        dec = BatchDecoder(gen, max_batch=4, prefill_chunk=chunk)
        first = dec.add_many(jobs)
        assert first["long"] == [] and dec.prefilling == 1  # queued for chunks
        assert first["hit"]  # prefilled after its cached prefix, alone
        assert dec.prefill_batched == (gen.windowed or not gen.graph.right_padded_batch)
        # Prefilled together, each prompt's own cache was stored as one alone stores it.
        import numpy as np

        for key, ids, _ in jobs[2:]:
            done, kv = gen.prefix_cache.take(np.asarray([*ids, 7], dtype=np.int64))
            assert done == len(ids) and kv is not None, key
        assert _drain(dec, first) == single  # type: ignore[arg-type]
        # ...and a later prompt that extends one decodes over it as over its own prefill.
        longer = jobs[2][1] + gen.text_prompt(" y = 1")
        hit = BatchDecoder(gen, max_batch=1)
        started = hit.add("x", longer, params)
        assert hit._seqs[0].stats.cached_tokens == len(jobs[2][1])  # the stored row, reused
        got = _drain(hit, {"x": started})["x"]
        gen.use_prefix_cache(0)
        assert got == gen.generate(longer, params).token_ids
    finally:
        gen.use_prefix_cache(0)


def test_add_many_refuses_before_any_work(gen):
    params = SamplingParams(max_tokens=3)
    dec = BatchDecoder(gen, max_batch=2)
    ids = gen.text_prompt("x")
    with pytest.raises(GenerationError, match="batch is full"):
        dec.add_many([(k, ids, params) for k in range(3)])
    with pytest.raises(GenerationError, match="empty"):
        dec.add_many([(0, ids, params), (1, [], params)])
    with pytest.raises(GenerationError, match="already"):
        dec.add_many([(0, ids, params), (0, ids, params)])
    assert dec.active == 0 and dec.prefill_work == (0, 0.0)
