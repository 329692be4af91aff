"""`edge-fleet image`: the overlay dry run for 3 provisioned devices, and the daemon booted
the way the unit's ExecStart starts it, saying READY=1 and WATCHDOG=1 on a NOTIFY_SOCKET."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from mqtt_fixtures import Broker, Pki

from edge_runtime.rollout import cli
from edge_runtime.rollout.image import build_wheel, check_overlay

BROKER = "mqtts://fleet.example:8883"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_wheel(tmp_path_factory.mktemp("wheel"))


def _provision_and_image(tmp_path: Path, bundle: Any, wheel: Path, ids: list[str]) -> Path:
    argv = ["provision", "--out", str(tmp_path / "prov"), "--device-broker", BROKER,
            "--bundle-signer", str(bundle.pubkey)]
    for device in ids:
        assert cli.main([*argv, "--device", device]) == 0
    assert cli.main(["image", "--provisioned", str(tmp_path / "prov"), "--bundle",
                     str(bundle.path), "--wheel", str(wheel), "--out",
                     str(tmp_path / "overlays")]) == 0
    return tmp_path / "overlays"


def test_the_dry_run_builds_and_checks_three_overlays(
    tmp_path: Path, tiny_bundle: Any, wheel: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ids = ["orin-001", "orin-002", "orin-003"]
    overlays = _provision_and_image(tmp_path, tiny_bundle, wheel, ids)
    out = capsys.readouterr().out
    for device in ids:
        assert f"{device}: OK overlay {overlays / device}" in out, out
        overlay = overlays / device
        assert check_overlay(overlay) == []
        link = overlay / "etc/systemd/system/multi-user.target.wants/edge-runtime.service"
        assert os.readlink(link) == "../edge-runtime.service"
        assert (overlay / "opt/edge-runtime/wheels" / wheel.name).is_file()
    # Each check can fail: a key readable by others, another device's certificate, a unit
    # systemd rejects, a bundle signed by nobody the device trusts.
    a, b = overlays / "orin-001", overlays / "orin-002"
    os.chmod(a / "etc/edge-runtime/tls/device.key", 0o644)
    shutil.copyfile(b / "etc/edge-runtime/tls/device.pem", a / "etc/edge-runtime/tls/device.pem")
    unit = a / "etc/systemd/system/edge-runtime.service"
    unit.write_text(unit.read_text().replace("Type=notify", "Type=notifyy"))
    manifest = a / "opt/edge-runtime/first-bundle/manifest.json"
    manifest.write_text(manifest.read_text().replace('"name"', '"name" ', 1))
    config = a / "etc/edge-runtime/config.toml"
    config.write_text(config.read_text().replace('remote_config = "/var/lib/edge-runtime/',
                                                 'remote_config = "/etc/edge-runtime/'))
    c = overlays / "orin-003"
    unit_c = c / "etc/systemd/system/edge-runtime.service"
    unit_c.write_text(unit_c.read_text().replace("ReadWritePaths=/var/lib/edge-runtime",
                                                 "ReadWritePaths=/var/lib/edge-runtime "
                                                 "/etc/edge-runtime"))
    assert check_overlay(c) == ["unit: /etc/edge-runtime/config.toml is writable by the "
                                "daemon; it must be read-only (remote changes go to "
                                "fleet.remote_config)"]
    problems = "\n".join(check_overlay(a))
    assert "fleet.remote_config /etc/edge-runtime/remote.toml is not writable" in problems
    assert "mode 0644, want 0600" in problems
    assert "is not the key of" in problems and "is not the device id 'orin-001'" in problems
    assert "systemd-analyze verify" in problems and "notifyy" in problems
    assert "first bundle:" in problems


def _unit_command(unit: Path) -> tuple[list[str], dict[str, str]]:
    text = unit.read_text()
    exec_start = re.search(r"^ExecStart=(.+)$", text, re.M)
    assert exec_start is not None
    env = dict(line.split("=", 1) for line in re.findall(r"^Environment=(.+)$", text, re.M))
    return shlex.split(exec_start.group(1)), env


def _boot_as_the_unit_does(
    tmp_path: Path, overlay: Path, broker_url: str | None, while_ready: Any = None
) -> tuple[list[str], str]:
    """Start the daemon with the unit's ExecStart and Environment (device paths mapped into
    the test's directories); collect its notify messages until READY=1 and WATCHDOG=1, run
    `while_ready`, stop it. Returns (messages, stderr)."""
    state = tmp_path / "state"
    state.mkdir()
    venv_bin = str(Path(sys.executable).parent)
    subs = [("/opt/edge-runtime/venv/bin", venv_bin),
            ("/opt/edge-runtime", str(overlay / "opt/edge-runtime")),
            ("/etc/edge-runtime", str(overlay / "etc/edge-runtime")),
            ("/var/lib/edge-runtime", str(state))]

    def local(s: str) -> str:
        for a, b in subs:
            s = s.replace(a, b)
        return s

    config = overlay / "etc/edge-runtime/config.toml"
    text = local(config.read_text()).replace("port = 8000", "port = 0")  # 8000 may be taken
    if broker_url is not None:
        text = text.replace(BROKER, broker_url)
    config.write_text(text)
    argv, unit_env = _unit_command(overlay / "etc/systemd/system/edge-runtime.service")
    assert argv[1:3] == ["serve", "--config"]
    notify = tmp_path / "notify.sock"
    got: list[str] = []
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(notify))
        sock.settimeout(1.0)
        env = {"PATH": os.environ.get("PATH", ""), **{k: local(v) for k, v in unit_env.items()},
               "NOTIFY_SOCKET": str(notify), "WATCHDOG_USEC": "2000000"}
        if "PYTHONPATH" in os.environ:  # the test run's checkout (a device has the wheel)
            env["PYTHONPATH"] = os.environ["PYTHONPATH"]
        proc = subprocess.Popen([local(a) for a in argv], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and proc.poll() is None:
                try:
                    got.append(sock.recv(4096).decode())
                except TimeoutError:
                    continue
                if any(m.startswith("READY=1") for m in got) and "WATCHDOG=1" in got:
                    if while_ready is not None:
                        while_ready()
                    break
        finally:
            proc.terminate()
            _, err = proc.communicate(timeout=30)
    return got, err


def test_the_daemon_started_as_the_unit_does_says_ready_and_pings_the_watchdog(
    tmp_path: Path, tiny_bundle: Any, wheel: Path
) -> None:
    # The broker is unreachable: the agent keeps retrying in the background while it serves.
    overlay = _provision_and_image(tmp_path, tiny_bundle, wheel, ["orin-001"]) / "orin-001"
    got, err = _boot_as_the_unit_does(tmp_path, overlay, None)
    ready = [m for m in got if m.startswith("READY=1")]
    assert ready and "STATUS=serving" in ready[0], (got, err)
    assert "WATCHDOG=1" in got, (got, err)
    assert "Traceback" not in err
    assert "offers" in err and "CPUExecutionProvider" in err  # the providers line


def test_first_boot_connects_with_its_certificate_and_publishes_its_status(
    tmp_path: Path, tiny_bundle: Any, wheel: Path, capsys: Any
) -> None:
    """A real Mosquitto with TLS and required client certificates from the fleet CA: the
    booted device publishes its retained status, read back with another fleet identity,
    and `edge-fleet devices` lists it."""
    overlay = _provision_and_image(tmp_path, tiny_bundle, wheel, ["orin-001"]) / "orin-001"
    prov = tmp_path / "prov"
    assert cli.main(["provision", "--out", str(prov), "--device-broker", BROKER,
                     "--bundle-signer", str(tiny_bundle.pubkey), "--device", "watcher"]) == 0
    (tmp_path / "broker").mkdir()
    server = _server_pki(prov, tmp_path / "broker")
    broker = Broker(tmp_path / "broker", pki=server)
    broker.start()
    seen: list[str] = []

    def read_status() -> None:
        out = subprocess.run(
            ["mosquitto_sub", "-h", "127.0.0.1", "-p", str(broker.port), "-V", "mqttv5",
             "--cafile", str(server.ca), "--cert", str(server.client_cert),
             "--key", str(server.client_key), "-t", "fleet/orin-001/status", "-C", "1",
             "-W", "30"], capture_output=True, text=True, timeout=40, check=False)
        seen.append(out.stdout + out.stderr)

    try:
        got, err = _boot_as_the_unit_does(tmp_path, overlay, broker.url, read_status)
        capsys.readouterr()
        listed = cli.main(["--broker", broker.url, "--connect-timeout", "5", "--ca-file",
                           str(server.ca), "--cert-file", str(server.client_cert),
                           "--key-file", str(server.client_key), "devices", "--json",
                           "--wait", "1"])
        devices = capsys.readouterr()
    finally:
        broker.stop()
    assert listed == 0, devices.err
    assert json.loads(devices.out)["orin-001"]["device"] == "orin-001", devices.out
    assert any(m.startswith("READY=1") for m in got), err
    assert seen, err
    status = json.loads(seen[0].strip().splitlines()[0])
    assert status["device"] == "orin-001" and status["online"] is True, (seen, err)


def _server_pki(prov: Path, work: Path) -> Pki:
    """The broker's certificate from the fleet CA (127.0.0.1), as mqtt_fixtures.Pki."""
    import datetime as dt
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    from edge_runtime import pki

    ca_cert = pki.load_cert(prov / "ca" / "ca.pem")
    ca_key = pki.load_ec_key(prov / "ca" / "ca.key")
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "broker")]))
        .issuer_name(ca_cert.subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(
            [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    pki.write_cert(work / "server.pem", cert)
    pki.write_private_key(work / "server.key", key)
    client = prov / "devices" / "watcher" / "etc/edge-runtime/tls"
    return Pki(prov / "ca" / "ca.pem", work / "server.pem", work / "server.key",
               client / "device.pem", client / "device.key", prov / "ca" / "ca.pem",
               client / "device.pem", client / "device.key")
