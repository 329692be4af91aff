"""Simulated devices for the rollout tests: real DeviceAgents on a real Mosquitto, with the
fake model of scripts/fleetsim (signed tiny bundles, metrics chosen per bundle)."""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))

from fleetsim.devices import make_sim_bundle, provision, sim_agent

from edge_runtime import signing
from edge_runtime.fleet.agent import DeviceAgent
from edge_runtime.fleet.messages import Ack, parse_command
from edge_runtime.mqtt import topics
from edge_runtime.mqtt.client import Message, MqttClient


@dataclass(frozen=True)
class SimBundles:
    pub: Path
    v1: Path
    v2: Path
    bad: Path
    """Healthy on every device, but its telemetry reports error_rate 0.08."""
    operator_key: Path
    """The operator key the simulated devices trust (edge-fleet signs with it)."""
    operator_pub: Path


@pytest.fixture(scope="module")
def sim_bundles(tmp_path_factory: pytest.TempPathFactory) -> SimBundles:
    d = tmp_path_factory.mktemp("simbundles")
    signing.generate_keypair(d / "k.key", d / "k.pub")
    signing.generate_keypair(d / "operator.key", d / "operator.pub")
    key = signing.load_private_key(d / "k.key")
    return SimBundles(d / "k.pub", make_sim_bundle(d / "v1", key, "1"),
                      make_sim_bundle(d / "v2", key, "2"),
                      make_sim_bundle(d / "bad", key, "3", error_rate=0.08),
                      d / "operator.key", d / "operator.pub")


class SimFleet:
    def __init__(self, url: str, root: Path, bundles: SimBundles) -> None:
        self.url, self.root, self.bundles = url, root, bundles
        self.trusted = [signing.load_public_key(bundles.pub)]
        self.operators = [signing.load_public_key(bundles.operator_pub)]
        self.agents: dict[str, DeviceAgent] = {}

    def start(self, device: str, health_check: Callable[[Path], None] | None = None) -> None:
        root = self.root / device
        provision(root, self.bundles.v1, self.trusted)
        agent = sim_agent(device, self.url, root, self.trusted, group="lab",
                          telemetry_interval_s=0.2, health_check=health_check,
                          operators=self.operators)
        agent.start(10)
        assert agent.mqtt.wait_subscribed(10)
        self.agents[device] = agent

    def stop(self, device: str) -> None:
        self.agents.pop(device).stop()

    def close(self) -> None:
        for d in list(self.agents):
            self.stop(d)


class Observer:
    """Every command and ack on the broker, in arrival order."""

    def __init__(self, url: str) -> None:
        self.log: list[tuple[str, str, str, str]] = []  # (cmd|ack, device, id, type/state)
        self._lock = threading.Lock()
        self.mqtt = MqttClient(url, "observer")
        self.mqtt.subscribe("fleet/+/cmd", self._on)
        self.mqtt.subscribe("fleet/+/cmd/ack", self._on)
        self.mqtt.start()
        assert self.mqtt.wait_subscribed(10)

    def _on(self, m: Message) -> None:
        device = topics.device_of(m.topic)
        if m.topic.endswith("/ack"):
            a = Ack.from_json(m.payload)
            row = ("ack", device, a.id or "", a.state + ("*" if a.duplicate else ""))
        else:
            c = parse_command(m.payload)
            row = ("cmd", device, c.id, c.type)
        with self._lock:
            self.log.append(row)

    def rows(self, **match: Any) -> list[tuple[str, str, str, str]]:
        keys = ("what", "device", "id", "state")
        with self._lock:
            return [r for r in self.log
                    if all(r[keys.index(k)] == v for k, v in match.items())]
