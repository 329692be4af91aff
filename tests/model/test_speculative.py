"""Speculative decoding on a real draft/target pair (the tiny model and its one-layer draft):
greedy tokens identical to plain decoding on both cache layouts, sequences moving between a
speculating batch of one and a plain wider batch, and the rejection rule's distribution."""

from __future__ import annotations

import numpy as np
import pytest

from edge_runtime.bundle.manifest import verify_bundle
from edge_runtime.model.batching import BatchDecoder
from edge_runtime.model.generator import Generator
from edge_runtime.model.sampling import Sampler, SamplingParams
from edge_runtime.model.speculative import Speculator
from edge_runtime.signing import load_public_key

PROMPTS = [
    "def main(argv):\n    ",
    "import os\nimport sys\n\nclass Reader:\n    def __init__(self, path):\n        self.",
    "    return ",
    "x = [i * 2 for i in range(",
]


@pytest.fixture(scope="module", params=["decomposed", "fused"])
def pair(request, spec_bundles, tiny_bundle) -> tuple[Generator, Generator]:
    """(speculating generator, the same bundle without its draft), on both cache layouts."""
    b = verify_bundle(spec_bundles[request.param], [load_public_key(tiny_bundle.pubkey)])
    spec, plain = Generator.from_bundle(b), Generator.from_bundle(b, speculative=False)
    assert spec.speculative and not plain.speculative
    assert spec.graph.right_padded_batch == (request.param == "fused")
    assert spec.draft is not None and spec.draft.graph.kv_cache.num_layers == 1
    for g in (spec, plain):
        g._eos = frozenset()  # fixed lengths: what is compared is tokens
    return spec, plain


def _run(gen, ids, params, fixed_k=None, max_batch=1):
    dec = BatchDecoder(gen, max_batch=max_batch)
    if fixed_k is not None:
        assert dec.spec is not None
        dec.spec = Speculator(gen, gen.draft, fixed_k=fixed_k)
    out = []
    last = None
    for c in dec.decode_alone(ids, params):
        out.extend(c.token_ids)
        last = c
    assert last is not None and last.finish_reason is not None
    return out, last


@pytest.mark.parametrize("k", [1, 3, 8, None])
def test_greedy_tokens_identical_to_plain_decoding(pair, k):
    spec, plain = pair
    for n, prompt in enumerate(PROMPTS):
        ids = spec.text_prompt(prompt)
        params = SamplingParams(max_tokens=17 + 9 * n, temperature=0.0)
        want = plain.generate(ids, params)
        got, last = _run(spec, ids, params, fixed_k=k)
        assert got == want.token_ids
        assert last.finish_reason == want.finish_reason == "length"
        assert last.stats.completion_tokens == want.stats.completion_tokens
        if k is not None:
            assert last.stats.draft_tokens > 0
            assert 0 <= last.stats.accepted_tokens <= last.stats.draft_tokens


