"""`edge-runtime doctor` on this machine, and against a real TLS Mosquitto."""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
from pathlib import Path

from mqtt_fixtures import Broker, Pki, free_port

from edge_runtime import pki as fleet_pki
from edge_runtime.config import load_config
from edge_runtime.doctor import FAIL, OK, check_broker, l4t_release


def _config(tmp_path: Path, url: str, ca: Path, cert: Path, key: Path) -> Path:
    os.chmod(key, 0o600)
    path = tmp_path / "config.toml"
    path.write_text(
        f'[fleet]\nbroker = "{url}"\ndevice_id = "dev-1"\nca_file = "{ca}"\n'
        f'cert_file = "{cert}"\nkey_file = "{key}"\n'
    )
    return path


def _by_name(checks: list, name: str) -> list:  # type: ignore[type-arg]
    return [c for c in checks if c.name == name]


def test_doctor_here_runs_every_check_and_exits_by_its_result() -> None:
    exe = Path(sys.executable).with_name("edge-runtime")
    proc = subprocess.run([str(exe), "doctor"], capture_output=True, text=True, timeout=60,
                          check=False)
    lines = proc.stdout.splitlines()
    for name in ("JetPack/L4T", "CUDA", "TensorRT", "ONNX Runtime", "power mode", "memory",
                 "disk", "broker"):
        assert any(f"] {name}: " in line for line in lines), proc.stdout
    failed = any(line.startswith("[FAIL]") for line in lines)
    assert proc.returncode == (1 if failed else 0), proc.stdout + proc.stderr
    # Every warning or failure carries its fix.
    assert all(" -> " in line for line in lines if line.startswith(("[warn]", "[FAIL]")))


def test_l4t_release_parsing(tmp_path: Path) -> None:
    f = tmp_path / "nv_tegra_release"
    f.write_text("# R36 (release), REVISION: 4.3, GCID: 38968081, BOARD: generic, "
                 "EABI: aarch64, DATE: Wed Jan  8 01:49:37 UTC 2025\n")
    assert l4t_release(f) == "36.4.3"
    assert l4t_release(tmp_path / "missing") is None


def test_doctor_accepts_a_good_device_against_a_tls_broker(
    tmp_path: Path, pki: Pki, tls_broker: Broker
) -> None:
    cfg = load_config(_config(tmp_path, tls_broker.url, pki.ca, pki.client_cert, pki.client_key))
    checks = check_broker(cfg)
    cert = [c.status for c in _by_name(checks, "certificate")]
    assert OK in cert and FAIL not in cert, checks  # the fixture's CA lives a day: a warning
    assert [c.status for c in _by_name(checks, "broker")] == [OK], checks


def test_doctor_fails_a_certificate_of_another_ca(
    tmp_path: Path, pki: Pki, tls_broker: Broker
) -> None:
    cfg = load_config(_config(tmp_path, tls_broker.url, pki.ca, pki.other_cert, pki.other_key))
    checks = check_broker(cfg)
    cert = _by_name(checks, "certificate")
    assert any(c.status == FAIL and "not signed by the CA" in c.detail for c in cert), checks
    broker = _by_name(checks, "broker")
    assert [c.status for c in broker] == [FAIL] and broker[0].fix, checks


def test_doctor_fails_an_expired_certificate_and_a_wrong_key(tmp_path: Path, pki: Pki) -> None:
    ca_key, ca = fleet_pki.new_ca("fleet")
    key, cert = fleet_pki.device_cert(ca_key, ca, "dev-1", days=1)
    fleet_pki.write_cert(tmp_path / "ca.pem", ca)
    fleet_pki.write_cert(tmp_path / "d.pem", cert)
    fleet_pki.write_private_key(tmp_path / "d.key", key)
    later = dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=3)
    c = fleet_pki.check_device_cert(tmp_path / "d.pem", tmp_path / "d.key", tmp_path / "ca.pem",
                                    now=later)
    assert any("expired on" in p for p in c.problems), c
    other, _ = fleet_pki.device_cert(ca_key, ca, "dev-2")
    fleet_pki.write_private_key(tmp_path / "o.key", other)
    os.chmod(tmp_path / "o.key", 0o644)
    c = fleet_pki.check_device_cert(tmp_path / "d.pem", tmp_path / "o.key", tmp_path / "ca.pem")
    assert any("is not the key of" in p for p in c.problems)
    assert any("chmod 0600" in p for p in c.problems)


def test_doctor_fails_an_unreachable_broker(tmp_path: Path, pki: Pki) -> None:
    url = f"mqtts://127.0.0.1:{free_port()}"
    checks = check_broker(load_config(_config(tmp_path, url, pki.ca, pki.client_cert,
                                              pki.client_key)))
    broker = _by_name(checks, "broker")
    assert broker[0].status == FAIL and "unreachable" in broker[0].detail


def test_doctor_exit_status_follows_failures(tmp_path: Path, pki: Pki) -> None:
    exe = Path(sys.executable).with_name("edge-runtime")
    url = f"mqtts://127.0.0.1:{free_port()}"
    path = _config(tmp_path, url, pki.ca, pki.client_cert, pki.client_key)
    argv = [str(exe), "doctor", "--config", str(path)]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 1 and "[FAIL] broker" in proc.stdout  # unreachable broker
    assert "BEGIN" not in proc.stdout + proc.stderr  # no key material, ever


def test_doctor_reports_the_remote_config_overlay_merged_or_ignored(tmp_path: Path) -> None:
    """What serve merges over the config file, or why it ignores it: the doctor reads the
    overlay with serve's own loader, and names only keys (never values)."""
    from edge_runtime.config import Config, load_config
    from edge_runtime.doctor import WARN, check_remote_config

    state = tmp_path / "state"
    state.mkdir()
    base = tmp_path / "config.toml"
    base.write_text(f'[fleet]\nenabled = true\nbroker = "mqtt://127.0.0.1:1"\n'
                    f'device_id = "orin-1"\nroot = "{state}"\n')
    cfg = load_config(base)
    assert check_remote_config(cfg, base).detail.startswith("no overlay at")
    overlay = state / "remote.toml"
    overlay.write_text("[scheduler]\nmax_queue = 9\n")
    ok = check_remote_config(cfg, base)
    assert ok.status == "ok" and "merged: scheduler.max_queue" in ok.detail
    overlay.write_text('[server]\napi_key = "s3cret-planted"\n')
    bad = check_remote_config(cfg, base)
    assert bad.status == WARN and "only provisioning may set" in bad.detail
    assert "s3cret" not in bad.line() and "--toml FILE" in bad.fix and str(overlay) in bad.fix
    assert check_remote_config(Config(), None).status == "skip"  # no fleet agent, no overlay
