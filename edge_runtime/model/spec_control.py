"""How many tokens speculative decoding drafts per round, from what the rounds cost here.

A round drafting k tokens emits E(k) = (1 − α^(k+1)) / (1 − α) tokens on average (α: the
acceptance rate per drafted token) and costs k·t_draft + rest(k): k draft steps, then the
verify pass of k + 1 tokens with the round's own bookkeeping. A plain step emits one token in
t_plain. The controller takes the k with the largest speed-up E(k)·t_plain / round(k), or no
speculation when none beats a plain step by MIN_GAIN.

rest(k) is measured for each k separately (the median of its last few rounds: one preempted
step or a first pass at a new shape cannot move it), because its shape differs by device: on
two CPU cores a pass over k + 1 tokens costs about (1 + k/4) plain steps, on a launch-bound
GPU about one step whatever k, and not even monotonically (an H100: k = 2 1.08, k = 4 0.88
steps). A k not measured yet is estimated from its measured neighbours (between two: linear;
beyond the largest: its slope, never falling), so one measured k does not decide the others;
every EXPLORE_EVERY rounds a plain step or a neighbour of the chosen k is measured again, so
an estimate that was wrong, or has gone stale, gets corrected.

Pure arithmetic on the seconds it is given: tests drive it with injected cost models.
"""

from __future__ import annotations

import statistics
from collections import deque

K_MAX = 8
"""Most tokens drafted per round: beyond it α^k is small for any draft worth shipping."""
MIN_GAIN = 1.05
"""Expected speed-up below which speculation pauses: a losing round costs more than the
plain step that could have run, and the estimates are a few rounds' medians."""
WINDOW = 9
"""Samples kept per measured quantity (their median is the estimate)."""
EXPLORE_EVERY = 8
"""Rounds between re-measurements of a neighbour of the chosen k."""
_DECAY = 0.9
"""Weight of the past in the acceptance rate's sums (about the last ten rounds count)."""
_ALPHA_PRIOR = 0.8
"""A new request's acceptance rate starts halfway between the last one's and this."""
_PLAIN_FIRST = 3
"""Plain steps before the first round: a plain step's cost is what every k is judged by."""
_CONFIRM = 3
"""Rounds at a k before its cost can pause speculation."""
_PAUSE_STEPS = 32
"""Plain steps before speculation is tried again after it stopped paying."""
_MAX_PAUSE = 2048


