"""Scheduler decisions with an injected clock and hand-built rates: exact numbers."""

from __future__ import annotations

import dataclasses

import pytest

from edge_runtime.errors import ConfigError
from edge_runtime.serving.scheduler import (
    Action,
    CloudState,
    Job,
    Pressure,
    Rates,
    Running,
    Scheduler,
    SchedulerConfig,
)

UP = CloudState(available=True, p99_s=0.5)
DOWN = CloudState(available=False, p99_s=0.5)
NONE = CloudState(available=False, p99_s=0.0, configured=False)
OK = Pressure()


def rates() -> Rates:
    # prefill 100 tok/s; a decode step takes 0.1 s alone, 0.15 s in pairs.
    return Rates(prefill_tokens_per_s=100.0, step_s={1: 0.1, 2: 0.15})


def job(key, now=0.0, deadline=10.0, prompt=10, max_tokens=11):
    return Job(
        key=key, arrival=now, deadline=now + deadline, prompt_tokens=prompt, max_tokens=max_tokens
    )


def sched(**kw) -> Scheduler:
    return Scheduler(SchedulerConfig(max_batch=kw.pop("max_batch", 1), safety=1.0, **kw), rates())


def test_idle_device_serves_locally_with_exact_estimate():
    s = sched()
    d = s.admit(job("a"), 0.0, UP, OK)
    # prefill 10 tokens = 0.1 s, then 10 more tokens at 0.1 s = 1.0 s.
    assert d.action is Action.LOCAL
    assert d.estimated_finish == pytest.approx(1.1)
    assert [j.key for j in s.queue] == ["a"]


def test_queue_wait_pushes_past_deadline_then_offloads():
    s = sched()
    assert s.admit(job("a"), 0.0, UP, OK).action is Action.LOCAL
    s.next_batch(1)
    # "b" must wait for "a" (11 tokens at 0.1 s), then its own 1.1 s: 2.2 s > deadline 2.0.
    d = s.admit(job("b", deadline=2.0), 0.0, UP, OK)
    assert d.action is Action.OFFLOAD
    assert "exceeds the deadline" in d.reason
    assert [j.key for j in s.queue] == []
    # With a looser deadline it stays local.
    assert s.admit(job("c", deadline=2.3), 0.0, UP, OK).action is Action.LOCAL


def test_batching_is_in_the_estimate():
    s = sched(max_batch=2)
    s.admit(job("a"), 0.0, UP, OK)
    s.next_batch(2)
    d = s.admit(job("b"), 0.0, UP, OK)
    # a: 11 left (running). b: prefill 0.1 s, then 10 steps at 0.15 s (batch of 2).
    assert d.estimated_finish == pytest.approx(0.1 + 10 * 0.15)


def test_chunked_prefill_is_in_the_estimate():
    s = sched(max_batch=2, prefill_chunk=4)
    s.admit(job("a"), 0.0, UP, OK)
    s.next_batch(2)
    d = s.admit(job("b"), 0.0, UP, OK)
    # b: prefill 0.1 s in all, spread over 3 chunks of <= 4 tokens, one after each of 3
    # decode steps (in which it holds a slot), then its 10 steps: 13 steps, the first 11
    # beside a (0.15 s), the last 2 alone (0.1 s). Whole-prompt prefill: 0.1 + 10 x 0.15.
    assert d.estimated_finish == pytest.approx(0.1 + 11 * 0.15 + 2 * 0.1)


def test_reject_codes_depend_on_the_cloud():
    s = sched(max_queue=0)
    assert s.admit(job("a"), 0.0, NONE, OK).status == 429
    d = s.admit(job("b"), 0.0, DOWN, OK)
    assert (d.action, d.status) == (Action.REJECT, 503)
    assert "cloud path is down" in d.reason
    # The cloud is up but the deadline is shorter than its p99: refuse, do not gamble.
    d = s.admit(job("c", deadline=0.4), 0.0, UP, OK)
    assert (d.action, d.status) == (Action.REJECT, 429)
    # Nothing runs (capacity is there now), but 1.1 s alone exceeds its 0.4 s budget: a
    # retry cannot help (test_scheduler_estimates.py has the cases where it can).
    assert d.retry_after_s == 0.0 and d.should_retry is False


def test_pressure_sends_everything_away():
    s = sched()
    for p, word in [
        (Pressure(engine_errors=3), "engine failed"),
        (Pressure(memory=True), "memory"),
        (Pressure(thermal=True), "thermal"),
    ]:
        d = s.admit(job("x"), 0.0, UP, p)
        assert d.action is Action.OFFLOAD and word in d.reason
    assert s.admit(job("y"), 0.0, UP, Pressure(engine_errors=2)).action is Action.LOCAL


