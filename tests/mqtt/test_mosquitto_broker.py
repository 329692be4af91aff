"""The shared Mosquitto launcher (scripts/mosquitto_broker.py) itself: an ACL and a password
file are enforced, extra config lines reach the broker, a broker that cannot start says why,
and a broker in its own process group is killed and restarted on the same port."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
from mosquitto_broker import MOSQUITTO, Broker, write_passwords

from edge_runtime.errors import BrokerError
from edge_runtime.mqtt.client import Message, MqttClient

pytestmark = pytest.mark.skipif(MOSQUITTO is None, reason="mosquitto is not installed")


def test_acl_and_password_file_are_enforced(tmp_path: Path) -> None:
    passwords = write_passwords(tmp_path / "passwd", {"dev": "s3cret"})
    acl = tmp_path / "acl"
    acl.write_text("user dev\ntopic readwrite ok/#\n")
    got: list[Message] = []
    seen = threading.Event()
    with Broker(tmp_path / "b", acl_file=acl, password_file=passwords) as b:
        dev = MqttClient(b.url, "dev", username="dev", password="s3cret")
        dev.subscribe("ok/#", lambda m: (got.append(m), seen.set()))
        dev.subscribe("no/#", got.append)
        anon = MqttClient(b.url, "anon")
        wrong = MqttClient(b.url, "wrong", username="dev", password="guess")
        try:
            assert dev.start(wait_s=5) and dev.wait_subscribed(5)
            with pytest.raises(BrokerError, match="refused user 'dev' the publish to 'no/x': "
                               "Not authorized"):
                dev.publish("no/x", b"denied", wait_s=5)  # the ACL refuses it (PUBACK 0x87)
            dev.publish("ok/x", b"allowed", wait_s=5)
            assert seen.wait(5)
            assert not anon.start(wait_s=1)  # allow_anonymous false with a password file
            assert not wrong.start(wait_s=1)
        finally:
            for c in (dev, anon, wrong):
                c.stop()
    assert [m.topic for m in got] == ["ok/x"]
    assert "s3cret" not in passwords.read_text()


def test_extra_lines_reach_the_broker_and_a_bad_one_is_quoted(tmp_path: Path) -> None:
    b = Broker(tmp_path / "ok", extra=["max_connections -1"])
    assert "max_connections -1\n" in b.config.read_text()
    with b:
        assert b.running
    bad = Broker(tmp_path / "bad", extra=["no_such_option 1"])
    with pytest.raises(RuntimeError, match=f"did not start on port {bad.port}:.*no_such_option"):
        bad.start()
    assert not bad.running


def test_own_group_kill_and_restart_on_the_same_port(tmp_path: Path) -> None:
    b = Broker(tmp_path, own_group=True).start()
    try:
        assert os.getpgid(b.pid) == b.pid  # its own process group (scripts signal the group)
        url, first = b.url, b.pid
        b.kill()
        assert not b.running
        b.start()
        assert b.url == url and b.pid != first
        c = MqttClient(b.url, "c")
        try:
            assert c.start(wait_s=5)
        finally:
            c.stop()
    finally:
        b.stop()
    assert not b.running
