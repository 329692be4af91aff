"""At start the device checks its own certificate with the doctor's function (pki) and logs an
ERROR when the broker will refuse it (expired) or soon will (expiring within 30 days)."""

from __future__ import annotations

import datetime as dt
import logging
from pathlib import Path

import pytest

from edge_runtime import pki
from edge_runtime.config import FleetConfig
from edge_runtime.fleet.daemon import check_own_certificate


def _fleet(tmp_path: Path, days_left: float) -> FleetConfig:
    ca_key, ca = pki.new_ca("fleet CA")
    key, cert = pki.device_cert(ca_key, ca, "orin-1")
    now = dt.datetime.now(dt.timezone.utc)
    if days_left != 730:  # re-sign the same key with other dates
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes

        cert = (x509.CertificateBuilder().subject_name(cert.subject).issuer_name(ca.subject)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - dt.timedelta(days=400))
                .not_valid_after(now + dt.timedelta(days=days_left))
                .sign(ca_key, hashes.SHA256()))
    pki.write_cert(tmp_path / "ca.pem", ca)
    pki.write_cert(tmp_path / "device.pem", cert)
    pki.write_private_key(tmp_path / "device.key", key)
    return FleetConfig(ca_file=tmp_path / "ca.pem", cert_file=tmp_path / "device.pem",
                       key_file=tmp_path / "device.key")


@pytest.mark.parametrize(("days_left", "says"), [(-1, "expired on"), (10, "expires on"),
                                                 (730, None)])
def test_device_logs_its_own_certificate_expiry_at_start(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, days_left: float, says: str | None
) -> None:
    f = _fleet(tmp_path, days_left)
    with caplog.at_level(logging.ERROR, logger="edge_runtime.fleet.daemon"):
        lines = check_own_certificate(f)
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    if says is None:
        assert lines == [] and errors == []
    else:
        assert len(errors) == 1 and says in errors[0] and "device.pem" in errors[0]
        assert "PRIVATE KEY" not in errors[0]