def test_review_moves_late_queued_jobs_out_in_time():
    s = sched()
    s.admit(job("a", max_tokens=11), 0.0, UP, OK)
    s.next_batch(1)
    assert s.admit(job("b", deadline=2.5), 0.0, UP, OK).action is Action.LOCAL
    assert s.review(0.0, UP, OK) == []
    # "a" ran slower than estimated: at t=1.5 it still has 6 tokens to go.
    s.progressed("a", 5)
    out = s.review(1.5, UP, OK)
    assert [(j.key, d.action) for j, d in out] == [("b", Action.OFFLOAD)]
    assert s.queue == []


def test_earliest_deadline_first_and_cancel():
    s = sched()
    s.admit(job("late", deadline=30.0), 0.0, UP, OK)
    # An urgent job does not wait behind one that is due later.
    d = s.admit(job("urgent", deadline=1.2), 0.0, UP, OK)
    assert d.action is Action.LOCAL
    assert [j.key for j in s.queue] == ["urgent", "late"]
    assert [j.key for j in s.next_batch(1)] == ["urgent"]
    s.finished("urgent")
    assert s.cancel("late") and not s.cancel("late")
    assert s.queue == [] and s.running == {}


def test_rates_learn_and_extrapolate():
    r = Rates(prefill_tokens_per_s=100.0, step_s={1: 0.1}, alpha=0.5)
    r.seed({1: 0.1}, 100.0)
    r.observe_step(1, 0.2)
    assert r.step_time(1) == pytest.approx(0.15)  # mean of {0.1, 0.2}
    assert r.step_time(4) == pytest.approx(0.6)  # linear from batch 1, pessimistic
    r.observe_prefill(100, 0.5)
    assert r.prefill_tokens_per_s == pytest.approx(150.0)
    with pytest.raises(ConfigError, match=r"scheduler\.max_batch must be >= 1, got 0"):
        SchedulerConfig(max_batch=0)


# -- the 1x failure: jobs admitted into a half-empty batch, slowed by those admitted after ---


def run_engine(s: Scheduler, arrivals: list[Job], cloud: CloudState = UP) -> dict:
    """A discrete-event stand-in for serving.LocalWorker's loop, driven by the scheduler with
    the same hand-built rates as its own (so any miss is the policy's, not the rates'):
    admit on arrival, start what next_batch() gives (prefill pauses decoding and yields the
    first token), one decode step at a time, review() between steps, and a running job
    ended at its deadline as serving/engine_loop.py does. Returns what happened to every job."""
    out: dict = {}
    pending = sorted(arrivals, key=lambda j: j.arrival)
    jobs = {j.key: j for j in arrivals}
    active: dict = {}
    t = 0.0
    while pending or active or s.queue:
        while pending and pending[0].arrival <= t:
            j = pending.pop(0)
            d = s.admit(j, t, cloud, OK)
            if d.action is not Action.LOCAL:
                out[j.key] = d.action.value
        for j, d in s.review(t, cloud, OK):
            out[j.key] = d.action.value
        for j in s.next_batch(s.config.max_batch - len(active), t):
            t += s.rates.prefill_time(j.prompt_tokens)
            active[j.key] = j.max_tokens - 1
        if not active:
            if pending:
                t = max(t, pending[0].arrival)
            continue
        t += s.rates.step_time(len(active))
        for key in list(active):
            active[key] -= 1
            s.progressed(key)
            if active[key] == 0 or t >= jobs[key].deadline:
                out[key] = "late" if t > jobs[key].deadline else "done"
                del active[key]
                s.finished(key)
    return out


def test_newcomers_cannot_push_an_admitted_long_request_past_its_deadline():
    """The benchmark's 1x case in miniature. A 96-token request arrives at an idle moment:
    alone it needs 0.97 s of its 1.5 s budget, so it is served locally. Short requests then
    keep arriving; each on its own fits easily (≤ 0.4 s), but every one that joins pauses the
    long one for a prefill and makes each of its steps slower (step time grows with the
    batch: 10 → 22 ms). Judged only by their own finish they join, and the long request is
    still running at its deadline (checked: this test fails without Scheduler._would_delay).
    The scheduler must also keep its earlier promises."""
    r = Rates(prefill_tokens_per_s=1000.0, step_s={1: 0.010, 2: 0.014, 3: 0.018, 4: 0.022})
    s = Scheduler(SchedulerConfig(max_batch=4, safety=1.0), r)
    long = Job("long", 0.0, 1.5, prompt_tokens=20, max_tokens=96)
    shorts = [Job(f"s{i}", 0.02 + 0.04 * i, 0.02 + 0.04 * i + 1.5, 20, 16) for i in range(40)]
    out = run_engine(s, [long, *shorts])
    assert out["long"] == "done"
    local = [k for k, v in out.items() if v in ("done", "late")]
    assert [k for k in local if out[k] == "late"] == []
    assert len(local) > 10, "the rule should refuse only what would do harm"
    assert "offload" in out.values()


