"""Speculative decoding for a batch of one: a small draft model proposes k tokens, the
target verifies them in one pass over its cache, and the accepted prefix is kept.

    draft:  s.token ─▶ d1 ─▶ d2 … ─▶ dk          (k cheap one-token steps, q_i = P_draft)
    target: [s.token, d1 … dk] over the cache ─▶ p_1 … p_(k+1)   (one pass, like a prefill
            chunk; GraphSpec.logits_window makes a last-position graph return k + 1 rows)
    accept d_i with probability min(1, p_i(d_i) / q_i(d_i)); at the first rejection take a
    token from norm(max(0, p_i − q_i)) and stop; all k accepted: one more from p_(k+1)

That is the rejection rule of Leviathan et al. (2023) and Chen et al. (2023): every emitted
token is distributed exactly as the target's sampler would have drawn it, whatever the draft.
Greedy is its limit (p and q one-hot): keep the drafts the target's argmax agrees with, then
the target's argmax — the same tokens as plain greedy decoding, up to the engine's last bits:
a pass over several tokens and a one-token step round differently (int4 kernels, fused
attention), so a near tie is left to a one-token step (GREEDY_MARGIN), and a tie closer than
the keys and values a verify pass wrote differ by can still go the other way (seen on an
8-layer int4 model: margin 9e-4; docs/BENCHMARKS.md). Both caches are then cut back to the
accepted tokens (the rejected drafts' keys and values must not be attended to).

k adapts (spec_control.KController): the acceptance rate, the draft's step and each k's
verify pass are measured as the engine runs, and each round drafts the k with the most
expected tokens per second, or none when no k beats a plain step.
It runs only for a batch of one (BatchDecoder asks):
a wider batch already amortises the weights over its rows, and its rows would accept
different numbers of drafts. The draft catches up on whatever tokens its cache lacks (a
sequence that decoded in a batch, or a new one), so a sequence can move between plain and
speculative steps without changing its tokens.
"""

from __future__ import annotations

import time
from collections.abc import Hashable
from typing import TYPE_CHECKING

import numpy as np

from edge_runtime.model.spec_control import K_MAX, KController

if TYPE_CHECKING:  # batching.py imports this module; generator.py imports batching.py
    from edge_runtime.engines.protocol import DeviceTensor
    from edge_runtime.model.batching import BatchDecoder, _Seq
    from edge_runtime.model.generator import Generator
    from edge_runtime.model.stream import Chunk

GREEDY_MARGIN = 0.02
"""Greedy verification accepts the target's choice at a position only when it leads the
runner-up by this many logits. A pass over k + 1 tokens and a one-token step differ in the
last bits (int8 activation blocks and GroupQueryAttention take other kernel paths: up to
3e-3 logits on an 8-layer int4 model), so a nearer tie is decided by a one-token step, as
plain decoding decides it."""


