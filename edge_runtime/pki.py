"""The fleet's X.509 identities: a CA, per-device ECDSA P-256 certificates, and their checks
(and a broker's server certificate, for the compose file's broker: scripts/compose_pki.py).

A device's identity on the broker is its client certificate, whose CN is the device id (the
broker takes it as the username, and the ACL grants that username only its own topics).
The same checks serve `edge-fleet provision`, the overlay's dry run and `edge-runtime doctor`:
the certificate chains to the fleet CA, is inside its validity, and matches its key.
Private keys are written 0600 through atomic.py (mkstemp's mode, fsync, rename) and never
appear in a message.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from edge_runtime.atomic import atomic_write_bytes
from edge_runtime.errors import ConfigError

CA_DAYS = 10 * 365
DEVICE_DAYS = 2 * 365  # renewed by re-provisioning; the doctor warns 30 days ahead
EXPIRY_WARNING = dt.timedelta(days=30)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _serial() -> int:
    # RFC 5280: positive, at most 20 octets; random so that two CAs' serials never collide.
    return secrets.randbits(159) | 1


def new_ca(name: str, days: int = CA_DAYS) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject).issuer_name(subject)
        .public_key(key.public_key()).serial_number(_serial())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, key_cert_sign=True, crl_sign=True,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    return key, cert


def device_cert(
    ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, device_id: str,
    days: int = DEVICE_DAYS,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A fresh P-256 key and a client certificate for it: CN = device id, client auth only."""
    return _leaf(ca_key, ca_cert, device_id, days, [
        (x509.KeyUsage(digital_signature=True, content_commitment=False,
                       key_encipherment=False, data_encipherment=False, key_agreement=False,
                       key_cert_sign=False, crl_sign=False, encipher_only=False,
                       decipher_only=False), True),
        (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), False),
    ])


