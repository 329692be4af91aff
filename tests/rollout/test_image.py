"""`edge-fleet image`: the overlay dry run for 3 provisioned devices, and the daemon booted
the way the unit's ExecStart starts it, saying READY=1 and WATCHDOG=1 on a NOTIFY_SOCKET."""

from __future__ import annotations

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
    problems = "\n".join(check_overlay(a))
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


def test_the_daemon_started_as_the_unit_does_says_ready_and_pings_the_watchdog(
    tmp_path: Path, tiny_bundle: Any, wheel: Path
) -> None:
    overlay = _provision_and_image(tmp_path, tiny_bundle, wheel, ["orin-001"]) / "orin-001"
    state = tmp_path / "state"
    state.mkdir()
    # The device's paths, mapped into this test's directories; nothing else changes.
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
    # Port 0 (8000 may be taken here); the broker is unreachable: the agent keeps retrying
    # in the background while the daemon serves.
    config.write_text(local(config.read_text()).replace("port = 8000", "port = 0"))
    argv, unit_env = _unit_command(overlay / "etc/systemd/system/edge-runtime.service")
    assert argv[1:3] == ["serve", "--config"]
    notify = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(notify))
        sock.settimeout(1.0)
        env = {"PATH": os.environ.get("PATH", ""), **{k: local(v) for k, v in unit_env.items()},
               "NOTIFY_SOCKET": str(notify), "WATCHDOG_USEC": "2000000"}
        if "PYTHONPATH" in os.environ:  # the test run's checkout (a device has the wheel)
            env["PYTHONPATH"] = os.environ["PYTHONPATH"]
        proc = subprocess.Popen([local(a) for a in argv], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        got: list[str] = []
        try:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and proc.poll() is None:
                try:
                    got.append(sock.recv(4096).decode())
                except TimeoutError:
                    continue
                if any(m.startswith("READY=1") for m in got) and "WATCHDOG=1" in got:
                    break
        finally:
            proc.terminate()
            _, err = proc.communicate(timeout=30)
    ready = [m for m in got if m.startswith("READY=1")]
    assert ready and "STATUS=serving" in ready[0], (got, err)
    assert "WATCHDOG=1" in got, (got, err)
    assert "Traceback" not in err
    assert "offers" in err and "CPUExecutionProvider" in err  # the providers line
