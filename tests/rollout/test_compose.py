"""deploy/docker/compose.yaml without Docker (it cannot pull images here): the files it mounts
are made by scripts/compose_pki.py, then run as the compose file wires them, with container
paths mapped onto that tree and the broker's host and port onto a free loopback port: the
shipped mosquitto.conf on a real Mosquitto, the cloud worker's own command line with its
client certificate, the provisioned device's certificate, the operator's; and a client from
another CA refused."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from bundle_fixtures import BuiltBundle
from live_server import stop_process, wait_until
from mqtt_fixtures import Broker, free_port, make_pki
from test_cli import _read_line

from edge_runtime.fleet.messages import status_payload
from edge_runtime.mqtt.client import MqttClient, TlsFiles

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "deploy" / "docker"
sys.path.insert(0, str(ROOT / "scripts"))

import compose_pki  # noqa: E402


def _sub(text: str, old: str, new: str) -> str:
    assert old in text, f"mosquitto.conf no longer has {old!r}"
    return text.replace(old, new)


class Compose:
    """compose.yaml's services, with their bind mounts mapped onto this test's files."""

    def __init__(self, pki_dir: Path, bundle: Path) -> None:
        self.services: dict[str, Any] = yaml.safe_load(
            (DOCKER / "compose.yaml").read_text())["services"]
        self.pki_dir, self.bundle = pki_dir, bundle

    def source(self, src: str) -> Path | None:
        if src.startswith("${BUNDLE"):
            return self.bundle
        if src == "./pki" or src.startswith("./pki/"):
            return self.pki_dir / src[len("./pki/"):]
        if src.startswith(("./", "../")):
            return (DOCKER / src).resolve()
        return None  # a named volume

    @staticmethod
    def split(volume: str) -> tuple[str, str]:
        """`SRC:DST[:ro]` → (SRC, DST); SRC may be `${BUNDLE:?message}`."""
        if volume.startswith("${"):
            end = volume.index("}") + 1
            return volume[:end], volume[end + 1:].partition(":")[0]
        src, dst = volume.split(":")[:2]
        return src, dst

    def host(self, service: str, path: str) -> Path:
        """The host file behind `path` inside `service`'s container (longest mount wins)."""
        best: tuple[str, Path] | None = None
        for volume in self.services[service].get("volumes", []):
            src, dst = self.split(volume)
            mapped = self.source(src)
            inside = path == dst or path.startswith(dst + "/")
            if mapped is not None and inside and (best is None or len(dst) > len(best[0])):
                best = (dst, mapped / path[len(dst):].lstrip("/"))
        assert best is not None, f"{service} mounts nothing at {path}"
        return best[1]


def test_compose_runs_on_the_generated_pki_and_the_shipped_broker_config(
    tmp_path: Path, tiny_bundle: BuiltBundle, capsys: pytest.CaptureFixture[str],
) -> None:
    pki_dir = tmp_path / "pki"
    assert compose_pki.main(["--out", str(pki_dir), "--bundle-signer",
                             str(tiny_bundle.pubkey)]) == 0
    printed = capsys.readouterr().out
    assert "PRIVATE" not in printed  # keys are written 0600, never printed
    assert f"sudo chown 10001:10001 {pki_dir}/worker/worker.key" in printed  # the image's user
    compose = Compose(pki_dir, tiny_bundle.path)
    for name, service in compose.services.items():  # every bind mount has its file
        for volume in service.get("volumes", []):
            src = compose.source(compose.split(volume)[0])
            assert src is None or src.exists(), (name, volume)

    # The broker: the shipped config, unchanged but for where its files and ports are.
    conf_path = compose.host("broker", "/etc/mosquitto/edge/mosquitto.conf")
    assert conf_path == ROOT / "deploy" / "mosquitto" / "mosquitto.conf"
    etc = compose.host("broker", "/etc/mosquitto/edge/acl").parent
    acl = (etc / "acl").read_text()
    assert acl.startswith((ROOT / "deploy" / "mosquitto" / "acl").read_text())
    assert "user dev-1\n" in acl and "user worker-cloud\n" in acl
    port, port_pw = free_port(), free_port()
    conf = conf_path.read_text()
    conf = _sub(conf, "/etc/mosquitto/edge/", f"{etc}/")
    conf = _sub(conf, "/var/lib/mosquitto/", f"{tmp_path}/")
    conf = _sub(conf, "listener 8883\n", f"listener {port} 127.0.0.1\n")
    conf = _sub(conf, "listener 8884\n", f"listener {port_pw} 127.0.0.1\n")
    broker = Broker(tmp_path / "broker", config=conf, port=port)
    broker.start()
    url = f"mqtts://localhost:{port}"  # the server certificate names broker and localhost
    worker: subprocess.Popen[str] | None = None
    clients: list[MqttClient] = []
    try:
        # The cloud worker: compose's command, its paths mapped, the broker's address moved.
        args = list(compose.services["cloud-worker"]["command"])
        assert {"--ca-file", "--cert-file", "--key-file"} <= set(args)
        args = [str(compose.host("cloud-worker", a)) if a.startswith("/") else a for a in args]
        args = [url if a == "mqtts://broker:8883" else a for a in args]
        exe = Path(sys.executable).with_name("edge-runtime")
        worker = subprocess.Popen([str(exe), "cloud-worker", *args, "--threads", "1"],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = _read_line(worker, 120)
        assert f"cloud worker subscribed on {url}" in line, line

        # The provisioned device and the operator, by their certificates from the same CA.
        tls = pki_dir / "devices" / "dev-1" / "etc" / "edge-runtime" / "tls"
        device = MqttClient(url, "dev-1", tls=TlsFiles(str(tls / "ca.pem"),
                                                       str(tls / "device.pem"),
                                                       str(tls / "device.key")))
        op = pki_dir / "operator"
        seen: list[bytes] = []
        operator = MqttClient(url, "operator-admin", tls=TlsFiles(
            str(op / "ca.pem"), str(op / "operator.pem"), str(op / "operator.key")))
        operator.subscribe("fleet/+/status", lambda m: seen.append(m.payload))
        clients += [device, operator]
        assert operator.start(wait_s=10) and operator.wait_subscribed(10), operator.failure(5)
        assert device.start(wait_s=10), device.failure(5)
        device.publish("fleet/dev-1/status", status_payload("dev-1", True, bundle="b"),
                       wait_s=5, retain=True)
        wait_until(lambda: bool(seen), 10)
        assert b"dev-1" in seen[0]

        # A certificate from another CA: the TLS handshake fails.
        other = make_pki(tmp_path / "other")
        rogue = MqttClient(url, "dev-1", tls=TlsFiles(str(pki_dir / "ca" / "ca.pem"),
                                                      str(other.other_cert),
                                                      str(other.other_key)))
        clients.append(rogue)
        assert not rogue.start(wait_s=1.5)
    finally:
        for c in clients:
            c.stop()
        if worker is not None:
            stop_process(worker)
        broker.stop()
