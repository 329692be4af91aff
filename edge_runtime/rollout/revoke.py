"""`edge-fleet revoke`: put devices' certificates on the fleet CA's revocation list.

    edge-fleet revoke orin-017 orin-018 --ca OUT/ca --provisioned OUT --out crl.pem
    edge-fleet revoke orin-017 --replaced --ca OUT/ca --provisioned OUT --out crl.pem
    edge-fleet revoke --cert lost-device.pem --ca OUT/ca --out crl.pem
    edge-fleet revoke --ca OUT/ca --out crl.pem        (no device: re-sign, fresh next_update)

The CRL at --out is read first and must be signed by this CA (a list from another CA would
drop this fleet's earlier revocations); its entries are kept, the new serials are added,
and the result is signed and written atomically (atomic.py). The broker checks it on its
certificate listener (`crlfile` in deploy/mosquitto/mosquitto.conf) and reads it again on
SIGHUP. Only serials and the CA's public parts are printed; never a key.

A device id revokes the device's current certificate and every one `edge-fleet provision
--force` replaced (kept under OUT/replaced/ID/): a retired device leaves nothing valid behind.
With `--replaced`, only those replaced ones: the device was re-issued (its old key lost or
exposed) and keeps its new certificate.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from cryptography.exceptions import InvalidSignature

from edge_runtime import pki
from edge_runtime.errors import ConfigError
from edge_runtime.rollout.provision import (
    check_device_id,
    load_or_create_ca,
    replaced_certs,
    replaced_dir,
)


def device_cert_path(provisioned: Path, device_id: str) -> Path:
    """Where `edge-fleet provision --out provisioned` put the device's certificate."""
    return provisioned / "devices" / device_id / "etc" / "edge-runtime" / "tls" / "device.pem"


def revoke(ca_dir: Path, crl_path: Path, certs: list[tuple[str, Path]],
           days: int = pki.CRL_DAYS) -> list[str]:
    """Revoke each (label, certificate file); one line per certificate for the operator."""
    if not (ca_dir / "ca.pem").is_file() or not (ca_dir / "ca.key").is_file():
        raise ConfigError(f"{ca_dir} holds no fleet CA (ca.pem + ca.key): pass the --ca "
                          "that edge-fleet provision used")
    (ca_key, ca), _ = load_or_create_ca(ca_dir)
    previous = pki.load_crl(crl_path, ca_key, ca)
    already = {r.serial_number for r in previous} if previous is not None else set()
    serials: list[int] = []
    lines: list[str] = []
    for label, path in certs:
        cert = pki.load_cert(path)
        try:
            cert.verify_directly_issued_by(ca)
        except (ValueError, TypeError, InvalidSignature):
            raise ConfigError(f"{path} ({label}) was not issued by the CA {ca_dir / 'ca.pem'}: "
                              "pass the CA that provisioned it (--ca)") from None
        state = "already revoked" if cert.serial_number in already else "revoked"
        serials.append(cert.serial_number)
        lines.append(f"{state} {label}: certificate {cert.serial_number:x} "
                     f"(CN {pki.common_name(cert)!r})")
    crl = pki.build_crl(ca_key, ca, previous, serials, days)
    pki.write_crl(crl_path, crl)
    assert crl.next_update_utc is not None
    lines.append(f"wrote {crl_path}: {len(list(crl))} revoked, next update "
                 f"{crl.next_update_utc:%Y-%m-%d} (install it as the broker's crlfile, then "
                 "kill -HUP the broker)")
    return lines


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`edge-fleet revoke` (rollout/cli.py registers it next to provision)."""
    p = sub.add_parser("revoke", help="add device certificates to the fleet CA's CRL")
    p.add_argument("device", nargs="*", help="device id(s) provisioned under --provisioned")
    p.add_argument("--ca", type=Path, required=True, help="fleet CA directory (ca.pem, ca.key)")
    p.add_argument("--out", type=Path, required=True,
                   help="the CRL (PEM): read if present, kept entries, rewritten")
    p.add_argument("--provisioned", type=Path,
                   help="edge-fleet provision's --out, where the devices' certificates are")
    p.add_argument("--cert", action="append", type=Path, default=[],
                   help="a certificate file to revoke (repeatable)")
    p.add_argument("--replaced", action="store_true",
                   help="only the certificates provision --force replaced for these devices "
                   "(their current ones stay valid)")
    p.add_argument("--days", type=int, default=pki.CRL_DAYS,
                   help="days until the CRL's next update (the broker refuses everyone after)")
    p.set_defaults(fn=cmd_revoke)


def cmd_revoke(a: argparse.Namespace) -> int:
    if a.days < 1:
        raise ConfigError(f"--days must be >= 1, got {a.days}")
    certs: list[tuple[str, Path]] = []
    if a.device and a.provisioned is None:
        raise ConfigError(f"device ids {', '.join(a.device)} need --provisioned (edge-fleet "
                          "provision's --out), or pass their certificates with --cert")
    if a.replaced and not a.device:
        raise ConfigError("--replaced needs the device ids whose replaced certificates to "
                          "revoke (and --provisioned)")
    for device in a.device:
        check_device_id(device)
        path = device_cert_path(a.provisioned, device)
        old = [(f"{device} (replaced)", p) for p in replaced_certs(a.provisioned, device)]
        if a.replaced:
            if not old:
                raise ConfigError(f"{device} has no replaced certificates under "
                                  f"{replaced_dir(a.provisioned, device)}: nothing to revoke")
            certs.extend(old)
            continue
        if not path.is_file():
            raise ConfigError(f"{device} has no certificate at {path}: check --provisioned or "
                              "pass its certificate with --cert")
        certs.append((device, path))
        certs.extend(old)
    certs.extend((str(c), c) for c in a.cert)
    for line in revoke(a.ca, a.out, certs, a.days):
        print(line)
    return 0
