"""Tiny Qwen2 and Llama teachers for the model-space stages (distill, prune).

Each is built from a config in code with a fixed seed and trained for a few seconds on stdlib
text with a small BPE tokenizer, so that its predictions have structure: distillation then
has something to imitate, and activation importance something to find.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from model_fixtures import ARCHS, tiny_config, train_briefly

try:
    import torch
except ImportError:  # the device leg has no [build] extra: the test modules skip themselves
    torch = None



@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread() -> None:
    # Tiny matrices on a shared 2-core machine: a second intra-op thread only adds contention
    # (measured 3-8x slower per step under load).
    if torch is not None:
        torch.set_num_threads(1)


@pytest.fixture(scope="session")
def corpus_texts() -> tuple[list[str], list[str]]:
    from edge_build.corpus import stdlib_corpus

    c = stdlib_corpus(max_chars=300_000)
    return c.train, c.heldout


@pytest.fixture(scope="session")
def data_file(tmp_path_factory: pytest.TempPathFactory, corpus_texts: Any) -> Path:
    """The tiny corpus as jsonl (train and held-out documents mixed; the stage splits)."""
    p = tmp_path_factory.mktemp("data") / "corpus.jsonl"
    texts = corpus_texts[0] + corpus_texts[1]
    p.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return p


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory, corpus_texts: Any) -> Path:
    from edge_build.corpus import Corpus
    from edge_build.demo import train_tokenizer

    d = tmp_path_factory.mktemp("tok")
    train_tokenizer(Corpus(train=corpus_texts[0], heldout=[]), 384, d)
    return d


@pytest.fixture(scope="session")
def teacher_dirs(
    tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path, corpus_texts: Any
) -> dict[str, Path]:
    import shutil

    from transformers import AutoModelForCausalLM

    from edge_build.textdata import token_stream

    out = {}
    for arch in ARCHS:
        d = tmp_path_factory.mktemp(f"teacher-{arch}")
        for f in tokenizer_dir.iterdir():
            shutil.copyfile(f, d / f.name)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(tiny_config(arch))
        model.save_pretrained(d)  # config first: token_stream reads eos from it
        train_briefly(model, token_stream(d, corpus_texts[0]))
        model.save_pretrained(d)
        out[arch] = d
    return out
