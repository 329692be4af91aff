from __future__ import annotations

import pytest

from edge_runtime.errors import GenerationError
from edge_runtime.model.tokenizer import IncrementalDecoder, TextTokenizer


@pytest.fixture(scope="module")
def tok(tiny_bundle) -> TextTokenizer:
    d = tiny_bundle.path / "tokenizer"
    return TextTokenizer.from_files(d / "tokenizer.json", d / "tokenizer_config.json")


@pytest.mark.parametrize("text", [
    "def f(x):\n    return x * 2  # double\n",
    "naïve café — 東京 🚀 façade",  # multi-byte characters split across byte-level tokens
])
def test_incremental_decode_equals_full_decode(tok, text):
    ids = tok.encode(text)
    dec = IncrementalDecoder(tok)
    deltas = [dec.push(i) for i in ids]
    out = "".join(deltas) + dec.flush()
    assert out == tok.decode(ids) == text
    assert all("\ufffd" not in d for d in deltas)


def test_chat_template_and_special_tokens(tok):
    prompt = tok.render_chat([{"role": "system", "content": "be brief"},
                              {"role": "user", "content": "hi"}])
    assert prompt == ("<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
                      "<|im_start|>assistant\n")
    ids = tok.encode(prompt)
    assert ids[0] == tok.token_id("<|im_start|>")
    assert tok.eos_token == "<|im_end|>"


def test_template_errors_become_generation_errors(tiny_bundle):
    t = TextTokenizer(tiny_bundle.path / "tokenizer" / "tokenizer.json",
                      chat_template="{{ raise_exception('roles must alternate') }}")
    with pytest.raises(GenerationError, match="roles must alternate") as e:
        t.render_chat([{"role": "user", "content": "x"}])
    assert e.value.field == "messages"
