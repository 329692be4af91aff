"""The MQTT payloads of fleet management: commands, acks, status, telemetry (JSON, `v` = 1).

    fleet/{device}/cmd, fleet/group/{group}/cmd   (controller → device)
        {"v": 1, "id": "c-42", "type": "deploy",
         "params": {"bundle": "/srv/b/demo-2.tar", "sha256": "…", "signer": "<key id>"}}
        {"v": 1, "id": "c-43", "type": "rollback", "params": {}}
        {"v": 1, "id": "c-44", "type": "rollback", "params": {"expect_active": "<version>"}}
            (with expect_active: rejected, active unchanged, unless that bundle is active)
    fleet/{device}/cmd/ack                        (device → controller, one per step)
        {"v": 1, "id": "c-42", "device": "d1", "state": "verifying", "reason": null,
         "bundle": null, "duplicate": false, "ts": 1712.3}
    fleet/{device}/status                         (retained; the Will carries online=false)
    fleet/{device}/telemetry

Ack states of a deploy: received → verifying → staged → checking → active | rolled_back;
any step may end in `rejected` (the command was refused or failed; the active bundle is
unchanged) with a reason. `sha256` is the hash of the .tar, or of manifest.json when
`bundle` is a directory. A re-delivered command id is answered with its stored final ack
and `duplicate: true`, and is not run again.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from edge_runtime.errors import MessageError
from edge_runtime.topics import check_id

SCHEMA_VERSION = 1
COMMAND_TYPES = ("deploy", "rollback", "set-config", "drain")
ACK_STATES = ("received", "verifying", "staged", "checking", "active", "rolled_back",
              "rejected")
FINAL_STATES = frozenset({"active", "rolled_back", "rejected"})


@dataclass(frozen=True)
class Command:
    id: str
    type: str
    params: Mapping[str, Any] = field(default_factory=dict)

    def to_json(self) -> bytes:
        return json.dumps({"v": SCHEMA_VERSION, "id": self.id, "type": self.type,
                           "params": dict(self.params)}).encode()


@dataclass(frozen=True)
class DeployParams:
    bundle: str
    """A bundle directory or .tar on the device's filesystem (URLs come later)."""
    sha256: str
    signer: str
    """Key id of the only trusted key allowed to have signed the bundle."""


def command_id_of(payload: bytes) -> str | None:
    """The id of a payload that may be malformed, so its rejection can name it."""
    try:
        cid = json.loads(payload).get("id")
    except (ValueError, AttributeError):
        return None
    return cid if isinstance(cid, str) and cid else None


def parse_command(payload: bytes) -> Command:
    """A Command, or MessageError saying what is wrong with the payload."""
    try:
        d = json.loads(payload)
    except (ValueError, UnicodeDecodeError) as e:
        raise MessageError(f"command is not valid JSON: {e}") from None
    if not isinstance(d, dict):
        raise MessageError("command must be a JSON object")
    if d.get("v") != SCHEMA_VERSION:
        raise MessageError(f"command schema v={d.get('v')!r} is not supported "
                           f"(this agent reads v={SCHEMA_VERSION})")
    cid = d.get("id")
    if not isinstance(cid, str) or not cid or len(cid) > 128:
        raise MessageError("command id must be a non-empty string of at most 128 characters")
    ctype = d.get("type")
    if ctype not in COMMAND_TYPES:
        raise MessageError(f"unknown command type {ctype!r} (known: {', '.join(COMMAND_TYPES)})")
    params = d.get("params", {})
    if not isinstance(params, dict):
        raise MessageError("command params must be a JSON object")
    return Command(cid, ctype, params)


def deploy_params(cmd: Command) -> DeployParams:
    p = cmd.params
    for key in ("bundle", "sha256", "signer"):
        if not isinstance(p.get(key), str) or not p[key]:
            raise MessageError(f"deploy needs params.{key} (a non-empty string)")
    sha = p["sha256"].lower()
    if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
        raise MessageError("deploy params.sha256 must be 64 hex digits")
    return DeployParams(p["bundle"], sha, check_id(p["signer"], "signer key id"))


@dataclass(frozen=True)
class Ack:
    id: str | None
    """None when a malformed command carried no readable id."""
    device: str
    state: str
    reason: str | None = None
    bundle: str | None = None
    """The bundle version id the step concerns (staged / now active)."""
    duplicate: bool = False
    ts: float = field(default_factory=time.time)

    def __post_init__(self) -> None:
        if self.state not in ACK_STATES:
            raise MessageError(f"ack state {self.state!r} is not one of {ACK_STATES}")

    @property
    def final(self) -> bool:
        return self.state in FINAL_STATES

    def to_dict(self) -> dict[str, Any]:
        return {"v": SCHEMA_VERSION, **asdict(self)}

    def to_json(self) -> bytes:
        return json.dumps(self.to_dict()).encode()

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Ack:
        try:
            return cls(id=d["id"], device=d["device"], state=d["state"], reason=d.get("reason"),
                       bundle=d.get("bundle"), duplicate=bool(d.get("duplicate", False)),
                       ts=float(d.get("ts", 0.0)))
        except (KeyError, TypeError, ValueError) as e:
            raise MessageError(f"malformed ack: {e}") from None

    @classmethod
    def from_json(cls, payload: bytes) -> Ack:
        try:
            return cls.from_dict(json.loads(payload))
        except (ValueError, AttributeError) as e:
            raise MessageError(f"malformed ack: {e}") from None


def status_payload(device: str, online: bool, **info: Any) -> bytes:
    """Retained status: online flag plus whatever the agent knows (bundle, runtime, host)."""
    return json.dumps({"v": SCHEMA_VERSION, "device": device, "online": online,
                       "ts": time.time(), **info}, sort_keys=True).encode()


def telemetry_payload(device: str, system: Mapping[str, Any],
                      runtime: Mapping[str, Any]) -> bytes:
    return json.dumps({"v": SCHEMA_VERSION, "device": device, "ts": time.time(),
                       "system": dict(system), "runtime": dict(runtime)},
                      sort_keys=True).encode()