class KController:
    """Chooses each round's k (or a pause) from measured acceptance and costs."""

    def __init__(self, k_max: int = K_MAX, fixed_k: int | None = None) -> None:
        if fixed_k is not None and not 1 <= fixed_k <= k_max:
            raise ValueError(f"fixed_k must be in [1, {k_max}], got {fixed_k}")
        self.k_max = k_max
        self.fixed_k = fixed_k
        """Draft exactly this many tokens per round, never pausing (tests, benchmarks)."""
        self.k = fixed_k or min(4, k_max)
        """Tokens the next round drafts."""
        self._accepted, self._examined = 0.6, 1.0  # a prior worth one examined draft
        self.paused = 0 if fixed_k else _PLAIN_FIRST
        """Plain steps to run before the next round."""
        self.rounds = 0
        self._plain: deque[float] = deque(maxlen=WINDOW)
        self._draft: deque[float] = deque(maxlen=WINDOW)
        self._rest: dict[int, deque[float]] = {k: deque(maxlen=WINDOW)
                                               for k in range(1, k_max + 1)}
        self._pause = _PAUSE_STEPS
        self._explore = 0  # which is re-measured next: a plain step, k − 1, k + 1

    @property
    def alpha(self) -> float:
        """Acceptance rate per examined draft: accepted over examined drafts, both summed
        with decaying weights (a ratio of sums, not an average of each round's ratio, which
        one unlucky round of k = 4 would halve)."""
        return self._accepted / self._examined

    @alpha.setter
    def alpha(self, value: float) -> None:
        self._examined = max(min(self._examined, 4.0), 1.0)
        self._accepted = value * self._examined

    # -- what the decoder reports ----------------------------------------------------------

    def plain_step(self, seconds: float) -> None:
        """A plain decode step of the batch of one took `seconds`."""
        self._plain.append(seconds)
        self.paused = max(0, self.paused - 1)

    def new_request(self) -> None:
        """A new sequence: acceptance depends on the text (repetitive code is accepted almost
        whole, prose much less), so it gets its own early probe where the measured costs let
        speculation pay well (1.3x at an acceptance of 0.95)."""
        if self.fixed_k is not None:
            return
        if self.rounds and self.best_k(0.95)[1] >= 1.3:
            self.paused, self._pause = min(self.paused, 1), _PAUSE_STEPS
        self.alpha = 0.5 * self.alpha + 0.5 * _ALPHA_PRIOR

    def round_done(self, k: int, accepted: int, t_draft_step: float, t_rest: float) -> None:
        """A round drafted k tokens and kept `accepted`; a draft step took `t_draft_step`
        seconds (negative: none measured, e.g. a catch-up), verifying and the round's
        bookkeeping `t_rest`."""
        self.rounds += 1
        examined = accepted + (1 if accepted < k else 0)
        self._accepted = _DECAY * self._accepted + accepted
        self._examined = _DECAY * self._examined + examined
        if t_draft_step >= 0:
            self._draft.append(t_draft_step)
        self._rest[k].append(t_rest)
        if self.fixed_k is not None:
            return
        best, gain = self.best_k()
        if gain < MIN_GAIN and len(self._rest[best]) < _CONFIRM:
            # Too few rounds at that k to stop on (the first pass at a new shape can cost
            # several steps): measure it again first.
            self.k = best
            return
        if gain < MIN_GAIN:
            # Each probe that finds no gain doubles the pause: on a pair where speculation
            # never pays, probing costs a few percent at most.
            self.k, self.paused = best, self._pause
            self._pause = min(2 * self._pause, _MAX_PAUSE)
            return
        self._pause = _PAUSE_STEPS
        self.k = best
        if self.rounds % EXPLORE_EVERY == 0:
            # Re-measure, in turn, a plain step (what every k is judged by), the k below
            # and the k above: a stale or unlucky estimate cannot hold the choice for long.
            self._explore = (self._explore + 1) % 3
            near = best + (0, -1, 1)[self._explore]
            if near == best:
                self.paused = 1
            elif 1 <= near <= self.k_max:
                self.k = near

    # -- the cost model --------------------------------------------------------------------

    def costs(self) -> tuple[float, float, list[float]]:
        """(a plain step, a draft step, rest(k) for k = 0 … k_max) in seconds; rest(0) is
        the plain step. A k measured fewer than _CONFIRM times is estimated from the
        confirmed ones, or from its own samples where they are lower: optimism that gets a
        k whose first pass was slow measured again, rather than written off."""
        plain = _median(self._plain) if self._plain else 0.0
        draft = _median(self._draft) if self._draft else 0.0
        known = {k: _median(v) for k, v in self._rest.items() if len(v) >= _CONFIRM}
        if plain > 0 or not known:
            known[0] = plain
        else:  # no plain step measured (a fixed k): a pass over one token is the nearest
            known[0] = known[min(known)]
        rest = [_between(known, k) for k in range(self.k_max + 1)]
        for k, v in self._rest.items():
            if 0 < len(v) < _CONFIRM:
                rest[k] = min(rest[k], _median(v))
        return plain, draft, rest

    def best_k(self, alpha: float | None = None) -> tuple[int, float]:
        """(k with the most expected tokens per second, its expected speed-up over plain
        decoding), at the measured acceptance rate or at `alpha`."""
        a = min(self.alpha if alpha is None else alpha, 0.999)
        plain, draft, rest = self.costs()
        best, gain = 1, 0.0
        for k in range(1, self.k_max + 1):
            cost = k * draft + rest[k]
            g = expected_tokens(a, k) * plain / cost if cost > 0 else 0.0
            if g > gain:
                best, gain = k, g
        return best, gain


def expected_tokens(alpha: float, k: int) -> float:
    """Tokens a round drafting k emits on average at acceptance rate α (the accepted
    drafts, then the target's own token)."""
    if alpha >= 1.0:
        return float(k + 1)
    return (1 - alpha ** (k + 1)) / (1 - alpha)


def _median(xs: deque[float]) -> float:
    """The lower median: timings err upwards (preemption, a first pass at a shape), so of
    two samples the smaller is the better guess."""
    return statistics.median_low(xs)


def _between(known: dict[int, float], k: int) -> float:
    """rest(k) from the measured points: itself, linear between its neighbours, or beyond
    the largest at the last slope (never falling: a GPU's dip does not extend)."""
    if k in known:
        return known[k]
    xs = sorted(known)
    below = max(x for x in xs if x < k)
    above = [x for x in xs if x > k]
    if above:
        hi = above[0]
        return known[below] + (k - below) / (hi - below) * (known[hi] - known[below])
    lower = [x for x in xs if x < below]
    slope = 0.0
    if lower:
        slope = max(0.0, (known[below] - known[lower[-1]]) / (below - lower[-1]))
    return known[below] + slope * (k - below)
