"""Continuous batching: sequences join and leave a shared decode batch between steps.

    add(prompt) ─▶ prefill alone ([1, S]) ─▶ first token ─▶ merge its cache into the batch
    step()      ─▶ one decode step for every active sequence ([B, 1]) ─▶ a token each
    finished / cancelled sequences leave ─▶ their rows are dropped from the cache

Which side the padding goes depends on the graph's attention (bundle.GraphSpec):

- decomposed attention (Optimum's export): present = past ++ new appends every row's new
  key/value at the same column, so the cache is left-padded — a sequence of length L sits in
  the last L of P columns of each [B, kv_heads, P, head_dim] tensor;
- fused GroupQueryAttention: the kernel reads each row's length from the mask (`seqlens_k`)
  and writes the new key/value right after it, so the cache is right-padded — a sequence
  sits in the first L columns.

Either way its attention-mask row is 0 over the padding and position ids stay each
sequence's own, so a token's logits do not depend on who else is in the batch. Cache
surgery (pad, concatenate, drop rows) happens only when the batch changes, never per step;
when one sequence is left the cache is exactly its own, unpadded.
"""

from __future__ import annotations

import time
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from edge_runtime.errors import EngineError, GenerationError
from edge_runtime.sampling import Sampler, SamplingParams
from edge_runtime.tokenizer import IncrementalDecoder

if TYPE_CHECKING:
    from edge_runtime.engines import DeviceTensor
    from edge_runtime.generator import Chunk, GenerationStats, Generator


@dataclass(eq=False)
class _Seq:
    """One sequence's decoding state."""

    key: Hashable
    sampler: Sampler
    decoder: IncrementalDecoder
    stops: Any  # StopMatcher (import cycle with generator.py)
    max_tokens: int
    length: int
    """Tokens in this sequence's cache (prompt + fed tokens)."""
    stats: GenerationStats
    t0: float
    t_first: float = 0.0
    token: int = -1
    """The last sampled token: fed at the next step."""
    pending: list[int] = field(default_factory=list)


