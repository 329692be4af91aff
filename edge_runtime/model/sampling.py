"""Next-token choice from one row of logits: greedy, temperature, top-k, top-p, seeded.

Exact top-p without sorting the whole vocabulary (151,936 entries for Qwen2 would cost more
than a decode step): take the k largest by partition, and if they do not yet hold mass p,
double k. The nucleus is the same set a full sort would give.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edge_runtime.errors import GenerationError


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens and when to stop. Validated on construction."""

    max_tokens: int
    temperature: float = 1.0
    """0 means greedy (argmax), as OpenAI's API treats it."""
    top_p: float = 1.0
    top_k: int = 0
    """0 disables top-k."""
    seed: int | None = None
    stop: tuple[str, ...] = ()
    """Generation ends before the first occurrence of any of these strings."""

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise GenerationError(f"max_tokens must be >= 1, got {self.max_tokens}", "max_tokens")
        if not 0.0 <= self.temperature <= 2.0:
            raise GenerationError(
                f"temperature must be in [0, 2], got {self.temperature}", "temperature"
            )
        if not 0.0 < self.top_p <= 1.0:
            raise GenerationError(f"top_p must be in (0, 1], got {self.top_p}", "top_p")
        if self.top_k < 0:
            raise GenerationError(f"top_k must be >= 0, got {self.top_k}", "top_k")
        if any(not s for s in self.stop):
            raise GenerationError("stop strings must not be empty", "stop")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1


class Sampler:
    """Picks tokens for one sequence; owns that sequence's random stream."""

    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        self._rng = np.random.default_rng(params.seed)

    def __call__(self, logits: np.ndarray) -> int:
        """`logits`: [vocab] float32 for the next position."""
        p = self.params
        if p.greedy:
            return int(np.argmax(logits))
        vocab = logits.shape[-1]
        k = min(p.top_k, vocab) if p.top_k else vocab
        scaled = logits.astype(np.float64, copy=False) / p.temperature
        if k < vocab or p.top_p < 1.0:
            ids, probs = _nucleus(scaled, k, p.top_p)
        else:
            ids = None
            probs = np.exp(scaled - scaled.max())
            probs /= probs.sum()
        choice = int(self._rng.choice(probs.shape[0], p=probs))
        return int(ids[choice]) if ids is not None else choice

    @property
    def rng(self) -> np.random.Generator:
        """This sequence's random stream (speculative decoding's accept/reject draws)."""
        return self._rng

    def distribution(self, logits: np.ndarray) -> np.ndarray:
        """The full-vocabulary distribution `__call__` samples from: [vocab] float64, one-hot
        at the argmax when greedy, zero outside the top-k / top-p candidates."""
        p = self.params
        vocab = logits.shape[-1]
        out = np.zeros(vocab, dtype=np.float64)
        if p.greedy:
            out[int(np.argmax(logits))] = 1.0
            return out
        k = min(p.top_k, vocab) if p.top_k else vocab
        scaled = logits.astype(np.float64, copy=False) / p.temperature
        if k < vocab or p.top_p < 1.0:
            ids, probs = _nucleus(scaled, k, p.top_p)
            out[ids] = probs
            return out
        out = np.exp(scaled - scaled.max())
        return out / out.sum()


def _nucleus(scaled: np.ndarray, top_k: int, top_p: float) -> tuple[np.ndarray, np.ndarray]:
    """Candidate ids (most likely first) and their renormalised probabilities."""
    vocab = scaled.shape[0]
    full = np.exp(scaled - scaled.max())
    full /= full.sum()
    k = min(top_k, 64)
    while True:
        part = np.argpartition(-full, k - 1)[:k] if k < vocab else np.arange(vocab)
        ids = part[np.argsort(-full[part], kind="stable")]
        probs = full[ids]
        cum = np.cumsum(probs)
        if k >= top_k or cum[-1] >= top_p:
            break
        k = min(k * 2, top_k)
    # Smallest prefix whose mass reaches top_p (always at least one token).
    n = int(np.searchsorted(cum, top_p) + 1) if top_p < 1.0 else len(ids)
    ids, probs = ids[:n], probs[:n]
    return ids, probs / probs.sum()