def server_cert(
    ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, hosts: list[str],
    days: int = DEVICE_DAYS,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A fresh P-256 key and a broker's certificate: its host names (and IP addresses) in the
    SAN, which is what TLS clients check; server auth only."""
    if not hosts:
        raise ConfigError("a server certificate needs at least one host name")
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return _leaf(ca_key, ca_cert, hosts[0], days, [
        (x509.SubjectAlternativeName(names), False),
        (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False),
    ])


def _leaf(
    ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, common_name: str, days: int,
    extensions: list[tuple[x509.ExtensionType, bool]],
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A fresh P-256 key and an end-entity certificate the CA signs: CN `common_name`, valid
    from 5 minutes ago (clock skew) for `days` but never past the CA, not a CA itself, with
    `extensions` (each with its criticality) and the CA's key identifier."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    not_after = min(now + dt.timedelta(days=days), ca_cert.not_valid_after_utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key()).serial_number(_serial())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
    )  # fmt: skip
    for extension, critical in extensions:
        builder = builder.add_extension(extension, critical=critical)
    builder = builder.add_extension(
        x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
    return key, builder.sign(ca_key, hashes.SHA256())


def write_private_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    """PKCS#8 PEM, unencrypted (the daemon starts unattended), mode 0600 from creation."""
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    atomic_write_bytes(path, pem)  # mkstemp creates it 0600; the rename keeps the mode
    os.chmod(path, 0o600)


def write_cert(path: Path, cert: x509.Certificate) -> None:
    atomic_write_bytes(path, cert.public_bytes(serialization.Encoding.PEM))
    os.chmod(path, 0o644)


def load_cert(path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(Path(path).read_bytes())
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read certificate {path}: {e}") from e


def load_ec_key(path: Path) -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as e:
        # The exception text never includes key material; the path is enough.
        raise ConfigError(f"cannot read private key {path}: {type(e).__name__}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigError(f"{path} is not an EC private key")
    return key


def common_name(cert: x509.Certificate) -> str:
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if names else ""


@dataclass
class CertCheck:
    problems: list[str]  # each with its fix; empty: good
    warnings: list[str]
    cn: str
    not_after: dt.datetime


def check_device_cert(
    cert_path: Path, key_path: Path, ca_path: Path, now: dt.datetime | None = None
) -> CertCheck:
    """Chains to the CA, inside its validity, matches its key, the key is 0600."""
    now = now or _now()
    cert, ca = load_cert(cert_path), load_cert(ca_path)
    problems: list[str] = []
    warnings: list[str] = []
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        problems.append(f"{cert_path} is not signed by the CA {ca_path}: re-provision the "
                        "device with this fleet's CA (edge-fleet provision)")
    renew = "re-provision the device (edge-fleet provision) and install the new certificate"
    if now < cert.not_valid_before_utc:
        problems.append(f"{cert_path} is not valid before {cert.not_valid_before_utc:%Y-%m-%d}: "
                        "set the device clock (NTP) or " + renew)
    elif now > cert.not_valid_after_utc:
        problems.append(f"{cert_path} expired on {cert.not_valid_after_utc:%Y-%m-%d}: {renew}")
    elif cert.not_valid_after_utc - now < EXPIRY_WARNING:
        warnings.append(f"{cert_path} expires on {cert.not_valid_after_utc:%Y-%m-%d}: {renew}")
    if now > ca.not_valid_after_utc:
        problems.append(f"the CA {ca_path} expired on {ca.not_valid_after_utc:%Y-%m-%d}: "
                        "make a new fleet CA and re-provision")
    key = load_ec_key(key_path)
    pub = key.public_key().public_bytes(serialization.Encoding.DER,
                                        serialization.PublicFormat.SubjectPublicKeyInfo)
    if pub != cert.public_key().public_bytes(serialization.Encoding.DER,
                                             serialization.PublicFormat.SubjectPublicKeyInfo):
        problems.append(f"{key_path} is not the key of {cert_path}: install the key that was "
                        "provisioned with this certificate")
    mode = os.stat(key_path).st_mode & 0o777
    if mode & 0o077:
        problems.append(f"{key_path} has mode {mode:04o}, readable by others: chmod 0600 "
                        f"{key_path}")
    return CertCheck(problems, warnings, common_name(cert), cert.not_valid_after_utc)


CRL_DAYS = 365
"""How far ahead a CRL's next_update lies. OpenSSL (so Mosquitto) refuses EVERY client once
the CRL it checks is past next_update, so it is generous; re-running `edge-fleet revoke`
(even with no device) re-signs the list with a fresh date."""


def load_crl(path: Path, ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate
             ) -> x509.CertificateRevocationList | None:
    """The CRL at path (None if there is none), refused unless this CA signed it: a list
    from another CA would silently drop this fleet's earlier revocations."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise ConfigError(f"cannot read the CRL {path}: {e.strerror}") from e
    try:
        crl = x509.load_pem_x509_crl(data)
    except ValueError as e:
        raise ConfigError(f"{path} is not a PEM CRL ({e}): move it away or pass another "
                          "--out") from e
    if crl.issuer != ca_cert.subject or not crl.is_signature_valid(ca_key.public_key()):
        raise ConfigError(f"the CRL {path} was not signed by the CA {common_name(ca_cert)!r} "
                          f"(issuer {crl.issuer.rfc4514_string()!r}): pass this fleet's CA "
                          "(--ca) or another --out")
    return crl


def build_crl(
    ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate,
    previous: x509.CertificateRevocationList | None, serials: list[int],
    days: int = CRL_DAYS, now: dt.datetime | None = None,
) -> x509.CertificateRevocationList:
    """previous's revocations (their dates kept) plus serials, with a CRL number one above
    previous's (RFC 5280 asks it to increase), signed by the CA."""
    now = now or _now()
    number = 1
    b = (x509.CertificateRevocationListBuilder().issuer_name(ca_cert.subject)
         .last_update(now - dt.timedelta(minutes=5))
         .next_update(min(now + dt.timedelta(days=days), ca_cert.not_valid_after_utc)))
    seen: set[int] = set()
    if previous is not None:
        for r in previous:
            b = b.add_revoked_certificate(r)
            seen.add(r.serial_number)
        with contextlib.suppress(x509.ExtensionNotFound):  # a CRL from elsewhere: start at 1
            ext = previous.extensions.get_extension_for_class(x509.CRLNumber)
            number = ext.value.crl_number + 1
    for serial in serials:
        if serial not in seen:
            seen.add(serial)
            b = b.add_revoked_certificate(x509.RevokedCertificateBuilder()
                                          .serial_number(serial).revocation_date(now).build())
    b = b.add_extension(x509.CRLNumber(number), critical=False).add_extension(
        x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
    return b.sign(ca_key, hashes.SHA256())


def write_crl(path: Path, crl: x509.CertificateRevocationList) -> None:
    atomic_write_bytes(path, crl.public_bytes(serialization.Encoding.PEM))
    os.chmod(path, 0o644)  # the broker's user reads it; it holds no secret
