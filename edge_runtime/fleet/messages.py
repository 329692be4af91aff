"""The MQTT payloads of fleet management: commands, acks, status, telemetry (JSON, `v` = 1).

    fleet/{device}/cmd, fleet/group/{group}/cmd   (controller → device)
        {"v": 1, "id": "c-42", "type": "deploy",
         "params": {"bundle": "https://repo/b/demo-2.tar", "sha256": "…", "signer": "<key id>",
                    "size": 123456}}
        {"v": 1, "id": "c-43", "type": "rollback", "params": {}}
        {"v": 1, "id": "c-44", "type": "rollback", "params": {"expect_active": "<version>"}}
            (with expect_active: rejected, active unchanged, unless that bundle is active)
        {"v": 1, "id": "c-45", "type": "set-config",
         "params": {"set": {"scheduler": {"max_batch": 4}}}}    (or {"toml": "<document>"})
        {"v": 1, "id": "c-46", "type": "drain", "params": {}}  (and "undrain")
    fleet/{device}/cmd/ack                        (device → controller, one per step)
        {"v": 1, "id": "c-42", "device": "d1", "state": "verifying", "reason": null,
         "bundle": null, "duplicate": false, "detail": null, "ts": 1712.3}
    fleet/{device}/status                         (retained; the Will carries online=false)
    fleet/{device}/telemetry                      (see telemetry.py for the field names)

Ack states of a deploy: received → [downloading] → verifying → staged → checking → active |
rolled_back; any step may end in `rejected` (the command was refused or failed; the active
bundle is unchanged) with a reason. `bundle` is a directory or .tar on the device, or an
http(s) URL of a .tar (downloaded resumably; `size`, required for a URL, is its length in
bytes and the download stops there; `downloading` acks carry `detail: {"bytes", "total"}`).
Every command also carries an operator signature (`auth`, see command_auth.py); a command
refused for its signature, target, expiry or replay is acked with `id: null` (its id is not
to be believed) and `detail: {"claimed_id", "digest"}`.
`sha256` is the hash of the .tar, or of manifest.json when `bundle` is a directory.

set-config: received → applied (`detail.changed` = {"section.key": [old, new]}) | rejected.
drain / undrain: received → drained / undrained. A re-delivered command id is answered with
its stored final ack and `duplicate: true`, and is not run again. Malformed commands (bad
JSON, unknown type, wrong or unknown params) are answered `rejected` with the reason.
"""

from __future__ import annotations

import json
import time
import urllib.parse
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from edge_runtime.errors import MessageError
from edge_runtime.mqtt.topics import check_id

SCHEMA_VERSION = 1
COMMAND_TYPES = ("deploy", "rollback", "set-config", "drain", "undrain")
ACK_STATES = ("received", "downloading", "verifying", "staged", "checking", "active",
              "rolled_back", "applied", "drained", "undrained", "rejected")
FINAL_STATES = frozenset({"active", "rolled_back", "applied", "drained", "undrained",
                          "rejected"})
MAX_COMMAND_BYTES = 256 << 10
"""A command is a few hundred bytes; a config document a few KiB. More is refused unread."""
URL_SCHEMES = ("http", "https")
MAX_ID_CHARS = 128


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
    """A bundle directory or .tar on the device's filesystem, or an http(s) URL of a .tar."""
    sha256: str
    signer: str
    """Key id of the only trusted key allowed to have signed the bundle."""
    size: int | None = None
    """Length of the .tar at a URL, in bytes: the free space is checked before downloading."""

    @property
    def is_url(self) -> bool:
        return "://" in self.bundle


@dataclass(frozen=True)
class ConfigParams:
    toml: str | None = None
    """A whole config document that replaces the device's file."""
    set: Mapping[str, Any] | None = None
    """Keys merged into the device's file: `{"section": {"key": v}}` or `{"section.key": v}`."""


def command_id_of(payload: bytes) -> str | None:
    """The id of a payload that may be malformed, so its rejection can name it."""
    if len(payload) > MAX_COMMAND_BYTES:
        return None
    try:
        cid = json.loads(payload).get("id")
    except (ValueError, AttributeError, RecursionError):
        return None
    # An id the agent would refuse is not echoed either (it may be megabytes long).
    return cid if isinstance(cid, str) and 0 < len(cid) <= MAX_ID_CHARS else None


def decode_command(payload: bytes) -> dict[str, Any]:
    """The payload as a JSON object (size-checked), or MessageError; nothing else checked."""
    if len(payload) > MAX_COMMAND_BYTES:
        raise MessageError(f"command is {len(payload)} bytes, more than the "
                           f"{MAX_COMMAND_BYTES} accepted")
    try:
        d = json.loads(payload)
    except (ValueError, UnicodeDecodeError) as e:
        raise MessageError(f"command is not valid JSON: {e}") from None
    except RecursionError:  # `[[[[...` nested deeper than the parser's stack
        raise MessageError("command is not valid JSON: nested too deeply") from None
    if not isinstance(d, dict):
        raise MessageError("command must be a JSON object")
    return d