class Speculator:
    """Drafts with `draft` and verifies with `target` for one sequence at a time."""

    def __init__(self, target: Generator, draft: Generator, k_max: int = K_MAX,
                 fixed_k: int | None = None) -> None:
        self.target, self.draft = target, draft
        self.control = KController(k_max, fixed_k)
        """Chooses each round's k from what the rounds cost (raises on a bad fixed_k)."""
        # The draft's cache: whose sequence, and how many of its tokens it holds.
        self._owner: _Seq | None = None
        self._cache: dict[str, DeviceTensor] = {}
        self._len = 0
        self._buf = (
            np.empty((1, 1, draft.vocab_size), dtype=draft.logits_dtype)
            if draft.last_token_logits else None
        )
        self._last_seq: _Seq | None = None
        self._plain_next = False
        """A greedy round stopped at a near tie: the next step is a one-token step."""
        self._timing: tuple[int, int, float, float, float] = (0, 0, 0.0, 0.0, 0.0)
        """The last round's k, accepted drafts, seconds per draft step (-1: none measured),
        verify seconds, drafting seconds (catch-up included)."""

    # -- the round -----------------------------------------------------------------------

    def decode(self, dec: BatchDecoder, s: _Seq) -> dict[Hashable, list[Chunk]]:
        """One step for the batch's only sequence: a speculative round or a plain step."""
        ctl = self.control
        if s is not self._last_seq and s.stats.completion_tokens <= 1:
            self._last_seq = s
            ctl.new_request()
        room = min(s.max_tokens - s.stats.completion_tokens - 1,
                   self.target.context_length - s.length - 1, ctl.k)
        if ctl.paused > 0 or room < 1 or self._plain_next:
            self._plain_next = False
            t = time.perf_counter()
            out = dec._decode_plain()
            ctl.plain_step(time.perf_counter() - t)
            return out
        t = time.perf_counter()
        chunks = self._round(dec, s, room)
        k, accepted, t_step, _, t_drafting = self._timing
        # What is not drafting is this k's cost: the verify pass, accepting, emitting and
        # trimming the caches (Python's share, which at small models is much of it).
        ctl.round_done(k, accepted, t_step, time.perf_counter() - t - t_drafting)
        return {s.key: chunks}

    @property
    def rounds(self) -> int:
        """Speculative rounds run so far."""
        return self.control.rounds

    def _round(self, dec: BatchDecoder, s: _Seq, k: int) -> list[Chunk]:
        """Draft k tokens, verify them, emit what is kept; the round's timings go to
        self._timing for decode."""
        target, draft, sampler = self.target, self.draft, s.sampler
        greedy = sampler.params.greedy
        rng = sampler.rng
        if self._owner is not s:  # another sequence's (or no) draft cache: start over
            self._owner, self._cache, self._len = s, draft.empty_cache(1), 0
        t0 = time.perf_counter()
        drafts: list[int] = []
        qs: list[np.ndarray] = []
        feed = s.tokens[self._len:]  # ends with s.token, the last sampled token
        t_catchup = 0.0
        for i in range(k):
            n = len(feed)
            if i == 1 and t_catchup < 0:  # the first step fed several tokens: catching up
                t_catchup = time.perf_counter() - t0
            elif i == 0 and n > 1:
                t_catchup = -1.0
            end = self._len + n
            logits, self._cache = draft.forward(
                np.asarray([feed], dtype=np.int64), draft.ones[:, :end],
                draft.positions[:, self._len:end], self._cache,
                out=self._buf if n == 1 else None)
            self._len = end
            row = logits[0, -1]
            if greedy:
                d = int(np.argmax(row))
            else:
                q = sampler.distribution(row)
                d = int(rng.choice(q.shape[0], p=q))
                qs.append(q)
            drafts.append(d)
            feed = [d]
        t1 = time.perf_counter()
        base = s.length
        width = base + k + 1
        ids = np.asarray([[s.token, *drafts]], dtype=np.int64)
        logits, cache = target.forward(ids, target.ones[:, :width],
                                       target.positions[:, base:width], dec._cache,
                                       window=k + 1)
        t2 = time.perf_counter()
        rows = logits[0]
        accepted, tokens = self._accept(sampler, greedy, rows, drafts, qs)

        # Keep the target's cache up to the last accepted draft (s.token, d1 … d_n; without
        # d_n after a near tie, which leaves d_n to be fed as the next step's token); the
        # draft's holds s.token, d1 … d_(k-1) at most.
        keep = base + len(tokens)
        if len(tokens) == accepted:  # greedy near tie: that position is decoded plainly
            self._plain_next = True
        dec._cache = _trim(target, cache, keep, width)
        dec._width = keep
        self._cache = _trim(draft, self._cache, min(self._len, keep), self._len)
        self._len = min(self._len, keep)
        st = s.stats
        st.draft_tokens += k
        st.accepted_tokens += accepted
        chunks: list[Chunk] = []
        for tok in tokens:
            s.length += 1
            chunks.extend(dec._emit(s, tok))
            if chunks and chunks[-1].finish_reason is not None:
                dec._drop([0])
                self._owner = None
                break
        if t_catchup < 0:  # k = 1 and it was a catch-up: no draft step measured
            t_catchup = t1 - t0
        # The draft's catch-up (a new sequence's prompt, or tokens decoded in a batch) is a
        # one-off per sequence: not a cost of the rounds to come.
        steps = k - (1 if t_catchup else 0)
        self._timing = (k, accepted, (t1 - t0 - t_catchup) / steps if steps else -1.0,
                        t2 - t1, t1 - t0)
        return chunks

    @staticmethod
    def _accept(sampler: object, greedy: bool, rows: np.ndarray, drafts: list[int],
                qs: list[np.ndarray]) -> tuple[int, list[int]]:
        """(drafts accepted, the tokens this round emits: those drafts and one more, or, for
        greedy, no more when the target's choice there is a near tie)."""
        from edge_runtime.model.sampling import Sampler

        assert isinstance(sampler, Sampler)
        out: list[int] = []
        if greedy:
            for i in range(len(drafts) + 1):
                row = rows[i]
                best = int(np.argmax(row))
                top2 = np.partition(row, -2)[-2:] if row.shape[0] > 1 else row
                if float(top2[-1] - top2[0]) < GREEDY_MARGIN:
                    # A near tie: the verify pass's numerics may pick otherwise than a
                    # one-token step would. Keep the drafts so far; the next step is plain.
                    return i, out
                out.append(best)
                if i == len(drafts) or best != drafts[i]:
                    return i, out
            raise AssertionError("unreachable")
        rng = sampler.rng
        for i, d in enumerate(drafts):
            p, q = sampler.distribution(rows[i]), qs[i]
            if rng.random() * q[d] < p[d]:  # u < p/q without dividing by a tiny q
                out.append(d)
                continue
            residual = np.maximum(p - q, 0.0)
            total = residual.sum()
            # total = 0 only when p = q (then d was accepted): p itself is then exact.
            probs = residual / total if total > 0 else p
            out.append(int(rng.choice(probs.shape[0], p=probs)))
            return i, out
        p = sampler.distribution(rows[len(drafts)])
        out.append(int(rng.choice(p.shape[0], p=p)))
        return len(drafts), out


def _trim(gen: Generator, cache: dict[str, DeviceTensor], keep: int,
          width: int) -> dict[str, DeviceTensor]:
    """A batch-of-one cache cut to its first `keep` positions (no padding at batch 1, in
    either layout); unchanged when nothing is cut."""
    if keep >= width:
        return cache
    engine = gen.engine
    return {name: engine.from_host(np.ascontiguousarray(engine.to_host(t)[:, :, :keep, :]))
            for name, t in cache.items()}
