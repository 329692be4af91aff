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

k adapts: the acceptance rate α (per drafted token, an exponential average over rounds),
the draft's step time and the verify pass's time are measured, and each round takes the k
that maximises the expected tokens per second, (1 − α^(k+1)) / (1 − α) / (k·t_draft +
t_verify(k) + the round's own overhead), against the plain decode rate; when no k is expected
to beat it by MIN_GAIN, speculation steps aside for a while (longer each time it still does
not pay) and then tries again with k = 1.
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
K_MAX = 8
"""Most tokens drafted per round: beyond it α^k is small for any draft worth shipping."""
_DECAY = 0.8
"""Weight of the past in the running averages (about the last five rounds count)."""
_PAUSE_STEPS = 32
_MAX_PAUSE = 2048
_ALPHA_PRIOR = 0.8
"""A new request's acceptance rate starts halfway between the last one's and this."""
MIN_GAIN = 1.1
"""Expected speed-up below which speculation pauses: the estimates come from a few noisy
rounds, and a round that loses costs more than a plain step that could have won."""
"""Plain steps before speculation is tried again after it stopped paying."""


class Speculator:
    """Drafts with `draft` and verifies with `target` for one sequence at a time."""

    def __init__(self, target: Generator, draft: Generator, k_max: int = K_MAX,
                 fixed_k: int | None = None) -> None:
        if fixed_k is not None and not 1 <= fixed_k <= k_max:
            raise ValueError(f"fixed_k must be in [1, {k_max}], got {fixed_k}")
        self.target, self.draft = target, draft
        self.k_max = k_max
        self.fixed_k = fixed_k
        """Draft exactly this many tokens per round, never pausing (tests, benchmarks)."""
        self.k = fixed_k or min(4, k_max)
        """Tokens the next round drafts."""
        # Running estimates (seconds, and accepted / examined drafts).
        self.alpha = 0.6
        self.t_draft = 0.0
        """One draft step (per drafted token)."""
        self.t_verify_base = 0.0
        """A verify pass, less its per-drafted-token part."""
        self.t_verify_per_token = 0.0
        self.t_overhead = 0.0
        """The rest of a round: accepting, emitting, trimming the caches (Python's share,
        which at small models is most of it)."""
        self.t_plain = 0.0
        """One plain decode step of the batch of one."""
        self.paused = 1
        """Plain steps left before speculation is tried again (the first one measures what
        a plain step costs)."""
        # The draft's cache: whose sequence, and how many of its tokens it holds.
        self._owner: _Seq | None = None
        self._cache: dict[str, DeviceTensor] = {}
        self._len = 0
        self._buf = (
            np.empty((1, 1, draft.vocab_size), dtype=draft.logits_dtype)
            if draft.last_token_logits else None
        )
        self.rounds = 0
        self._last_seq: _Seq | None = None
        self._pause = _PAUSE_STEPS
        self._plain_next = False
        """A greedy round stopped at a near tie: the next step is a one-token step."""
        self._timing: tuple[int, int, float, float, float] = (0, 0, 0.0, 0.0, 0.0)
        """The last round's k, accepted drafts, seconds per draft step (-1: none measured),
        verify seconds, drafting seconds (catch-up included)."""

    # -- the round -----------------------------------------------------------------------

    def decode(self, dec: BatchDecoder, s: _Seq) -> dict[Hashable, list[Chunk]]:
        """One step for the batch's only sequence: a speculative round or a plain step."""
        if s is not self._last_seq and s.stats.completion_tokens <= 1:
            # A new request: how well the draft follows depends on the text (repetitive code
            # is accepted almost whole, prose much less), so it gets its own early probe —
            # where the measured costs let speculation pay well (1.3x at an acceptance of 0.95).
            self._last_seq = s
            if self.rounds == 0 or self.best_k(0.95)[1] >= 1.3:
                self.paused, self._pause = min(self.paused, 1), _PAUSE_STEPS
                self.alpha = 0.5 * self.alpha + 0.5 * _ALPHA_PRIOR
        room = min(s.max_tokens - s.stats.completion_tokens - 1,
                   self.target.context_length - s.length - 1, self.k)
        if (self.paused > 0 and self.fixed_k is None) or room < 1 or self._plain_next:
            self.paused = max(0, self.paused - 1)
            self._plain_next = False
            t = time.perf_counter()
            out = dec._decode_plain()
            self.t_plain = _avg(self.t_plain, time.perf_counter() - t)
            return out
        t = time.perf_counter()
        chunks = self._round(dec, s, room)
        self._learn(time.perf_counter() - t)
        return {s.key: chunks}

    def _round(self, dec: BatchDecoder, s: _Seq, k: int) -> list[Chunk]:
        """Draft k tokens, verify them, emit what is kept; the round's timings go to
        self._timing for _learn."""
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

    # -- adapting k ----------------------------------------------------------------------

    def _learn(self, t_round: float) -> None:
        k, accepted, t_step, t_verify, t_drafting = self._timing
        self.rounds += 1
        examined = accepted + (1 if accepted < k else 0)
        self.alpha = _avg(self.alpha, accepted / examined, first=self.rounds == 1)
        if t_step >= 0:
            self.t_draft = _avg(self.t_draft, t_step)
        self.t_overhead = _avg(self.t_overhead, max(0.0, t_round - t_drafting - t_verify))
        # Verify cost ≈ base + per_token·k: the base is what one plain step costs; the rest
        # is what the k extra positions add.
        base = self.t_plain if self.t_plain > 0 else t_verify / (1 + 0.1 * k)
        self.t_verify_base = _avg(self.t_verify_base, base)
        self.t_verify_per_token = _avg(self.t_verify_per_token, max(0.0, t_verify - base) / k)
        if self.fixed_k is not None:
            return
        self.k, gain = self.best_k()
        if gain < MIN_GAIN:
            # Each probe that finds no gain doubles the pause: on a pair where speculation
            # never pays, probing costs a few percent at most.
            self.k, self.paused = 1, self._pause
            self._pause = min(2 * self._pause, _MAX_PAUSE)
        else:
            self._pause = _PAUSE_STEPS

    def best_k(self, alpha: float | None = None) -> tuple[int, float]:
        """(k with the most expected tokens per second, its speed-up over plain decoding), at
        the measured acceptance rate or at `alpha`."""
        a = min(self.alpha if alpha is None else alpha, 0.999)
        plain = self.t_plain if self.t_plain > 0 else self.t_verify_base
        best, gain = 1, 0.0
        for k in range(1, self.k_max + 1):
            tokens = (1 - a ** (k + 1)) / (1 - a)
            cost = (k * self.t_draft + self.t_verify_base + k * self.t_verify_per_token
                    + self.t_overhead)
            g = tokens * plain / cost if cost > 0 else 0.0
            if g > gain:
                best, gain = k, g
        return best, gain


def _avg(old: float, new: float, first: bool = False) -> float:
    """Exponential average; a sample over 3x the average (a preempted step on a shared
    CPU) counts as 3x, so one outlier cannot switch speculation off for long."""
    if first or old == 0.0:
        return new
    return _DECAY * old + (1 - _DECAY) * min(new, 3 * old)


def _trim(gen: Generator, cache: dict[str, DeviceTensor], keep: int,
          width: int) -> dict[str, DeviceTensor]:
    """A batch-of-one cache cut to its first `keep` positions (no padding at batch 1, in
    either layout); unchanged when nothing is cut."""
    if keep >= width:
        return cache
    engine = gen.engine
    return {name: engine.from_host(np.ascontiguousarray(engine.to_host(t)[:, :, :keep, :]))
            for name, t in cache.items()}
