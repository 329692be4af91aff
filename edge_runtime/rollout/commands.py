"""`edge-fleet drain|undrain|set-config|rollback --device|--group` and `edge-fleet audit`.

    edge-fleet --broker URL --key OP.key drain --device dev-1 [--wait 30]
    edge-fleet --broker URL set-config --device dev-1 --set scheduler.max_batch=4 \\
                                                     --set log.level=debug
    edge-fleet --broker URL rollback --device dev-1 [--expect-active VERSION]
    edge-fleet audit [--device dev-1] [--since 2h|2026-12-05T12:00|1765000000] [--json]
                     [--file DEVICE_ROOT/audit.jsonl]

Each command is signed with the operator key (`--key`, else $EDGE_FLEET_KEY, else
~/.config/edge-fleet/operator.key), recorded in the operator's audit log (`--audit`, else
$EDGE_FLEET_AUDIT, else ~/.local/state/edge-fleet/audit.jsonl) with the key's id, published
to the device (or group) and its final ack awaited: for a device the command's own, or the
device's refusal of the signature (matched by the payload's SHA-256, since a refusal does
not trust the id); for a group whatever devices answer within `--wait`. Exit status 0 when
every answer is a success, 1 otherwise (the reason is printed).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import queue
import secrets
import time
from pathlib import Path
from typing import Any

from edge_runtime.errors import ConfigError, EdgeError, MessageError, SignatureError
from edge_runtime.fleet import messages as fm
from edge_runtime.fleet.audit import AUDIT, AuditLog, read_audit
from edge_runtime.fleet.command_auth import (
    CommandSigner,
    device_target,
    group_target,
    payload_digest,
)
from edge_runtime.mqtt import topics
from edge_runtime.mqtt.auth import BrokerAuth
from edge_runtime.mqtt.client import Message, MqttClient


def default_key() -> Path:
    env = os.environ.get("EDGE_FLEET_KEY")
    if env:
        return Path(env)
    base = Path(os.environ.get("XDG_CONFIG_HOME", Path.home() / ".config"))
    return base / "edge-fleet" / "operator.key"


def default_audit() -> Path:
    env = os.environ.get("EDGE_FLEET_AUDIT")
    if env:
        return Path(env)
    base = Path(os.environ.get("XDG_STATE_HOME", Path.home() / ".local" / "state"))
    return base / "edge-fleet" / AUDIT


def signer(a: argparse.Namespace) -> CommandSigner:
    path = Path(a.key) if a.key else default_key()
    try:
        return CommandSigner.from_file(path)
    except SignatureError as e:
        raise ConfigError(f"{a.cmd} signs with an operator key: {e} (pass --key FILE or set "
                          "$EDGE_FLEET_KEY; make a pair with `edge-build keygen --name "
                          "operator`)") from None


def audit_log(a: argparse.Namespace) -> AuditLog:
    return AuditLog(Path(a.audit) if a.audit else default_audit())


def _value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text  # `log.level=debug`: a bare word is a string


def _params(a: argparse.Namespace) -> dict[str, Any]:
    if a.cmd == "set-config":
        if bool(a.set) == bool(a.toml):
            raise ConfigError("set-config needs --set section.key=VALUE (repeatable) or "
                              "--toml FILE, not both")
        if a.toml:
            return {"toml": Path(a.toml).read_text()}
        keys: dict[str, Any] = {}
        for item in a.set:
            key, eq, value = item.partition("=")
            if not eq or "." not in key:
                raise ConfigError(f"--set {item!r} must be section.key=VALUE")
            keys[key] = _value(value)
        return {"set": keys}
    if a.cmd == "rollback" and a.expect_active:
        return {"expect_active": a.expect_active}
    return {}


def cmd_device(a: argparse.Namespace) -> int:
    """drain, undrain, set-config or rollback of one device or group."""
    if bool(a.device) == bool(a.group):
        raise ConfigError(f"{a.cmd} needs exactly one of --device ID or --group ID")
    if not a.broker:
        raise ConfigError(f"{a.cmd} needs --broker mqtt://HOST:PORT (or $EDGE_FLEET_BROKER)")
    s = signer(a)
    target = device_target(a.device) if a.device else group_target(a.group)
    cid = f"op-{dt.datetime.now(dt.timezone.utc):%Y%m%d-%H%M%S}-{secrets.token_hex(3)}"
    cmd = fm.Command(cid, a.cmd, _params(a))
    payload = s.sign(cmd, target, ttl_s=a.ttl)
    got: queue.Queue[Message] = queue.Queue()
    ack_topic = topics.fleet_cmd_ack(a.device) if a.device else "fleet/+/cmd/ack"
    auth: BrokerAuth = getattr(a, "auth", None) or BrokerAuth()
    client = MqttClient(a.broker, f"edge-fleet-{secrets.token_hex(4)}", **auth.mqtt_options())
    client.subscribe(ack_topic, got.put, qos=1)
    # A refusal (CONNACK or SUBACK "Not authorized") is said as such, not as unreachable.
    if (not client.start(wait_s=a.connect_timeout)
            or not client.wait_subscribed(a.connect_timeout) or client.refused_filters):
        client.stop()
        raise client.failure(a.connect_timeout)
    try:
        audit_log(a).append({"event": "command-sent", "device": a.device, "group": a.group,
                             "id": cid, "type": a.cmd, "key_id": s.key_id,
                             "params": _redacted(cmd.params)})
        topic = topics.fleet_cmd(a.device) if a.device else topics.fleet_group_cmd(a.group)
        client.publish(topic, payload, wait_s=a.connect_timeout)
        finals = _collect(got, cid, payload_digest(payload), a.wait, single=bool(a.device))
    finally:
        client.stop()
    if not finals:
        raise EdgeError(f"no answer to {a.cmd} {cid} within {a.wait:g}s (the device may be "
                        "offline: the broker keeps the command for it)")
    ok = True
    for ack in finals:
        ok &= ack.state != "rejected"
        extra = f" ({ack.reason})" if ack.reason else ""
        detail = f" {json.dumps(ack.detail, sort_keys=True)}" if ack.detail else ""
        print(f"{ack.device}: {a.cmd} {cid} {ack.state}{extra}{detail}")
    return 0 if ok else 1


def _redacted(params: Any) -> Any:
    from edge_runtime.fleet.config_update import is_secret

    if isinstance(params, dict) and isinstance(params.get("set"), dict):
        return {"set": {k: "<redacted>" if is_secret(k) else v
                        for k, v in params["set"].items()}}
    if isinstance(params, dict) and "toml" in params:
        return {"toml": f"<{len(params['toml'])} characters>"}
    return params


def _collect(got: queue.Queue[Message], cid: str, digest: str, wait_s: float,
             single: bool) -> list[fm.Ack]:
    deadline = time.monotonic() + wait_s
    finals: dict[str, fm.Ack] = {}
    while (left := deadline - time.monotonic()) > 0:
        try:
            msg = got.get(timeout=left)
        except queue.Empty:
            break
        try:
            ack = fm.Ack.from_json(msg.payload)
        except MessageError:
            continue
        ours = ack.id == cid or (ack.id is None and isinstance(ack.detail, dict)
                                 and ack.detail.get("digest") == digest)
        if ours and ack.final:
            finals[ack.device] = ack
            if single:
                break
    return list(finals.values())


def parse_since(text: str) -> float:
    """`90s`, `15m`, `2h`, `3d` ago; Unix seconds; or an ISO 8601 time (UTC if no zone)."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    try:
        if text[-1:] in units and text[:-1].replace(".", "", 1).isdigit():
            return time.time() - float(text[:-1]) * units[text[-1]]
        if text.replace(".", "", 1).isdigit():
            return float(text)
        t = dt.datetime.fromisoformat(text)
    except ValueError:
        raise ConfigError(f"--since {text!r}: give 2h / 30m / 3d, Unix seconds or an ISO 8601 "
                          "time") from None
    return (t if t.tzinfo else t.replace(tzinfo=dt.timezone.utc)).timestamp()


