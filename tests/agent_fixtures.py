"""Shared pieces of the device-agent tests: an operator-side Controller, a device root with
the tiny bundle active, a re-signed v2 of it (as a directory and as a .tar), and builders.

    def test_x(broker, controller, device_root, tiny_bundle, bundle_v2): ...
"""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import tarfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from bundle_fixtures import BuiltBundle
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from mqtt_fixtures import Broker

from edge_runtime import signing
from edge_runtime.bundle.manifest import MANIFEST
from edge_runtime.fleet.agent import AgentConfig, DeviceAgent
from edge_runtime.fleet.command_auth import CommandSigner, device_target
from edge_runtime.fleet.messages import Ack, Command
from edge_runtime.fleet.slots import Slots
from edge_runtime.mqtt import topics
from edge_runtime.mqtt.client import Message, MqttClient, TlsFiles

DEVICE = "dev-1"
OPERATOR = CommandSigner(Ed25519PrivateKey.generate())
"""The operator key the agents of these tests trust; Controller.send signs with it."""


def operator_pub(directory: Path) -> Path:
    """OPERATOR's public key as a PEM file in `directory` (a daemon's [fleet] operator_keys)."""
    from cryptography.hazmat.primitives import serialization

    path = directory / "operator.pub"
    directory.mkdir(parents=True, exist_ok=True)
    path.write_bytes(OPERATOR.key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return path


@pytest.fixture(scope="module")
def bundle_v2(tiny_bundle: BuiltBundle, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same model re-released as version 2: re-signed with edge_runtime alone, so these
    tests also run on the device leg (no onnx, no torch)."""
    from edge_runtime.bundle.manifest import write_bundle
    from edge_runtime.signing import load_private_key

    src = tiny_bundle.path
    fields = json.loads((src / MANIFEST).read_text())
    files = {rel: src / rel for rel in fields.pop("files")}
    del fields["schema_version"]
    fields.update(name="demo", version="2")
    out = tmp_path_factory.mktemp("v2") / "bundle"
    return write_bundle(out, files, fields, load_private_key(tiny_bundle.key))


@pytest.fixture(scope="module")
def bundle_v2_tar(bundle_v2: Path) -> Path:
    tar = bundle_v2.parent / "bundle-v2.tar"
    with tarfile.open(tar, "w") as tf:
        tf.add(bundle_v2, arcname="bundle")
    return tar


class Controller:
    """The operator's side: publishes commands, collects acks and retained status."""

    def __init__(self, url: str, tls: TlsFiles | None = None) -> None:
        self.acks: list[Ack] = []
        self.status: dict[str, object] = {}
        self.telemetry: list[dict[str, object]] = []
        self._cv = threading.Condition()
        # A persistent session, as a real controller has: acks published while it is
        # reconnecting (after a broker restart) are queued for it, not lost.
        self.mqtt = MqttClient(url, "controller", reconnect_min_s=0.1, reconnect_max_s=1.0,
                               tls=tls, clean_start=False, session_expiry_s=600)
        self.mqtt.subscribe(topics.fleet_cmd_ack(DEVICE), self._on_ack)
        self.mqtt.subscribe(topics.fleet_status(DEVICE), self._on_status)
        self.mqtt.subscribe(topics.fleet_telemetry(DEVICE), self._on_telemetry)
        self.mqtt.start()
        assert self.mqtt.wait_subscribed(10)

    def _on_ack(self, m: Message) -> None:
        with self._cv:
            self.acks.append(Ack.from_json(m.payload))
            self._cv.notify_all()

    def _on_status(self, m: Message) -> None:
        with self._cv:
            self.status = json.loads(m.payload)
            self._cv.notify_all()

    def _on_telemetry(self, m: Message) -> None:
        with self._cv:
            self.telemetry.append(json.loads(m.payload))
            self._cv.notify_all()

    def send(self, cmd: Command | bytes, signer: CommandSigner | None = OPERATOR) -> bytes:
        """A Command is signed for DEVICE (by `signer`; None: sent unsigned); bytes go as is."""
        if isinstance(cmd, bytes):
            payload = cmd
        elif signer is None:
            payload = cmd.to_json()
        else:
            payload = signer.sign(cmd, device_target(DEVICE))
        self.mqtt.publish(topics.fleet_cmd(DEVICE), payload, wait_s=5)
        return payload

    def wait(self, pred: Callable[[], bool], timeout_s: float = 60) -> None:
        with self._cv:
            assert self._cv.wait_for(pred, timeout_s), (self.acks, self.status)

    def states(self, cid: str | None) -> list[str]:
        return [a.state for a in self.acks if a.id == cid]

    def final(self, cid: str | None, timeout_s: float = 60) -> Ack:
        self.wait(lambda: any(a.final for a in self.acks if a.id == cid), timeout_s)
        return next(a for a in self.acks if a.id == cid and a.final)


@pytest.fixture
def device_root(tiny_bundle: BuiltBundle, tmp_path: Path) -> Path:
    root = tmp_path / "device"
    slots = Slots(root / "slots", [signing.load_public_key(tiny_bundle.pubkey)])
    slots.activate(slots.stage(tiny_bundle.path))
    slots.commit()
    return root


def make_agent(url: str, root: Path, bundle: BuiltBundle, tls: TlsFiles | None = None,
               config_path: Path | None = None, **kw: object) -> DeviceAgent:
    """With `config_path` (the provisioned file), set-config writes `remote.toml` beside it."""
    cfg = AgentConfig(DEVICE, url, root, groups=("lab",), telemetry_interval_s=3600,
                      reconnect_min_s=0.1, reconnect_max_s=1.0, tls=tls,
                      config_path=config_path, tegrastats=None,
                      remote_config=config_path.with_name("remote.toml") if config_path else None)
    kw.setdefault("operators", [OPERATOR.key.public_key()])
    return DeviceAgent(cfg, [signing.load_public_key(bundle.pubkey)], **kw)  # type: ignore[arg-type]


def deploy(cid: str, bundle: Path | str, key: BuiltBundle, sha256: str | None = None,
           **extra: object) -> Command:
    kid = signing.key_id(signing.load_public_key(key.pubkey))
    if sha256 is None:
        assert isinstance(bundle, Path)
        target = bundle / MANIFEST if bundle.is_dir() else bundle
        sha256 = hashlib.sha256(target.read_bytes()).hexdigest()
    return Command(cid, "deploy", {"bundle": str(bundle), "sha256": sha256, "signer": kid,
                                   **extra})


@pytest.fixture
def controller(broker: Broker) -> Iterator[Controller]:
    c = Controller(broker.url)
    yield c
    c.mqtt.stop()


@contextmanager
def serve_process(proc: subprocess.Popen[str], controller: Controller) -> Iterator[None]:
    """Around a started `edge-runtime serve --fleet` process: on leaving, SIGINT as systemd's
    stop sends it; it must exit 130 and its retained status go offline. Killed if it is
    still running after a failure, so no daemon outlives its test."""
    try:
        yield
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 130
        controller.wait(lambda: controller.status.get("online") is False)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
