"""The device agent against a real Mosquitto: deploy, refusals, rollback, offline commands."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from agent_fixtures import Controller, deploy, make_agent
from bundle_fixtures import BuiltBundle
from mqtt_fixtures import Broker

from edge_runtime.fleet.messages import Command


def test_deploy_switches_and_redelivery_is_not_rerun(
    broker: Broker, controller: Controller, device_root: Path, tiny_bundle: BuiltBundle,
    bundle_v2: Path,
) -> None:
    switched: list[Path | None] = []
    agent = make_agent(broker.url, device_root, tiny_bundle, on_switch=switched.append)
    agent.start(10)
    try:
        controller.wait(lambda: controller.status.get("online") is True)
        cmd = deploy("c-1", bundle_v2, tiny_bundle)
        controller.send(cmd)
        final = controller.final("c-1")  # the default health check: a real generation
        assert final.state == "active", final.reason
        assert controller.states("c-1") == ["received", "verifying", "staged", "checking",
                                            "active"]
        assert agent.slots.active == final.bundle and "-2-" in (final.bundle or "")
        assert switched == [agent.slots.path(final.bundle or "")]
        controller.wait(lambda: controller.status.get("bundle") == final.bundle)
        controller.send(cmd)  # the broker re-delivers, or the operator retries
        controller.wait(lambda: any(a.duplicate for a in controller.acks))
        dup = next(a for a in controller.acks if a.duplicate)
        assert (dup.state, dup.bundle) == ("active", final.bundle)
        assert controller.states("c-1").count("received") == 1
    finally:
        agent.stop()
    controller.wait(lambda: controller.status.get("online") is False)


def test_refusals_never_touch_active_nor_crash(
    broker: Broker, controller: Controller, device_root: Path, tiny_bundle: BuiltBundle,
    bundle_v2: Path, tmp_path: Path,
) -> None:
    agent = make_agent(broker.url, device_root, tiny_bundle)
    before = agent.slots.active
    agent.start(10)
    try:
        assert agent.mqtt.wait_subscribed(10)
        tampered = tmp_path / "tampered"
        shutil.copytree(bundle_v2, tampered)
        graph = next(p for p in tampered.rglob("*.onnx"))
        graph.write_bytes(graph.read_bytes()[:-1] + b"\0")
        cmd = deploy("bad-hash", tampered, tiny_bundle)
        controller.send(cmd)
        r = controller.final("bad-hash")
        assert r.state == "rejected" and graph.name in (r.reason or "")
        assert "staged" not in controller.states("bad-hash")
        bad_signer = Command("bad-sig", "deploy", {**cmd.params, "signer": "ab" * 8,
                                                   "bundle": str(bundle_v2)})
        controller.send(bad_signer)
        assert "not trusted" in (controller.final("bad-sig").reason or "")
        controller.send(b"{not json")
        assert "not valid JSON" in (controller.final(None).reason or "")
        controller.acks.clear()
        controller.send(Command("u-1", "reboot"))
        assert "unknown command type" in (controller.final("u-1").reason or "")
        controller.send(Command("u-2", "drain"), signer=None)
        refused = controller.final(None)
        assert "unsigned" in (refused.reason or "") and refused.id is None
        assert not agent.drained
        controller.send(Command("r-1", "rollback"))
        assert "no previous" in (controller.final("r-1").reason or "")
        assert agent.slots.active == before
    finally:
        agent.stop()


def test_failed_health_check_rolls_back(
    broker: Broker, controller: Controller, device_root: Path, tiny_bundle: BuiltBundle,
    bundle_v2: Path,
) -> None:
    def sick(path: Path) -> None:
        raise RuntimeError("quality probe: perplexity 812 > 40")

    agent = make_agent(broker.url, device_root, tiny_bundle, health_check=sick)
    before = agent.slots.active
    agent.start(10)
    try:
        assert agent.mqtt.wait_subscribed(10)
        controller.send(deploy("c-2", bundle_v2, tiny_bundle))
        final = controller.final("c-2")
        assert final.state == "rolled_back" and "perplexity 812" in (final.reason or "")
        assert final.bundle == before == agent.slots.active
        assert agent.slots.recover() == before
    finally:
        agent.stop()


def test_offline_command_runs_once_across_a_broker_restart(
    persistent_broker: Broker, device_root: Path, tiny_bundle: BuiltBundle, bundle_v2: Path,
) -> None:
    url = persistent_broker.url
    agent = make_agent(url, device_root, tiny_bundle, health_check=lambda p: None)
    agent.start(10)
    assert agent.mqtt.wait_subscribed(10)  # the broker now holds the persistent session
    persistent_broker.restart()  # kill -9: the agent must come back by itself
    assert agent.mqtt.wait_subscribed(20)
    time.sleep(0.2)
    agent.stop()
    controller = Controller(url)
    try:
        cmd = deploy("c-3", bundle_v2, tiny_bundle)
        payload = controller.send(cmd)  # PUBACKed while the device is offline
        # kill -9, no goodbye: the command survives because the broker saved its store
        # when it queued it (autosave_on_changes, autosave_interval 1; docs/FLEET.md),
        # a few ms after its PUBACK (see Broker.wait_saved).
        persistent_broker.wait_saved(payload)
        persistent_broker.restart()
        assert controller.mqtt.wait_subscribed(20)
        agent = make_agent(url, device_root, tiny_bundle, health_check=lambda p: None)
        agent.start(10)
        assert controller.final("c-3").state == "active"
        assert controller.states("c-3").count("received") == 1
        agent.stop()
        # Restarted once more: neither the broker nor the journal brings c-3 back.
        agent = make_agent(url, device_root, tiny_bundle, health_check=lambda p: None)
        agent.start(10)
        assert agent.mqtt.wait_subscribed(10)
        time.sleep(0.5)
        agent.stop()
        assert controller.states("c-3").count("received") == 1
        assert "-2-" in (agent.slots.active or "")
    finally:
        controller.mqtt.stop()
