"""The I/O around the rollout controller: MQTT in and out, SQLite, the clock.

    spec = rollout_spec(bundle_path, trusted, group=..., ...)   verify the bundle first
    rid = create_rollout(store, spec, statuses)                  plan + one transaction
    record = drive(store, rid, broker_url)                       until completed / aborted

`drive` owns one MQTT session per rollout (client id `edge-fleet-{rollout}`, clean start
off), so acks that arrive while the controller is down are queued by the broker, and it
re-sends the in-flight commands on start (same ids: the agents deduplicate). Each loop
turn feeds the queued acks and telemetry to the controller, ticks it, writes its changes
in one transaction and only then publishes the commands they imply.
"""

from __future__ import annotations

import datetime as dt
import json
import queue
import secrets
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from edge_runtime.bundle.manifest import MANIFEST, sha256_file, verify_bundle
from edge_runtime.errors import BrokerError, MessageError, RolloutError
from edge_runtime.fleet import messages as fm
from edge_runtime.mqtt import topics
from edge_runtime.mqtt.auth import BrokerAuth
from edge_runtime.mqtt.client import Message, MqttClient
from edge_runtime.mqtt.types import PublishProps
from edge_runtime.rollout.abort_rules import AbortRule
from edge_runtime.rollout.controller import Controller, Send
from edge_runtime.rollout.plan import Event, RolloutRecord, RolloutSpec, phase_name, plan
from edge_runtime.rollout.store import RolloutStore

SESSION_EXPIRY_S = 24 * 3600
"""How long the broker keeps a dead controller's acks for its resume."""


def rollout_spec(bundle: Path, trusted: list[Ed25519PublicKey], *, group: str,
                 source: str | None = None, **kw: Any) -> RolloutSpec:
    """Verify the bundle here (signature and hashes), then describe it for the devices:
    the SHA-256 they check, its signer and the version id they will report."""
    from edge_runtime.fleet.slots import Slots, version_id

    topics.check_id(group, "group")
    if not bundle.exists():
        raise RolloutError(f"bundle {bundle} does not exist")
    if bundle.is_dir():
        b = verify_bundle(bundle, trusted)
        version, digest = version_id(b), sha256_file(bundle / MANIFEST)
    else:  # a .tar: unpack it the way a device does, into a throw-away slot
        with tempfile.TemporaryDirectory(prefix="edge-fleet-") as tmp:
            slots = Slots(tmp, trusted, margin_bytes=0)
            version = slots.stage(bundle)
            b = verify_bundle(slots.path(version), trusted)
        digest = sha256_file(bundle)
    return RolloutSpec(group=group, bundle=source or str(bundle.resolve()), sha256=digest,
                       signer=b.signer, version=version, **kw)


def new_rollout_id() -> str:
    return f"r{dt.datetime.now(dt.timezone.utc):%Y%m%d-%H%M%S}-{secrets.token_hex(2)}"


def create_rollout(store: RolloutStore, spec: RolloutSpec,
                   statuses: Mapping[str, Mapping[str, Any]], rollout_id: str | None = None
                   ) -> RolloutRecord:
    if spec.abort_if:
        AbortRule.parse(spec.abort_if)  # a bad rule fails before anything is recorded
    rid = topics.check_id(rollout_id or new_rollout_id(), "rollout id")
    if "." in rid:
        raise RolloutError(f"rollout id {rid!r} must not contain '.' (command ids use it)")
    busy = [r["id"] for r in store.list() if r["group"] == spec.group
            and r["state"] in ("running", "aborting", "rolling_back")]
    if busy:  # two controllers deploying to one group would undo each other's work
        raise RolloutError(f"rollout {busy[0]} on group {spec.group!r} is unfinished; "
                           f"`edge-fleet resume {busy[0]}` or `edge-fleet rollback {busy[0]}` "
                           "it first")
    devices = plan(rid, statuses, spec)
    phases = 1 + max(d.phase for d in devices)
    record = RolloutRecord(id=rid, spec=spec, phases=phases)
    store.create(record, devices)
    return record


