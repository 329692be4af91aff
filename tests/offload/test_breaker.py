"""The circuit breaker's transitions, exactly, on a fake clock."""

from __future__ import annotations

import pytest

from edge_runtime.offload.breaker import BreakerConfig, CircuitBreaker, State


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def make(**kw: float) -> tuple[CircuitBreaker, Clock]:
    clock = Clock()
    cfg = BreakerConfig(**{"failure_rate": 0.5, "window_s": 10.0, "min_requests": 4,
                           "open_s": 5.0, "probes": 1, **kw})  # type: ignore[arg-type]
    return CircuitBreaker(cfg, clock), clock


def test_stays_closed_below_min_requests_even_if_all_fail() -> None:
    b, _ = make()
    for _ in range(3):
        assert b.allow()
        b.record_failure()
    assert b.state is State.CLOSED


def test_opens_exactly_at_the_failure_rate_threshold() -> None:
    b, _ = make()
    b.record_success()
    b.record_success()
    b.record_failure()
    assert b.state is State.CLOSED  # 1/3, and fewer than min_requests
    b.record_failure()  # 2/4 = 0.5 >= 0.5 with 4 outcomes
    assert b.state is State.OPEN
    assert not b.allow() and not b.available()


def test_below_threshold_stays_closed() -> None:
    b, _ = make()
    for ok in (True, True, True, False, True, False):  # 2/6 < 0.5
        (b.record_success if ok else b.record_failure)()
    assert b.state is State.CLOSED
    assert b.failure_rate() == pytest.approx(2 / 6)


def test_old_outcomes_leave_the_time_window() -> None:
    b, clock = make()
    for _ in range(3):
        b.record_failure()
    clock.t += 10.5  # those three are now older than window_s
    b.record_failure()
    assert b.state is State.CLOSED
    assert b.failure_rate() == 1.0  # one outcome left in the window


def test_count_cap_of_the_window() -> None:
    # 4 successes then 2 failures: 2/6 uncapped (closed), but the cap keeps S S F F = 1/2.
    capped, _ = make(window_max=4)
    uncapped, _ = make(window_max=100)
    for b in (capped, uncapped):
        for ok in (True, True, True, True, False, False):
            (b.record_success if ok else b.record_failure)()
    assert capped.state is State.OPEN
    assert uncapped.state is State.CLOSED


def test_open_then_half_open_after_open_s_then_close_on_probe_success() -> None:
    b, clock = make()
    b.trip()
    assert b.state is State.OPEN
    clock.t += 4.999
    assert not b.available()
    clock.t += 0.001
    assert b.state is State.HALF_OPEN
    assert b.available()
    assert b.allow()  # the probe
    assert not b.available() and not b.allow()  # probes=1: nobody else meanwhile
    b.record_success()
    assert b.state is State.CLOSED
    assert b.failure_rate() == 0.0  # a fresh window
    assert [s for _, s in b.transitions] == [State.OPEN, State.HALF_OPEN, State.CLOSED]


def test_probe_failure_reopens_for_a_full_interval() -> None:
    b, clock = make(probes=2)
    b.trip()
    clock.t += 5.0
    assert b.allow() and b.allow() and not b.allow()
    b.record_failure()
    assert b.state is State.OPEN
    clock.t += 4.9
    assert b.state is State.OPEN
    clock.t += 0.1
    assert b.state is State.HALF_OPEN


def test_release_frees_a_probe_slot_without_a_verdict() -> None:
    b, clock = make()
    b.trip()
    clock.t += 5.0
    assert b.allow()
    b.release()
    assert b.state is State.HALF_OPEN and b.allow()


def test_late_outcomes_while_open_change_nothing() -> None:
    b, clock = make()
    b.trip()
    b.record_success()
    b.record_failure()
    assert b.state is State.OPEN
    clock.t += 5.0
    assert b.state is State.HALF_OPEN


def test_trip_while_open_restarts_the_interval() -> None:
    b, clock = make()
    b.trip()
    clock.t += 4.0
    b.trip()
    clock.t += 4.0
    assert b.state is State.OPEN
    clock.t += 1.0
    assert b.state is State.HALF_OPEN


def test_probe_now_skips_the_rest_of_the_open_interval() -> None:
    b, clock = make()
    b.trip()
    clock.t += 0.5
    b.probe_now()  # the connection is back
    assert b.state is State.HALF_OPEN and b.allow() and not b.allow()
    b.record_failure()  # the probe failed: a full interval again
    assert b.state is State.OPEN
    clock.t += 4.9
    assert b.state is State.OPEN
    b.record_success()  # a late answer changes nothing while open
    b.probe_now()
    assert b.allow()
    b.record_success()
    assert b.state is State.CLOSED
    b.probe_now()  # closed: no-op
    assert b.state is State.CLOSED


@pytest.mark.parametrize("kw", [{"failure_rate": 0.0}, {"failure_rate": 1.5}, {"probes": 0},
                                {"min_requests": 0}, {"window_s": 0.0}])
def test_bad_config(kw: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        BreakerConfig(**kw)  # type: ignore[arg-type]
