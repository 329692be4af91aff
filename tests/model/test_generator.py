"""The generator against real ONNX Runtime graphs and the reference PyTorch model."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_runtime.bundle.manifest import verify_bundle
from edge_runtime.errors import ContextLengthError, GenerationError
from edge_runtime.model.generator import Generator
from edge_runtime.model.sampling import SamplingParams
from edge_runtime.model.stream import StopMatcher
from edge_runtime.signing import load_public_key


@pytest.fixture(scope="module")
def gen(tiny_bundle) -> Generator:
    return Generator.from_bundle(verify_bundle(tiny_bundle.path,
                                               [load_public_key(tiny_bundle.pubkey)]))


@pytest.fixture(scope="module")
def fp32_gen(tiny_bundle, tmp_path_factory) -> Generator:
    """The fp32 export, packaged like any bundle, to compare with transformers exactly."""
    pytest.importorskip("torch")
    from edge_build import package

    out = tmp_path_factory.mktemp("fp32") / "bundle"
    package.run(tiny_bundle.work / "onnx", out, tiny_bundle.key, name="fp32", version="1")
    return Generator.from_bundle(verify_bundle(out, [load_public_key(tiny_bundle.pubkey)]))


PROMPTS = ["def main(argv):\n    ", "import os\nimport sys\n\nclass ", "    return self._"]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_fp32_greedy_tokens_equal_transformers_generate(tiny_bundle, fp32_gen, prompt):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(Path(tiny_bundle.work / "model"))
    ids = fp32_gen.text_prompt(prompt)
    with torch.inference_mode():
        ref = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids),
                             dtype=torch.long), max_new_tokens=48, do_sample=False,
                             eos_token_id=None, pad_token_id=0)[0, len(ids):].tolist()
    # No EOS set on the reference, so the bundle's EOS must not stop us early either.
    fp32_gen._eos = frozenset()
    got = fp32_gen.generate(ids, SamplingParams(max_tokens=48, temperature=0.0))
    assert got.token_ids == ref
    assert got.finish_reason == "length"
    assert got.stats.completion_tokens == 48


def test_stream_equals_generate_and_counts(gen):
    ids = gen.chat_prompt([{"role": "user", "content": "write a function"}])
    params = SamplingParams(max_tokens=30, temperature=0.0)
    whole = gen.generate(ids, params)
    chunks = list(gen.stream(ids, params))
    assert "".join(c.text for c in chunks) == whole.text
    assert [t for c in chunks for t in c.token_ids] == whole.token_ids
    assert chunks[-1].finish_reason == whole.finish_reason
    assert all(c.finish_reason is None for c in chunks[:-1])
    assert whole.stats.prompt_tokens == len(ids)
    assert whole.stats.completion_tokens == len(whole.token_ids)
    assert gen.tokenizer.decode(whole.token_ids) == whole.text


def test_seeded_sampling_is_reproducible_and_differs_by_seed(gen):
    ids = gen.text_prompt("def ")
    a = gen.generate(ids, SamplingParams(max_tokens=40, temperature=1.0, seed=7))
    b = gen.generate(ids, SamplingParams(max_tokens=40, temperature=1.0, seed=7))
    c = gen.generate(ids, SamplingParams(max_tokens=40, temperature=1.0, seed=8))
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids


def test_stop_string_truncates_and_finishes(gen):
    ids = gen.text_prompt("def f(x):\n")
    free = gen.generate(ids, SamplingParams(max_tokens=60, temperature=0.0))
    # Stop on a piece of text the model really produces, in the middle of its output.
    text = free.text
    assert len(text) > 4, text
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    got = gen.generate(ids, SamplingParams(max_tokens=60, temperature=0.0, stop=(stop,)))
    assert got.finish_reason == "stop"
    assert got.text == text[: text.find(stop)]
    streamed = "".join(c.text for c in gen.stream(
        ids, SamplingParams(max_tokens=60, temperature=0.0, stop=(stop,))))
    assert streamed == got.text


def test_max_tokens_and_context_limits(gen):
    ids = gen.text_prompt("x = ")
    assert gen.generate(ids, SamplingParams(max_tokens=3, temperature=0)).stats \
        .completion_tokens <= 3
    with pytest.raises(ContextLengthError) as e:
        gen.resolve_max_tokens(len(ids), gen.context_length)
    assert e.value.field == "max_tokens"
    with pytest.raises(ContextLengthError) as e:
        gen.resolve_max_tokens(gen.context_length, None)
    assert e.value.field == "messages"
    assert gen.resolve_max_tokens(gen.context_length - 5, None) == 5
    with pytest.raises(GenerationError, match="empty"):
        list(gen.stream([], SamplingParams(max_tokens=3)))


@pytest.mark.parametrize(("deltas", "stops", "expected", "hit"), [
    (["hel", "lo wor", "ld"], ["wor"], "hello ", True),
    (["ab", "c"], ["bd"], "abc", False),
    (["a", "b", "c"], ["abc"], "", True),
    (["xa", "bx"], ["ab", "zz"], "x", True),
])
def test_stop_matcher_holds_back_prefixes(deltas, stops, expected, hit):
    m = StopMatcher(stops)
    out = ""
    got_hit = False
    for d in deltas:
        text, got_hit = m.feed(d)
        out += text
        if got_hit:
            break
    if not got_hit:
        out += m.flush()
    assert (out, got_hit) == (expected, hit)
