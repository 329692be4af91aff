"""What a request costs here, end to end, as the scheduler's estimates need it.

    estimate(request) = per_request_s                    hand-off, wake-up, last delivery
                      + prompt_tokens / prefill rate     (prefill pauses the batch)
                      + Σ steps (step_s[b] + b · per_token_s)
                      + per_concurrent_s for each other request in the daemon with it

- `step_s[b]`: the engine's decode step for b rows (rate_probe.py at start-up, then every
  step the engine loop serves).
- `per_token_s`: the serving path's own work per generated token — the engine loop's
  bookkeeping, handing each chunk to the event loop, and the GIL it then waits for while the
  event loop detokenizes, formats and writes the stream. The start-up probe cannot see it (it
  measured 0.1 ms a step on the demo bundle while a served request cost 0.3-0.4 ms a token),
  so it is learned only from the engine loop's cycles while it serves real requests: wall
  time from one decode step to the next, less the engine's step and any prefill.
- `per_request_s`: what a completed request cost beyond what the rates above predicted for
  the steps and prefills it actually went through (engine_loop.py keeps that tally): the
  per-request fixed costs, and the error left in the model. Learned from requests that had
  the daemon to themselves.
- `per_concurrent_s`: what each other request in the daemon at the same time (queued,
  running, or arriving meanwhile) added on top: its HTTP parsing, chat template,
  tokenization, admission and response run on the event loop and hold the GIL the engine
  loop needs (in a burst of 15 requests on the demo bundle the last ones ran 30 ms past
  what steps and prefills explained; alone, 1 ms). The scheduler charges it for every pair
  of requests it has at once, so admitting a newcomer makes every admitted request a
  little later, and one that would push an admitted request past its deadline is refused.

Every quantity is a trimmed mean over a short window of recent samples (the extreme 1/32 on
each side dropped, at least one): one outlier (a page fault, a GC pause, a probe on a busy
CPU) counts for nothing, and a sustained change moves the estimate as it fills the window — a
few requests for `per_request_s`, a few dozen decode steps (one request) for step times. An
exponentially weighted mean did neither: one 1 s hiccup left the step estimate 40x too high
for dozens of steps, and while it was high every tight deadline was refused, so no step came
to correct it ("local estimate 1.49s exceeds the deadline 1.00s" for a 0.2 s request).
Not a median nor the middle half: on a shared CPU step times are skewed (demo bundle: median
0.17 ms, mean 0.3-0.6 ms, from one step in ten taking milliseconds), and what a request of
60 steps costs is their sum — an estimate at the median was 2-3x short.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

STEP_WINDOW = 64
"""Decode-step samples kept per batch size (about one request's worth of steps)."""
REQUEST_WINDOW = 8
"""Completed-request samples kept: a sustained change is followed within ~4 requests."""
REQUEST_MAX_AGE_S = 30.0
"""A completed-request sample older than this is forgotten when the engine is re-measured
(`expire`): requests are learned from only once admitted, so a cost learned too high would
otherwise refuse every request that could correct it (the issue's "local estimate 1.49s
exceeds the deadline 1.00s" for a 0.2 s request, which lasted until a restart)."""


def robust_mean(samples: deque[float] | list[float]) -> float:
    """The mean without the extreme 1/32 of samples on each side (at least one each): an
    outlier is dropped, the frequent tail of skewed noise is kept (it is what requests pay)."""
    xs = sorted(samples)
    n = len(xs)
    cut = -(-n // 32)
    middle = xs[cut : n - cut] or xs
    return sum(middle) / len(middle)


@dataclass(frozen=True)
class RateSnapshot:
    """The estimates at one moment, for /metrics (api/metrics.py)."""

    step_s: dict[int, float]
    """End to end per decode step by batch size: engine step + per-token serving work."""
    engine_step_s: dict[int, float]
    per_token_s: float
    per_request_s: float
    per_concurrent_s: float
    prefill_tokens_per_s: float
    requests_observed: int


@dataclass
class Rates:
    """Service rates: seeded by the probe, measured online from the requests served."""

    prefill_tokens_per_s: float = 500.0
    step_s: dict[int, float] = field(default_factory=lambda: {1: 0.05})
    """The engine's decode step time at each batch size seen so far."""
    alpha: float = 0.2
    """0 freezes every estimate (tests with hand-set rates); anything else learns."""
    per_token_s: float = 0.0
    """The serving path's work per generated token, beyond the engine step."""
    per_request_s: float = 0.0
    """Fixed cost per request beyond its prefill and steps (never below 0)."""
    _steps: dict[int, deque[float]] = field(default_factory=dict, repr=False)
    _prefill: deque[float] = field(default_factory=lambda: deque(maxlen=STEP_WINDOW),
                                   repr=False)
    _per_token: deque[float] = field(default_factory=lambda: deque(maxlen=STEP_WINDOW),
                                     repr=False)
    _per_request: deque[tuple[float, float]] = field(
        default_factory=lambda: deque(maxlen=REQUEST_WINDOW), repr=False)
    """(time.monotonic(), sample)"""
    per_concurrent_s: float = 0.0
    """What each other request in the daemon at the same time adds (never below 0)."""
    _per_concurrent: deque[tuple[float, float]] = field(
        default_factory=lambda: deque(maxlen=REQUEST_WINDOW), repr=False)
    requests_observed: int = 0
    """Completed requests measured so far (each one a `per_request_s` sample)."""

    @property
    def learning(self) -> bool:
        return self.alpha > 0

    # -- observations -----------------------------------------------------------------

    def seed(self, step_s: dict[int, float], prefill_tokens_per_s: float | None) -> None:
        """A probe's measurement (rate_probe.py): it replaces the step and prefill windows,
        so the next samples from served requests outvote it within half a window. The
        serving path's costs are not the probe's to measure and are kept."""
        for batch, seconds in step_s.items():
            self.step_s[batch] = seconds
            self._steps[batch] = deque([seconds], maxlen=STEP_WINDOW)
        if prefill_tokens_per_s is not None and prefill_tokens_per_s > 0:
            self.prefill_tokens_per_s = prefill_tokens_per_s
            self._prefill = deque([prefill_tokens_per_s], maxlen=STEP_WINDOW)

    def observe_prefill(self, tokens: int, seconds: float) -> None:
        if tokens > 0 and seconds > 0 and self.learning:
            self._prefill.append(tokens / seconds)
            self.prefill_tokens_per_s = robust_mean(self._prefill)

    def observe_step(self, batch: int, seconds: float) -> None:
        if batch > 0 and seconds > 0 and self.learning:
            window = self._steps.setdefault(batch, deque(maxlen=STEP_WINDOW))
            window.append(seconds)
            self.step_s[batch] = robust_mean(window)

    def observe_call(self, rows: int, seconds: float, prefill: tuple[int, float]) -> None:
        """One add() or step() of a decode batch that took `seconds`: the prefill it did
        (`DecodeBatch.prefill_work`: tokens, seconds; a chunk may ride along a step) counts
        as prefill, the rest as a decode step of `rows` sequences (none in add())."""
        tokens, prefill_s = prefill
        self.observe_prefill(tokens, prefill_s)
        self.observe_step(rows, seconds - prefill_s)

    def observe_overhead(self, rows: int, seconds: float) -> None:
        """The engine loop's cycle around one decode step of `rows` tokens took `seconds`
        more than the engine's step (and prefill) itself: the serving path's share."""
        if rows > 0 and self.learning:
            self._per_token.append(max(0.0, seconds) / rows)
            self.per_token_s = robust_mean(self._per_token)

    def observe_request(self, actual_s: float, modeled_s: float, others: int = 0,
                        now: float | None = None) -> None:
        """A completed request took `actual_s` (submit → last token handed over) where the
        rates predicted `modeled_s` for the prefills and steps it actually went through,
        with `others` other requests in the daemon at some time during it."""
        if not self.learning:
            return
        self.requests_observed += 1
        now = time.monotonic() if now is None else now
        residual = actual_s - modeled_s
        if others == 0:
            self._per_request.append((now, residual))
        else:
            self._per_concurrent.append((now, (residual - self.per_request_s) / others))
        self._request_costs()

    def expire(self, now: float | None = None) -> None:
        """Forget completed-request samples older than REQUEST_MAX_AGE_S (the engine loop
        calls it whenever it re-measures the engine, as it does when idle while refusing)."""
        now = time.monotonic() if now is None else now
        for window in (self._per_request, self._per_concurrent):
            while window and window[0][0] < now - REQUEST_MAX_AGE_S:
                window.popleft()
        self._request_costs()

    def _request_costs(self) -> None:
        self.per_request_s = max(0.0, robust_mean([v for _, v in self._per_request] or [0.0]))
        self.per_concurrent_s = max(
            0.0, robust_mean([v for _, v in self._per_concurrent] or [0.0]))

    def snapshot(self) -> RateSnapshot:
        sizes = sorted(self.step_s)
        return RateSnapshot(
            step_s={b: self.step_time(b) for b in sizes},
            engine_step_s={b: self.step_s[b] for b in sizes},
            per_token_s=self.per_token_s,
            per_request_s=self.per_request_s,
            per_concurrent_s=self.per_concurrent_s,
            prefill_tokens_per_s=self.prefill_tokens_per_s,
            requests_observed=self.requests_observed,
        )

    # -- estimates ----------------------------------------------------------------------

    def engine_step(self, batch: int) -> float:
        """The engine's step time at `batch`: between two measured sizes, the straight line
        through them (the probe measures powers of two); above the largest, that one scaled
        up linearly (pessimistic: weight reads are shared, so real steps grow slower)."""
        if batch in self.step_s:
            return self.step_s[batch]
        below = [b for b in self.step_s if b < batch]
        above = [b for b in self.step_s if b > batch]
        if below and above:
            lo, hi = max(below), min(above)
            f = (batch - lo) / (hi - lo)
            return self.step_s[lo] + f * (self.step_s[hi] - self.step_s[lo])
        base = max(below) if below else min(self.step_s)
        return self.step_s[base] * batch / base

    def step_time(self, batch: int) -> float:
        """One decode step of `batch` rows as a request lives it: the engine's step plus
        the serving path's work for each token it produces."""
        return self.engine_step(batch) + batch * self.per_token_s

    def prefill_time(self, tokens: int) -> float:
        return tokens / self.prefill_tokens_per_s
