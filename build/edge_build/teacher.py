"""Stage `teacher`: a recipe's [source.teacher] table → a locally trained Qwen2 teacher.

No model hub is reachable, so a recipe may make its own teacher the way the demo does (a
byte-level BPE tokenizer and a small Qwen2 trained for a bounded number of steps; see demo.py,
whose training this reuses) — but on the recipe's data and held-out split, so the teacher
never trains on the windows every later stage is measured on.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from edge_build.corpus import Corpus, stdlib_corpus
from edge_build.local_lm import DemoConfig, train_model, train_tokenizer
from edge_build.recipe import DataConfig, TeacherConfig
from edge_build.stage import stage_output, write_stage
from edge_build.textdata import load_texts, split_texts


def corpus_for(data: DataConfig, stdlib_chars: int) -> Corpus:
    """The recipe's train / held-out documents. For the stdlib this is the same path-hash
    split the model-space stages use (textdata.train_heldout), cut to `stdlib_chars`."""
    if data.files:
        train, held = split_texts(load_texts(data.files), data.heldout_share)
        return Corpus(train=train, heldout=held)
    return stdlib_corpus(max_chars=stdlib_chars, heldout_share=data.heldout_share)


def run(cfg: TeacherConfig, data: DataConfig, out: Path, progress: bool = True) -> dict[str, Any]:
    """Train the tokenizer and the model into `out` (HF format); return the stage record."""
    started = time.time()
    demo_cfg = DemoConfig(**asdict(cfg))
    corpus = corpus_for(data, cfg.corpus_chars)
    with stage_output(Path(out)) as tmp:
        train_tokenizer(corpus, cfg.vocab_size, tmp)
        metrics = train_model(demo_cfg, corpus, tmp, progress=progress)
        params = {
            **asdict(cfg),
            "data": [str(p) for p in data.files] or "stdlib",
            "heldout_share": data.heldout_share,
        }
        record = write_stage(tmp, "teacher", params, None, metrics, started)
    return record
