"""A staged rollout's records and its plan: which device goes in which phase.

    spec = RolloutSpec(group, bundle, sha256, signer, version, canary="10%", batch="25%")
    devices = plan(rollout_id, statuses, spec)     phase 0 = canary, 1.. = batches

Plain data, persisted by rollout_store.py and driven by the controller in rollout.py.
Devices offline when the rollout is planned are skipped, and so are devices already on
the new bundle (rerunning a deploy catches up the stragglers). The canary is a random
sample seeded by the rollout id: not always the same devices, but stable for one rollout.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from edge_runtime.errors import ConfigError, RolloutError

DEVICE_STATES = ("pending", "deploying", "active", "failed", "timeout", "skipped",
                 "rolling_back", "rolled_back", "rollback_failed", "rollback_timeout")
ROLLOUT_STATES = ("running", "completed", "aborting", "aborted", "rolling_back", "rolled_back")
FINISHED = frozenset({"completed", "aborted", "rolled_back"})


def parse_share(text: str, what: str) -> str:
    """`10%` or a device count `5`; returned normalised, ConfigError when neither."""
    t = str(text).strip()
    try:
        value = float(t[:-1]) if t.endswith("%") else int(t)
    except ValueError:
        raise ConfigError(f"{what} must be a share like 10% or a device count, got {text!r}"
                          ) from None
    if (t.endswith("%") and not 0 < value <= 100) or (not t.endswith("%") and value < 1):
        raise ConfigError(f"{what} must be in (0%, 100%] or a count >= 1, got {text!r}")
    return t


def share_count(share: str, n: int) -> int:
    """How many of `n` devices a share names: at least 1, at most n."""
    k = math.ceil(n * float(share[:-1]) / 100 - 1e-9) if share.endswith("%") else int(share)
    return max(1, min(n, k))


def phase_name(phase: int) -> str:
    return "canary" if phase == 0 else f"batch {phase}"


def command_id(rollout: str, kind: str, device: str) -> str:
    cid = f"{rollout}.{kind}.{device}"
    if len(cid) > 128:  # the agent's limit; a long device id is hashed, still deterministic
        cid = f"{rollout}.{kind}.{hashlib.sha256(device.encode()).hexdigest()[:32]}"
    return cid


@dataclass(frozen=True)
class RolloutSpec:
    group: str
    bundle: str
    """What devices are told to fetch: a path on the device or a URL."""
    sha256: str
    signer: str
    version: str
    """The version id devices will report once the bundle is active (slots.version_id)."""
    size: int | None = None
    """Length of the .tar in bytes, signed into every deploy: a device downloading it from a
    URL stops there (None for a bundle directory, which is never downloaded)."""
    canary: str = "10%"
    batch: str = "25%"
    abort_if: str | None = None
    soak_s: float = 60.0
    ack_timeout_s: float = 300.0
    max_failures: float = 0.1
    """Share of the devices attempted so far that may fail or time out before aborting."""
    broker: str = ""


@dataclass
class DeviceRecord:
    device: str
    phase: int
    seq: int
    state: str = "pending"
    reason: str | None = None
    step: str | None = None
    """The last progress ack of the current command (verifying, staged, checking...)."""
    before: str | None = None
    after: str | None = None
    """The bundle the device reported in its last final ack."""
    sent_at: float | None = None
    active_ts: float | None = None
    """Device clock of its `active` ack: telemetry dated after it measures the new bundle."""
    baseline_quality: float | None = None


@dataclass
class RolloutRecord:
    id: str
    spec: RolloutSpec
    phases: int
    state: str = "running"
    phase: int = 0
    step: str = "deploy"
    step_started: float = 0.0
    phase_started: float = 0.0
    """When the current phase's deploy step began (0: the rollout has not started)."""
    reason: str | None = None
    created: float = 0.0
    updated: float = 0.0


@dataclass(frozen=True)
class Event:
    ts: float
    phase: int
    kind: str
    detail: str


def plan(rollout_id: str, statuses: Mapping[str, Mapping[str, Any]], spec: RolloutSpec
         ) -> list[DeviceRecord]:
    """The group's devices in phases; the canary is a random sample seeded by the id."""
    members = sorted(d for d, st in statuses.items()
                     if "error" not in st and spec.group in (st.get("groups") or []))
    if not members:
        raise RolloutError(f"no device announces group {spec.group!r} in its status "
                           f"({len(statuses)} devices seen on the broker)")
    out: list[DeviceRecord] = []
    targets = []
    for d in members:
        st = statuses[d]
        if not st.get("online"):
            out.append(DeviceRecord(d, -1, -1, "skipped", "offline when the rollout started",
                                    before=st.get("bundle")))
        elif st.get("bundle") == spec.version:
            out.append(DeviceRecord(d, -1, -1, "skipped", f"already runs {spec.version}",
                                    before=st.get("bundle")))
        else:
            targets.append(d)
    if not targets:
        raise RolloutError(f"nothing to deploy in group {spec.group!r}: its {len(members)} "
                           "devices are offline or already run the bundle")
    random.Random(rollout_id).shuffle(targets)
    n = len(targets)
    sizes = [share_count(spec.canary, n)]
    step = share_count(spec.batch, n)
    while sum(sizes) < n:
        sizes.append(min(step, n - sum(sizes)))
    i = 0
    for phase, size in enumerate(sizes):
        for d in targets[i:i + size]:
            out.append(DeviceRecord(d, phase, i, before=statuses[d].get("bundle")))
            i += 1
    return out
