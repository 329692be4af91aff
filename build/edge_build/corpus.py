"""A local text corpus that every machine has: the running Python's standard library sources.

No dataset can be downloaded here, and the demo still needs text with real structure so that
perplexity, agreement and KL mean something. The stdlib is deterministic for a given Python
and large (tens of MB). Files are split into train and held-out by a hash of their relative
path, so the split does not depend on directory order or on which files exist.
"""

from __future__ import annotations

import hashlib
import sysconfig
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Corpus:
    train: list[str]
    heldout: list[str]

    @property
    def train_chars(self) -> int:
        return sum(len(t) for t in self.train)


def _is_heldout(rel: str, heldout_share: float) -> bool:
    bucket = int(hashlib.sha256(rel.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return bucket < heldout_share


def stdlib_corpus(max_chars: int = 4_000_000, heldout_share: float = 0.1) -> Corpus:
    """Up to `max_chars` of stdlib source, in a fixed order, split train / held-out."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(
        p
        for p in root.rglob("*.py")
        if "site-packages" not in p.parts and "test" not in p.parts and "tests" not in p.parts
    )
    train: list[str] = []
    heldout: list[str] = []
    # Each side fills its own quota, so a small corpus still gets a held-out share.
    quota = {
        True: int(max_chars * heldout_share),
        False: max_chars - int(max_chars * heldout_share),
    }
    used = {True: 0, False: 0}
    for p in files:
        side = _is_heldout(p.relative_to(root).as_posix(), heldout_share)
        if used[side] >= quota[side]:
            if used[not side] >= quota[not side]:
                break
            continue
        try:
            text = p.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        (heldout if side else train).append(text)
        used[side] += len(text)
    return Corpus(train=train, heldout=heldout)
