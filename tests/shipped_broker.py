"""Mosquitto running exactly deploy/mosquitto/'s config and ACL, on this test's files.

    sb = shipped_broker(tmp_path, devices={"dev-a": ["lab"], "dev-b": ["prod"]})
    sb.start(); ...; sb.stop()
    MqttClient(sb.cert_url, "dev-a", tls=sb.tls("dev-a"))                 certificate listener
    MqttClient(sb.password_url, "x", username="operator-pw", password=sb.passwords[...],
               tls=sb.tls())                                              password listener

The shipped files are rewritten only where a test must differ from production: the
/etc/mosquitto/edge/ and /var/lib/mosquitto/ directories become the test's, the ports 8883
and 8884 become free loopback ports. Each rewrite must hit, so a reshaped shipped config
fails here instead of silently testing something else. Device blocks are appended to the
shipped ACL by edge_runtime.rollout.acl.device_acl, as provisioning does.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from mqtt_fixtures import Broker, Pki, free_port, issue_client, make_pki

from edge_runtime.mqtt.client import TlsFiles
from edge_runtime.rollout.acl import device_acl, operator_acl, worker_acl
from edge_runtime.rollout.revoke import revoke

DEPLOY = Path(__file__).resolve().parents[1] / "deploy" / "mosquitto"
OPERATOR = "operator-admin"
WORKER = "worker-cloud"
"""The identities the shipped ACL lists."""


@dataclass
class ShippedBroker:
    broker: Broker
    pki: Pki
    cert_port: int
    password_port: int
    certs: dict[str, tuple[Path, Path]]
    passwords: dict[str, str] = field(default_factory=dict)

    @property
    def cert_url(self) -> str:
        return f"mqtts://127.0.0.1:{self.cert_port}"

    @property
    def password_url(self) -> str:
        return f"mqtts://127.0.0.1:{self.password_port}"

    def tls(self, identity: str | None = None) -> TlsFiles:
        """The CA, and `identity`'s certificate pair if given."""
        if identity is None:
            return TlsFiles(str(self.pki.ca))
        cert, key = self.certs[identity]
        return TlsFiles(str(self.pki.ca), str(cert), str(key))

    def rogue_tls(self) -> TlsFiles:
        """A certificate (CN dev-1) signed by a CA the broker does not trust."""
        return TlsFiles(str(self.pki.ca), str(self.pki.other_cert), str(self.pki.other_key))

    def start(self) -> None:
        self.broker.start()

    def stop(self) -> None:
        self.broker.stop()


def _sub(text: str, old: str, new: str) -> str:
    assert old in text, f"the shipped mosquitto.conf no longer has {old!r}"
    return text.replace(old, new)


def shipped_broker(workdir: Path, devices: dict[str, list[str]],
                   password_users: tuple[str, ...] = ()) -> ShippedBroker:
    """A not yet started broker with the shipped config and ACL, a certificate for every
    device and for the shipped operator and worker, and `password_users` in its password
    file (each with an ACL block for its role prefix)."""
    etc = workdir / "etc"
    etc.mkdir(parents=True, exist_ok=True)
    pki = make_pki(workdir / "pki")
    shutil.copy(pki.ca, etc / "ca.pem")
    shutil.copy(pki.server_cert, etc / "server.pem")
    shutil.copy(pki.server_key, etc / "server.key")
    certs = {who: issue_client(pki, who) for who in (*devices, OPERATOR, WORKER)}
    revoke(pki.ca.parent, etc / "crl.pem", [])  # the shipped config's crlfile: none revoked
    acl = (DEPLOY / "acl").read_text()
    for user in password_users:
        acl += "\n" + (operator_acl(user) if user.startswith("operator-") else worker_acl(user))
    for device, groups in devices.items():
        acl += "\n" + device_acl(device, groups)
    (etc / "acl").write_text(acl)
    passwd = etc / "passwd"
    passwd.write_text("")
    passwords = {}
    for user in password_users:
        passwords[user] = f"pw-{user}-{free_port()}"
        subprocess.run(["mosquitto_passwd", "-b", str(passwd), user, passwords[user]],
                       check=True, capture_output=True)
    cert_port, password_port = free_port(), free_port()
    conf = (DEPLOY / "mosquitto.conf").read_text()
    conf = _sub(conf, "/etc/mosquitto/edge/", f"{etc}/")
    conf = _sub(conf, "/var/lib/mosquitto/", f"{workdir}/")
    conf = _sub(conf, "listener 8883\n", f"listener {cert_port} 127.0.0.1\n")
    conf = _sub(conf, "listener 8884\n", f"listener {password_port} 127.0.0.1\n")
    broker = Broker(workdir, config=conf, port=cert_port)
    return ShippedBroker(broker, pki, cert_port, password_port, certs, passwords)
