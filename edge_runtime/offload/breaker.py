"""A circuit breaker: a pure state machine over outcomes and an injected clock.

    closed ──failure rate ≥ threshold over the window (≥ min_requests)──▶ open
    open ──open_s elapsed──▶ half-open ──a probe succeeds──▶ closed (window cleared)
                                 └──────a probe fails────▶ open (for open_s again)

While open, the cloud costs one fast decision (`allow()` is False) instead of a timeout per
request. Half-open lets `probes` requests through at once and no more, so a cloud that is
still down is tested by a few requests, not flooded. `trip()` opens at once for failures that
need no statistics (the broker connection dropped), and `probe_now()` lets probes through
as soon as that connection is back. No I/O, no threads: the caller serializes
calls (offload/client.py holds a lock) and tests drive it with a fake clock.
"""

from __future__ import annotations

import collections
import enum
import time
from collections.abc import Callable
from dataclasses import dataclass


class State(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass(frozen=True)
class BreakerConfig:
    failure_rate: float = 0.5
    """Open when at least this share of the outcomes in the window are failures."""
    window_s: float = 30.0
    """Outcomes older than this are forgotten (a time-based sliding window)."""
    window_max: int = 100
    """And at most this many recent outcomes are kept (a count-based cap)."""
    min_requests: int = 5
    """No decision on fewer outcomes than this: one early failure must not open it."""
    open_s: float = 5.0
    """How long the breaker stays open before it lets probes through."""
    probes: int = 1
    """Requests allowed at once while half-open."""

    def __post_init__(self) -> None:
        if not 0.0 < self.failure_rate <= 1.0:
            raise ValueError(f"failure_rate must be in (0, 1], got {self.failure_rate}")
        if self.window_s <= 0 or self.open_s < 0:
            raise ValueError("window_s must be > 0 and open_s >= 0")
        if self.window_max < 1 or self.min_requests < 1 or self.probes < 1:
            raise ValueError("window_max, min_requests and probes must be >= 1")


class CircuitBreaker:
    def __init__(
        self, config: BreakerConfig | None = None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.config = config or BreakerConfig()
        self._clock = clock
        self._state = State.CLOSED
        self._outcomes: collections.deque[tuple[float, bool]] = collections.deque()
        self._opened_at = 0.0
        self._probes_out = 0
        self.transitions: collections.deque[tuple[float, State]] = collections.deque(maxlen=64)
        """(time, new state) of the recent changes, for metrics, logs and tests."""

    @property
    def state(self) -> State:
        """The current state; an open breaker whose interval passed reads as half-open."""
        if self._state is State.OPEN and self._clock() >= self._opened_at + self.config.open_s:
            self._set(State.HALF_OPEN)
        return self._state

    def available(self) -> bool:
        """Would `allow()` say yes now? Does not take a probe slot."""
        state = self.state
        if state is State.HALF_OPEN:
            return self._probes_out < self.config.probes
        return state is State.CLOSED

    def allow(self) -> bool:
        """Admit one request; in half-open, this takes one of the probe slots."""
        if not self.available():
            return False
        if self._state is State.HALF_OPEN:
            self._probes_out += 1
        return True

    def record_success(self) -> None:
        if self._state is State.HALF_OPEN:
            self._close()
        elif self._state is State.CLOSED:
            self._record(True)
        # Open: a late answer to a request admitted before it opened changes nothing.

    def record_failure(self) -> None:
        if self._state is State.HALF_OPEN:
            self._open()
        elif self._state is State.CLOSED:
            self._record(False)
            if self._should_open():
                self._open()

    def release(self) -> None:
        """An admitted request ended with no verdict (its client left): free its probe slot."""
        if self._state is State.HALF_OPEN and self._probes_out > 0:
            self._probes_out -= 1

    def trip(self) -> None:
        """Open now, whatever the window says (the connection to the broker dropped)."""
        if self._state is not State.OPEN:
            self._open()
        else:
            self._opened_at = self._clock()

    def probe_now(self) -> None:
        """Open → half-open at once: what tripped it is known to be over (the connection to
        the broker is back), so probes need not wait out `open_s`. Other states: no-op."""
        if self._state is State.OPEN:
            self._probes_out = 0
            self._set(State.HALF_OPEN)

    def failure_rate(self) -> float:
        self._expire()
        if not self._outcomes:
            return 0.0
        return sum(1 for _, ok in self._outcomes if not ok) / len(self._outcomes)

    # -- internals ------------------------------------------------------------------------

    def _record(self, ok: bool) -> None:
        self._outcomes.append((self._clock(), ok))
        while len(self._outcomes) > self.config.window_max:
            self._outcomes.popleft()

    def _expire(self) -> None:
        horizon = self._clock() - self.config.window_s
        while self._outcomes and self._outcomes[0][0] < horizon:
            self._outcomes.popleft()

    def _should_open(self) -> bool:
        self._expire()
        return (
            len(self._outcomes) >= self.config.min_requests
            and self.failure_rate() >= self.config.failure_rate
        )

    def _open(self) -> None:
        self._opened_at = self._clock()
        self._probes_out = 0
        self._set(State.OPEN)

    def _close(self) -> None:
        # A fresh window: the failures that opened the breaker must not reopen it at once.
        self._outcomes.clear()
        self._probes_out = 0
        self._set(State.CLOSED)

    def _set(self, state: State) -> None:
        self._state = state
        self.transitions.append((self._clock(), state))
