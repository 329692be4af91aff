"""The cloud path's measured round trips.

    OffloadStream ends ─▶ RoundTrips.add(max_tokens, first chunk s, last chunk s)
    scheduler reads    ─▶ serving.cloud_view.cloud_state(): available? p99 publish → last
                          chunk, per generation-length bucket (p99_by_tokens), overall, or
                          the prior

A 16-token answer and a 512-token one have different p99s, so round trips are kept per
power-of-two bucket of max_tokens; timeouts count at the time they took (the successes alone
would make a cloud that times out look fast); and samples age out, so that a cloud that was
slow once is tried again. Pure, with the clock passed in: no MQTT here (offload/client.py).
"""

from __future__ import annotations

import collections
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class LatencyStats:
    """Round trips of recent successful offloads, from publish to first and to last chunk."""

    samples: int
    first_p50_s: float | None
    first_p99_s: float | None
    last_p50_s: float | None
    last_p99_s: float | None


class RoundTrips:
    """Recent round trips per generation-length bucket (thread-safe: fed on the MQTT side,
    read by the scheduler)."""

    def __init__(self, window: int, max_age_s: float, clock: Callable[[], float]) -> None:
        self._window = window
        self._max_age = max_age_s
        """Round trips older than this no longer count. The cloud's load changes, and an
        estimate that never ages would keep a cloud that once timed out out of use for good:
        nothing is offloaded, so no new sample could ever show it is fast again."""
        self._clock = clock
        self._lock = threading.Lock()
        self._by_bucket: dict[int, collections.deque[tuple[float, float, float]]] = {}
        """(when, first chunk s, last chunk s) per length_bucket."""

    def add(self, max_tokens: int, first_s: float, last_s: float) -> None:
        bucket = length_bucket(max_tokens)
        with self._lock:
            d = self._by_bucket.get(bucket)
            if d is None:
                d = self._by_bucket[bucket] = collections.deque(maxlen=self._window)
            d.append((self._clock(), first_s, last_s))

    def stats(self, max_tokens: int | None = None) -> LatencyStats:
        """All recent round trips, or those in the bucket of `max_tokens`."""
        since = self._clock() - self._max_age
        with self._lock:
            if max_tokens is None:
                samples = [x for d in self._by_bucket.values() for x in d]
            else:
                samples = list(self._by_bucket.get(length_bucket(max_tokens), ()))
        first = sorted(f for at, f, _ in samples if at >= since)
        last = sorted(t for at, _, t in samples if at >= since)
        return LatencyStats(
            len(last), _pct(first, 0.5), _pct(first, 0.99), _pct(last, 0.5), _pct(last, 0.99)
        )

    def p99_by_tokens(self, min_samples: int = 5) -> tuple[tuple[int, float], ...]:
        """(bucket's max_tokens, p99 publish → last chunk) for each bucket with at least
        `min_samples` recent round trips, ascending."""
        since = self._clock() - self._max_age
        with self._lock:
            buckets = {b: sorted(t for at, _, t in d if at >= since)
                       for b, d in self._by_bucket.items()}
        table = []
        for b, last in sorted(buckets.items()):
            p99 = _pct(last, 0.99)
            if b and len(last) >= min_samples and p99 is not None:  # b 0: length unknown
                table.append((b, p99))
        return tuple(table)


def length_bucket(max_tokens: int) -> int:
    """The generation-length bucket of a request: the next power of two, at least 16 (0 for
    an unknown length). Round trips are compared within a bucket."""
    if max_tokens <= 0:
        return 0
    return max(16, 1 << (max_tokens - 1).bit_length())


def _pct(sorted_values: list[float], q: float) -> float | None:
    """Nearest-rank percentile; None without samples (the scheduler decides what that means)."""
    if not sorted_values:
        return None
    return sorted_values[max(0, math.ceil(q * len(sorted_values)) - 1)]
