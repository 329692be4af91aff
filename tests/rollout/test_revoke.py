"""`edge-fleet revoke` and a real Mosquitto that checks its CRL: a revoked or expired device
certificate is refused by the broker, a good one of the same CA connects, and the device's
MQTT client says why in its log."""

from __future__ import annotations

import datetime as dt
import logging
from pathlib import Path

import pytest
from cryptography import x509
from mqtt_fixtures import MOSQUITTO, Broker, Pki, issue_client, make_pki

from edge_runtime import pki as fleet_pki
from edge_runtime.mqtt.client import MqttClient, TlsFiles
from edge_runtime.rollout import cli
from edge_runtime.rollout.provision import Device, Options, provision_device
from edge_runtime.signing import generate_keypair


def _revoke(*args: str | Path) -> int:
    return cli.main(["revoke", *map(str, args)])


def _serials(crl_path: Path) -> set[int]:
    return {r.serial_number for r in x509.load_pem_x509_crl(crl_path.read_bytes())}


def _serial(cert: Path) -> int:
    return x509.load_pem_x509_certificate(cert.read_bytes()).serial_number


def test_revoke_by_device_id_keeps_earlier_revocations(tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]
                                                       ) -> None:
    out, ca_dir, crl = tmp_path / "out", tmp_path / "ca", tmp_path / "crl.pem"
    ca_key, ca = fleet_pki.new_ca("fleet CA")
    ca_dir.mkdir()
    fleet_pki.write_private_key(ca_dir / "ca.key", ca_key)
    fleet_pki.write_cert(ca_dir / "ca.pem", ca)
    for d in ("orin-1", "orin-2", "orin-3"):
        provision_device(out, (ca_key, ca), Device("", d), Options("mqtts://b:8883"))
    cert = {d: out / "devices" / d / "etc/edge-runtime/tls/device.pem"
            for d in ("orin-1", "orin-2", "orin-3")}

    assert _revoke("orin-1", "--ca", ca_dir, "--provisioned", out, "--out", crl) == 0
    assert _serials(crl) == {_serial(cert["orin-1"])}
    assert _revoke("orin-2", "--ca", ca_dir, "--provisioned", out, "--out", crl) == 0
    got = x509.load_pem_x509_crl(crl.read_bytes())
    assert _serials(crl) == {_serial(cert["orin-1"]), _serial(cert["orin-2"])}
    assert got.is_signature_valid(ca.public_key())
    assert got.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number == 2
    assert got.next_update_utc is not None
    assert got.next_update_utc - dt.datetime.now(dt.timezone.utc) > dt.timedelta(days=300)
    printed = capsys.readouterr()
    assert f"revoked orin-2: certificate {_serial(cert['orin-2']):x}" in printed.out
    assert "PRIVATE" not in printed.out + printed.err
    assert oct(crl.stat().st_mode & 0o777) == "0o644"

    # No device: re-signed with the same entries (a fresh next_update for the broker).
    assert _revoke("--ca", ca_dir, "--out", crl) == 0
    assert len(_serials(crl)) == 2