def test_greedy_with_eos_and_stop_strings(pair, tiny_bundle):
    """Finishing inside an accepted run of drafts (EOS or a stop string) ends exactly where
    plain decoding ends."""
    spec, plain = pair
    ids = spec.text_prompt(PROMPTS[1])
    ref = plain.generate(ids, SamplingParams(max_tokens=40, temperature=0.0))
    eos = ref.token_ids[11]  # a token that comes mid-run: made EOS for this test
    try:
        spec._eos = plain._eos = frozenset({eos})
        params = SamplingParams(max_tokens=40, temperature=0.0)
        want = plain.generate(ids, params)
        got, last = _run(spec, ids, params, fixed_k=4)
        assert got == want.token_ids and last.finish_reason == want.finish_reason == "stop"
    finally:
        spec._eos = plain._eos = frozenset()
    stop = ref.text[len(ref.text) // 2:][:3]
    params = SamplingParams(max_tokens=40, temperature=0.0, stop=(stop,))
    want = plain.generate(ids, params)
    got, last = _run(spec, ids, params, fixed_k=5)
    assert got == want.token_ids and last.finish_reason == "stop"
    assert spec.generate(ids, params).text == want.text


def test_sequences_move_between_speculation_and_the_batch(pair):
    """A alone speculates; B joins (plain batched steps); B leaves; A speculates again, its
    draft catching up on the tokens decoded while batched. Tokens equal plain decoding."""
    spec, plain = pair
    params = {"a": SamplingParams(max_tokens=60, temperature=0.0),
              "b": SamplingParams(max_tokens=12, temperature=0.0)}
    ids = {"a": spec.text_prompt(PROMPTS[0]), "b": spec.text_prompt(PROMPTS[1])}
    want = {k: plain.generate(ids[k], params[k]).token_ids for k in ids}
    dec = BatchDecoder(spec, max_batch=2)
    assert dec.spec is not None
    dec.spec = Speculator(spec, spec.draft, fixed_k=3)
    got: dict[str, list[int]] = {"a": [], "b": []}
    drafted = []
    for c in dec.add("a", ids["a"], params["a"]):
        got["a"].extend(c.token_ids)
    for step in range(200):
        if step == 3:
            for c in dec.add("b", ids["b"], params["b"]):
                got["b"].extend(c.token_ids)
        before = dec.spec.rounds
        for key, chunks in dec.step().items():
            for c in chunks:
                got[key].extend(c.token_ids)
        drafted.append((dec.active, dec.spec.rounds > before))
        if not dec.active:
            break
    assert got == want
    # Speculated alone, never while two sequences shared the batch, and again afterwards.
    assert any(r for n, r in drafted[:3]) and any(r for n, r in drafted[8:])
    assert not any(r for n, r in drafted if n == 2)


def test_sampled_generation_runs_and_is_reproducible(pair):
    spec, _ = pair
    ids = spec.text_prompt(PROMPTS[2])
    params = SamplingParams(max_tokens=30, temperature=0.8, top_p=0.95, seed=7)
    a, last = _run(spec, ids, params, fixed_k=4)
    b, _ = _run(spec, ids, params, fixed_k=4)
    assert a == b and len(a) == 30 and last.stats.draft_tokens > 0


def test_adaptive_k_follows_acceptance_and_cost(pair):
    spec, _ = pair
    ctl = Speculator(spec, spec.draft).control
    for _ in range(3):
        ctl.plain_step(1.0)
    for k in range(1, ctl.k_max + 1):  # verify ≈ (1 + k/50) steps, a draft step 0.05
        for _ in range(3):
            ctl.round_done(k, k, 0.05, 1.0 + 0.02 * k)
    ctl.alpha = 0.9
    k_high, gain_high = ctl.best_k()
    ctl.alpha = 0.3
    k_low, gain_low = ctl.best_k()
    assert k_high > k_low >= 1 and gain_high > gain_low
    for _ in range(9):  # a draft as slow as the target never pays
        ctl.round_done(1, 1, 0.9, 1.02)
    assert ctl.best_k()[1] < 1.0


# -- the rejection rule, statistically --------------------------------------------------

_CHI2_DF5_P001 = 20.52
"""Chi-square critical value, 5 degrees of freedom, p = 0.001."""


def _chi2(counts: np.ndarray, probs: np.ndarray) -> float:
    n = counts.sum()
    keep = probs > 0
    assert counts[~keep].sum() == 0, "a token outside the target's support was emitted"
    expected = probs[keep] * n
    return float(((counts[keep] - expected) ** 2 / expected).sum())


@pytest.mark.parametrize("params", [
    SamplingParams(max_tokens=8, temperature=1.0, seed=3),
    SamplingParams(max_tokens=8, temperature=0.7, top_k=5, seed=4),
])
def test_rejection_rule_keeps_the_targets_distribution(params):
    """Vocab of 6, three drafted positions whose draft distributions differ from the
    target's: the emitted first and second tokens follow the target's distributions (rows
    do not depend on the prefix here, so each position's marginal is its row's)."""
    rng = np.random.default_rng(0)
    target = rng.normal(size=(4, 6)) * 1.5
    draft = target + rng.normal(size=(4, 6)) * 1.2
    sampler = Sampler(params)
    p = [sampler.distribution(target[i]) for i in range(2)]
    counts = [np.zeros(6), np.zeros(6)]
    naive = np.zeros(6)
    n = 20_000
    for _ in range(n):
        qs = [sampler.distribution(draft[i]) for i in range(3)]
        drafts = [int(sampler.rng.choice(6, p=q)) for q in qs]
        _, tokens = Speculator._accept(sampler, False, target, drafts, qs)
        for pos in range(min(2, len(tokens))):
            counts[pos][tokens[pos]] += 1
        naive[drafts[0]] += 1
    # Every round emits at least one token, the second only when the first draft was kept.
    assert counts[0].sum() == n and counts[1].sum() > n / 4
    for pos in range(2):
        assert _chi2(counts[pos], p[pos]) < _CHI2_DF5_P001
    # The test can fail: taking the draft's tokens as they come is far off the target.
    assert _chi2(naive, p[0] + 1e-12) > 10 * _CHI2_DF5_P001


def test_distribution_is_what_the_sampler_draws_from():
    params = SamplingParams(max_tokens=1, temperature=0.9, top_k=4, top_p=0.8, seed=1)
    logits = np.random.default_rng(2).normal(size=32).astype(np.float32)
    dist = Sampler(params).distribution(logits)
    assert abs(dist.sum() - 1) < 1e-9
    draws = Sampler(params)
    seen = {draws(logits) for _ in range(500)}
    assert seen == set(np.flatnonzero(dist).tolist())
    greedy = Sampler(SamplingParams(max_tokens=1, temperature=0.0)).distribution(logits)
    assert greedy.argmax() == logits.argmax() and greedy.sum() == 1


def test_greedy_verification_leaves_near_ties_to_a_one_token_step():
    """A verify row whose two best logits are closer than GREEDY_MARGIN is not trusted: the
    drafts before it are kept and no token is taken from it (the next step is plain)."""
    from edge_runtime.model.speculative import GREEDY_MARGIN

    greedy = Sampler(SamplingParams(max_tokens=8, temperature=0.0))
    rows = np.zeros((4, 6), dtype=np.float32)
    rows[0, 2] = rows[1, 3] = rows[3, 1] = 5.0
    rows[2, 4], rows[2, 5] = 5.0, 5.0 - GREEDY_MARGIN / 2  # a near tie at position 2
    assert Speculator._accept(greedy, True, rows, [2, 3, 4], []) == (2, [2, 3])
    rows[2, 5] = 5.0 - 2 * GREEDY_MARGIN  # a clear choice: accepted, and the bonus token
    assert Speculator._accept(greedy, True, rows, [2, 3, 4], []) == (3, [2, 3, 4, 1])
    assert Speculator._accept(greedy, True, rows, [2, 0, 4], []) == (1, [2, 3])
