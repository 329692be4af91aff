"""`edge-fleet`: the operator's view of a fleet, read from the broker, and staged rollouts.

    edge-fleet --broker URL devices [--wait 1.0] [--json]   every device's retained status
    edge-fleet --broker URL telemetry DEVICE [--count N]    live telemetry, as JSON lines
    edge-fleet --broker URL deploy BUNDLE --group G [--canary 10%] [--batch 25%]
               [--abort-if "error_rate>0.02 or ttft_p95_ms>800 or quality_drop>0.05"]
               [--soak 60] [--ack-timeout 300] [--max-failures 10%] [--pubkey PEM]
    edge-fleet resume ROLLOUT         continue a rollout whose controller died (or was ^C)
    edge-fleet rollback ROLLOUT       send every device of the rollout back
    edge-fleet status ROLLOUT [--json]                      phase, per-device state, counts
    edge-fleet rollouts [--json]
    edge-fleet drain|undrain|set-config|rollback --device D | --group G   (commands.py)
    edge-fleet audit [--device D] [--since 2h]    who sent what, from the operator's audit log

Every command a device receives is signed with the operator key (`--key`, else
$EDGE_FLEET_KEY, else ~/.config/edge-fleet/operator.key) and recorded, with the key's id, in
the audit log (`--audit`, else $EDGE_FLEET_AUDIT, else ~/.local/state/edge-fleet/audit.jsonl).

Devices publish a retained status on `fleet/{device}/status` (online, bundle, groups,
runtime, host) and their broker publishes their Last Will (offline) when they vanish, so a
new subscriber learns the whole fleet's state at once, without asking any device.

A rollout (rollout.py and rollout_plan.py hold the policy) deploys to a random canary of
the group's online devices, then to batches; after each phase it waits for every device's
final ack, then soaks: post-deploy telemetry is averaged over the phase and `--abort-if`
evaluated. A trip, or more failed/timed-out devices than `--max-failures` of those attempted, aborts
and rolls back every device the rollout switched. State lives in SQLite (`--db`, default
$EDGE_FLEET_DB or ~/.local/state/edge-fleet/rollouts.db). Exit status: 0 completed or
rolled back, 1 error, 2 aborted, 130 interrupted (resume it).
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import secrets
import signal
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from edge_runtime.errors import ConfigError, EdgeError, MessageError
from edge_runtime.mqtt import topics
from edge_runtime.mqtt.auth import BrokerAuth, add_auth_options, auth_from_args
from edge_runtime.mqtt.client import Message, MqttClient
from edge_runtime.rollout import image, provision, revoke


def _decode(msg: Message) -> dict[str, Any]:
    try:
        doc = json.loads(msg.payload)
    except ValueError as e:
        raise MessageError(f"{msg.topic}: payload is not JSON: {e}") from e
    if not isinstance(doc, dict):
        raise MessageError(f"{msg.topic}: payload is not a JSON object")
    return doc


def _connect(broker: str, topic_filter: str, got: queue.Queue[Message], qos: int,
             timeout_s: float, auth: BrokerAuth | None = None) -> MqttClient:
    client = MqttClient(broker, f"edge-fleet-{secrets.token_hex(4)}",
                        **(auth or BrokerAuth()).mqtt_options())
    client.subscribe(topic_filter, got.put, qos=qos)
    # A refusal (CONNACK or SUBACK "Not authorized") is said as such, not as unreachable.
    if (not client.start(wait_s=timeout_s) or not client.wait_subscribed(timeout_s)
            or client.refused_filters):
        client.stop()
        raise client.failure(timeout_s)
    return client


def read_statuses(broker: str, wait_s: float = 1.0, connect_s: float = 10.0,
                  auth: BrokerAuth | None = None) -> dict[str, dict[str, Any]]:
    """Each device's retained status (malformed ones are reported, not fatal)."""
    got: queue.Queue[Message] = queue.Queue()
    client = _connect(broker, topics.FLEET_STATUS_ALL, got, 1, connect_s, auth)
    # Retained messages arrive right after SUBACK; we listen `wait_s`, and longer while they
    # keep coming (a thousand devices' statuses take a while on a busy machine), at most 5x.
    start = time.monotonic()
    deadline = start + wait_s
    out: dict[str, dict[str, Any]] = {}
    try:
        while (left := deadline - time.monotonic()) > 0:
            try:
                msg = got.get(timeout=left)
            except queue.Empty:
                break
            deadline = max(deadline, min(time.monotonic() + 0.5, start + 5 * wait_s))
            try:
                device = topics.device_of(msg.topic)
            except MessageError as e:
                out[msg.topic] = {"error": str(e)}
                continue
            try:
                out[device] = _decode(msg)
            except MessageError as e:
                out[device] = {"error": str(e)}
    finally:
        client.stop()
    return out


