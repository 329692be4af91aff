"""`edge-fleet`: the operator's view of a fleet, read from the broker.

    edge-fleet --broker URL devices [--wait 1.0] [--json]   every device's retained status
    edge-fleet --broker URL telemetry DEVICE [--count N]    live telemetry, as JSON lines

Devices publish a retained status on `fleet/{device}/status` (online, bundle, runtime,
host) and their broker publishes their Last Will (offline) when they vanish, so a new
subscriber learns the whole fleet's state at once, without asking any device. Staged
rollouts (`deploy`, `rollback`, `status`) come next on the same connection.
"""

from __future__ import annotations

import argparse
import json
import queue
import secrets
import sys
import time
from collections.abc import Sequence
from typing import Any

from edge_runtime import topics
from edge_runtime.errors import EdgeError, MessageError
from edge_runtime.mqtt import Message, MqttClient


def _decode(msg: Message) -> dict[str, Any]:
    try:
        doc = json.loads(msg.payload)
    except ValueError as e:
        raise MessageError(f"{msg.topic}: payload is not JSON: {e}") from e
    if not isinstance(doc, dict):
        raise MessageError(f"{msg.topic}: payload is not a JSON object")
    return doc


def _connect(broker: str, topic_filter: str, got: queue.Queue[Message], qos: int,
             timeout_s: float) -> MqttClient:
    client = MqttClient(broker, f"edge-fleet-{secrets.token_hex(4)}")
    client.subscribe(topic_filter, got.put, qos=qos)
    if not client.start(wait_s=timeout_s) or not client.wait_subscribed(timeout_s):
        client.stop()
        raise EdgeError(f"cannot reach the MQTT broker at {broker} within {timeout_s:g}s")
    return client


def read_statuses(broker: str, wait_s: float = 1.0, connect_s: float = 10.0
                  ) -> dict[str, dict[str, Any]]:
    """Each device's retained status (malformed ones are reported, not fatal)."""
    got: queue.Queue[Message] = queue.Queue()
    client = _connect(broker, topics.FLEET_STATUS_ALL, got, 1, connect_s)
    # Retained messages arrive right after SUBACK; `wait_s` bounds how long we listen.
    deadline = time.monotonic() + wait_s
    out: dict[str, dict[str, Any]] = {}
    try:
        while (left := deadline - time.monotonic()) > 0:
            try:
                msg = got.get(timeout=left)
            except queue.Empty:
                break
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
    return (f"{device:<24} {state:<8} {st.get('bundle') or '-':<36} "
            f"{st.get('runtime_version') or '-':<10} {age:>8.0f}s")


def cmd_devices(a: argparse.Namespace) -> int:
    statuses = read_statuses(a.broker, a.wait, a.connect_timeout)
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
    client = _connect(a.broker, topics.fleet_telemetry(a.device), got, 0, a.connect_timeout)
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


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edge-fleet", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--broker", required=True, help="mqtt://host:port or mqtts://host:port")
    p.add_argument("--connect-timeout", type=float, default=10.0, help="seconds")
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
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return int(args.fn(args))
    except EdgeError as e:
        print(f"edge-fleet {args.cmd}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
