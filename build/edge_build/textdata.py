"""Local text for the model-space stages: .txt / .jsonl files (or the stdlib corpus), split
train / held-out by a hash of each document, tokenized with the model's own tokenizer.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from edge_build.corpus import stdlib_corpus
from edge_build.stage import StageError


def load_texts(paths: Sequence[Path]) -> list[str]:
    """Documents from .txt files (one per file) and .jsonl files (one per line: a string or
    an object with a "text" field)."""
    texts: list[str] = []
    for path in map(Path, paths):
        if not path.is_file():
            raise StageError(f"data file {path} does not exist")
        if path.suffix == ".jsonl":
            for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise StageError(f"{path}:{n}: not JSON ({e.msg})") from None
                text = (
                    row
                    if isinstance(row, str)
                    else row.get("text")
                    if isinstance(row, dict)
                    else None
                )
                if not isinstance(text, str):
                    raise StageError(f'{path}:{n}: expected a string or an object with "text"')
                texts.append(text)
        elif path.suffix in (".txt", ".md", ".py"):
            texts.append(path.read_text(encoding="utf-8"))
        else:
            raise StageError(f"data file {path}: unsupported type (use .txt or .jsonl)")
    return texts


def split_texts(texts: Sequence[str], heldout_share: float) -> tuple[list[str], list[str]]:
    """Train / held-out by a hash of each document, so the split ignores file order."""
    train: list[str] = []
    held: list[str] = []
    for t in texts:
        bucket = int(hashlib.sha256(t.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
        (held if bucket < heldout_share else train).append(t)
    if not held and len(train) > 1:  # a tiny dataset still needs something to measure on
        held.append(train.pop())
    return train, held


def token_stream(model_dir: Path, texts: Sequence[str]) -> Any:
    """All documents tokenized and joined by the end-of-text id: a 1-D LongTensor."""
    import torch
    from tokenizers import Tokenizer

    tok_file = Path(model_dir) / "tokenizer.json"
    if not tok_file.is_file():
        raise StageError(f"{model_dir} has no tokenizer.json")
    tok = Tokenizer.from_file(str(tok_file))
    sep = json.loads((Path(model_dir) / "config.json").read_text()).get("eos_token_id")
    sep = sep[0] if isinstance(sep, list) else sep
    ids: list[int] = []
    for enc in tok.encode_batch(list(texts), add_special_tokens=False):
        ids.extend(enc.ids)
        if sep is not None:
            ids.append(int(sep))
    return torch.tensor(ids, dtype=torch.long)


def train_heldout(
    data: Sequence[Path] | None, heldout_share: float = 0.1
) -> tuple[list[str], list[str]]:
    """(train, held-out) documents from `data`, or the stdlib corpus when no files are given."""
    if data:
        return split_texts(load_texts(data), heldout_share)
    corpus = stdlib_corpus(heldout_share=heldout_share)
    return corpus.train, corpus.heldout