def _row(device: str, st: dict[str, Any]) -> str:
    if "error" in st:
        return f"{device:<24} {'?':<8} {st['error']}"
    state = "online" if st.get("online") else "offline"
    age = time.time() - float(st.get("ts", time.time()))
    note = ("  remote config ignored (see --json)" if st.get("remote_config_ignored")
            else "")
    return (f"{device:<24} {state:<8} {st.get('bundle') or '-':<36} "
            f"{st.get('runtime_version') or '-':<10} {age:>8.0f}s{note}")


def cmd_devices(a: argparse.Namespace) -> int:
    statuses = read_statuses(a.broker, a.wait, a.connect_timeout, a.auth)
    if a.json:
        print(json.dumps(statuses, indent=2, sort_keys=True))
        return 0
    print(f"{'DEVICE':<24} {'STATE':<8} {'BUNDLE':<36} {'RUNTIME':<10} {'SINCE':>9}")
    for device in sorted(statuses):
        print(_row(device, statuses[device]))
    online = sum(1 for s in statuses.values() if s.get("online"))
    print(f"{len(statuses)} devices, {online} online")
    return 0


def cmd_telemetry(a: argparse.Namespace) -> int:
    got: queue.Queue[Message] = queue.Queue()
    client = _connect(a.broker, topics.fleet_telemetry(a.device), got, 0, a.connect_timeout,
                      a.auth)
    try:
        for _ in range(a.count):
            try:
                msg = got.get(timeout=a.timeout)
            except queue.Empty:
                raise EdgeError(f"no telemetry from {a.device} within {a.timeout:.0f}s") from None
            print(json.dumps(_decode(msg), sort_keys=True), flush=True)
    finally:
        client.stop()
    return 0


def _broker(a: argparse.Namespace) -> str:
    if not a.broker:
        raise ConfigError(f"{a.cmd} needs --broker mqtt://HOST:PORT (or $EDGE_FLEET_BROKER)")
    return str(a.broker)


def _store(a: argparse.Namespace) -> Any:
    from edge_runtime.rollout.store import RolloutStore, default_db

    return RolloutStore(Path(a.db) if a.db else default_db())


def _drive(a: argparse.Namespace, rollout_id: str, rollback: bool = False) -> int:
    """Drive until finished; SIGINT/SIGTERM stop it cleanly, leaving it resumable."""
    from edge_runtime.rollout.driver import drive, print_event

    stop = threading.Event()
    old = {}
    if threading.current_thread() is threading.main_thread():  # else Python refuses
        old = {sig: signal.signal(sig, lambda *_: stop.set())
               for sig in (signal.SIGINT, signal.SIGTERM)}
    from edge_runtime.rollout.commands import audit_log, signer

    store = _store(a)
    try:
        record = drive(store, rollout_id, a.broker, rollback=rollback, auth=a.auth,
                       connect_timeout_s=a.connect_timeout, on_event=print_event, stop=stop,
                       signer=signer(a), audit=audit_log(a))
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
        store.close()
    if record.state == "aborted":
        print(f"rollout {record.id} aborted: {record.reason}", file=sys.stderr)
        return 2
    if record.state not in ("completed", "rolled_back"):
        print(f"rollout {record.id} interrupted ({record.state}); continue it with "
              f"`edge-fleet resume {record.id}`", file=sys.stderr)
        return 130
    print(f"rollout {record.id} {record.state}")
    return 0


