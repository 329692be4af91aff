from __future__ import annotations

import numpy as np
import pytest

from edge_runtime.errors import GenerationError
from edge_runtime.model.sampling import Sampler, SamplingParams, _nucleus


def _reference_nucleus(scaled, top_k, top_p):
    p = np.exp(scaled - scaled.max())
    p /= p.sum()
    order = np.argsort(-p, kind="stable")[: top_k or len(p)]
    cum = np.cumsum(p[order])
    n = int(np.searchsorted(cum, top_p) + 1) if top_p < 1 else len(order)
    return set(order[:n].tolist())


@pytest.mark.parametrize("top_p", [0.1, 0.5, 0.9, 0.99])
@pytest.mark.parametrize("top_k", [0, 5, 1000])
def test_nucleus_equals_full_sort(top_p, top_k):
    rng = np.random.default_rng(0)
    scaled = rng.normal(size=50_000) * 3
    ids, probs = _nucleus(scaled, top_k or len(scaled), top_p)
    assert set(ids.tolist()) == _reference_nucleus(scaled, top_k, top_p)
    assert probs.sum() == pytest.approx(1.0)


def test_greedy_topk1_and_seeded_distribution():
    logits = np.array([0.0, 3.0, 1.0, 2.9], dtype=np.float32)
    assert Sampler(SamplingParams(max_tokens=1, temperature=0))(logits) == 1
    assert Sampler(SamplingParams(max_tokens=1, top_k=1))(logits) == 1
    s = Sampler(SamplingParams(max_tokens=1, temperature=1.0, top_k=2, seed=3))
    draws = [s(logits) for _ in range(2000)]
    assert set(draws) == {1, 3}
    # P(1) / P(3) = e^0.1 within top-2: about 52.5% for token 1.
    assert 0.47 < draws.count(1) / len(draws) < 0.58


@pytest.mark.parametrize(("kw", "field"), [
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": 1, "temperature": 2.5}, "temperature"),
    ({"max_tokens": 1, "temperature": -0.1}, "temperature"),
    ({"max_tokens": 1, "top_p": 0.0}, "top_p"),
    ({"max_tokens": 1, "top_p": 1.1}, "top_p"),
    ({"max_tokens": 1, "top_k": -1}, "top_k"),
    ({"max_tokens": 1, "stop": ("",)}, "stop"),
])
def test_bad_params_name_the_field(kw, field):
    with pytest.raises(GenerationError) as e:
        SamplingParams(**kw)
    assert e.value.field == field
