"""The prefix cache: KV caches of prompts already prefilled, reused by later prompts that
start with the same tokens (a system prompt, the chat history so far).

    BatchDecoder.add(prompt) ─▶ take(prompt) ─▶ (k, KV of prompt[:k]) ─▶ prefill prompt[k:] only
    prompt fully prefilled   ─▶ store(prompt, its KV)  ─▶ LRU within a byte budget

Every entry is one sequence's own, unpadded cache: [1, kv_heads, L, head_dim] per past
tensor, exactly what a prefill over a single sequence yields and takes, whichever side the
batch pads (left for the decomposed graph, right for fused GroupQueryAttention: padding is
added only when a sequence joins the batch, batching.py). So one cache serves both layouts,
chunked prefill (a hit just starts the chunks at k) and the single-stream path.

Token-exact, not block-aligned. Blocks pay in vLLM because its KV lives in pages that
sequences share by reference; here a sequence's KV is one contiguous tensor per layer, so a
block-aligned hit would still build a contiguous tensor, and would only throw away the
up-to-a-block of tokens after the last boundary (a chat template's system prompt rarely ends
on one). A hit on a whole entry (the chat-history case: the new prompt extends an old one)
reuses the entry's tensors as they are, no copy: engines never write into their inputs. A
hit on part of an entry (same system prompt, another question) copies that part once
(`to_host`, slice, `from_host`).

An entry is at least `min_tokens` long, and a hit reuses at least that many: reusing a few
tokens saves less than the lookup and the copy cost, and the start-up rate probe's short
prompts (serving/rate_probe.py) must measure real prefills. At least one prompt token is
always prefilled: its logits give the first token.

Entries stay where the engine keeps them (OrtValues; device memory on a GPU); their bytes are
counted exactly from the shapes (kv_heads · L · head_dim · itemsize per tensor). An engine
compiled for fixed shape ranges (TensorRT: prefill only over an empty cache) gets no prefix
cache (Generator.use_prefix_cache). Used by the engine-loop thread only; `stats()` may be
read from another thread (plain counters, read at once).
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from edge_runtime.bundle.manifest import KVCacheSpec
from edge_runtime.engines.protocol import DeviceTensor, Engine

DEFAULT_BUDGET_BYTES = 256 * 2**20
"""256 MiB: a 1,024-token prefix of Qwen2-0.5B (fp32 KV, 24 layers, 2 KV heads of 64) is
24 MiB, of a Llama-3.2-3B (fp16, 28 layers, 8 KV heads of 128) 112 MiB."""
MIN_TOKENS = 32
"""Shortest prefix stored or reused (see the module docstring)."""


@dataclass(frozen=True)
class PrefixCacheStats:
    """What /metrics exports (edge_runtime_prefix_cache_*)."""

    hits: int
    """Prompts that reused a cached prefix."""
    misses: int
    """Prompts long enough to reuse one that found none."""
    hit_tokens: int
    """Prompt tokens not prefilled thanks to a hit."""
    evictions: int
    """Entries dropped to stay within the budget (least recently used first)."""
    entries: int
    bytes: int
    """KV bytes held by the entries."""
    budget_bytes: int


@dataclass(eq=False)
class _Entry:
    serial: int
    tokens: np.ndarray
    """[L] int64: the prefix."""
    kv: dict[str, DeviceTensor]
    """Past-input name → [1, kv_heads, L, head_dim] engine tensor."""
    nbytes: int


class PrefixCache:
    """Prompt prefixes' KV caches on one engine, least recently used evicted first."""

    def __init__(self, engine: Engine, kv: KVCacheSpec, budget_bytes: int = DEFAULT_BUDGET_BYTES,
                 min_tokens: int = MIN_TOKENS) -> None:
        if budget_bytes < 0:
            raise ValueError(f"budget_bytes must be >= 0, got {budget_bytes}")
        if min_tokens < 1:
            raise ValueError(f"min_tokens must be >= 1, got {min_tokens}")
        self.engine = engine
        self.budget_bytes = budget_bytes
        self.min_tokens = min_tokens
        # K and V of every layer, for one token.
        self.token_bytes = 2 * kv.num_layers * kv.num_kv_heads * kv.head_dim * np.dtype(
            kv.dtype).itemsize
        self._lru: OrderedDict[int, _Entry] = OrderedDict()  # oldest first
        # Entries by their first min_tokens tokens: a lookup compares only with those that
        # could give a hit at all.
        self._by_head: dict[bytes, list[_Entry]] = {}
        self._serials = itertools.count()
        self.bytes = 0
        self.hits = self.misses = self.hit_tokens = self.evictions = 0

    def stats(self) -> PrefixCacheStats:
        return PrefixCacheStats(self.hits, self.misses, self.hit_tokens, self.evictions,
                                len(self._lru), self.bytes, self.budget_bytes)

    def _head(self, tokens: np.ndarray) -> bytes:
        return tokens[: self.min_tokens].tobytes()

    def take(self, prompt: np.ndarray) -> tuple[int, dict[str, DeviceTensor] | None]:
        """(k, the KV of prompt[:k]) for the longest cached prefix, k < len(prompt); (0,
        None) on a miss. `prompt`: [S] int64."""
        limit = len(prompt) - 1  # the last prompt token is always prefilled
        if limit < self.min_tokens:
            return 0, None  # too short to ever hit: neither a hit nor a miss
        best, k = None, 0
        for e in self._by_head.get(self._head(prompt), ()):
            n = min(len(e.tokens), limit)
            differ = np.flatnonzero(e.tokens[:n] != prompt[:n])
            common = int(differ[0]) if differ.size else n
            if common > k:
                best, k = e, common
        if best is None or k < self.min_tokens:
            self.misses += 1
            return 0, None
        self._lru.move_to_end(best.serial)
        self.hits += 1
        self.hit_tokens += k
        if k == len(best.tokens):
            return k, dict(best.kv)  # the tensors as they are: engines never write inputs
        engine = self.engine
        # [1, H, L, D] → [1, H, k, D]: one copy of the part reused.
        return k, {name: engine.from_host(np.ascontiguousarray(engine.to_host(t)[:, :, :k]))
                   for name, t in best.kv.items()}

    def keeps(self, n: int) -> bool:
        """Whether a prompt of `n` tokens can be stored (store() drops the others): a caller
        that must copy a cache out of a batch checks first."""
        return self.min_tokens <= n and n * self.token_bytes <= self.budget_bytes

    def store(self, tokens: np.ndarray, kv: Mapping[str, DeviceTensor]) -> None:
        """Keep `kv`, the cache of exactly `tokens` ([S] int64; [1, H, S, D] tensors), for
        later prompts. It supersedes entries it extends (a conversation's earlier turn); it
        is dropped if an entry already extends it."""
        n = len(tokens)
        nbytes = n * self.token_bytes
        if not self.keeps(n):
            return
        head = self._head(tokens)
        for e in list(self._by_head.get(head, ())):
            m = min(len(e.tokens), n)
            if not np.array_equal(e.tokens[:m], tokens[:m]):
                continue
            if len(e.tokens) >= n:  # already held, as this entry's prefix
                self._lru.move_to_end(e.serial)
                return
            self._remove(e)  # a prefix of the new entry: every hit on it hits the new one
        entry = _Entry(next(self._serials), np.array(tokens, dtype=np.int64), dict(kv), nbytes)
        self._by_head.setdefault(head, []).append(entry)
        self._lru[entry.serial] = entry
        self.bytes += nbytes
        while self.bytes > self.budget_bytes:
            self._remove(next(iter(self._lru.values())))
            self.evictions += 1

    def _remove(self, e: _Entry) -> None:
        del self._lru[e.serial]
        head = self._head(e.tokens)
        same = self._by_head[head]
        same.remove(e)
        if not same:
            del self._by_head[head]
        self.bytes -= e.nbytes

    def clear(self) -> None:
        """Drop every entry (their engine tensors are freed with the last reference)."""
        self._lru.clear()
        self._by_head.clear()
        self.bytes = 0