def drive(store: RolloutStore, rollout_id: str, broker: str | None = None, *,
          rollback: bool = False, connect_timeout_s: float = 10.0, tick_s: float = 0.2,
          on_event: Callable[[Event], None] | None = None,
          stop: threading.Event | None = None, auth: BrokerAuth | None = None
          ) -> RolloutRecord:
    """Run (or resume, or roll back) a rollout until it finishes or `stop` is set; `auth`:
    the operator's broker credentials."""
    with store.lock(rollout_id):
        record, devices = store.load(rollout_id)
        url = broker or record.spec.broker
        if not url:
            raise RolloutError(f"rollout {rollout_id} has no broker recorded; pass --broker")
        if record.state in ("completed", "aborted", "rolled_back") and not rollback:
            return record
        rule = AbortRule.parse(record.spec.abort_if) if record.spec.abort_if else None
        ctl = Controller(record, devices, rule)
        inbox: queue.Queue[Message] = queue.Queue()
        client = MqttClient(url, f"edge-fleet-{rollout_id}", clean_start=False,
                            session_expiry_s=SESSION_EXPIRY_S, reconnect_min_s=0.2,
                            reconnect_max_s=5.0, **(auth or BrokerAuth()).mqtt_options())
        client.subscribe("fleet/+/cmd/ack", inbox.put, qos=1)
        client.subscribe("fleet/+/telemetry", inbox.put, qos=0)
        if (not client.start(wait_s=connect_timeout_s)
                or not client.wait_subscribed(connect_timeout_s) or client.refused_filters):
            client.stop()
            raise RolloutError(str(client.failure(connect_timeout_s)))
        try:
            return _loop(store, ctl, client, inbox, rollback, tick_s, on_event, stop)
        finally:
            if ctl.finished:  # else the broker would queue every ack for a session never back
                for topic_filter in ("fleet/+/cmd/ack", "fleet/+/telemetry"):
                    client.unsubscribe(topic_filter)
            client.stop()


def _loop(store: RolloutStore, ctl: Controller, client: MqttClient,
          inbox: queue.Queue[Message], rollback: bool, tick_s: float,
          on_event: Callable[[Event], None] | None, stop: threading.Event | None
          ) -> RolloutRecord:
    rid = ctl.r.id
    unsent: list[Send] = ctl.rollback(time.time()) if rollback else ctl.start(time.time())
    while True:
        unsent += ctl.tick(time.time())
        changes = ctl.take_changes()
        store.save(rid, changes)  # durable before the commands it implies leave
        for e in changes.events:
            if on_event is not None:
                on_event(e)
        unsent = _publish(client, unsent)
        if (ctl.finished and not unsent) or (stop is not None and stop.is_set()):
            return ctl.r
        deadline = time.monotonic() + tick_s
        while (left := deadline - time.monotonic()) > 0:
            try:
                msg = inbox.get(timeout=left)
            except queue.Empty:
                break
            unsent += _feed(ctl, msg)


def _feed(ctl: Controller, msg: Message) -> list[Send]:
    try:
        if msg.topic.endswith("/cmd/ack"):
            return ctl.on_ack(fm.Ack.from_json(msg.payload), time.time())
        doc = json.loads(msg.payload)
        if isinstance(doc, dict):
            ctl.on_telemetry(topics.device_of(msg.topic), doc)
    except (MessageError, ValueError):
        pass  # a stranger's malformed message says nothing about this rollout
    return []


def _publish(client: MqttClient, sends: list[Send]) -> list[Send]:
    """Publish what can be; the rest (broker away) is retried next turn, ids unchanged."""
    left: list[Send] = []
    for i, s in enumerate(sends):
        try:
            client.publish(topics.fleet_cmd(s.device), s.command.to_json(),
                           props=PublishProps(message_expiry_s=s.expiry_s)
                           if s.expiry_s else None)
        except BrokerError:
            left = sends[i:]
            break
    return left


def print_event(e: Event) -> None:
    stamp = dt.datetime.fromtimestamp(e.ts).strftime("%H:%M:%S")
    print(f"{stamp} {phase_name(e.phase) if e.phase >= 0 else '-':<9} {e.kind:<16} {e.detail}",
          flush=True)


def summary(store: RolloutStore, rollout_id: str) -> dict[str, Any]:
    """What `edge-fleet status` shows: the record, counts, per-device rows, the timeline."""
    record, devices = store.load(rollout_id)
    counts: dict[str, int] = {}
    for d in devices:
        counts[d.state] = counts.get(d.state, 0) + 1
    return {
        "id": record.id, "state": record.state, "phase": phase_name(record.phase),
        "phase_index": record.phase, "phases": record.phases, "step": record.step,
        "reason": record.reason, "created": record.created, "updated": record.updated,
        "spec": {k: v for k, v in record.spec.__dict__.items()}, "counts": counts,
        "devices": [d.__dict__ for d in devices],
        "events": [e.__dict__ for e in store.events(rollout_id)],
    }