def cmd_deploy(a: argparse.Namespace) -> int:
    from edge_runtime import signing
    from edge_runtime.rollout.driver import create_rollout, rollout_spec
    from edge_runtime.rollout.plan import parse_share

    broker = _broker(a)
    if a.abort_if:
        from edge_runtime.rollout.abort_rules import AbortRule

        AbortRule.parse(a.abort_if)  # fail before reading the fleet
    max_failures = parse_share(a.max_failures, "--max-failures")
    if not max_failures.endswith("%"):
        raise ConfigError(f"--max-failures must be a share like 10%, got {a.max_failures!r}")
    for name, v in (("--soak", a.soak), ("--ack-timeout", a.ack_timeout)):
        if v < 0 or (name == "--ack-timeout" and v == 0):
            raise ConfigError(f"{name} must be > 0 seconds, got {v:g}")
    trusted = signing.trusted_keys([Path(p) for p in a.pubkey] if a.pubkey else None)
    spec = rollout_spec(Path(a.bundle), trusted, group=a.group, source=a.source,
                        canary=parse_share(a.canary, "--canary"),
                        batch=parse_share(a.batch, "--batch"), abort_if=a.abort_if or None,
                        soak_s=a.soak, ack_timeout_s=a.ack_timeout,
                        max_failures=float(max_failures[:-1]) / 100, broker=broker)
    statuses = read_statuses(broker, a.discover_wait, a.connect_timeout, a.auth)
    store = _store(a)
    try:
        from edge_runtime.rollout.commands import audit_log, signer
        from edge_runtime.rollout.driver import summary

        key_id = signer(a).key_id  # no key, no rollout: fail before anything is recorded
        record = create_rollout(store, spec, statuses, a.id)
        s = summary(store, record.id)
        audit_log(a).append({"event": "rollout-created", "rollout": record.id,
                             "group": spec.group, "version": spec.version,
                             "sha256": spec.sha256, "size": spec.size, "key_id": key_id})
    finally:
        store.close()
    sizes: dict[int, int] = {}
    for d in s["devices"]:
        if d["phase"] >= 0:
            sizes[d["phase"]] = sizes.get(d["phase"], 0) + 1
    skipped = s["counts"].get("skipped", 0)
    print(f"rollout {record.id}: {spec.version} to {sum(sizes.values())} devices of group "
          f"{spec.group} in {record.phases} phases ({' + '.join(map(str, sizes.values()))})"
          f"{f', {skipped} skipped' if skipped else ''}", flush=True)
    return _drive(a, record.id)


def cmd_resume(a: argparse.Namespace) -> int:
    return _drive(a, a.rollout)


def cmd_rollback(a: argparse.Namespace) -> int:
    if a.rollout is None:
        from edge_runtime.rollout.commands import cmd_device

        return cmd_device(a)  # one device or group back to its previous slot
    if a.device or a.group or a.expect_active:
        raise ConfigError("rollback takes a rollout id or --device/--group, not both")
    return _drive(a, a.rollout, rollback=True)


def cmd_status(a: argparse.Namespace) -> int:
    from edge_runtime.rollout.driver import summary

    store = _store(a)
    try:
        s = summary(store, a.rollout)
    finally:
        store.close()
    if a.json:
        print(json.dumps(s, indent=2, sort_keys=True))
        return 0
    print(f"rollout {s['id']}: {s['state']}, {s['phase']} ({s['phase_index'] + 1} of "
          f"{s['phases']}), step {s['step']}")
    print(f"bundle {s['spec']['version']} to group {s['spec']['group']}")
    if s["reason"]:
        print(f"reason: {s['reason']}")
    print("counts: " + ", ".join(f"{k} {v}" for k, v in sorted(s["counts"].items())))
    print(f"\n{'DEVICE':<24} {'PHASE':<9} {'STATE':<16} {'BUNDLE':<32} REASON")
    for d in s["devices"]:
        phase = "-" if d["phase"] < 0 else ("canary" if d["phase"] == 0 else f"batch {d['phase']}")
        print(f"{d['device']:<24} {phase:<9} {d['state']:<16} "
              f"{d['after'] or d['before'] or '-':<32} {d['reason'] or ''}")
    print("\ntimeline:")
    from edge_runtime.rollout.driver import print_event
    from edge_runtime.rollout.plan import Event

    for e in s["events"]:
        print_event(Event(**e))
    return 0


