"""Continuous batching: sequences join and leave a shared decode batch between steps.

    add(prompt) ─▶ prefill alone ([1, S]) ─▶ first token ─▶ merge its cache into the batch
    step()      ─▶ one decode step for every active sequence ([B, 1]) ─▶ a token each
    finished / cancelled sequences leave ─▶ their rows are dropped from the cache

Chunked prefill (`prefill_chunk`): a prompt longer than the chunk is prefilled `prefill_chunk`
tokens at a time over its own growing cache, one chunk after each step()'s decode, and
joins the batch when its prompt is done. Without it, a 2,000-token prompt would
stop every running stream for its whole prefill (seconds on a CPU); with it, the running
streams' steps are delayed by one chunk at most, and the long prompt's first token comes
about as soon as it would have.

Prompts that arrive together (add_many) are prefilled together: one engine run of a padded
[B, S] batch instead of B runs, where the graph allows it — a decomposed graph always (every
row's last position is its own last token: left padding), a fused one when it returns a
window of last positions (GraphSpec.logits_window: the rows' last tokens sit at different
columns), and never on an engine with fixed shape ranges. Prompts of one run differ in
length by at most TOGETHER_SPREAD tokens (padding is computed and discarded, and a fused
graph's window spans the spread); prompts with a prefix-cache hit or longer than the
prefill chunk go their own way. On a GPU a prefill run costs about what a decode step does
(kernel launches, not arithmetic), so 15 requests that arrive at once wait for 1 prefill
run instead of 15; on a CPU the arithmetic dominates and the gain is small.

Prefix cache (prefix_cache.py, the generator's, when it has one): add() starts a prompt's
prefill after the longest cached prefix of it (its KV taken as the sequence's own cache),
and a prompt's KV is stored once fully prefilled, before the sequence joins the batch.

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

import logging
import time
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from edge_runtime.errors import EngineError, GenerationError
from edge_runtime.model.sampling import Sampler, SamplingParams
from edge_runtime.model.stream import Chunk, ChunkStream, GenerationStats, StopMatcher
from edge_runtime.model.tokenizer import IncrementalDecoder

if TYPE_CHECKING:  # generator.py imports this module to build its batch
    from edge_runtime.engines.protocol import DeviceTensor
    from edge_runtime.model.generator import Generator
    from edge_runtime.model.speculative import Speculator

log = logging.getLogger(__name__)


@dataclass(eq=False)
class _Seq:
    """One sequence's decoding state."""

    key: Hashable
    sampler: Sampler
    decoder: IncrementalDecoder
    stops: StopMatcher
    max_tokens: int
    length: int
    """Tokens in this sequence's cache (prompt + fed tokens)."""
    stats: GenerationStats
    t0: float
    t_first: float = 0.0
    token: int = -1
    """The last sampled token: fed at the next step."""
    pending: list[int] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    """Prompt + sampled tokens: what a draft model catches up on (speculative.py)."""


@dataclass(eq=False)
class _Prefill:
    """A sequence whose prompt is being prefilled chunk by chunk (not in the batch yet)."""

    seq: _Seq
    prompt: np.ndarray
    """[1, S] int64: the whole prompt."""
    cache: dict[str, DeviceTensor] | None
    """The sequence's own cache: the first `done` prompt tokens (None: nothing yet; its first
    chunk starts from an empty one, and a prompt prefilled with others never needs one)."""
    done: int = 0


TOGETHER_SPREAD = 16
"""Most tokens by which the prompts of one batched prefill run may differ in length."""


