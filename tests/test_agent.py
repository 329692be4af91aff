"""The device agent against a real Mosquitto: deploy, refusals, rollback, offline commands."""

from __future__ import annotations

import hashlib
import json
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import BuiltBundle
from mqtt_fixtures import Broker

from edge_runtime import signing, topics
from edge_runtime.agent import AgentConfig, DeviceAgent
from edge_runtime.bundle import MANIFEST
from edge_runtime.fleet_messages import Ack, Command
from edge_runtime.mqtt import Message, MqttClient
from edge_runtime.slots import Slots

DEVICE = "dev-1"


@pytest.fixture(scope="module")
def bundle_v2(tiny_bundle: BuiltBundle, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same model re-released as version 2: re-signed with edge_runtime alone, so these
    tests also run on the device leg (no onnx, no torch)."""
    import json

    from edge_runtime.bundle import MANIFEST, write_bundle
    from edge_runtime.signing import load_private_key

    src = tiny_bundle.path
    fields = json.loads((src / MANIFEST).read_text())
    files = {rel: src / rel for rel in fields.pop("files")}
    del fields["schema_version"]
    fields.update(name="demo", version="2")
    out = tmp_path_factory.mktemp("v2") / "bundle"
    return write_bundle(out, files, fields, load_private_key(tiny_bundle.key))


class Controller:
    """The operator's side: publishes commands, collects acks and retained status."""

    def __init__(self, url: str) -> None:
        self.acks: list[Ack] = []
        self.status: dict[str, object] = {}
        self._cv = threading.Condition()
        self.mqtt = MqttClient(url, "controller", reconnect_min_s=0.1, reconnect_max_s=1.0)
        self.mqtt.subscribe(topics.fleet_cmd_ack(DEVICE), self._on_ack)
        self.mqtt.subscribe(topics.fleet_status(DEVICE), self._on_status)
        self.mqtt.start()
        assert self.mqtt.wait_subscribed(10)

    def _on_ack(self, m: Message) -> None:
        with self._cv:
            self.acks.append(Ack.from_json(m.payload))
            self._cv.notify_all()

    def _on_status(self, m: Message) -> None:
        with self._cv:
            self.status = json.loads(m.payload)
            self._cv.notify_all()

    def send(self, cmd: Command | bytes) -> None:
        payload = cmd if isinstance(cmd, bytes) else cmd.to_json()
        self.mqtt.publish(topics.fleet_cmd(DEVICE), payload, wait_s=5)

    def wait(self, pred: Callable[[], bool], timeout_s: float = 60) -> None:
        with self._cv:
            assert self._cv.wait_for(pred, timeout_s), (self.acks, self.status)

    def states(self, cid: str | None) -> list[str]:
        return [a.state for a in self.acks if a.id == cid]

    def final(self, cid: str | None, timeout_s: float = 60) -> Ack:
        self.wait(lambda: any(a.final for a in self.acks if a.id == cid), timeout_s)
        return next(a for a in self.acks if a.id == cid and a.final)


@pytest.fixture
def device_root(tiny_bundle: BuiltBundle, tmp_path: Path) -> Path:
    root = tmp_path / "device"
    slots = Slots(root / "slots", [signing.load_public_key(tiny_bundle.pubkey)])
    slots.activate(slots.stage(tiny_bundle.path))
    slots.commit()
    return root


def make_agent(url: str, root: Path, bundle: BuiltBundle, **kw: object) -> DeviceAgent:
    cfg = AgentConfig(DEVICE, url, root, groups=("lab",), telemetry_interval_s=3600,
                      reconnect_min_s=0.1, reconnect_max_s=1.0)
    return DeviceAgent(cfg, [signing.load_public_key(bundle.pubkey)], **kw)  # type: ignore[arg-type]


def deploy(cid: str, bundle: Path, key: BuiltBundle) -> Command:
    kid = signing.key_id(signing.load_public_key(key.pubkey))
    digest = hashlib.sha256((bundle / MANIFEST).read_bytes()).hexdigest()
    return Command(cid, "deploy", {"bundle": str(bundle), "sha256": digest, "signer": kid})


@pytest.fixture
def controller(broker: Broker) -> Iterator[Controller]:
    c = Controller(broker.url)
    yield c
    c.mqtt.stop()


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
        controller.send(Command("u-1", "reboot").to_json())
        assert "unknown command type" in (controller.final("u-1").reason or "")
        controller.send(Command("d-1", "drain"))
        assert "not supported" in (controller.final("d-1").reason or "")
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
        controller.send(deploy("c-3", bundle_v2, tiny_bundle))  # PUBACKed while offline
        # A graceful restart: Mosquitto writes its store on exit (a kill -9 of the broker
        # loses what arrived since its last autosave).
        persistent_broker.stop()
        persistent_broker.start()
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
