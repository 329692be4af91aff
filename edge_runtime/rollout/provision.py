"""`edge-fleet provision`: a device's identity and configuration, made before it is flashed.

For each device: a fresh ECDSA P-256 key and a client certificate from the fleet CA (CN = the
device id, which the broker takes as the username and its ACL as the only topics it may
use), the trust stores (bundle signers, operators) and /etc/edge-runtime/config.toml. The
output is one tree per device laid out as on the device, which `scripts/flash_orin.sh`
copies into the root-file-system overlay:

    OUT/ca/{ca.pem,ca.key}                         the fleet CA (made once, or --ca DIR)
    OUT/devices/ID/etc/edge-runtime/config.toml    0640
    OUT/devices/ID/etc/edge-runtime/tls/{ca.pem,device.pem,device.key}   key 0600
    OUT/devices/ID/etc/edge-runtime/trust/bundle-signers/*.pub
    OUT/devices/ID/etc/edge-runtime/trust/operators/*.pub
    OUT/devices/ID/broker.acl                      its block for the broker's ACL (acl.py)
    OUT/replaced/ID/SERIAL.pem                     certificates --force replaced

`--force` re-issues a device (a new key and certificate); the certificate it replaces is
signed by the same CA and stays valid until it expires or is revoked, so it is kept under
OUT/replaced/ (outside the device's tree: it is never flashed) and the output line gives the
`edge-fleet revoke ID --replaced` command that puts it on the CRL while the new one stays good.

Private keys go through atomic.py (0600 from creation, fsync, rename) and are never printed;
a replaced device's old key is deleted with its tree (only the certificate is kept).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import shutil
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from edge_runtime import pki
from edge_runtime.atomic import atomic_write_bytes, atomic_write_text
from edge_runtime.config import config_from_dict
from edge_runtime.errors import ConfigError, EdgeError
from edge_runtime.fleet.remote_config import REMOTE_FILE
from edge_runtime.mqtt import topics
from edge_runtime.rollout.acl import device_acl
from edge_runtime.signing import load_public_key

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - 3.10
    import tomli as tomllib

ETC = Path("/etc/edge-runtime")  # where the files live on the device
STATE = Path("/var/lib/edge-runtime")
# A device id is a certificate CN, a topic level, a file name and a host name alike.
DEVICE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
CA = tuple[ec.EllipticCurvePrivateKey, x509.Certificate]


@dataclass(frozen=True)
class Device:
    serial: str
    device_id: str


@dataclass(frozen=True)
class Options:
    broker: str  # as the device reaches it: mqtts://host:8883
    groups: tuple[str, ...] = ()
    bundle_signers: tuple[Path, ...] = ()
    operator_keys: tuple[Path, ...] = ()
    days: int = pki.DEVICE_DAYS
    force: bool = False


def check_device_id(value: str, where: str = "device id") -> str:
    if not DEVICE_ID.fullmatch(value):
        raise ConfigError(f"{where}: {value!r} is not a device id (letters, digits, '.', '_', "
                          "'-', at most 63, starting with a letter or digit)")
    try:
        device_acl(value)  # a topic-safe id that no broker role (operator-, worker-) claims
    except EdgeError as e:
        raise ConfigError(f"{where}: {e}") from e
    return value


def read_devices_csv(path: Path) -> list[Device]:
    """`serial,device_id` per line (a header line `serial,device_id` is allowed; # comments);
    a bad line is a ConfigError naming the file and the line."""
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e.strerror}") from e
    devices: list[Device] = []
    seen: dict[str, int] = {}
    for n, row in enumerate(csv.reader(text.splitlines()), start=1):
        cells = [c.strip() for c in row]
        if not cells or not any(cells) or cells[0].startswith("#"):
            continue
        if n == 1 and [c.lower() for c in cells] == ["serial", "device_id"]:
            continue
        where = f"{path}:{n}"
        if len(cells) != 2 or not cells[0]:
            raise ConfigError(f"{where}: expected 'serial,device_id', got {','.join(row)!r}")
        serial, device_id = cells
        check_device_id(device_id, where)
        if device_id in seen:
            raise ConfigError(f"{where}: device id {device_id!r} already on line "
                              f"{seen[device_id]}")
        seen[device_id] = n
        devices.append(Device(serial, device_id))
    if not devices:
        raise ConfigError(f"{path}: no devices (expected lines 'serial,device_id')")
    return devices


def load_or_create_ca(ca_dir: Path, name: str = "edge-runtime fleet CA") -> tuple[CA, bool]:
    """The fleet CA in ca_dir (ca.pem, ca.key), made there if the directory holds none."""
    cert_path, key_path = ca_dir / "ca.pem", ca_dir / "ca.key"
    if cert_path.is_file() and key_path.is_file():
        ca = pki.load_cert(cert_path)
        key = pki.load_ec_key(key_path)
        if ca.public_key() != key.public_key():
            raise ConfigError(f"{key_path} is not the key of {cert_path}")
        return (key, ca), False
    if cert_path.exists() or key_path.exists():
        raise ConfigError(f"{ca_dir} holds only one of ca.pem, ca.key: restore the other or "
                          "point --ca at an empty directory to make a new CA")
    key, ca = pki.new_ca(name)
    pki.write_private_key(key_path, key)
    pki.write_cert(cert_path, ca)
    return (key, ca), True


def _toml_list(values: list[str]) -> str:
    return "[" + ", ".join(json.dumps(v) for v in values) + "]"


def config_toml(device: Device, opts: Options, signers: list[str], operators: list[str]) -> str:
    """The device's config.toml; checked by config.py's own parser before it is written."""
    tls = ETC / "tls"
    signer_paths = [str(ETC / "trust" / "bundle-signers" / s) for s in signers]
    lines = [
        f"# /etc/edge-runtime/config.toml for {device.device_id} (serial {device.serial}),",
        "# written by edge-fleet provision. Owner root:edge-runtime, mode 0640.",
        "",
        "[server]",
        'host = "127.0.0.1"',
        "port = 8000",
        "",
        "[model]",
        f"pubkeys = {_toml_list(signer_paths)}",
        "",
        "[fleet]",
        "enabled = true",
        f"broker = {json.dumps(opts.broker)}",
        f"device_id = {json.dumps(device.device_id)}",
        f"root = {json.dumps(str(STATE))}",
        "# What signed set-config commands change (allowed keys only), merged over this",
        "# file at each start; the daemon never writes this file.",
        f"remote_config = {json.dumps(str(STATE / REMOTE_FILE))}",
        f"groups = {_toml_list(list(opts.groups))}",
        f"pubkeys = {_toml_list(signer_paths)}",
        f"ca_file = {json.dumps(str(tls / 'ca.pem'))}",
        f"cert_file = {json.dumps(str(tls / 'device.pem'))}",
        f"key_file = {json.dumps(str(tls / 'device.key'))}",
    ]
    lines.append(f"operator_keys = [{json.dumps(str(ETC / 'trust' / 'operators'))}]")
    text = "\n".join(lines) + "\n"
    try:
        config_from_dict(tomllib.loads(text), ETC, source=f"config of {device.device_id}")
    except tomllib.TOMLDecodeError as e:  # a bug here, never the user's input
        raise ConfigError(f"generated config of {device.device_id} is not TOML: {e}") from e
    return text


def _copy_keys(sources: tuple[Path, ...], dest: Path) -> list[str]:
    names = []
    for src in sources:
        load_public_key(src)  # an ed25519 public key, or a one-line SignatureError
        if src.name in names:
            raise ConfigError(f"two trusted keys named {src.name}: rename one")
        atomic_write_bytes(dest / src.name, src.read_bytes())
        os.chmod(dest / src.name, 0o644)
        names.append(src.name)
    return names


def replaced_dir(out: Path, device_id: str) -> Path:
    """Where --force keeps the certificates it replaced (named by serial, hex)."""
    return out / "replaced" / device_id


def _keep_replaced(out: Path, device_id: str, cert_path: Path) -> None:
    """Copy the certificate about to be replaced to OUT/replaced/ID/SERIAL.pem (atomically,
    before its tree is deleted); nothing when the tree holds no readable certificate."""
    try:
        cert = pki.load_cert(cert_path)
    except EdgeError:
        return
    dest = replaced_dir(out, device_id) / f"{cert.serial_number:x}.pem"
    dest.parent.mkdir(parents=True, exist_ok=True)
    pki.write_cert(dest, cert)


def provision_device(out: Path, ca: CA, device: Device, opts: Options) -> Path:
    """Write one device's tree under out/devices/ID; returns its etc/edge-runtime."""
    root = out / "devices" / device.device_id
    etc = root / "etc" / "edge-runtime"
    if root.exists():
        if not opts.force:
            raise ConfigError(f"{device.device_id} is already provisioned at {root}: pass "
                              "--force to issue it a new key and certificate")
        _keep_replaced(out, device.device_id, etc / "tls" / "device.pem")
        shutil.rmtree(root)
    for d in (etc / "tls", etc / "trust" / "bundle-signers", etc / "trust" / "operators"):
        d.mkdir(parents=True, exist_ok=True)
    signers = _copy_keys(opts.bundle_signers, etc / "trust" / "bundle-signers")
    operators = _copy_keys(opts.operator_keys, etc / "trust" / "operators")
    ca_key, ca_cert = ca
    key, cert = pki.device_cert(ca_key, ca_cert, device.device_id, opts.days)
    pki.write_private_key(etc / "tls" / "device.key", key)
    pki.write_cert(etc / "tls" / "device.pem", cert)
    pki.write_cert(etc / "tls" / "ca.pem", ca_cert)
    atomic_write_text(etc / "config.toml", config_toml(device, opts, signers, operators))
    os.chmod(etc / "config.toml", 0o640)
    # Appended to the broker's acl (deploy/mosquitto/): only its own topics and its groups'.
    atomic_write_text(root / "broker.acl", device_acl(device.device_id, opts.groups))
    os.chmod(root / "broker.acl", 0o644)
    return etc


def provision(out: Path, ca_dir: Path | None, devices: list[Device], opts: Options) -> list[str]:
    """Provision every device; one line per device (no key material) for the operator."""
    if not opts.bundle_signers:
        raise ConfigError("no --bundle-signer: a device must know which keys sign its bundles")
    if not opts.broker.startswith("mqtts://"):
        raise ConfigError(f"--device-broker {opts.broker!r}: devices reach the broker over TLS "
                          "with their certificate: use mqtts://HOST:8883")
    for g in opts.groups:
        topics.check_id(g, "group")
    (key, ca), made = load_or_create_ca(ca_dir or out / "ca")
    lines = [f"{'made' if made else 'using'} fleet CA {(ca_dir or out / 'ca') / 'ca.pem'} "
             f"(serial {ca.serial_number:x})"]
    now = datetime.now(timezone.utc)
    for device in devices:
        before = set(replaced_certs(out, device.device_id))
        etc = provision_device(out, (key, ca), device, opts)
        cert = pki.load_cert(etc / "tls" / "device.pem")
        lines.append(f"provisioned {device.device_id} (serial {device.serial}): certificate "
                     f"{cert.serial_number:x} valid until {cert.not_valid_after_utc:%Y-%m-%d}, "
                     f"files in {etc}")
        for path in sorted(set(replaced_certs(out, device.device_id)) - before):
            old = pki.load_cert(path)
            if old.not_valid_after_utc > now:
                lines.append(
                    f"replaced certificate {old.serial_number:x} of {device.device_id} is still "
                    f"valid until {old.not_valid_after_utc:%Y-%m-%d} (kept as {path}): revoke it "
                    f"with edge-fleet revoke {device.device_id} --replaced --provisioned {out} "
                    f"--ca {ca_dir or out / 'ca'} --out crl.pem")
    return lines


def replaced_certs(out: Path, device_id: str) -> list[Path]:
    """The certificates --force replaced for this device, oldest serial file first."""
    d = replaced_dir(out, device_id)
    return sorted(d.glob("*.pem")) if d.is_dir() else []


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`edge-fleet provision` (rollout/cli.py registers it with this one call)."""
    p = sub.add_parser("provision", help="fleet CA, device keys and certificates, device config")
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.add_argument("--ca", type=Path, help="fleet CA directory with ca.pem + ca.key (default: "
                   "OUT/ca, made if empty)")
    who = p.add_mutually_exclusive_group(required=True)
    who.add_argument("--device", help="one device id")
    who.add_argument("--csv", type=Path, help="lines 'serial,device_id'")
    p.add_argument("--serial", default="", help="--device's serial number")
    p.add_argument("--device-broker", required=True,
                   help="the broker as devices reach it: mqtts://HOST:8883")
    p.add_argument("--group", action="append", default=[], help="device group (repeatable)")
    p.add_argument("--bundle-signer", action="append", type=Path, default=[], required=True,
                   help="ed25519 public key that signs bundles (repeatable)")
    p.add_argument("--operator-key", action="append", type=Path, default=[],
                   help="ed25519 public key of an operator who signs fleet commands")
    p.add_argument("--days", type=int, default=pki.DEVICE_DAYS, help="certificate validity")
    p.add_argument("--force", action="store_true", help="re-issue already provisioned devices")
    p.set_defaults(fn=cmd_provision)


def cmd_provision(a: argparse.Namespace) -> int:
    if a.days < 1:
        raise ConfigError(f"--days must be >= 1, got {a.days}")
    devices = (read_devices_csv(a.csv) if a.csv
               else [Device(a.serial, check_device_id(a.device, "--device"))])
    opts = Options(a.device_broker, tuple(a.group), tuple(a.bundle_signer),
                   tuple(a.operator_key), a.days, a.force)
    for line in provision(a.out, a.ca, devices, opts):
        print(line)
    return 0
