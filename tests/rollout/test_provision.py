"""`edge-fleet provision`: 3 devices from a CSV, their certificates, keys, modes and config."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from edge_runtime import pki
from edge_runtime.config import load_config
from edge_runtime.rollout import cli
from edge_runtime.signing import generate_keypair

BROKER = "mqtts://fleet.example:8883"


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, Path]:
    generate_keypair(tmp_path / "keys" / "signer.key", tmp_path / "keys" / "signer.pub")
    generate_keypair(tmp_path / "keys" / "op.key", tmp_path / "keys" / "op.pub")
    return {"signer": tmp_path / "keys" / "signer.pub", "op": tmp_path / "keys" / "op.pub"}


def _provision(out: Path, keys: dict[str, Path], *extra: str) -> list[str]:
    return ["provision", "--out", str(out), "--device-broker", BROKER, "--group", "lab",
            "--bundle-signer", str(keys["signer"]), "--operator-key", str(keys["op"]), *extra]


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def test_provision_three_devices_from_a_csv(
    tmp_path: Path, keys: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    csv = tmp_path / "devices.csv"
    csv.write_text("serial,device_id\n1421022000001,orin-001\n# spare\n"
                   "1421022000002,orin-002\n1421022000003,orin-003\n")
    out = tmp_path / "out"
    assert cli.main(_provision(out, keys, "--csv", str(csv))) == 0
    printed = capsys.readouterr()
    assert "PRIVATE KEY" not in printed.out + printed.err
    assert printed.out.count("provisioned orin-") == 3
    ca_path = out / "ca" / "ca.pem"
    assert _mode(out / "ca" / "ca.key") == 0o600
    serials = set()
    for n in (1, 2, 3):
        device = f"orin-00{n}"
        etc = out / "devices" / device / "etc" / "edge-runtime"
        tls = etc / "tls"
        check = pki.check_device_cert(tls / "device.pem", tls / "device.key", tls / "ca.pem")
        assert check.problems == [] and check.cn == device
        # ...and to the fleet CA itself, not only the copy shipped with the device.
        assert pki.check_device_cert(tls / "device.pem", tls / "device.key", ca_path).problems == []
        serials.add(pki.load_cert(tls / "device.pem").serial_number)
        assert _mode(tls / "device.key") == 0o600
        assert _mode(etc / "config.toml") == 0o640
        assert _mode(tls / "device.pem") == 0o644
        assert (etc / "trust" / "bundle-signers" / "signer.pub").read_bytes() == \
            keys["signer"].read_bytes()
        assert (etc / "trust" / "operators" / "op.pub").is_file()
        text = (etc / "config.toml").read_text()
        assert "PRIVATE" not in text and "operator_keys" in text
        cfg = load_config(etc / "config.toml")
        f = cfg.fleet
        assert f.enabled and f.broker == BROKER and f.device_id == device
        assert f.groups == ("lab",) and f.root == Path("/var/lib/edge-runtime")
        assert f.remote_config == Path("/var/lib/edge-runtime/remote.toml")  # not under /etc
        assert f.cert_file == Path("/etc/edge-runtime/tls/device.pem")
        assert f.key_file == Path("/etc/edge-runtime/tls/device.key")
        assert f.pubkeys == (Path("/etc/edge-runtime/trust/bundle-signers/signer.pub"),)
        assert cfg.model.pubkeys == f.pubkeys
        acl = (out / "devices" / device / "broker.acl").read_text()
        assert f"user {device}\n" in acl and f"topic write fleet/{device}/status" in acl
        assert "topic read fleet/group/lab/cmd" in acl
        assert not [o for o in ("orin-001", "orin-002", "orin-003") if o != device and o in acl]
    assert len(serials) == 3


def test_an_existing_ca_is_reused_and_a_provisioned_device_is_not_overwritten(
    tmp_path: Path, keys: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    assert cli.main(_provision(out, keys, "--device", "orin-a", "--serial", "S1")) == 0
    ca_before = (out / "ca" / "ca.pem").read_bytes()
    assert cli.main(_provision(out, keys, "--device", "orin-b")) == 0
    assert "using fleet CA" in capsys.readouterr().out
    assert (out / "ca" / "ca.pem").read_bytes() == ca_before
    assert cli.main(_provision(out, keys, "--device", "orin-a")) == 1
    err = capsys.readouterr().err
    assert "already provisioned" in err and "--force" in err and err.count("\n") == 1


@pytest.mark.parametrize(
    ("body", "line", "needle"),
    [
        ("serial,device_id\nS1,orin-1\nS2\n", 3, "expected 'serial,device_id'"),
        ("S1,orin-1\nS2,orin/2\n", 2, "is not a device id"),
        ("S1,orin-1\nS2,orin-1\n", 2, "already on line 1"),
        ("S1,group\n", 1, "reserved"),
        ("S1,operator-1\n", 1, "role prefix"),
    ],
)
def test_a_bad_csv_line_is_one_line_naming_it(
    tmp_path: Path, keys: dict[str, Path], capsys: pytest.CaptureFixture[str],
    body: str, line: int, needle: str,
) -> None:
    csv = tmp_path / "devices.csv"
    csv.write_text(body)
    assert cli.main(_provision(tmp_path / "out", keys, "--csv", str(csv))) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{csv}:{line}: " in err and needle in err, err
    assert not (tmp_path / "out" / "devices").exists()  # nothing issued for a bad list


def test_a_plain_mqtt_broker_url_is_refused(
    tmp_path: Path, keys: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    argv = _provision(tmp_path / "out", keys, "--device", "orin-a")
    argv[argv.index(BROKER)] = "mqtt://fleet.example:1883"
    assert cli.main(argv) == 1
    assert "mqtts://HOST:8883" in capsys.readouterr().err
