"""The device agent against deploy/mosquitto/ verbatim (tests/shipped_broker.py): it logs in
with its own certificate (CN = device id), publishes its retained status under the ACL,
obeys an operator's command and acks it; its own certificate cannot command it."""

from __future__ import annotations

from pathlib import Path

import pytest
from agent_fixtures import DEVICE, Controller, make_agent
from bundle_fixtures import BuiltBundle
from mqtt_fixtures import MOSQUITTO
from shipped_broker import OPERATOR, shipped_broker

from edge_runtime.errors import BrokerError
from edge_runtime.fleet.messages import Command
from edge_runtime.mqtt import topics
from edge_runtime.mqtt.client import MqttClient

pytestmark = pytest.mark.skipif(MOSQUITTO is None, reason="mosquitto is not installed")


def test_agent_and_operator_with_role_certificates(tmp_path: Path, device_root: Path,
                                                   tiny_bundle: BuiltBundle) -> None:
    sb = shipped_broker(tmp_path / "broker", {DEVICE: ["lab"]})
    sb.start()
    agent = make_agent(sb.cert_url, device_root, tiny_bundle, tls=sb.tls(DEVICE))
    controller = None
    try:
        assert agent.start(10), agent.mqtt.failure(10)
        assert agent.mqtt.wait_subscribed(10) and not agent.mqtt.refused_filters
        controller = Controller(sb.cert_url, tls=sb.tls(OPERATOR))
        controller.wait(lambda: controller.status.get("online") is True)
        controller.send(Command("t-1", "drain"))
        assert controller.final("t-1").state == "drained"
        # The device's own identity cannot publish a command to itself.
        self_cmd = MqttClient(sb.cert_url, f"{DEVICE}-second", tls=sb.tls(DEVICE))
        try:
            assert self_cmd.start(wait_s=10)
            with pytest.raises(BrokerError, match="Not authorized"):
                self_cmd.publish(topics.fleet_cmd(DEVICE), Command("t-2", "undrain").to_json(),
                                 wait_s=5)
        finally:
            self_cmd.stop()
        assert controller.states("t-2") == []
    finally:
        if controller is not None:
            controller.mqtt.stop()
        agent.stop()
        sb.stop()