class BatchDecoder:
    """Decodes up to `max_batch` sequences together on one generator's engine."""

    def __init__(self, gen: Generator, max_batch: int = 8) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        graph = gen.graph
        if max_batch > 1 and not (graph.left_padded_batch or graph.right_padded_batch):
            raise EngineError(
                f"this bundle's decoder declares no padded-batch layout (a fused graph "
                f"packaged before right-padded batching); serve it with scheduler.max_batch "
                f"= 1, not {max_batch}, or package it again"
            )
        limit: int | None = getattr(gen.engine, "max_batch", None)
        if limit is not None and max_batch > limit:
            raise EngineError(
                f"the engine {gen.engine.name} decodes at most {limit} sequences together and "
                f"scheduler.max_batch is {max_batch}: set scheduler.max_batch = {limit}, or "
                f"build the plan again with `edge-runtime build-engine --profile "
                f"max_batch={max_batch}`"
            )
        self.gen = gen
        self._right = graph.right_padded_batch and not graph.left_padded_batch
        """Pad the cache on the right (fused GQA) instead of the left."""
        self.max_batch = max_batch
        self._seqs: list[_Seq] = []
        self._cache: dict[str, DeviceTensor] = {}
        self._width = 0  # P: cache columns shared by the batch
        self._ids = np.empty((max_batch, 1), dtype=np.int64)
        self._logits = (
            np.empty((max_batch, 1, gen.vocab_size), dtype=gen.logits_dtype)
            if gen.last_token_logits
            else None
        )

    @property
    def active(self) -> int:
        return len(self._seqs)

    @property
    def keys(self) -> list[Hashable]:
        return [s.key for s in self._seqs]

    def add(self, key: Hashable, prompt_ids: Sequence[int], params: SamplingParams) -> list[Chunk]:
        """Prefill a new sequence and sample its first token; the chunks it produced."""
        if len(self._seqs) >= self.max_batch:
            raise GenerationError(f"batch is full ({self.max_batch} sequences)")
        if not prompt_ids:
            raise GenerationError("prompt is empty", "prompt")
        from edge_runtime.generator import GenerationStats, StopMatcher

        gen = self.gen
        n = len(prompt_ids)
        seq = _Seq(
            key=key,
            sampler=Sampler(params),
            decoder=IncrementalDecoder(gen.tokenizer),
            stops=StopMatcher(params.stop),
            max_tokens=gen.resolve_max_tokens(n, params.max_tokens),
            length=n,
            stats=GenerationStats(prompt_tokens=n),
            t0=time.perf_counter(),
        )
        ids = np.asarray([prompt_ids], dtype=np.int64)  # [1, S]
        # A last-position graph yields [1, 1, V]: borrow row 0 of the batch buffer.
        out = self._logits[:1] if gen.last_token_logits and self._logits is not None else None
        logits, cache = gen.forward(
            ids, gen.ones[:, :n], gen.positions[:, :n], gen.empty_cache(1), out=out
        )
        chunks = self._advance(seq, logits[0, -1])
        if chunks and chunks[-1].finish_reason is not None:
            return chunks  # finished on its first token: never joins the batch
        self._join(seq, cache)
        return chunks

    def step(self) -> dict[Hashable, list[Chunk]]:
        """One decode step for the whole batch; chunks per sequence key (may be empty)."""
        seqs = self._seqs
        if not seqs:
            return {}
        gen, b = self.gen, len(seqs)
        ids = self._ids[:b]
        for i, s in enumerate(seqs):
            ids[i, 0] = s.token
        width = self._width + 1
        if b == 1:  # the common case: no padding, no per-step allocation
            mask = gen.ones[:, :width]
            positions = gen.positions[:, width - 1 : width]
        else:
            lengths = np.fromiter((s.length for s in seqs), dtype=np.int64, count=b)
            cols = np.arange(width)[None, :]
            if self._right:  # row i attends to its first (length_i + 1) columns
                mask = (cols <= lengths[:, None]).astype(np.int64)
            else:  # row i attends to its last (length_i + 1) columns
                mask = (cols >= (width - 1 - lengths)[:, None]).astype(np.int64)
            positions = lengths[:, None]
        out = self._logits[:b] if self._logits is not None else None
        logits, self._cache = gen.forward(ids, mask, positions, self._cache, out=out)
        self._width = width
        result: dict[Hashable, list[Chunk]] = {}
        done: list[int] = []
        for i, s in enumerate(seqs):
            s.length += 1
            chunks = self._advance(s, logits[i, -1])
            result[s.key] = chunks
            if chunks and chunks[-1].finish_reason is not None:
                done.append(i)
        if done:
            self._drop(done)
        return result

    def remove(self, key: Hashable) -> bool:
        """Drop a sequence (its client went away); False when it is not in the batch."""
        idx = [i for i, s in enumerate(self._seqs) if s.key == key]
        if idx:
            self._drop(idx)
        return bool(idx)

    # -- per sequence --------------------------------------------------------------------

    def _advance(self, s: _Seq, logits: np.ndarray) -> list[Chunk]:
        """Sample the next token of `s` from its logits row; the chunks that produced."""
        from edge_runtime.generator import Chunk

        token = s.sampler(logits)
        st = s.stats
        if st.completion_tokens == 0:
            s.t_first = time.perf_counter()
            st.ttft_s = s.t_first - s.t0
        if token in self.gen.eos_ids:
            return [self._finish(s, "stop", None)]
        st.completion_tokens += 1
        s.pending.append(token)
        text, hit = s.stops.feed(s.decoder.push(token))
        if hit:
            return [self._finish(s, "stop", text)]
        chunks = []
        if text:
            chunks.append(Chunk(text, s.pending))
            s.pending = []
        if st.completion_tokens >= s.max_tokens:
            chunks.append(self._finish(s, "length", None))
        s.token = token
        return chunks

    def _finish(self, s: _Seq, reason: str, tail: str | None) -> Chunk:
        from edge_runtime.generator import Chunk

        if tail is None:  # EOS or length: release what was held back
            tail, hit = s.stops.feed(s.decoder.flush())
            if hit:
                reason = "stop"
            else:
                tail += s.stops.flush()
        s.stats.decode_s = time.perf_counter() - s.t_first
        chunk = Chunk(tail, s.pending, reason, s.stats)
        s.pending = []
        return chunk

    # -- cache surgery (only when the batch changes) -------------------------------------

    def _join(self, seq: _Seq, cache: dict[str, DeviceTensor]) -> None:
        if not self._seqs:
            self._seqs, self._cache, self._width = [seq], cache, seq.length
            return
        engine = self.gen.engine
        width = max(self._width, seq.length)
        merged = {}
        for name, batch_t in self._cache.items():
            old = _pad(engine.to_host(batch_t), width, self._right)
            new = _pad(engine.to_host(cache[name]), width, self._right)
            merged[name] = engine.from_host(np.concatenate([old, new], axis=0))
        self._seqs.append(seq)
        self._cache, self._width = merged, width

    def _drop(self, rows: list[int]) -> None:
        gone = set(rows)
        keep = [i for i in range(len(self._seqs)) if i not in gone]
        self._seqs = [self._seqs[i] for i in keep]
        if not keep:
            self._cache, self._width = {}, 0
            return
        # Columns that are padding for every remaining row can go.
        width = max(s.length for s in self._seqs)
        cols = slice(0, width) if self._right else slice(self._width - width, self._width)
        engine = self.gen.engine
        self._cache = {
            name: engine.from_host(np.ascontiguousarray(engine.to_host(t)[keep, :, cols, :]))
            for name, t in self._cache.items()
        }
        self._width = width


def _pad(t: np.ndarray, width: int, right: bool) -> np.ndarray:
    """[B, H, L, D] → [B, H, width, D] with zeros on the right or the left."""
    extra = width - t.shape[2]
    if extra == 0:
        return t
    return np.pad(t, ((0, 0), (0, 0), (0, extra) if right else (extra, 0), (0, 0)))