def cmd_rollouts(a: argparse.Namespace) -> int:
    store = _store(a)
    try:
        rows = store.list()
    finally:
        store.close()
    if a.json:
        print(json.dumps(rows, indent=2, sort_keys=True))
        return 0
    print(f"{'ROLLOUT':<24} {'STATE':<12} {'GROUP':<12} {'DEVICES':>7} {'PHASE':>6}  VERSION")
    for r in rows:
        print(f"{r['id']:<24} {r['state']:<12} {r['group']:<12} {r['devices']:>7} "
              f"{r['phase'] + 1:>3}/{r['phases']:<2}  {r['version']}")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edge-fleet", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--broker", default=os.environ.get("EDGE_FLEET_BROKER"),
                   help="mqtt://host:port or mqtts://host:port ($EDGE_FLEET_BROKER)")
    add_auth_options(p, "EDGE_FLEET")
    p.add_argument("--connect-timeout", type=float, default=10.0, help="seconds")
    p.add_argument("--key", help="operator private key that signs commands (default "
                   "$EDGE_FLEET_KEY or ~/.config/edge-fleet/operator.key)")
    p.add_argument("--audit", help="operator audit log (default $EDGE_FLEET_AUDIT or "
                   "~/.local/state/edge-fleet/audit.jsonl)")
    p.add_argument("--db", help="rollout database (default $EDGE_FLEET_DB or "
                   "~/.local/state/edge-fleet/rollouts.db)")
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("devices", help="every device's retained status")
    d.add_argument("--wait", type=float, default=1.0, help="seconds to collect statuses")
    d.add_argument("--json", action="store_true")
    d.set_defaults(fn=cmd_devices)
    t = sub.add_parser("telemetry", help="a device's live telemetry as JSON lines")
    t.add_argument("device")
    t.add_argument("--count", type=int, default=10)
    t.add_argument("--timeout", type=float, default=30.0, help="seconds to wait per message")
    t.set_defaults(fn=cmd_telemetry)
    dep = sub.add_parser("deploy", help="staged rollout of a bundle to a device group")
    dep.add_argument("bundle", help="bundle directory or .tar (verified here first)")
    dep.add_argument("--group", required=True)
    dep.add_argument("--canary", default="10%", help="share (10%%) or device count")
    dep.add_argument("--batch", default="25%", help="share of the group per batch, or count")
    dep.add_argument("--abort-if", default=None, help='e.g. "error_rate>0.02 or '
                     'ttft_p95_ms>800 or quality_drop>0.05"')
    dep.add_argument("--soak", type=float, default=60.0,
                     help="seconds of post-deploy telemetry per phase")
    dep.add_argument("--ack-timeout", type=float, default=300.0,
                     help="seconds a device has to finish its deploy (or rollback)")
    dep.add_argument("--max-failures", default="10%",
                     help="share of attempted devices that may fail or time out")
    dep.add_argument("--pubkey", action="append", default=[],
                     help="trusted key to verify the bundle (default: the trust directory)")
    dep.add_argument("--source", help="what devices fetch (default: the bundle's path)")
    dep.add_argument("--discover-wait", type=float, default=2.0,
                     help="seconds to collect the devices' retained statuses")
    dep.add_argument("--id", help="rollout id (default r<UTC date>-<time>-<hex>)")
    dep.set_defaults(fn=cmd_deploy)
    r = sub.add_parser("resume", help="continue an interrupted rollout")
    r.add_argument("rollout")
    r.set_defaults(fn=cmd_resume)
    from edge_runtime.rollout.commands import add_parsers

    add_parsers(sub, cmd_rollback)
    st = sub.add_parser("status", help="a rollout's phase, devices and timeline")
    st.add_argument("rollout")
    st.add_argument("--json", action="store_true")
    st.set_defaults(fn=cmd_status)
    ls = sub.add_parser("rollouts", help="every recorded rollout")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(fn=cmd_rollouts)
    provision.register(sub)  # edge-fleet provision (#12)
    revoke.register(sub)  # edge-fleet revoke (#12)
    image.register(sub)  # edge-fleet image (#12)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        args.auth = auth_from_args(args, "EDGE_FLEET")
        if args.cmd in ("devices", "telemetry"):
            _broker(args)
        return int(args.fn(args))
    except EdgeError as e:
        print(f"edge-fleet {args.cmd}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
