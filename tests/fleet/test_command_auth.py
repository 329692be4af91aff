"""Operator-signed commands against a real Mosquitto and a real agent: what is refused and
why, replay and expiry, the audit trail, least-privilege set-config, downgrade protection."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import pytest
from agent_fixtures import DEVICE, OPERATOR, Controller, deploy, make_agent
from bundle_fixtures import BuiltBundle
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from mqtt_fixtures import Broker

from edge_runtime import signing
from edge_runtime.errors import CommandAuthError, SignatureError
from edge_runtime.fleet.audit import AUDIT, AuditLog, read_audit
from edge_runtime.fleet.command_auth import (
    CommandSigner,
    CommandVerifier,
    device_target,
    group_target,
)
from edge_runtime.fleet.config_update import REDACTED, redact
from edge_runtime.fleet.deploy import version_key
from edge_runtime.fleet.journal import JOURNAL
from edge_runtime.fleet.messages import Command
from edge_runtime.fleet.remote_config import REMOTE_KEYS, merged_config
from edge_runtime.mqtt import topics
from edge_runtime.tomlconfig import read_toml

STRANGER = CommandSigner(Ed25519PrivateKey.generate())
MARKER = "attacker-marker-0xdeadbeef"


def test_forged_expired_misdirected_and_replayed_commands_are_refused(
    broker: Broker, controller: Controller, device_root: Path, tiny_bundle: BuiltBundle,
) -> None:
    agent = make_agent(broker.url, device_root, tiny_bundle)
    agent.start(10)
    try:
        assert agent.mqtt.wait_subscribed(10)
        good = OPERATOR.sign(Command("a-1", "drain"), device_target(DEVICE))
        tampered = json.loads(good)
        tampered["type"] = "undrain"
        expired = OPERATOR.sign(Command("a-3", "drain"), device_target(DEVICE), ttl_s=60,
                                now=time.time() - 3600)
        too_long = OPERATOR.sign(Command("a-4", "drain"), device_target(DEVICE),
                                 ttl_s=30 * 24 * 3600)
        future = OPERATOR.sign(Command("a-5", "drain"), device_target(DEVICE),
                               now=time.time() + 3600)
        cases = [
            (Command("a-0", "drain", {"note": MARKER}).to_json(), "unsigned command refused"),
            (STRANGER.sign(Command("a-2", "drain"), device_target(DEVICE)), "not trusted"),
            (json.dumps(tampered).encode(), "bad signature"),
            (expired, "expired at"),
            (too_long, "more than the"),
            (future, "in the future"),
            (OPERATOR.sign(Command("a-6", "drain"), device_target("dev-2")), "for 'device:dev-2'"),
            (OPERATOR.sign(Command("a-7", "drain"), group_target("other")), "for 'group:other'"),
            (OPERATOR.sign_doc({"v": 1, "id": "a-8", "type": "drain"}, device_target(DEVICE),
                               nonce="short"), "nonce"),
        ]
        for payload, _ in cases:
            controller.send(payload)
        controller.wait(lambda: sum(a.state == "rejected" for a in controller.acks) >= len(cases))
        refused = [a for a in controller.acks if a.state == "rejected"]
        for (payload, words), ack in zip(cases, refused, strict=True):
            assert ack.id is None and words in (ack.reason or ""), (words, ack)
            digest = hashlib.sha256(payload).hexdigest()
            assert ack.detail is not None and ack.detail["digest"] == digest
        assert not agent.drained and controller.states("a-0") == []
        # A group command on the group's topic is obeyed; the same on another topic is not.
        group_cmd = OPERATOR.sign(Command("g-1", "drain"), group_target("lab"))
        controller.mqtt.publish(topics.fleet_group_cmd("lab"), group_cmd, wait_s=5)
        assert controller.final("g-1").state == "drained"
        controller.send(Command("g-2", "undrain"))
        assert controller.final("g-2").state == "undrained"
        # Replays: the same id is answered from the journal and not run again...
        controller.send(good)
        assert controller.final("a-1").state == "drained"
        controller.send(Command("a-8", "undrain"))
        assert controller.final("a-8").state == "undrained"
        controller.send(good)
        controller.wait(lambda: any(a.duplicate for a in controller.acks if a.id == "a-1"))
        assert not agent.drained
        agent.journal.keep = 1  # a-1 leaves the journal: its nonce must still catch a replay
        controller.send(Command("a-9", "undrain"))
        assert controller.final("a-9").state == "undrained"
        controller.acks.clear()
        controller.send(good)  # ...and once a-1 left the journal (keep=1), by its nonce
        replay = controller.final("a-1")
        assert replay.state == "rejected" and "replayed" in (replay.reason or "")
        assert not agent.drained
    finally:
        agent.stop()
    # Nothing unverified reached the journal; the audit trail has every command.
    assert MARKER not in (device_root / JOURNAL).read_text()
    assert MARKER not in (device_root / AUDIT).read_text()
    records = list(read_audit(device_root / AUDIT, device=DEVICE))
    outcomes = [(r["id"], r["outcome"]) for r in records]
    assert outcomes.count((None, "refused")) == len(cases)
    assert ("a-1", "accepted") in outcomes and ("a-1", "drained") in outcomes
    assert ("a-1", "rejected") in outcomes  # the replay
    ok = next(r for r in records if r["id"] == "a-1" and r["outcome"] == "accepted")
    assert ok["key_id"] == OPERATOR.key_id and ok["target"] == device_target(DEVICE)
    assert all(r["reason"] for r in records if r["outcome"] in ("refused", "rejected"))
    assert list(read_audit(device_root / AUDIT, since=time.time() + 60)) == []


def test_no_operator_key_refuses_everything(
    broker: Broker, controller: Controller, device_root: Path, tiny_bundle: BuiltBundle,
) -> None:
    agent = make_agent(broker.url, device_root, tiny_bundle, operators=[])
    agent.start(10)
    try:
        assert agent.mqtt.wait_subscribed(10)
        controller.send(Command("n-1", "drain"))
        assert "no operator key is trusted" in (controller.final(None).reason or "")
        assert not agent.drained
    finally:
        agent.stop()


PROTECTED = {
    "server.host": "0.0.0.0", "server.port": 80, "server.api_key": "hunter2",
    "server.api_key_file": "/tmp/k", "model.bundle": "/tmp/evil", "model.pubkeys": ["/tmp/k"],
    "log.access_log": "/etc/passwd", "offload.broker": "mqtt://evil:1883",
    "offload.username": "x", "offload.password_file": "/tmp/p", "offload.ca_file": "/tmp/ca",
    "offload.cert_file": "/tmp/c", "offload.key_file": "/tmp/k", "offload.device_id": "dev-2",
    "fleet.enabled": False, "fleet.broker": "mqtt://evil:1883", "fleet.root": "/tmp/x",
    "fleet.device_id": "dev-2", "fleet.groups": ["evil"], "fleet.pubkeys": ["/tmp/k"],
    "fleet.operator_keys": ["/tmp/k"], "fleet.username": "x", "fleet.password_file": "/tmp/p",
    "fleet.ca_file": "/tmp/ca", "fleet.cert_file": "/tmp/c", "fleet.key_file": "/tmp/k",
    "fleet.download_ca_file": "/tmp/ca", "fleet.tegrastats": "/tmp/evil-binary",
    "fleet.session_expiry_s": 1, "fleet.remote_config": "/etc/edge-runtime/config.toml",
}


def test_set_config_refuses_every_protected_key_and_redacts_secrets(
    broker: Broker, controller: Controller, device_root: Path, tiny_bundle: BuiltBundle,
    tmp_path: Path,
) -> None:
    path = tmp_path / "edge.toml"
    original = '[server]\napi_key = "s3cret-key"\n'
    path.write_text(original)
    overlay = tmp_path / "remote.toml"
    agent = make_agent(broker.url, device_root, tiny_bundle, config_path=path)
    agent.start(10)
    try:
        assert agent.mqtt.wait_subscribed(10)
        for i, (key, value) in enumerate(PROTECTED.items()):
            assert key not in REMOTE_KEYS
            controller.send(Command(f"p-{i}", "set-config", {"set": {key: value}}))
        for i, key in enumerate(PROTECTED):
            r = controller.final(f"p-{i}")
            assert r.state == "rejected" and key in (r.reason or ""), (key, r.reason)
        assert path.read_text() == original and not overlay.exists()
        # A whole document is the overlay: it cannot name the API key, and leaving it out
        # does not drop the provisioned one.
        controller.send(Command("p-doc", "set-config", {"toml": "[server]\napi_key = \"x\"\n"}))
        r = controller.final("p-doc")
        assert r.state == "rejected" and "may not change server.api_key" in (r.reason or "")
        controller.send(Command("p-log", "set-config", {"toml": "[log]\nlevel = \"debug\"\n"}))
        assert controller.final("p-log").state == "applied"
        running = merged_config(read_toml(path), tmp_path, str(path), overlay)[1]
        assert running.server.api_key == "s3cret-key" and running.log.level == "debug"
        controller.send(Command("p-ok", "set-config", {"set": {"scheduler.max_queue": 7}}))
        assert controller.final("p-ok").state == "applied"
        assert path.read_text() == original
    finally:
        agent.stop()
    wire = json.dumps([a.to_dict() for a in controller.acks])
    assert "s3cret" not in wire and "hunter2" not in wire
    assert "s3cret" not in (device_root / AUDIT).read_text()
    assert redact({"server.api_key": ["a", None], "log.level": ["info", "debug"]}) == {
        "server.api_key": [REDACTED, None], "log.level": ["info", "debug"]}


def test_a_key_planted_through_set_config_is_not_trusted(
    broker: Broker, controller: Controller, device_root: Path, tiny_bundle: BuiltBundle,
    tmp_path: Path,
) -> None:
    """The one writable file a command reaches is the config: a PEM written into it (a
    comment is allowed) never becomes a key, and the trust store is not a key to set."""
    signing.generate_keypair(tmp_path / "evil.key", tmp_path / "evil.pub")
    pem = (tmp_path / "evil.pub").read_text()
    path = tmp_path / "edge.toml"
    agent = make_agent(broker.url, device_root, tiny_bundle, config_path=path)
    agent.start(10)
    try:
        assert agent.mqtt.wait_subscribed(10)
        doc = "[log]\nlevel = \"debug\"\n" + "".join(f"# {line}\n" for line in pem.splitlines())
        controller.send(Command("k-1", "set-config", {"toml": doc}))
        assert controller.final("k-1").state == "applied"
        overlay = tmp_path / "remote.toml"  # the one file a command writes
        assert "BEGIN PUBLIC KEY" in overlay.read_text()
        with pytest.raises(SignatureError, match="not a PEM public key file"):
            signing.load_public_key(overlay)
        with pytest.raises(SignatureError, match="not a PEM public key file"):
            signing.load_public_key(device_root / JOURNAL)
        controller.send(Command("k-2", "set-config", {"set": {"fleet.operator_keys":
                                                             [str(path)]}}))
        assert "fleet.operator_keys" in (controller.final("k-2").reason or "")
        evil = CommandSigner(signing.load_private_key(tmp_path / "evil.key"))
        controller.send(Command("k-3", "drain"), signer=evil)
        assert "not trusted" in (controller.final(None).reason or "")
        assert not agent.drained
    finally:
        agent.stop()


def test_downgrade_is_refused_and_rollback_is_the_way_back(
    broker: Broker, controller: Controller, device_root: Path, tiny_bundle: BuiltBundle,
    bundle_v2: Path,
) -> None:
    agent = make_agent(broker.url, device_root, tiny_bundle, health_check=lambda p: None)
    v1 = agent.slots.active
    agent.start(10)
    try:
        assert agent.mqtt.wait_subscribed(10)
        controller.send(deploy("v-2", bundle_v2, tiny_bundle))
        assert controller.final("v-2").state == "active"
        v2 = agent.slots.active
        controller.send(deploy("v-1", tiny_bundle.path, tiny_bundle))
        r = controller.final("v-1")
        assert r.state == "rejected" and "downgrade refused" in (r.reason or ""), r.reason
        assert agent.slots.active == v2 and agent.slots.previous == v1
        controller.send(Command("v-rb", "rollback", {"expect_active": v2}))
        rb = controller.final("v-rb")
        assert rb.state == "rolled_back" and agent.slots.active == v1
    finally:
        agent.stop()


def test_version_order() -> None:
    order = ["dev", "0.9", "1.0rc1", "1.0-rc2", "1", "1.0.1", "1.2", "1.10", "2", "v2.1",
             "10.0"]
    assert sorted(order, key=version_key) == order
    assert version_key("1.2") == version_key("1.2.0") == version_key("1.2+build7")


def test_verifier_without_a_broker() -> None:
    v = CommandVerifier(DEVICE, ("lab",), [OPERATOR.key.public_key()], clock=lambda: 1000.0)
    payload = OPERATOR.sign(Command("x", "drain"), device_target(DEVICE), now=1000)
    auth = v.check(json.loads(payload), topics.fleet_cmd(DEVICE))
    assert auth.key_id == OPERATOR.key_id and auth.expires == 1000 + 24 * 3600
    with pytest.raises(CommandAuthError, match="not for this device"):
        v.check(json.loads(payload), topics.fleet_group_cmd("lab"))  # moved to another topic


def test_audit_log_rotates_and_skips_a_torn_line(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / AUDIT, max_bytes=400, keep=2)
    for i in range(30):
        log.append({"device": "d", "i": i})
    with open(tmp_path / AUDIT, "ab") as f:
        f.write(b'{"device": "d", "i": 9')  # kill -9 mid-line
    got = [r["i"] for r in read_audit(tmp_path / AUDIT)]
    assert got == sorted(got) and got[-1] == 29 and len(got) < 30  # the oldest rotated away
    assert sorted(p.name for p in tmp_path.iterdir()) == [AUDIT, f"{AUDIT}.1", f"{AUDIT}.2"]
