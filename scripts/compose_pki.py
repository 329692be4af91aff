"""The files deploy/docker/compose.yaml mounts, made by the project's own PKI code around the
shipped broker configuration: one fleet CA for the broker, the devices, the cloud worker and
the operator, so every TLS connection of the compose file is checked end to end.

    python scripts/compose_pki.py --bundle-signer SIGNER.pub [--operator-key OP.pub]
        [--device dev-1 ...] [--out deploy/docker/pki] [--chown]

    OUT/ca/{ca.pem,ca.key}                      the fleet CA (edge-fleet provision's)
    OUT/devices/ID/etc/edge-runtime/...         provisioned as a Jetson is (edge-fleet
                                                provision, broker mqtts://broker:8883)
    OUT/broker/{ca.pem,server.pem,server.key}   the broker's certificate: SAN broker, localhost
    OUT/broker/acl                              deploy/mosquitto/acl verbatim + each device's
                                                block (rollout/acl.py, as provisioning writes)
    OUT/broker/passwd                           empty: every client here has a certificate
    OUT/broker/crl.pem                          the fleet CA's CRL (edge-fleet revoke's; kept,
                                                re-signed on every run)
    OUT/worker/{ca.pem,worker.pem,worker.key}   CN worker-cloud, the worker the shipped ACL names
    OUT/operator/{ca.pem,operator.pem,operator.key}  CN operator-admin: `edge-fleet` on the host
                                                (--broker mqtts://localhost:8883)
    OUT/bundle-signer.pub                       the cloud worker's --pubkey

Private keys are 0600 and never printed. The containers run as other users than the one who
made the keys (Mosquitto as 1883, the project's images as 10001): `--chown` (as root) hands
each key to its container's user; without it, the commands that do so are printed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

from edge_runtime import pki
from edge_runtime.errors import EdgeError
from edge_runtime.rollout.provision import (
    CA,
    Device,
    Options,
    check_device_id,
    load_or_create_ca,
    provision,
)
from edge_runtime.rollout.revoke import revoke

ROOT = Path(__file__).resolve().parents[1]
SHIPPED_ACL = ROOT / "deploy" / "mosquitto" / "acl"
BROKER_HOSTS = ["broker", "localhost"]
"""The compose service's name (containers) and the published port's host (the operator)."""
WORKER, OPERATOR = "worker-cloud", "operator-admin"
"""The identities deploy/mosquitto/acl grants."""
MOSQUITTO_UID, IMAGE_UID = 1883, 10001
"""eclipse-mosquitto's user; USER of deploy/docker's images."""


def _pair(directory: Path, stem: str, ca: CA, cn: str | None = None,
          hosts: list[str] | None = None) -> Path:
    """`directory/{ca.pem, STEM.pem, STEM.key}`: a client certificate for `cn`, or a server
    certificate for `hosts`."""
    ca_key, ca_cert = ca
    if hosts is not None:
        key, cert = pki.server_cert(ca_key, ca_cert, hosts)
    else:
        assert cn is not None
        key, cert = pki.device_cert(ca_key, ca_cert, cn)
    directory.mkdir(parents=True, exist_ok=True)
    pki.write_cert(directory / "ca.pem", ca_cert)
    pki.write_cert(directory / f"{stem}.pem", cert)
    pki.write_private_key(directory / f"{stem}.key", key)
    return directory / f"{stem}.key"


def make(out: Path, signers: list[Path], operators: list[Path], devices: list[str],
         force: bool = False) -> dict[Path, int]:
    """Write OUT; returns each private key and the uid of the container that reads it."""
    ids = [check_device_id(d, "--device") for d in devices]
    opts = Options("mqtts://broker:8883", ("lab",), tuple(signers), tuple(operators),
                   force=force)
    for line in provision(out, None, [Device("compose", d) for d in ids], opts):
        print(line)
    ca, _ = load_or_create_ca(out / "ca")
    owners = {
        _pair(out / "broker", "server", ca, hosts=BROKER_HOSTS): MOSQUITTO_UID,
        _pair(out / "worker", "worker", ca, cn=WORKER): IMAGE_UID,
        _pair(out / "operator", "operator", ca, cn=OPERATOR): os.getuid(),
    }
    for d in ids:
        owners[out / "devices" / d / "etc/edge-runtime/tls/device.key"] = IMAGE_UID
    acl = SHIPPED_ACL.read_text()
    for d in ids:
        acl += "\n" + (out / "devices" / d / "broker.acl").read_text()
    (out / "broker" / "acl").write_text(acl)
    (out / "broker" / "passwd").write_text("")  # mosquitto.conf names one; nobody is in it
    # mosquitto.conf's crlfile: earlier revocations kept, a fresh next update.
    revoke(out / "ca", out / "broker" / "crl.pem", [])
    shutil.copyfile(signers[0], out / "bundle-signer.pub")
    return owners


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="scripts/compose_pki.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "deploy" / "docker" / "pki")
    ap.add_argument("--bundle-signer", type=Path, action="append", required=True,
                    help="public key that signs the bundles (the first is the worker's)")
    ap.add_argument("--operator-key", type=Path, action="append", default=[],
                    help="operator public key whose signed commands the devices run")
    ap.add_argument("--device", action="append", default=[], help="device id (dev-1)")
    ap.add_argument("--force", action="store_true", help="re-issue provisioned devices")
    ap.add_argument("--chown", action="store_true",
                    help="give each key to its container's user (needs root)")
    a = ap.parse_args(argv)
    try:
        owners = make(a.out, a.bundle_signer, a.operator_key, a.device or ["dev-1"], a.force)
    except EdgeError as e:
        print(f"compose_pki: error: {e}", file=sys.stderr)
        return 1
    for key, uid in owners.items():
        if a.chown:
            os.chown(key, uid, uid)
        elif uid != os.getuid():
            print(f"sudo chown {uid}:{uid} {key}")
    print(f"OK {a.out}: BUNDLE=/path/to/bundle docker compose -f deploy/docker/compose.yaml up")
    return 0


if __name__ == "__main__":
    sys.exit(main())
