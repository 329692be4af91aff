"""The rollout controller and its abort rule, with hand-built acks, telemetry and clock."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from edge_runtime.errors import AbortRuleError, ConfigError, RolloutError
from edge_runtime.fleet.messages import Ack
from edge_runtime.rollout.abort_rules import AbortRule
from edge_runtime.rollout.controller import Controller, Send
from edge_runtime.rollout.plan import (
    RolloutRecord,
    RolloutSpec,
    command_id,
    parse_share,
    plan,
    share_count,
)

V1, V2 = "m-1-aaaaaaaaaaaa", "m-2-bbbbbbbbbbbb"
RULE = "error_rate>0.02 or ttft_p95_ms>800 or quality_drop>0.05"


# -- abort rule -----------------------------------------------------------------------------


def test_rule_trips_with_the_numbers() -> None:
    rule = AbortRule.parse(RULE)
    assert rule.metrics == {"error_rate", "ttft_p95_ms", "quality_drop"}
    ok = rule.evaluate({"error_rate": 0.01, "ttft_p95_ms": 300, "quality_drop": 0.0})
    assert not ok.tripped and not ok.missing
    bad = rule.evaluate({"error_rate": 0.031, "ttft_p95_ms": 900, "quality_drop": 0.0})
    assert bad.tripped and bad.reason == "error_rate=0.031>0.02, ttft_p95_ms=900>800"
    assert rule.evaluate({"error_rate": 0.5}).missing == ("quality_drop", "ttft_p95_ms")


def test_rule_precedence_parentheses_and_percent() -> None:
    rule = AbortRule.parse("error_rate >= 2% and (ttft_p95_ms>800 or tokens_per_s<10)")
    assert not rule.evaluate({"error_rate": 0.05, "ttft_p95_ms": 100, "tokens_per_s": 30}).tripped
    v = rule.evaluate({"error_rate": 0.02, "ttft_p95_ms": 100, "tokens_per_s": 5})
    assert v.tripped and v.reason == "error_rate=0.02>=0.02, tokens_per_s=5<10"
    # `and` binds tighter than `or`
    r2 = AbortRule.parse("error_rate>1 and quality<0.5 or ttft_p95_ms>1")
    assert r2.evaluate({"error_rate": 0, "quality": 1, "ttft_p95_ms": 2}).tripped


@pytest.mark.parametrize(("text", "token", "column"), [
    ("eror_rate>0.02", "eror_rate", 1),
    ("error_rate>0.02 or", "", 19),
    ("error_rate>>0.02", ">", 12),
    ("error_rate>0.02 && ttft_p95_ms>1", "&&", 17),
    ("__import__('os')>1", "'", 12),
    ("__import__>1", "__import__", 1),
    ("(error_rate>0.02", "", 17),
    ("error_rate 0.02", "0.02", 12),
    ("", "", 1),
])
def test_malformed_rules_name_the_token(text: str, token: str, column: int) -> None:
    with pytest.raises(AbortRuleError) as e:
        AbortRule.parse(text)
    assert (e.value.token, e.value.column) == (token, column)
    if token:
        assert repr(token) in str(e.value)
    assert isinstance(e.value, ConfigError)


# -- shares and the plan --------------------------------------------------------------------


def test_shares() -> None:
    assert [share_count(parse_share(s, "x"), 1000) for s in ("10%", "25%", "3", "0.05%")] == [
        100, 250, 3, 1]
    assert share_count("10%", 7) == 1 and share_count("50", 7) == 7
    for bad in ("0%", "150%", "0", "ten", "-1"):
        with pytest.raises(ConfigError, match=repr(bad)):
            parse_share(bad, "--canary")


def _spec(**kw: object) -> RolloutSpec:
    base: dict[str, object] = dict(group="lab", bundle="/b", sha256="0" * 64, signer="k",
                                   version=V2, canary="10%", batch="25%", abort_if=RULE,
                                   soak_s=10.0, ack_timeout_s=30.0, max_failures=0.1)
    base.update(kw)
    return RolloutSpec(**base)  # type: ignore[arg-type]


def _statuses(n: int) -> dict[str, dict[str, object]]:
    return {f"d{i:02d}": {"online": True, "bundle": V1, "groups": ["lab"]} for i in range(n)}


def test_plan_phases_skips_and_is_stable_per_id() -> None:
    st = _statuses(20)
    st["d03"]["online"] = False
    st["d04"]["bundle"] = V2
    st["x"] = {"online": True, "groups": ["other"]}
    devices = plan("r1", st, _spec())
    assert {d.device: d.reason for d in devices if d.state == "skipped"} == {
        "d03": "offline when the rollout started", "d04": f"already runs {V2}"}
    phases = [sum(1 for d in devices if d.phase == p) for p in range(5)]
    assert phases == [2, 5, 5, 5, 1]  # 18 targets: canary ceil(1.8), batches ceil(4.5)
    canary = sorted(d.device for d in devices if d.phase == 0)
    assert canary == sorted(d.device for d in plan("r1", st, _spec()) if d.phase == 0)
    assert canary != sorted(d.device for d in plan("r2", st, _spec()) if d.phase == 0) or \
        canary != sorted(d.device for d in plan("r3", st, _spec()) if d.phase == 0)
    with pytest.raises(RolloutError, match="no device announces group 'nope'"):
        plan("r1", st, _spec(group="nope"))


# -- the controller -------------------------------------------------------------------------


class Fleet:
    """Drives a Controller the way the driver does, with a hand-held clock."""

    def __init__(self, n: int = 10, **spec: object) -> None:
        s = _spec(**spec)
        devices = plan("r1", _statuses(n), s)
        self.record = RolloutRecord("r1", s, phases=1 + max(d.phase for d in devices))
        self.ctl = Controller(self.record, devices, AbortRule.parse(s.abort_if)
                              if s.abort_if else None)
        self.now = 1000.0
        self.sent: list[Send] = self.ctl.start(self.now)

    def phase(self, p: int) -> list[str]:
        return [d.device for d in self.ctl.devices.values() if d.phase == p]

    def ack(self, device: str, state: str, kind: str = "deploy", bundle: str | None = V2,
            ts: float | None = None) -> None:
        a = Ack(command_id("r1", kind, device), device, state, bundle=bundle,
                ts=self.now if ts is None else ts)
        self.sent += self.ctl.on_ack(a, self.now)

    def telemetry(self, device: str, **m: float) -> None:
        self.ctl.on_telemetry(device, {"device": device, "ts": self.now + 0.01, "runtime": m})

    def tick(self, dt: float = 0.0) -> None:
        self.now += dt
        self.sent += self.ctl.tick(self.now)

    def kinds(self) -> list[tuple[str, str]]:
        out = [(s.command.type, s.device) for s in self.sent]
        self.sent = []
        return out


def test_canary_then_batches_in_order() -> None:
    f = Fleet(10)
    assert f.kinds() == [("deploy", d) for d in f.phase(0)]
    for d in f.phase(1):  # devices still on the old bundle: the quality baseline
        f.telemetry(d, quality=0.92)
    assert f.ctl.take_changes().rollout is not None
    for p in range(f.record.phases):
        for d in f.phase(p):
            f.ack(d, "received")
            f.tick()
            assert f.kinds() == [], "nothing moves before every device of the phase is final"
            f.ack(d, "active")
        f.tick()
        assert f.ctl.r.step == "soak"
        for d in f.phase(p):
            f.ctl.on_telemetry(d, {"ts": 0.0, "runtime": {"error_rate": 0.5}})  # before switch
            f.telemetry(d, error_rate=0.01, ttft_p95_ms=300, quality=0.9)
        f.tick(9.9)
        assert f.kinds() == []
        f.tick(0.2)
        nxt = f.kinds()
        if p + 1 < f.record.phases:
            assert nxt == [("deploy", d) for d in f.phase(p + 1)]
    assert f.ctl.r.state == "completed" and f.ctl.finished
    kinds = [e.kind for e in f.ctl.take_changes().events]
    assert kinds.count("passed") == f.record.phases and kinds[-1] == "completed"


def test_abort_rolls_back_what_may_run_the_new_bundle() -> None:
    f = Fleet(20, canary="4")
    a, b, c, d = f.phase(0)
    f.kinds()
    f.ack(a, "active")
    f.ack(b, "active")
    f.ack(c, "rolled_back", bundle=V1)  # its own health check failed: a failure
    f.tick(29)
    assert f.ctl.r.step == "deploy"
    f.tick(1)  # d never answered within the ack timeout
    assert (f.ctl.devices[d].reason or "").startswith("no final ack within 30s")
    assert f.ctl.r.state == "aborting"
    assert f.ctl.r.reason == "canary: 2 of 4 devices failed or timed out (50.0% > max 10%)"
    # Active and timed-out devices get a rollback; the failed one never switched.
    assert sorted(f.kinds()) == sorted([("rollback", a), ("rollback", b), ("rollback", d)])
    f.ack(d, "active")  # d's deploy finally ran: its queued rollback follows it
    assert f.ctl.devices[d].state == "rolling_back"
    f.tick(30)
    assert f.ctl.r.state == "aborted"
    assert {f.ctl.devices[x].state for x in (a, b, d)} == {"rollback_timeout"}


def test_telemetry_trip_reason_quotes_numbers_and_rolls_back() -> None:
    f = Fleet(20, canary="4", max_failures=0.5)
    canary = f.phase(0)
    for i, dev in enumerate(f.phase(1)):  # the control group on the old bundle
        f.telemetry(dev, quality=0.90 + 0.01 * (i % 2))
    f.kinds()
    for dev in canary[:3]:
        f.ack(dev, "active")
    f.ack(canary[3], "rejected", bundle=V1)
    f.tick()
    for dev, rate in zip(canary[:3], (0.061, 0.016, 0.016), strict=True):
        f.telemetry(dev, error_rate=rate, ttft_p95_ms=300, quality=0.9)
    f.tick(10)
    assert f.ctl.r.state == "aborting"
    reason = f.ctl.r.reason or ""
    assert reason == ("canary after 10s soak, mean of 3 devices: error_rate=0.031>0.02 "
                      f"(worst: {canary[0]} error_rate=0.061)")
    assert sorted(f.kinds()) == sorted(("rollback", x) for x in canary[:3])
    f.ack(canary[0], "rolled_back", kind="rollback", bundle=V1)
    f.ack(canary[1], "rejected", kind="rollback", bundle=V1)  # never switched: fine
    f.tick()
    assert f.ctl.r.state == "aborting"
    f.ack(canary[2], "rolled_back", kind="rollback", bundle=V1)
    f.tick()
    assert f.ctl.r.state == "aborted"
    assert [f.ctl.devices[x].state for x in canary] == ["rolled_back"] * 3 + ["failed"]
    assert all(d.state == "pending" for d in f.ctl.devices.values() if d.phase >= 1)


def test_failure_share_and_missing_metrics_abort() -> None:
    f = Fleet(20, canary="4", max_failures=0.25)
    c = f.phase(0)
    for dev in c[:2]:
        f.ack(dev, "active")
    for dev in c[2:]:
        f.ack(dev, "rejected", bundle=V1)
    f.tick()
    assert f.ctl.r.state == "aborting"
    assert f.ctl.r.reason == "canary: 2 of 4 devices failed or timed out (50.0% > max 25%)"
    g = Fleet(20, canary="2")
    for dev in g.phase(0):
        g.ack(dev, "active")
    g.tick()
    g.tick(10)
    assert g.ctl.r.step == "soak", "waits for one post-switch sample per device"
    g.tick(30)  # soak + ack timeout: gives up waiting, and nothing measured the metrics
    assert g.ctl.r.state == "aborting"
    assert "cannot evaluate the abort rule, nothing measured error_rate, quality_drop, " \
        "ttft_p95_ms" in (g.ctl.r.reason or "")


def test_resume_resends_the_same_ids_and_operator_rollback() -> None:
    f = Fleet(10, canary="2")
    first = [s.command.id for s in f.sent]
    f.ack(f.phase(0)[0], "active")
    changes = f.ctl.take_changes()
    devices = list(f.ctl.devices.values())
    # A new controller from the persisted state (what resume does after a SIGKILL).
    again = Controller(changes.rollout or f.record, devices, AbortRule.parse(RULE))
    resent = again.start(2000.0)
    assert [s.command.id for s in resent] == first[1:]
    assert resent[0].expiry_s == 30
    # Operator rollback while one device is still deploying: both get one.
    sends = again.rollback(2001.0)
    assert sorted(s.device for s in sends) == sorted(f.phase(0))
    assert all(s.command.type == "rollback" and s.expiry_s is None
               and s.command.params == {"expect_active": V2} for s in sends)
    for dev in f.phase(0):
        again.on_ack(Ack(command_id("r1", "rollback", dev), dev, "rolled_back", bundle=V1),
                     2002.0)
    again.tick(2002.0)
    assert again.r.state == "rolled_back"
    assert again.rollback(2003.0) == [] and again.r.state == "rolled_back"


# -- the store ------------------------------------------------------------------------------


def test_store_round_trip_lock_and_unknown(tmp_path: Path) -> None:
    from edge_runtime.rollout.store import RolloutStore

    store = RolloutStore(tmp_path / "r.db")
    f = Fleet(10, canary="2")
    store.create(f.record, list(f.ctl.devices.values()))
    with pytest.raises(RolloutError, match="rollout r1 already exists"):
        store.create(f.record, [])
    f.ack(f.phase(0)[0], "active")
    store.save("r1", f.ctl.take_changes())
    assert store.db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    other = RolloutStore(tmp_path / "r.db")  # another process's view
    record, devices = other.load("r1")
    assert record == f.ctl.r
    assert {d.device: d for d in devices} == f.ctl.devices
    assert [e.kind for e in other.events("r1")] == ["phase"]
    assert other.list()[0] | {"created": 0, "updated": 0} == {
        "id": "r1", "state": "running", "phase": 0, "phases": 4, "reason": None,
        "created": 0, "updated": 0, "group": "lab", "version": V2, "devices": 10}
    with store.lock("r1"):
        busy = rf"being driven by another edge-fleet process \(pid {os.getpid()}\)"
        with pytest.raises(RolloutError, match=busy), other.lock("r1"):
            pass
    with other.lock("r1"):  # released
        pass
    with pytest.raises(RolloutError, match=r"unknown rollout 'r9' in .*r\.db \(latest: r1\)"):
        other.load("r9")


def test_sample_metrics_reads_top_level_and_one_level_down() -> None:
    from edge_runtime.rollout.controller import sample_metrics

    doc = {"v": 1, "device": "d", "ts": 5.0, "error_rate": 0.01,
           "runtime": {"ttft_p95_ms": 420, "tokens_per_s": "fast", "queue_depth": True},
           "probe": {"quality": 0.88}, "system": {"cpu_percent": 50.0}}
    assert sample_metrics(doc) == {"error_rate": 0.01, "ttft_p95_ms": 420.0, "quality": 0.88}


def test_resumed_abort_resends_its_rollbacks() -> None:
    f = Fleet(10, canary="2", max_failures=0.0)
    a, b = f.phase(0)
    f.kinds()
    f.ack(a, "active")
    f.ack(b, "rejected", bundle=V1)
    f.tick()
    assert f.ctl.r.state == "aborting" and [k for k, _ in f.kinds()] == ["rollback"]
    # SIGKILL here; the new controller re-sends the same rollback id and waits for it.
    again = Controller(f.ctl.take_changes().rollout or f.record, list(f.ctl.devices.values()),
                       None)
    sends = again.start(5000.0)
    assert [(s.device, s.command.id) for s in sends] == [(a, f"r1.rollback.{a}")]
    again.on_ack(Ack(f"r1.rollback.{a}", a, "rolled_back", bundle=V1, duplicate=True), 5001.0)
    again.tick(5001.0)
    assert again.r.state == "aborted" and again.devices[a].state == "rolled_back"


def test_device_reported_quality_drop_wins_over_the_computed_one() -> None:
    got = []
    for extra in ({"quality_drop": 0.01}, {}):
        f = Fleet(10, canary="2")
        for d in f.phase(1):  # the control group on the old bundle
            f.telemetry(d, quality=0.95)
        for d in f.phase(0):
            f.ack(d, "active")
        f.tick()
        for d in f.phase(0):
            f.telemetry(d, error_rate=0.0, ttft_p95_ms=100, quality=0.80, **extra)
        got.append(f.ctl.phase_metrics([f.ctl.devices[d] for d in f.phase(0)])["quality_drop"])
    assert got == [pytest.approx(0.01), pytest.approx(0.15)]


def test_one_unfinished_rollout_per_group(tmp_path: Path) -> None:
    from edge_runtime.rollout.driver import create_rollout
    from edge_runtime.rollout.store import RolloutStore

    store = RolloutStore(tmp_path / "r.db")
    first = create_rollout(store, _spec(), _statuses(5), "a1")
    with pytest.raises(RolloutError, match="rollout a1 on group 'lab' is unfinished; "
                       "`edge-fleet resume a1`"):
        create_rollout(store, _spec(), _statuses(5), "a2")
    create_rollout(store, _spec(group="other"), {"x": {"online": True, "groups": ["other"]}},
                   "b1")
    with pytest.raises(RolloutError, match=r"must not contain '\.'"):
        create_rollout(store, _spec(group="third"), _statuses(1), "a.b")
    first.state = "completed"
    from edge_runtime.rollout.controller import Changes

    store.save("a1", Changes(rollout=first))
    assert create_rollout(store, _spec(), _statuses(5), "a3").phases == 3  # 1 + 2 + 2


def test_a_resumed_soak_starts_over() -> None:
    f = Fleet(10, canary="2")
    for d in f.phase(0):
        f.ack(d, "active")
    f.tick(1)
    assert f.ctl.r.step == "soak"
    f.ctl.take_changes()
    again = Controller(f.ctl.r, list(f.ctl.devices.values()), AbortRule.parse(RULE))
    assert again.start(3000.0) == []  # nothing in flight: no command re-sent
    assert (again.r.step, again.r.step_started) == ("soak", 3000.0)
    again.tick(3009.0)
    assert again.r.step == "soak" and again.r.phase == 0