def test_a_newcomer_with_time_to_spare_waits_instead_of_being_refused():
    """bench_deadlines' refusals in miniature: three requests due in 0.45 s decode together
    (0.40 s); a fourth with a 2 s budget would slow every step (18 → 22 ms) and push them past
    their deadlines. It used to be sent away (offloaded here; refused without a cloud) though
    it needs 0.44 s alone. Now it waits for them and starts when they are done."""
    r = Rates(prefill_tokens_per_s=1000.0, step_s={1: 0.010, 2: 0.014, 3: 0.018, 4: 0.022})
    s = Scheduler(SchedulerConfig(max_batch=4, safety=1.0), r)
    tight = [Job(f"t{i}", 0.0, 0.45, prompt_tokens=20, max_tokens=20) for i in range(3)]
    patient = Job("patient", 0.001, 2.001, prompt_tokens=20, max_tokens=20)
    out = run_engine(s, [*tight, patient])
    assert out == {"t0": "done", "t1": "done", "t2": "done", "patient": "done"}
    # The same arrivals with a budget it cannot wait out: still sent away, nobody late.
    s = Scheduler(SchedulerConfig(max_batch=4, safety=1.0), r)
    hasty = dataclasses.replace(patient, deadline=0.6)
    out = run_engine(s, [*tight, hasty])
    assert out == {"t0": "done", "t1": "done", "t2": "done", "patient": "offload"}


def test_a_running_job_holds_its_slot_until_its_deadline_at_most():
    s = sched(max_batch=1)
    # "a" runs (admitted when steps were faster); 100 tokens to go, due at 0.5 s. It would
    # take 10 s more, but the engine ends it at 0.5 s: "b" starts then.
    s.running["a"] = Running(remaining=100, deadline=0.5)
    d = s.admit(job("b", deadline=2.0), 0.0, UP, OK)
    assert d.action is Action.LOCAL
    assert d.estimated_finish == pytest.approx(0.5 + 1.1)


def test_cloud_p99_is_read_for_the_request_s_generation_length():
    cloud = CloudState(available=True, p99_s=9.0, p99_by_tokens=((16, 0.3), (64, 1.2)))
    assert cloud.p99_for(8) == 0.3 and cloud.p99_for(16) == 0.3
    assert cloud.p99_for(17) == 1.2  # the next longer bucket: pessimistic
    assert cloud.p99_for(128) == pytest.approx(2.4)  # beyond the longest: linear in tokens
    assert CloudState(available=True, p99_s=9.0).p99_for(8) == 9.0  # nothing measured
    s = sched(max_queue=0)
    # 1 s left: enough for a 16-token answer (p99 0.3 s), not for a 64-token one (1.2 s).
    assert s.admit(job("short", deadline=1.0, max_tokens=16), 0.0, cloud, OK).action \
        is Action.OFFLOAD
    d = s.admit(job("long", deadline=1.0, max_tokens=64), 0.0, cloud, OK)
    assert (d.action, d.status) == (Action.REJECT, 429)
    assert "p99 1.20s at 64 tokens" in d.reason


def test_a_prefill_chunk_riding_along_a_step_is_not_step_time():
    r = Rates(prefill_tokens_per_s=100.0, step_s={2: 0.1}, alpha=1.0)
    r.observe_call(2, 0.5, (128, 0.4))  # a 0.5 s step() of which 0.4 s prefilled 128 tokens
    assert r.step_s[2] == pytest.approx(0.1) and r.prefill_tokens_per_s == pytest.approx(320)
    r.observe_call(0, 0.0, (64, 0.1))  # add(): prefill only (640 tokens/s; mean of two)
    assert r.step_s == {2: pytest.approx(0.1)} and r.prefill_tokens_per_s == pytest.approx(480)
    r.observe_call(2, 0.2, (0, 0.0))  # a plain step
    assert r.step_s[2] == pytest.approx(0.15) and r.prefill_tokens_per_s == pytest.approx(480)


def test_prefill_waits():
    from edge_runtime.serving.scheduler import prefill_waits

    assert [prefill_waits(n, 4) for n in (1, 4, 5, 8, 9)] == [0, 0, 2, 2, 3]
    assert prefill_waits(1000, 0) == 0  # chunking off
