"""Fixtures of the model tests. A module that defines its own `gen` uses that one."""

from __future__ import annotations

import pytest

from edge_runtime.bundle.manifest import verify_bundle
from edge_runtime.model.generator import Generator
from edge_runtime.signing import load_public_key


@pytest.fixture(scope="module", params=["decomposed", "fused"])
def gen(request, tiny_bundle) -> Generator:
    """The exported graph (left-padded batches) and its GroupQueryAttention fusion
    (right-padded batches): every test that takes it runs on both cache layouts."""
    path = tiny_bundle.path if request.param == "decomposed" else \
        request.getfixturevalue("tiny_fused_bundle")
    g = Generator.from_bundle(verify_bundle(path, [load_public_key(tiny_bundle.pubkey)]))
    assert g.graph.right_padded_batch == (request.param == "fused")
    g._eos = frozenset()  # fixed lengths: what is compared is tokens, not when EOS comes
    return g
