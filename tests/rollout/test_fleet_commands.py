"""`edge-fleet drain|undrain|set-config|rollback --device` and `edge-fleet audit` against a
real Mosquitto and a real device agent: signed with the operator key, answered, recorded."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fleet_fixtures import SimBundles, SimFleet
from mqtt_fixtures import Broker

from edge_runtime import signing
from edge_runtime.fleet.audit import AUDIT, read_audit
from edge_runtime.fleet.command_auth import CommandSigner
from edge_runtime.rollout import cli as fleet_cli
from edge_runtime.rollout.commands import parse_since


@pytest.fixture
def fleet(broker: Broker, tmp_path: Path, sim_bundles: SimBundles) -> Iterator[SimFleet]:
    f = SimFleet(broker.url, tmp_path / "devices", sim_bundles)
    yield f
    f.close()


def test_device_commands_are_signed_answered_and_audited(
    broker: Broker, fleet: SimFleet, operator_env: Path, sim_bundles: SimBundles,
    tmp_path: Path, capsys: Any,
) -> None:
    fleet.start("cell-1")
    agent = fleet.agents["cell-1"]
    base = ["--broker", broker.url]
    assert fleet_cli.main([*base, "drain", "--device", "cell-1", "--wait", "20"]) == 0
    assert "cell-1: drain op-" in capsys.readouterr().out and agent.drained
    assert fleet_cli.main([*base, "undrain", "--group", "lab", "--wait", "3"]) == 0
    assert "cell-1: undrain" in capsys.readouterr().out and not agent.drained
    # set-config: an allowed key applies; a protected one is refused, named, exit 1.
    config = tmp_path / "edge.toml"
    agent.config = dataclasses.replace(agent.config, config_path=config,
                                       remote_config=tmp_path / "remote.toml")
    assert fleet_cli.main([*base, "set-config", "--device", "cell-1", "--set",
                           "scheduler.max_queue=9", "--set", "log.level=debug"]) == 0
    out = capsys.readouterr().out
    assert "applied" in out and "scheduler.max_queue" in out
    assert fleet_cli.main([*base, "set-config", "--device", "cell-1", "--set",
                           "server.api_key=hunter2"]) == 1
    out = capsys.readouterr().out
    assert "may not change server.api_key" in out and "hunter2" not in out
    # A device rollback with nothing to go back to: refused, with the device's reason.
    assert fleet_cli.main([*base, "rollback", "--device", "cell-1"]) == 1
    assert "no previous bundle" in capsys.readouterr().out
    # A key the device does not trust: the device's refusal is reported (matched by digest).
    signing.generate_keypair(tmp_path / "other.key", tmp_path / "other.pub")
    assert fleet_cli.main([*base, "--key", str(tmp_path / "other.key"), "drain", "--device",
                           "cell-1", "--wait", "20"]) == 1
    assert "not trusted" in capsys.readouterr().out and not agent.drained
    # Both sides kept a record: who (key id), what, and how it ended.
    op_kid = CommandSigner.from_file(sim_bundles.operator_key).key_id
    sent = list(read_audit(operator_env))
    assert [r["type"] for r in sent] == ["drain", "undrain", "set-config", "set-config",
                                         "rollback", "drain"]
    assert all(r["event"] == "command-sent" for r in sent)
    assert [r["key_id"] for r in sent][:5] == [op_kid] * 5
    assert "hunter2" not in operator_env.read_text()
    device_log = fleet.root / "cell-1" / AUDIT
    outcomes = [r["outcome"] for r in read_audit(device_log)]
    assert outcomes.count("refused") == 1 and "drained" in outcomes and "applied" in outcomes
    assert "hunter2" not in device_log.read_text()
    assert fleet_cli.main(["audit", "--device", "cell-1", "--json"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert len(lines) == 5 and all(x["device"] == "cell-1" for x in lines)
    assert fleet_cli.main(["audit", "--file", str(device_log), "--since", "1h"]) == 0
    table = capsys.readouterr().out
    assert "refused" in table and f"key {op_kid}" in table
    assert fleet_cli.main(["audit", "--since", "yesterday"]) == 1
    assert "--since 'yesterday'" in capsys.readouterr().err


def test_commands_need_a_key_and_a_target(tmp_path: Path, capsys: Any,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGE_FLEET_KEY", str(tmp_path / "missing.key"))
    base = ["--broker", "mqtt://127.0.0.1:1"]
    assert fleet_cli.main([*base, "drain", "--device", "d1"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "signs with an operator key" in err, err
    assert fleet_cli.main([*base, "drain"]) == 1
    assert "exactly one of --device ID or --group ID" in capsys.readouterr().err
    config = tmp_path / "config.toml"
    config.write_text("[log]\nlevel = 'info'\n")
    assert fleet_cli.main([*base, "--key", str(config), "drain", "--device", "d1"]) == 1
    assert "not a PEM private key file" in capsys.readouterr().err
    assert parse_since("1765000000") == 1765000000.0
    noon = dt.datetime(2026, 12, 5, 12, tzinfo=dt.timezone.utc).timestamp()
    assert parse_since("2026-12-05T12:00:00") == noon