def cmd_audit(a: argparse.Namespace) -> int:
    path = Path(a.file) if a.file else (Path(a.audit) if a.audit else default_audit())
    since = parse_since(a.since) if a.since else None
    for rec in read_audit(path, device=a.device, since=since):
        if a.json:
            print(json.dumps(rec, sort_keys=True))
            continue
        stamp = dt.datetime.fromtimestamp(float(rec.get("ts", 0)), dt.timezone.utc)
        who = rec.get("device") or (f"group:{rec['group']}" if rec.get("group") else "-")
        what = rec.get("outcome") or rec.get("event")
        print(f"{stamp:%Y-%m-%dT%H:%M:%SZ} {who:<20} {rec.get('type') or '-':<10} "
              f"{rec.get('id') or '-':<28} {what:<10} key {rec.get('key_id') or '-'}"
              f"{'  ' + str(rec['reason']) if rec.get('reason') else ''}")
    return 0


def add_parsers(sub: Any, rollback_fn: Any) -> None:
    """The device commands and `audit`; `rollback` also takes a rollout id (cli.py)."""
    for name, helptext in (("drain", "stop a device or group serving (503)"),
                           ("undrain", "let a drained device or group serve again"),
                           ("set-config", "change allowed config keys of a device or group"),
                           ("rollback", "a rollout's devices (ROLLOUT) or one device/group "
                                        "back to its previous bundle")):
        p = sub.add_parser(name, help=helptext)
        if name == "rollback":
            p.add_argument("rollout", nargs="?", help="rollout id (else --device/--group)")
            p.add_argument("--expect-active", help="refused unless this bundle is active")
        if name == "set-config":
            p.add_argument("--set", action="append", default=[],
                           help="section.key=VALUE (JSON, or a bare string); repeatable")
            p.add_argument("--toml", help="a whole config document (allowed keys only)")
        p.add_argument("--device")
        p.add_argument("--group")
        p.add_argument("--wait", type=float, default=30.0,
                       help="seconds to wait for the answer(s)")
        p.add_argument("--ttl", type=float, default=3600.0,
                       help="seconds the signed command stays valid")
        p.set_defaults(fn=rollback_fn if name == "rollback" else cmd_device)
    au = sub.add_parser("audit", help="the operator's audit log (or a device's, --file)")
    au.add_argument("--device")
    au.add_argument("--since", help="2h, 30m, 3d, Unix seconds or ISO 8601")
    au.add_argument("--file", help="an audit.jsonl copied from a device root")
    au.add_argument("--json", action="store_true")
    au.set_defaults(fn=cmd_audit)