def test_revoke_refusals_are_one_named_line(tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    p = make_pki(tmp_path / "pki")
    other = make_pki(tmp_path / "other")
    foreign_crl = tmp_path / "foreign.pem"
    assert _revoke("--cert", other.client_cert, "--ca", other.ca.parent,
                   "--out", foreign_crl) == 0
    before = foreign_crl.read_bytes()
    capsys.readouterr()
    # A CRL this CA did not sign is never extended (it would drop the fleet's revocations).
    assert _revoke("--cert", p.client_cert, "--ca", p.ca.parent, "--out", foreign_crl) == 1
    err = capsys.readouterr().err
    assert "was not signed by the CA" in err and err.count("\n") == 1
    assert foreign_crl.read_bytes() == before
    # A certificate of another CA.
    assert _revoke("--cert", other.client_cert, "--ca", p.ca.parent,
                   "--out", tmp_path / "crl.pem") == 1
    assert "was not issued by the CA" in capsys.readouterr().err
    assert not (tmp_path / "crl.pem").exists()
    # A device id without where its certificate is.
    assert _revoke("orin-1", "--ca", p.ca.parent, "--out", tmp_path / "crl.pem") == 1
    assert "need --provisioned" in capsys.readouterr().err
    assert _revoke("--ca", tmp_path / "nothing", "--out", tmp_path / "crl.pem") == 1
    assert "holds no fleet CA" in capsys.readouterr().err


def _connect(b: Broker, p: Pki, cert: Path, key: Path, cn: str) -> MqttClient:
    c = MqttClient(b.url, cn, tls=TlsFiles(str(p.ca), str(cert), str(key)),
                   reconnect_min_s=0.1, reconnect_max_s=0.3)
    c.start()
    return c


@pytest.mark.skipif(MOSQUITTO is None, reason="mosquitto is not installed")
def test_broker_refuses_revoked_and_expired_device_certificates(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    p = make_pki(tmp_path / "pki")  # the CA's key lies next to it: a CA directory
    crl = tmp_path / "crl.pem"
    assert _revoke("--cert", p.client_cert, "--ca", p.ca.parent, "--out", crl) == 0
    good = issue_client(p, "dev-2")
    expired = issue_client(p, "dev-3", expired=True)
    b = Broker(tmp_path / "broker", pki=p, extra=[f"crlfile {crl}"])
    b.start()
    clients: list[MqttClient] = []
    try:
        with caplog.at_level(logging.ERROR, logger="edge_runtime.mqtt.client"):
            ok = _connect(b, p, *good, "dev-2")
            revoked = _connect(b, p, p.client_cert, p.client_key, "dev-1")
            old = _connect(b, p, *expired, "dev-3")
            clients += [ok, revoked, old]
            assert ok.wait_connected(10)
            assert not revoked.wait_connected(1.5) and not old.wait_connected(0.1)
            assert "it is revoked" in str(revoked.failure(1.5))
            assert "certificate revoked" in str(revoked.failure(1.5))
            assert "it has expired" in str(old.failure(1.5))
        errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
        assert any("CN=dev-1" in m and "revoked" in m for m in errors), errors
        assert any("CN=dev-3" in m and "expired" in m for m in errors), errors
        assert not any("CN=dev-2" in m for m in errors), errors
        # Logged once per cause, not on every retry.
        assert sum("CN=dev-1" in m for m in errors) == 1
    finally:
        for c in clients:
            c.stop()
        b.stop()


def _provision(out: Path, ca_dir: Path, signer: Path, *extra: str) -> int:
    return cli.main(["provision", "--out", str(out), "--ca", str(ca_dir), "--device", "orin-7",
                     "--device-broker", "mqtts://b:8883", "--bundle-signer", str(signer),
                     *extra])


@pytest.mark.skipif(MOSQUITTO is None, reason="mosquitto is not installed")
def test_a_reissued_device_can_revoke_its_old_certificate_and_keep_the_new(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """provision --force used to delete the old certificate, which the CA had signed and the
    broker still accepted: whoever held the old key (the reason to re-issue) kept access, and
    there was no file left to revoke. Now it is kept outside the device's tree, the output
    says how to revoke it, and `revoke ID --replaced` leaves the new certificate valid."""
    p = make_pki(tmp_path / "pki")
    ca_dir, out, crl = p.ca.parent, tmp_path / "fleet", tmp_path / "crl.pem"
    signer = tmp_path / "signer.pub"
    generate_keypair(tmp_path / "signer.key", signer)
    tls = out / "devices" / "orin-7" / "etc" / "edge-runtime" / "tls"
    assert _provision(out, ca_dir, signer) == 0
    stolen = tmp_path / "stolen"  # what a thief copied off the device before it was re-issued
    stolen.mkdir()
    for f in ("device.pem", "device.key"):
        (stolen / f).write_bytes((tls / f).read_bytes())
    old_serial = _serial(tls / "device.pem")
    capsys.readouterr()

    assert _provision(out, ca_dir, signer, "--force") == 0
    printed = capsys.readouterr().out
    new_serial = _serial(tls / "device.pem")
    kept = out / "replaced" / "orin-7" / f"{old_serial:x}.pem"
    assert new_serial != old_serial and kept.read_bytes() == (stolen / "device.pem").read_bytes()
    assert f"replaced certificate {old_serial:x} of orin-7 is still valid" in printed
    assert "edge-fleet revoke orin-7 --replaced" in printed and "PRIVATE" not in printed
    assert not list((out / "devices").rglob(f"{old_serial:x}.pem"))  # never flashed

    assert _revoke("orin-7", "--replaced", "--provisioned", out, "--ca", ca_dir,
                   "--out", crl) == 0
    assert _serials(crl) == {old_serial}
    assert "revoked orin-7 (replaced)" in capsys.readouterr().out

    b = Broker(tmp_path / "broker", pki=p, extra=[f"crlfile {crl}"])
    b.start()
    clients: list[MqttClient] = []
    try:
        new = _connect(b, p, tls / "device.pem", tls / "device.key", "orin-7")
        old = _connect(b, p, stolen / "device.pem", stolen / "device.key", "orin-7")
        clients += [new, old]
        assert new.wait_connected(10)
        assert not old.wait_connected(1.5)
        assert "it is revoked" in str(old.failure(1.5))
    finally:
        for c in clients:
            c.stop()
        b.stop()

    # Retiring the device: its current certificate and every replaced one.
    assert _revoke("orin-7", "--provisioned", out, "--ca", ca_dir, "--out", crl) == 0
    assert _serials(crl) == {old_serial, new_serial}
    # --replaced for a device that was never re-issued is a named refusal.
    assert _provision(tmp_path / "f2", ca_dir, signer) == 0
    capsys.readouterr()
    assert _revoke("orin-7", "--replaced", "--provisioned", tmp_path / "f2", "--ca", ca_dir,
                   "--out", crl) == 1
    assert "has no replaced certificates" in capsys.readouterr().err
