"""`edge-fleet` against a real Mosquitto: the fleet's state from retained statuses."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest
from mqtt_fixtures import Broker, free_port

from edge_runtime.fleet.messages import status_payload, telemetry_payload
from edge_runtime.mqtt import topics
from edge_runtime.mqtt.client import MqttClient
from edge_runtime.rollout import cli as fleet_cli


def _publisher(broker: Broker) -> MqttClient:
    c = MqttClient(broker.url, "test-publisher")
    assert c.start(wait_s=10)
    return c


def test_devices_lists_retained_statuses(broker: Broker, capsys: Any) -> None:
    pub = _publisher(broker)
    acked = threading.Semaphore(0)
    try:
        for device, online in (("cell-1", True), ("cell-2", True), ("kiosk-9", False)):
            note = ({"remote_config_ignored": "the remote config ... is refused"}
                    if device == "cell-2" else {})
            payload = status_payload(device, online, bundle=f"demo-{device}",
                                     runtime_version="0.1.0", **note)
            pub.publish(topics.fleet_status(device), payload, retain=True,
                        on_ack=lambda rc: acked.release())
        pub.publish(topics.fleet_status("broken"), b"{not json", retain=True,
                    on_ack=lambda rc: acked.release())
        # Stored by the broker (PUBACK) before this publisher disconnects.
        assert all(acked.acquire(timeout=10) for _ in range(4))
    finally:
        pub.stop()
    # A new subscriber, after the publishers left: the broker alone knows the fleet.
    assert fleet_cli.main(["--broker", broker.url, "devices", "--wait", "1.5", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert {d: s.get("online") for d, s in got.items() if "error" not in s} == {
        "cell-1": True, "cell-2": True, "kiosk-9": False}
    assert got["cell-1"]["bundle"] == "demo-cell-1"
    assert "not JSON" in got["broken"]["error"]
    assert fleet_cli.main(["--broker", broker.url, "devices", "--wait", "1.5"]) == 0
    table = capsys.readouterr().out
    assert "4 devices, 2 online" in table and "kiosk-9" in table and "offline" in table
    flagged = [ln for ln in table.splitlines() if "remote config ignored" in ln]
    assert len(flagged) == 1 and flagged[0].startswith("cell-2 "), table


def test_telemetry_streams_json_lines(broker: Broker, capsys: Any) -> None:
    pub = _publisher(broker)
    stop = threading.Event()

    def beat() -> None:
        n = 0
        while not stop.wait(0.05) and n < 200:  # bounded
            pub.publish(topics.fleet_telemetry("cell-1"),
                        telemetry_payload("cell-1", {"cpu": n}, {"tokens_per_s": 42.0}), qos=0)
            n += 1

    t = threading.Thread(target=beat, daemon=True)
    t.start()
    try:
        code = fleet_cli.main(["--broker", broker.url, "telemetry", "cell-1", "--count", "3",
                               "--timeout", "5"])
    finally:
        stop.set()
        t.join(5)
        pub.stop()
    assert code == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert len(lines) == 3 and all(x["device"] == "cell-1" for x in lines)
    assert lines[0]["runtime"] == {"tokens_per_s": 42.0}


def test_unreachable_broker_is_a_one_line_error(capsys: Any, monkeypatch: Any) -> None:
    monkeypatch.delenv("EDGE_FLEET_BROKER", raising=False)
    url = f"mqtt://127.0.0.1:{free_port()}"  # nothing listens there
    assert fleet_cli.main(["devices"]) == 1
    assert "devices needs --broker" in capsys.readouterr().err
    assert fleet_cli.main(["--broker", url, "--connect-timeout", "0.5", "devices"]) == 1
    assert "cannot reach the MQTT broker" in capsys.readouterr().err


@pytest.mark.parametrize(("rule", "token"), [
    ("eror_rate>0.02", "'eror_rate' at column 1"),
    ("error_rate>0.02 or", "got 'end of expression' at column 19"),
    ("error_rate>0.02; import os", "unexpected ';' at column 16"),
    ("quality_drop>>5%", "got '>' at column 14"),
])
def test_malformed_abort_rule_is_refused_before_anything(
    rule: str, token: str, tmp_path: Path, capsys: Any,
) -> None:
    db = tmp_path / "r.db"
    url = f"mqtt://127.0.0.1:{free_port()}"  # never contacted: the rule fails first
    capsys.readouterr()
    code = fleet_cli.main(["--broker", url, "--db", str(db), "deploy", str(tmp_path),
                           "--group", "lab", "--abort-if", rule])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1, err
    assert err.startswith("edge-fleet deploy: error: abort rule: ") and token in err, err
    assert fleet_cli.main(["--db", str(db), "rollouts", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == []


@pytest.mark.parametrize("cmd", ["status", "resume", "rollback"])
def test_unknown_rollout_is_a_one_line_error(cmd: str, tmp_path: Path, capsys: Any) -> None:
    db = tmp_path / "r.db"
    capsys.readouterr()
    assert fleet_cli.main(["--broker", "mqtt://127.0.0.1:1", "--db", str(db), cmd, "nope"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith(f"edge-fleet {cmd}: error: unknown rollout 'nope' in {db}"), err


def test_bad_deploy_arguments_are_one_line_errors(tmp_path: Path, capsys: Any) -> None:
    base = ["--broker", "mqtt://127.0.0.1:1", "--db", str(tmp_path / "r.db"), "deploy"]
    for extra, want in (
        ([str(tmp_path / "missing"), "--group", "lab"], "does not exist"),
        ([str(tmp_path), "--group", "lab", "--canary", "0%"], "--canary must be in"),
        ([str(tmp_path), "--group", "lab", "--batch", "lots"], "--batch must be a share"),
        ([str(tmp_path), "--group", "a/b"], "group 'a/b' contains"),
        ([str(tmp_path), "--group", "lab", "--ack-timeout", "0"], "--ack-timeout must be > 0"),
    ):
        capsys.readouterr()
        assert fleet_cli.main(base + extra) == 1, extra
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and want in err, (extra, err)
