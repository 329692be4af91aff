"""TLS with client certificates end to end: a real Mosquitto listener that requires a
certificate signed by the fleet CA (made in the test with `cryptography`), the agent
connecting with its own pair, and clients without one (or with a rogue CA's) refused."""

from __future__ import annotations

from pathlib import Path

from agent_fixtures import Controller, make_agent
from bundle_fixtures import BuiltBundle
from mqtt_fixtures import Broker, Pki

from edge_runtime.fleet.messages import Command
from edge_runtime.mqtt.client import MqttClient, TlsFiles


def test_agent_over_mutual_tls(tls_broker: Broker, pki: Pki, device_root: Path,
                               tiny_bundle: BuiltBundle) -> None:
    assert tls_broker.url.startswith("mqtts://")
    device_tls = TlsFiles(str(pki.ca), str(pki.client_cert), str(pki.client_key))
    agent = make_agent(tls_broker.url, device_root, tiny_bundle, tls=device_tls)
    assert agent.start(10), "the agent did not connect with its certificate"
    controller = Controller(tls_broker.url, tls=device_tls)
    try:
        assert agent.mqtt.wait_subscribed(10)
        controller.wait(lambda: controller.status.get("online") is True)
        controller.send(Command("t-1", "drain"))
        assert controller.final("t-1").state == "drained"
    finally:
        controller.mqtt.stop()
        agent.stop()


def test_clients_without_a_fleet_certificate_are_refused(tls_broker: Broker, pki: Pki) -> None:
    for name, tls in [
        ("no certificate", TlsFiles(str(pki.ca))),
        ("a rogue CA's certificate", TlsFiles(str(pki.ca), str(pki.other_cert),
                                              str(pki.other_key))),
    ]:
        c = MqttClient(tls_broker.url, "intruder", tls=tls, reconnect_min_s=0.1,
                       reconnect_max_s=0.5)
        try:
            assert not c.start(3.0), f"a client with {name} got in"
        finally:
            c.stop()
    # And the device refuses a broker whose certificate the fleet CA did not sign.
    c = MqttClient(tls_broker.url, "dev-1", tls=TlsFiles(str(pki.other_ca), str(pki.client_cert),
                                                          str(pki.client_key)))
    try:
        assert not c.start(3.0)
    finally:
        c.stop()
    assert "certificate" in tls_broker.log.read_text().lower()