class BatchDecoder:
    """Decodes up to `max_batch` sequences together on one generator's engine."""

    def __init__(self, gen: Generator, max_batch: int = 8,
                 prefill_chunk: int = 0, reuse_prefixes: bool = True) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if prefill_chunk < 0:
            raise ValueError(f"prefill_chunk must be >= 0 (0: off), got {prefill_chunk}")
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
        # A chunk after the first runs over a cache with several new tokens: a shape that an
        # engine compiled for fixed ranges (a TensorRT plan, the engines with a batch limit:
        # prefill over an empty cache, decode one token) holds in no profile. Those engines
        # prefill whole prompts.
        self.prefill_chunk = 0 if limit is not None else prefill_chunk
        """Prompt tokens prefilled per step; 0: whole prompts in add()."""
        self.prefill_work: tuple[int, float] = (0, 0.0)
        """(prompt tokens, seconds) of prefill done by the last add(), add_many() or step()
        call (several runs summed)."""
        self.prefill_batched = False
        """The last add_many() prefilled several prompts in one run: its prefill_work is not
        what one prompt alone would cost (the rate learner skips it)."""
        self._together = limit is None and (not self._right or gen.windowed)
        """Prompts can be prefilled in one run (see the module docstring)."""
        self.reuse_prefixes = reuse_prefixes
        """Use the generator's prefix cache (off: a measurement of real prefills)."""
        self._prefilling: list[_Prefill] = []
        self._seqs: list[_Seq] = []
        self._cache: dict[str, DeviceTensor] = {}
        self._width = 0  # P: cache columns shared by the batch
        self._ids = np.empty((max_batch, 1), dtype=np.int64)
        self._logits = (
            np.empty((max_batch, 1, gen.vocab_size), dtype=gen.logits_dtype)
            if gen.last_token_logits
            else None
        )
        # A batch of one drafts with the bundle's draft model and verifies k tokens per
        # target pass; wider batches decode one token per step (speculative.py).
        self.spec: Speculator | None = gen.speculator()

    @property
    def active(self) -> int:
        """Sequences in the batch, and those still prefilling."""
        return len(self._seqs) + len(self._prefilling)

    @property
    def prefilling(self) -> int:
        """Sequences whose prompt is still being prefilled chunk by chunk."""
        return len(self._prefilling)

    @property
    def keys(self) -> list[Hashable]:
        return [s.key for s in self._seqs] + [p.seq.key for p in self._prefilling]

    def add(self, key: Hashable, prompt_ids: Sequence[int], params: SamplingParams) -> list[Chunk]:
        """Prefill a new sequence and sample its first token; the chunks it produced. A
        prompt longer than `prefill_chunk` is only queued here (no chunks back): the next
        steps prefill it, and the one that finishes it carries its first token."""
        got = self.add_many([(key, prompt_ids, params)])[key]
        if isinstance(got, Exception):
            raise got
        return got

    def add_many(
        self, items: Sequence[tuple[Hashable, Sequence[int], SamplingParams]]
    ) -> dict[Hashable, list[Chunk] | Exception]:
        """add() for several new sequences at once, prefilled together where the graph
        allows (module docstring); per key, its chunks, or the exception that made it fail
        alone (the others of its run are prefilled again one by one). A GenerationError
        before any work when they do not fit the batch, a key is repeated or a prompt is
        empty."""
        self.prefill_work, self.prefill_batched = (0, 0.0), False
        if self.active + len(items) > self.max_batch:
            raise GenerationError(f"batch is full ({self.max_batch} sequences)")
        keys = [key for key, _, _ in items]
        if len(set(keys)) != len(keys) or set(keys) & set(self.keys):
            raise GenerationError("a sequence key is already in the batch")
        if any(not ids for _, ids, _ in items):
            raise GenerationError("prompt is empty", "prompt")
        result: dict[Hashable, list[Chunk] | Exception] = {}
        now: list[_Prefill] = []
        for key, ids, params in items:
            job = self._new_job(key, ids, params)
            if 0 < self.prefill_chunk < job.prompt.shape[1] - job.done:
                # Not even a first chunk here: the running streams' next step comes first,
                # so that they never wait for more than one chunk (plus their own step).
                self._prefilling.append(job)
                result[key] = []
            else:
                now.append(job)
        for group in self._groups(now):
            if len(group) > 1:
                together = self._prefill_together(group)
                if together is not None:
                    result.update(together)
                    continue
            for job in group:
                try:
                    chunks = self._prefill(job)
                    assert chunks is not None
                    result[job.seq.key] = chunks
                except Exception as e:
                    result[job.seq.key] = e
        return result

    def _new_job(self, key: Hashable, prompt_ids: Sequence[int],
                 params: SamplingParams) -> _Prefill:
        """A new sequence, started after the longest cached prefix of its prompt."""
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
            tokens=list(prompt_ids),
        )
        prompt = np.asarray([prompt_ids], dtype=np.int64)
        prefixes = gen.prefix_cache if self.reuse_prefixes else None
        done, kv = prefixes.take(prompt[0]) if prefixes is not None else (0, None)
        seq.stats.cached_tokens = done
        return _Prefill(seq, prompt, kv, done)

    def _groups(self, jobs: list[_Prefill]) -> list[list[_Prefill]]:
        """Runs of prompts to prefill together: fresh prompts (nothing cached) whose lengths
        differ by at most TOGETHER_SPREAD; every other job alone."""
        if not self._together or len(jobs) < 2:
            return [[j] for j in jobs]
        fresh = sorted((j for j in jobs if j.done == 0), key=lambda j: j.prompt.shape[1])
        groups: list[list[_Prefill]] = [[j] for j in jobs if j.done != 0]
        run: list[_Prefill] = []
        for job in fresh:
            if run and job.prompt.shape[1] - run[0].prompt.shape[1] > TOGETHER_SPREAD:
                groups.append(run)
                run = []
            run.append(job)
        if run:
            groups.append(run)
        return groups

    def _prefill(self, job: _Prefill) -> list[Chunk] | None:
        """Prefill the job's next chunk (its whole prompt when not chunked); once the prompt
        is done, sample the first token and join the batch: the chunks that produced."""
        gen, seq = self.gen, job.seq
        start = job.done
        end = job.prompt.shape[1] if not self.prefill_chunk else min(
            start + self.prefill_chunk, job.prompt.shape[1])
        t = time.perf_counter()
        # A last-position graph yields [1, 1, V]: borrow row 0 of the batch buffer (read
        # before the next forward writes it).
        out = self._logits[:1] if gen.last_token_logits and self._logits is not None else None
        past = job.cache if job.cache is not None else gen.empty_cache(1)
        logits, cache = gen.forward(job.prompt[:, start:end], gen.ones[:, :end],
                                    gen.positions[:, start:end], past, out=out)
        job.cache, job.done = cache, end
        tokens, seconds = self.prefill_work
        self.prefill_work = (tokens + end - start, seconds + time.perf_counter() - t)
        if end < job.prompt.shape[1]:
            return None
        prefixes = gen.prefix_cache if self.reuse_prefixes else None
        if prefixes is not None:
            prefixes.store(job.prompt[0], cache)
        if job in self._prefilling:
            self._prefilling.remove(job)
        chunks = self._advance(seq, logits[0, -1])
        if chunks and chunks[-1].finish_reason is not None:
            return chunks  # finished on its first token: never joins the batch
        self._join(seq, cache)
        return chunks

    def _prefill_together(self, group: list[_Prefill]) -> dict[Hashable, list[Chunk]] | None:
        """One engine run prefills every prompt of `group` (fresh: nothing cached), padded
        to the longest on the batch's side; each row's first token is sampled from its own
        last position, and the rows join the batch in one cache merge. None when the engine
        run failed (nothing changed: the caller prefills them one by one, so that a prompt
        the engine cannot run fails alone)."""
        gen, engine = self.gen, self.gen.engine
        lengths = [j.prompt.shape[1] for j in group]
        width, shortest = max(lengths), min(lengths)
        # Each row's own columns: its tokens first (right-padded) or last (left-padded).
        spans = [slice(0, n) if self._right else slice(width - n, width) for n in lengths]
        ids = np.zeros((len(group), width), dtype=np.int64)
        mask = np.zeros_like(ids)
        positions = np.zeros_like(ids)
        for i, (job, n, cols) in enumerate(zip(group, lengths, spans, strict=True)):
            ids[i, cols] = job.prompt[0]
            mask[i, cols] = 1
            # Padding's positions are never attended to (mask 0); right of a row they run on.
            positions[i] = gen.positions[0, :width] if self._right else 0
            positions[i, cols] = gen.positions[0, :n]
        # A fused graph's last column is padding for every shorter row: ask for the columns
        # from the shortest prompt's last token on.
        window = width - shortest + 1 if self._right else 0
        t = time.perf_counter()
        try:
            logits, cache = gen.forward(ids, mask, positions, gen.empty_cache(len(group)),
                                        window=window)
        except Exception as e:
            log.warning("%d prompts prefilled together failed (%s): one by one", len(group), e)
            return None
        tokens, seconds = self.prefill_work
        self.prefill_work = (tokens + sum(lengths), seconds + time.perf_counter() - t)
        self.prefill_batched = True
        host = {name: engine.to_host(tensor) for name, tensor in cache.items()}
        prefixes = gen.prefix_cache if self.reuse_prefixes else None
        result: dict[Hashable, list[Chunk]] = {}
        joining: list[tuple[int, _Seq]] = []
        for i, (job, n, cols) in enumerate(zip(group, lengths, spans, strict=True)):
            if prefixes is not None and prefixes.keeps(n):  # its own cache, as alone
                prefixes.store(job.prompt[0], {
                    name: engine.from_host(np.ascontiguousarray(h[i : i + 1, :, cols, :]))
                    for name, h in host.items()})
            last = n - 1 - (width - logits.shape[1]) if self._right else logits.shape[1] - 1
            chunks = self._advance(job.seq, logits[i, last])
            result[job.seq.key] = chunks
            if not (chunks and chunks[-1].finish_reason is not None):
                joining.append((i, job.seq))  # one that finished on its first token never joins
        if joining:
            rows = [i for i, _ in joining]
            self._join_rows([seq for _, seq in joining],
                            {name: h[rows] for name, h in host.items()})
        return result

    def decode_alone(self, prompt_ids: Sequence[int], params: SamplingParams,
                     key: Hashable = 0) -> ChunkStream:
        """Add one sequence and step until it finishes, yielding its chunks as they come
        (the last carries finish and stats): a batch of one, speculating when it can."""
        yield from self.add(key, prompt_ids, params)
        while self.active:
            yield from self.step()[key]

    def step(self) -> dict[Hashable, list[Chunk]]:
        """One decode step for the whole batch, then the next prefill chunk of the oldest
        sequence still prefilling; chunks per sequence key (may be empty)."""
        self.prefill_work = (0, 0.0)
        result = self._decode() if self._seqs else {}
        if self._prefilling:
            job = self._prefilling[0]
            chunks = self._prefill(job)
            if chunks is not None:
                result[job.seq.key] = chunks
        return result

    def _decode(self) -> dict[Hashable, list[Chunk]]:
        if self.spec is not None and len(self._seqs) == 1 and not self._prefilling:
            return self.spec.decode(self, self._seqs[0])
        return self._decode_plain()

    def _decode_plain(self) -> dict[Hashable, list[Chunk]]:
        seqs = self._seqs
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
        jobs = [p for p in self._prefilling if p.seq.key == key]
        for p in jobs:
            self._prefilling.remove(p)
        return bool(idx or jobs)

    def clear(self) -> None:
        """Drop every sequence at once (a probe's own batch when it is done): removing them
        one by one rebuilt the remaining cache each time (3 ms for 32 demo-bundle rows)."""
        self._seqs, self._cache, self._width = [], {}, 0
        self._prefilling.clear()

    # -- per sequence --------------------------------------------------------------------

    def _advance(self, s: _Seq, logits: np.ndarray) -> list[Chunk]:
        """Sample the next token of `s` from its logits row; the chunks that produced."""
        return self._emit(s, s.sampler(logits))

    def _emit(self, s: _Seq, token: int) -> list[Chunk]:
        """`token` is the next token of `s`; the chunks that produced."""
        s.tokens.append(token)
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
        if not self._seqs:  # its own cache, unpadded: no copy
            self._seqs, self._cache, self._width = [seq], cache, seq.length
            return
        engine = self.gen.engine
        self._join_rows([seq], {name: engine.to_host(t) for name, t in cache.items()})

    def _join_rows(self, seqs: list[_Seq], rows: dict[str, np.ndarray]) -> None:
        """Merge new sequences into the batch in one copy: `rows` are their caches on the
        host, [k, H, W, D] laid out as the batch's (a row's tokens first on the right-padded
        side, last on the left-padded one), W at least their longest."""
        engine = self.gen.engine
        need = max(s.length for s in seqs)  # columns beyond it are padding for every new row
        have = next(iter(rows.values())).shape[2]
        cols = slice(0, need) if self._right else slice(have - need, have)
        width = max(self._width, need) if self._seqs else need
        merged = {}
        for name, new in rows.items():
            parts = [_pad(engine.to_host(self._cache[name]), width, self._right)] \
                if self._seqs else []
            parts.append(_pad(new[:, :, cols, :], width, self._right))
            merged[name] = engine.from_host(np.ascontiguousarray(np.concatenate(parts, axis=0)))
        self._seqs.extend(seqs)
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
