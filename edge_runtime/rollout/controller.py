"""The staged-rollout controller: a pure state machine (no I/O, no threads, no clock).

    devices = plan(rollout_id, statuses, spec)        rollout_plan.py: canary, then batches
    ctl = Controller(record, devices, rule)
    sends = ctl.start(now)        first phase's deploys, or a resumed rollout's re-sends
    ctl.on_ack(ack, now); ctl.on_telemetry(device, doc); sends = ctl.tick(now)
    changes = ctl.take_changes()  what to persist (one transaction) before publishing `sends`

A phase runs in two steps. **deploy**: every device of the phase gets its deploy command;
the step ends when each has a final ack (active, or failed: rejected / rolled back by its
own health check) or has not answered within `ack_timeout_s` (timeout). Then the failure
policy: when failed + timed-out devices exceed `max_failures` of the devices attempted so
far, the rollout aborts. **soak**: for `soak_s` seconds (and until every active device of
the phase has sent one telemetry sample dated after its switch, at most `ack_timeout_s`
more) the controller collects post-deploy telemetry; the abort rule is evaluated on the
phase's means over devices. A trip, or a metric the rule names that nothing measured,
aborts: every device this rollout may have switched (active, still deploying, timed out)
gets a rollback command that only acts if the device still runs the new bundle
(`expect_active`).

Command ids are `{rollout}.{deploy|rollback}.{device}`: a resumed controller re-sends the
same ids and the agents answer a command they already ran with its stored final ack.
Telemetry samples are not persisted: a soak interrupted by a crash starts over on resume.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from edge_runtime.errors import RolloutError
from edge_runtime.fleet import messages as fm
from edge_runtime.rollout.abort_rules import METRICS, AbortRule, Verdict
from edge_runtime.rollout.plan import (
    FINISHED,
    DeviceRecord,
    Event,
    RolloutRecord,
    command_id,
    phase_name,
)

_MAY_RUN_NEW = frozenset({"active", "deploying", "timeout"})
"""Device states in which the new bundle may be (or become) active: rolled back on abort."""


@dataclass(frozen=True)
class Send:
    device: str
    command: fm.Command
    expiry_s: int | None
    """MQTT message expiry: a deploy not delivered within the ack timeout is dropped."""


@dataclass
class Changes:
    rollout: RolloutRecord | None = None
    devices: list[DeviceRecord] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)


class Controller:
    def __init__(self, record: RolloutRecord, devices: Iterable[DeviceRecord],
                 rule: AbortRule | None) -> None:
        self.r = record
        self.devices = {d.device: d for d in devices}
        self.rule = rule
        self._samples: dict[str, list[dict[str, float]]] = {}
        self._old_quality: dict[str, float] = {
            d.device: d.baseline_quality for d in self.devices.values()
            if d.baseline_quality is not None}
        self._changes = Changes()
        self._changed: set[str] = set()

    # -- inputs -------------------------------------------------------------------------

    @property
    def finished(self) -> bool:
        return self.r.state in FINISHED

    def start(self, now: float) -> list[Send]:
        """Begin, or continue after a restart: re-send whatever was in flight."""
        if self.finished:
            return []
        if self.r.phase_started == 0:
            self._set(step_started=now, phase_started=now)
            n = len(self._phase_devices())
            self._event(now, "phase", f"{phase_name(self.r.phase)}: deploying to {n} devices")
        else:
            self._event(now, "resumed", f"{self.r.state}, {phase_name(self.r.phase)} "
                        f"{self.r.step}")
        if self.r.state in ("aborting", "rolling_back"):
            again = [d for d in self.devices.values()
                     if d.state in ("rolling_back", "rollback_timeout")]
            return [self._send_rollback(d, now) for d in again]
        if self.r.step == "soak":  # samples were not persisted: soak again from now
            self._set(step_started=now)
            return []
        return [self._send_deploy(d, now) for d in self._phase_devices()
                if d.state in ("pending", "deploying")]

    def on_ack(self, ack: fm.Ack, now: float) -> list[Send]:
        d = self.devices.get(ack.device)
        if d is None or ack.id is None:
            return []
        if ack.id == command_id(self.r.id, "deploy", d.device):
            return self._deploy_ack(d, ack, now)
        if ack.id == command_id(self.r.id, "rollback", d.device):
            self._rollback_ack(d, ack)
        return []

    def on_telemetry(self, device: str, doc: Mapping[str, Any]) -> None:
        d = self.devices.get(device)
        metrics = sample_metrics(doc)
        ts = float(doc.get("ts", 0.0))
        if d is None or not metrics:
            return
        if d.state in ("pending", "skipped") and "quality" in metrics:
            self._old_quality[device] = metrics["quality"]
        elif (d.state == "active" and d.phase == self.r.phase and self.r.step == "soak"
              and d.active_ts is not None and ts > d.active_ts):
            self._samples.setdefault(device, []).append(metrics)

    def tick(self, now: float) -> list[Send]:
        if self.r.state in ("aborting", "rolling_back"):
            self._rollback_timeouts(now)
            return []
        if self.r.state != "running":
            return []
        if self.r.step == "deploy":
            return self._tick_deploy(now)
        return self._tick_soak(now)

    def rollback(self, now: float, reason: str = "rolled back by the operator") -> list[Send]:
        """The operator's rollback: every device that may run the new bundle goes back."""
        if self.r.state == "aborting":
            raise RolloutError(f"rollout {self.r.id} is already rolling back (aborting); "
                               f"use `edge-fleet resume {self.r.id}`")
        self._set(state="rolling_back", step="rollback", step_started=now,
                  reason=self.r.reason or reason)
        self._event(now, "rollback_started", reason)
        return self._rollback_all(now, _MAY_RUN_NEW | {"rolling_back", "rollback_timeout"})

    def take_changes(self) -> Changes:
        out, self._changes = self._changes, Changes()
        self._changed = set()
        return out

    # -- deploy step ----------------------------------------------------------------------

    def _deploy_ack(self, d: DeviceRecord, ack: fm.Ack, now: float) -> list[Send]:
        if d.state not in ("deploying", "timeout"):
            return []
        if not ack.final:
            if d.state == "deploying" and d.step != ack.state:
                self._dev(d, step=ack.state)
            return []
        late = " (after its ack timeout)" if d.state == "timeout" else ""
        if ack.state == "active":
            self._dev(d, state="active", step=None, after=ack.bundle, active_ts=ack.ts,
                      reason=f"active{late}" if late else None)
            return []
        how = "rolled back by its health check" if ack.state == "rolled_back" else "rejected"
        self._dev(d, state="failed", step=None, after=ack.bundle,
                  reason=f"{how}{late}: {ack.reason or 'no reason given'}")
        return []

    def _tick_deploy(self, now: float) -> list[Send]:
        phase = self._phase_devices()
        t = self.r.spec.ack_timeout_s
        for d in phase:
            if d.state == "deploying" and d.sent_at is not None and now - d.sent_at >= t:
                self._dev(d, state="timeout",
                          reason=f"no final ack within {t:g}s (last step: {d.step or 'none'})")
        if any(d.state == "deploying" for d in phase):
            return []
        counts = _count(phase)
        self._event(now, "deployed", f"{phase_name(self.r.phase)}: {_fmt_counts(counts)} in "
                    f"{now - self.r.step_started:.1f}s")
        tried = [d for d in self.devices.values() if 0 <= d.phase <= self.r.phase]
        bad = sum(1 for d in tried if d.state in ("failed", "timeout"))
        if bad > self.r.spec.max_failures * len(tried):
            return self._abort(now, f"{phase_name(self.r.phase)}: {bad} of {len(tried)} "
                               f"devices failed or timed out ({bad / len(tried):.1%} > max "
                               f"{self.r.spec.max_failures:.0%})")
        if self.rule is None and self.r.spec.soak_s <= 0:
            return self._advance(now)
        self._samples = {}
        self._set(step="soak", step_started=now)
        self._event(now, "soak", f"{phase_name(self.r.phase)}: soaking {self.r.spec.soak_s:g}s")
        return []

    # -- soak step ------------------------------------------------------------------------

    def _tick_soak(self, now: float) -> list[Send]:
        elapsed = now - self.r.step_started
        spec = self.r.spec
        phase = self._phase_devices()
        active = [d for d in phase if d.state == "active"]
        if elapsed < spec.soak_s:
            return []
        heard = [d for d in active if self._samples.get(d.device)]
        if len(heard) < len(active) and elapsed < spec.soak_s + spec.ack_timeout_s:
            return []
        if self.rule is not None and active:
            values = self.phase_metrics(phase)
            verdict = self.rule.evaluate(values)
            where = (f"{phase_name(self.r.phase)} after {elapsed:.0f}s soak, mean of "
                     f"{len(heard)} devices")
            if verdict.missing:
                return self._abort(now, f"{where}: cannot evaluate the abort rule, nothing "
                                   f"measured {', '.join(verdict.missing)}")
            if verdict.tripped:
                return self._abort(now, f"{where}: {verdict.reason}{self._worst(verdict)}")
            shown = ", ".join(f"{k}={values[k]:.4g}" for k in sorted(self.rule.metrics))
            self._event(now, "gate", f"{phase_name(self.r.phase)} passed: {shown}")
        return self._advance(now)

    def phase_metrics(self, phase: list[DeviceRecord]) -> dict[str, float]:
        """Each metric's mean over the phase's devices of each device's mean sample."""
        per_device: dict[str, list[float]] = {}
        for d in phase:
            samples = self._samples.get(d.device, [])
            for name in {k for s in samples for k in s}:
                vals = [s[name] for s in samples if name in s]
                per_device.setdefault(name, []).append(statistics.fmean(vals))
        out = {k: statistics.fmean(v) for k, v in per_device.items()}
        tried = [d for d in phase if d.state not in ("pending", "deploying")]
        if tried:
            out["failure_rate"] = sum(d.state in ("failed", "timeout") for d in tried) / len(
                tried)
        if "quality_drop" not in out and "quality" in out and self._old_quality:
            # Devices that report a raw score: compare with the group's on the old bundle.
            out["quality_drop"] = statistics.fmean(self._old_quality.values()) - out["quality"]
        return out

    def _worst(self, verdict: Verdict) -> str:
        """The device furthest over the first per-device threshold that tripped: a phase
        mean can hide one device that is far worse than the rest."""
        for c in verdict.held:
            per = {d: statistics.fmean(s[c.metric] for s in ss if c.metric in s)
                   for d, ss in self._samples.items() if any(c.metric in s for s in ss)}
            if per and c.op in (">", ">=", "<", "<="):
                pick = max if c.op.startswith(">") else min
                dev = pick(per, key=lambda k: per[k])
                return f" (worst: {dev} {c.metric}={per[dev]:.4g})"
        return ""

    def _advance(self, now: float) -> list[Send]:
        self._event(now, "passed", f"{phase_name(self.r.phase)} done after "
                    f"{now - self.r.phase_started:.1f}s")
        if self.r.phase + 1 >= self.r.phases:
            self._set(state="completed", step="done", step_started=now)
            self._event(now, "completed", _fmt_counts(_count(self.devices.values())))
            return []
        self._set(phase=self.r.phase + 1, step="deploy", step_started=now, phase_started=now)
        nxt = self._phase_devices()
        self._event(now, "phase", f"{phase_name(self.r.phase)}: deploying to {len(nxt)} devices")
        return [self._send_deploy(d, now) for d in nxt if d.state == "pending"]

    # -- abort / rollback -----------------------------------------------------------------

    def _abort(self, now: float, reason: str) -> list[Send]:
        self._set(state="aborting", step="rollback", step_started=now, reason=reason)
        self._event(now, "aborting", reason)
        return self._rollback_all(now, _MAY_RUN_NEW)

    def _rollback_all(self, now: float, states: frozenset[str]) -> list[Send]:
        sends = [self._send_rollback(d, now) for d in self.devices.values() if d.state in states]
        self._rollback_timeouts(now)  # nothing to roll back: finished at once
        return sends

    def _rollback_ack(self, d: DeviceRecord, ack: fm.Ack) -> None:
        if not ack.final or d.state not in ("rolling_back", "rollback_timeout"):
            return
        if ack.state == "rolled_back":
            self._dev(d, state="rolled_back", after=ack.bundle, reason=None)
        elif ack.bundle != self.r.spec.version:
            # expect_active did not match: the new bundle never became active there.
            self._dev(d, state="rolled_back", after=ack.bundle,
                      reason=f"was not running {self.r.spec.version}: nothing to roll back")
        else:
            self._dev(d, state="rollback_failed", after=ack.bundle, reason=ack.reason)

    def _rollback_timeouts(self, now: float) -> None:
        t = self.r.spec.ack_timeout_s
        for d in self.devices.values():
            if d.state == "rolling_back" and d.sent_at is not None and now - d.sent_at >= t:
                self._dev(d, state="rollback_timeout", reason=f"no rollback ack within {t:g}s; "
                          "the command stays queued for the device")
        if any(d.state == "rolling_back" for d in self.devices.values()):
            return
        final = "aborted" if self.r.state == "aborting" else "rolled_back"
        self._set(state=final, step="done", step_started=now)
        self._event(now, final, f"{self.r.reason}; {_fmt_counts(_count(self.devices.values()))}")

    # -- helpers --------------------------------------------------------------------------

    def _send_deploy(self, d: DeviceRecord, now: float) -> Send:
        s = self.r.spec
        base = self._old_quality.get(d.device, d.baseline_quality)
        self._dev(d, state="deploying", sent_at=now, baseline_quality=base)
        params: dict[str, Any] = {"bundle": s.bundle, "sha256": s.sha256, "signer": s.signer}
        if s.size is not None:
            params["size"] = s.size
        cmd = fm.Command(command_id(self.r.id, "deploy", d.device), "deploy", params)
        return Send(d.device, cmd, max(1, math.ceil(s.ack_timeout_s)))

    def _send_rollback(self, d: DeviceRecord, now: float) -> Send:
        self._dev(d, state="rolling_back", sent_at=now, step=None)
        cmd = fm.Command(command_id(self.r.id, "rollback", d.device), "rollback",
                         {"expect_active": self.r.spec.version})
        return Send(d.device, cmd, None)  # no expiry: it must reach a device that returns

    def _phase_devices(self) -> list[DeviceRecord]:
        return sorted((d for d in self.devices.values() if d.phase == self.r.phase),
                      key=lambda d: d.seq)

    def _dev(self, d: DeviceRecord, **kw: Any) -> None:
        if any(getattr(d, k) != v for k, v in kw.items()):
            for k, v in kw.items():
                setattr(d, k, v)
            if d.device not in self._changed:
                self._changed.add(d.device)
                self._changes.devices.append(d)

    def _set(self, **kw: Any) -> None:
        self.r = replace(self.r, **kw)
        self._changes.rollout = self.r

    def _event(self, now: float, kind: str, detail: str) -> None:
        self._changes.events.append(Event(now, self.r.phase, kind, detail))


def sample_metrics(doc: Mapping[str, Any]) -> dict[str, float]:
    """The numbers a rule may name from one telemetry payload: at its top level or one level
    down (`runtime`, or wherever the agent groups its probe results)."""
    out: dict[str, float] = {}
    for src in (doc, *(v for v in doc.values() if isinstance(v, Mapping))):
        for k, v in src.items():
            if k in METRICS and isinstance(v, (int, float)) and not isinstance(v, bool):
                out[k] = float(v)
    return out


def _count(devices: Iterable[DeviceRecord]) -> dict[str, int]:
    out: dict[str, int] = {}
    for d in devices:
        out[d.state] = out.get(d.state, 0) + 1
    return out


def _fmt_counts(counts: Mapping[str, int]) -> str:
    return ", ".join(f"{n} {s}" for s, n in sorted(counts.items(), key=lambda x: -x[1]))