def parse_command(payload: bytes) -> Command:
    """A Command, or MessageError saying what is wrong with the payload."""
    return command_from_dict(decode_command(payload))


def command_from_dict(d: Mapping[str, Any]) -> Command:
    """The Command of a decoded payload (its `auth`, if any, is command_auth.py's)."""
    if d.get("v") != SCHEMA_VERSION:
        raise MessageError(f"command schema v={d.get('v')!r} is not supported "
                           f"(this agent reads v={SCHEMA_VERSION})")
    cid = d.get("id")
    if not isinstance(cid, str) or not cid or len(cid) > MAX_ID_CHARS:
        raise MessageError(f"command id must be a non-empty string of at most {MAX_ID_CHARS} "
                           "characters")
    ctype = d.get("type")
    if ctype not in COMMAND_TYPES:
        raise MessageError(f"unknown command type {ctype!r} (known: {', '.join(COMMAND_TYPES)})")
    params = d.get("params", {})
    if not isinstance(params, dict):
        raise MessageError("command params must be a JSON object")
    return Command(cid, ctype, params)


def deploy_params(cmd: Command) -> DeployParams:
    """Unknown keys are ignored here (a newer controller may add hints); known ones checked."""
    p = cmd.params
    for key in ("bundle", "sha256", "signer"):
        if not isinstance(p.get(key), str) or not p[key]:
            raise MessageError(f"deploy needs params.{key} (a non-empty string)")
    sha = p["sha256"].lower()
    if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
        raise MessageError(f"deploy params.sha256 must be 64 hex digits, got {p['sha256']!r}")
    bundle = p["bundle"]
    if "://" in bundle:
        u = urllib.parse.urlsplit(bundle)
        if u.scheme not in URL_SCHEMES or not u.hostname:
            raise MessageError(f"deploy params.bundle {bundle!r}: only http:// and https:// "
                               "URLs with a host are supported")
    size = p.get("size")
    if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 1):
        raise MessageError(f"deploy params.size must be a positive integer, got {size!r}")
    if "://" in bundle and size is None:
        # The signed size is the only bound a device can trust: a server's Content-Length
        # (or a chunked body with none) is the attacker's to choose.
        raise MessageError("deploy of a URL needs params.size (the archive's length in "
                           "bytes, signed with the command): the download stops there")
    return DeployParams(bundle, sha, check_id(p["signer"], "signer key id"), size)


def config_params(cmd: Command) -> ConfigParams:
    """set-config takes exactly one of `toml` (a string) or `set` (a table)."""
    p = cmd.params
    unknown = sorted(set(p) - {"toml", "set"})
    if unknown:
        raise MessageError(f"set-config: unknown params {unknown} (known: toml, set)")
    if ("toml" in p) == ("set" in p):
        raise MessageError("set-config needs exactly one of params.toml (a TOML document) "
                           "or params.set (a table of keys)")
    if "toml" in p and not isinstance(p["toml"], str):
        raise MessageError(f"set-config params.toml must be a string, got {type(p['toml'])}")
    if "set" in p and (not isinstance(p["set"], dict) or not p["set"]):
        raise MessageError("set-config params.set must be a non-empty table of keys")
    return ConfigParams(toml=p.get("toml"), set=p.get("set"))


def rollback_params(cmd: Command) -> str | None:
    """rollback's optional `expect_active`: the bundle version that must be active."""
    unknown = sorted(set(cmd.params) - {"expect_active"})
    if unknown:
        raise MessageError(f"rollback: unknown params {unknown} (known: expect_active)")
    expect = cmd.params.get("expect_active")
    if expect is not None and (not isinstance(expect, str) or not expect):
        raise MessageError(f"rollback params.expect_active must be a bundle version id, "
                           f"got {expect!r}")
    return expect


def no_params(cmd: Command) -> None:
    """drain and undrain take none: a stray key is a controller bug, not a hint."""
    if cmd.params:
        raise MessageError(f"{cmd.type} takes no params, got {sorted(cmd.params)}")


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
    detail: Mapping[str, Any] | None = None
    """Step-specific data: download progress, the config diff. Added in v1; may be absent."""
    ts: float = field(default_factory=time.time)

    def __post_init__(self) -> None:
        if self.state not in ACK_STATES:
            raise MessageError(f"ack state {self.state!r} is not one of {ACK_STATES}")

    @property
    def final(self) -> bool:
        return self.state in FINAL_STATES

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["detail"] = dict(self.detail) if self.detail is not None else None
        return {"v": SCHEMA_VERSION, **d}

    def to_json(self) -> bytes:
        return json.dumps(self.to_dict()).encode()

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Ack:
        try:
            return cls(id=d["id"], device=d["device"], state=d["state"], reason=d.get("reason"),
                       bundle=d.get("bundle"), duplicate=bool(d.get("duplicate", False)),
                       detail=d.get("detail"), ts=float(d.get("ts", 0.0)))
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
