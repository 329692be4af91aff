"""Attacks on the fleet control path, end to end: a real Mosquitto (open listener: what
signing alone stops), a real device agent process (`python -m edge_runtime.fleet.agent_process`
with a provisioned trust store), a real HTTP bundle server.

    rows = run(Path("/tmp/matrix"))     # one Row per attack (scripts/security/row.py)

Every row checks the same bar: the device still runs the bundle it ran, its trust stores
(bundle signers, operator keys) are byte for byte what provisioning wrote, and the attack
was answered with a `rejected` (or not-run duplicate) ack whose reason says why.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "scripts"))

from bundle_fixtures import make_bundle  # noqa: E402
from http_fixtures import RangeServer  # noqa: E402
from mqtt_fixtures import Broker  # noqa: E402

from edge_runtime import signing  # noqa: E402
from edge_runtime.errors import SignatureError  # noqa: E402
from edge_runtime.fleet.command_auth import CommandSigner, device_target  # noqa: E402
from edge_runtime.fleet.messages import Ack, Command  # noqa: E402
from edge_runtime.fleet.slots import Slots  # noqa: E402
from edge_runtime.mqtt import topics  # noqa: E402
from edge_runtime.mqtt.client import Message, MqttClient  # noqa: E402
from security.row import Row  # noqa: E402

DEVICE = "sec-dev"
PROTECTED = {
    "server.host": "0.0.0.0", "server.api_key": "stolen", "model.pubkeys": ["/tmp/evil.pub"],
    "log.access_log": "/etc/cron.d/x", "offload.broker": "mqtt://evil:1883",
    "offload.password_file": "/tmp/p", "fleet.broker": "mqtt://evil:1883",
    "fleet.pubkeys": ["/tmp/evil.pub"], "fleet.operator_keys": ["/tmp/evil.pub"],
    "fleet.tegrastats": "/tmp/evil-binary", "fleet.root": "/tmp/evil",
    "fleet.download_ca_file": "/tmp/evil-ca.pem", "fleet.remote_config": "/etc/passwd",
}


class _Acks:
    def __init__(self, url: str) -> None:
        self.acks: list[Ack] = []
        self._cv = threading.Condition()
        self.mqtt = MqttClient(url, "security-fleet")
        self.mqtt.subscribe(topics.fleet_cmd_ack(DEVICE), self._on)
        self.mqtt.start(10)
        if not self.mqtt.wait_subscribed(10):
            raise RuntimeError(f"cannot subscribe at {url}")

    def _on(self, m: Message) -> None:
        with self._cv:
            self.acks.append(Ack.from_json(m.payload))
            self._cv.notify_all()

    def send(self, payload: bytes) -> Ack:
        """Publish a command; its final ack (by id, or the refusal matched by digest)."""
        digest = hashlib.sha256(payload).hexdigest()
        try:
            cid = json.loads(payload).get("id")
        except ValueError:
            cid = None
        with self._cv:
            start = len(self.acks)
        self.mqtt.publish(topics.fleet_cmd(DEVICE), payload, wait_s=5)

        def mine() -> Ack | None:
            for a in self.acks[start:]:
                refused = a.id is None and (a.detail or {}).get("digest") == digest
                if a.final and (refused or (a.id == cid and cid is not None)):
                    return a
            return None

        with self._cv:
            if not self._cv.wait_for(lambda: mine() is not None, 60):
                raise RuntimeError(f"no answer to {payload[:80]!r}")
            ack = mine()
        assert ack is not None
        return ack


class _World:
    def __init__(self, work: Path) -> None:
        self.work = work
        keys = work / "keys"
        keys.mkdir(parents=True)
        # Provisioning: bundle signer and operator keys in separate trust directories.
        self.trust = work / "etc" / "trust"
        (self.trust / "bundle-signers").mkdir(parents=True)
        (self.trust / "operators").mkdir(parents=True)
        signing.generate_keypair(keys / "bundle.key", self.trust / "bundle-signers" / "b.pub")
        signing.generate_keypair(keys / "op.key", self.trust / "operators" / "op.pub")
        signing.generate_keypair(keys / "evil.key", keys / "evil.pub")
        self.operator = CommandSigner.from_file(keys / "op.key")
        self.evil = CommandSigner.from_file(keys / "evil.key")
        self.bundle_pub = self.trust / "bundle-signers" / "b.pub"
        self.trusted = [signing.load_public_key(self.bundle_pub)]
        self.signer_id = signing.key_id(self.trusted[0])
        self.v1 = make_bundle(work / "b1", keys / "bundle.key", "1.0", 50_000)
        self.v2 = make_bundle(work / "b2", keys / "bundle.key", "2.0", 50_000)
        self.root = work / "device"
        slots = Slots(self.root / "slots", self.trusted)
        slots.activate(slots.stage(self.v1))
        slots.commit()
        self.config = work / "etc" / "config.toml"
        self.config.write_text('[log]\nlevel = "info"\n')
        self.config.chmod(0o444)  # provisioned: the agent reads it, set-config never writes it
        self.overlay = self.root / "remote.toml"  # what set-config writes (REMOTE_KEYS only)
        (work / "broker").mkdir()
        self.broker = Broker(work / "broker")
        self.broker.start()
        self.acks = _Acks(self.broker.url)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "edge_runtime.fleet.agent_process", "--root",
             str(self.root), "--device", DEVICE, "--broker", self.broker.url, "--pubkey",
             str(self.bundle_pub), "--operator-key", str(self.trust / "operators"),
             "--config", str(self.config), "--health", "verify", "--telemetry-s", "3600"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
            env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *sys.path])})
        assert self.proc.stdout is not None
        if self.proc.stdout.readline().strip() != "READY":
            raise RuntimeError("the device agent did not start")
        self.trust_digest = self._trust_digest()

    def _trust_digest(self) -> str:
        h = hashlib.sha256()
        for p in sorted(self.trust.rglob("*")):
            h.update(str(p).encode() + (p.read_bytes() if p.is_file() else b""))
        return h.hexdigest()

    def active(self) -> str | None:
        return Slots(self.root / "slots", self.trusted).active

    def drained(self) -> bool:
        try:
            return bool(json.loads((self.root / "agent.json").read_text()).get("drained"))
        except (OSError, ValueError):
            return False

    def row(self, attack: str, expected: str, ack: Ack, before: str | None,
            words: str, extra_ok: bool = True) -> Row:
        reason = ack.reason or ""
        kept = self.active() == before and self._trust_digest() == self.trust_digest
        refused = (ack.state == "rejected" or ack.duplicate) and words in reason
        observed = (f"{ack.state}{' (duplicate)' if ack.duplicate else ''}: {reason[:140]}; "
                    f"active {'unchanged' if self.active() == before else 'CHANGED'}")
        return Row("fleet", attack, expected, observed, kept and refused and extra_ok)

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.acks.mqtt.stop()
        self.broker.stop()


def run(workdir: Path) -> list[Row]:
    w = _World(Path(workdir) / "fleet")
    try:
        return _attacks(w)
    finally:
        w.close()


def _attacks(w: _World) -> list[Row]:
    rows: list[Row] = []
    target = device_target(DEVICE)
    op, before = w.operator, w.active()

    def drain_row(attack: str, payload: bytes, words: str) -> None:
        ack = w.acks.send(payload)
        rows.append(w.row(attack, f"rejected, reason says '{words}'; still serving", ack,
                          before, words, extra_ok=not w.drained()))

    drain_row("unsigned drain", Command("x-1", "drain").to_json(), "unsigned")
    drain_row("drain signed by an untrusted key", w.evil.sign(Command("x-2", "drain"), target),
              "not trusted")
    forged = json.loads(op.sign(Command("x-3", "undrain"), target))
    forged["type"] = "drain"
    drain_row("signed undrain rewritten to drain", json.dumps(forged).encode(),
              "bad signature")
    drain_row("expired drain", op.sign(Command("x-4", "drain"), target, ttl_s=60,
                                       now=time.time() - 3600), "expired")
    drain_row("drain signed for another device", op.sign(Command("x-5", "drain"),
                                                         device_target("other")), "not for")
    good = op.sign(Command("x-6", "drain"), target)
    assert w.acks.send(good).state == "drained"
    assert w.acks.send(op.sign(Command("x-7", "undrain"), target)).state == "undrained"
    drain_row("replay of a captured drain after an undrain", good, "not run again")

    def files() -> tuple[str, str | None]:
        return w.config.read_text(), (w.overlay.read_text() if w.overlay.exists() else None)

    for i, (key, value) in enumerate(PROTECTED.items()):
        text = files()
        ack = w.acks.send(op.sign(Command(f"p-{i}", "set-config", {"set": {key: value}}),
                                  target))
        rows.append(w.row(f"signed set-config of {key}", f"rejected naming {key}; config "
                          "and overlay unchanged", ack, before, key, files() == text))

    # Key planting: the one file a command writes is the remote-config overlay; a PEM put
    # there as a comment is written, but it never becomes a key, and the attacker's key
    # stays untrusted.
    pem = (w.work / "keys" / "evil.pub").read_text()
    doc = '[log]\nlevel = "info"\n' + "".join(f"# {x}\n" for x in pem.splitlines())
    w.acks.send(op.sign(Command("k-1", "set-config", {"toml": doc}), target))
    try:
        signing.load_public_key(w.overlay)
        planted_loads = True
    except SignatureError:
        planted_loads = False
    ack = w.acks.send(w.evil.sign(Command("k-2", "drain"), target))
    rows.append(w.row("key planted in the config overlay, then a drain signed with it",
                      "overlay is no key file; drain rejected as untrusted", ack, before,
                      "not trusted", not planted_loads and not w.drained()))

    # Downgrade: v2 goes in legitimately, then a (validly signed) deploy of v1 is refused.
    sha1 = hashlib.sha256((w.v1 / "manifest.json").read_bytes()).hexdigest()
    sha2 = hashlib.sha256((w.v2 / "manifest.json").read_bytes()).hexdigest()
    up = w.acks.send(op.sign(Command("v-2", "deploy", {"bundle": str(w.v2), "sha256": sha2,
                                                        "signer": w.signer_id}), target))
    assert up.state == "active", up.reason
    before = w.active()
    ack = w.acks.send(op.sign(Command("v-1", "deploy", {"bundle": str(w.v1), "sha256": sha1,
                                                        "signer": w.signer_id}), target))
    rows.append(w.row("signed deploy of an older bundle (2.0 -> 1.0)",
                      "rejected: downgrade refused; rollback is the way back", ack, before,
                      "downgrade refused"))

    tar = w.work / "b1.tar"
    with tarfile.open(tar, "w") as tf:
        tf.add(w.v1, arcname="bundle")
    data = tar.read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    with RangeServer({"/b.tar": data + os.urandom(1 << 20)}) as srv:
        base = {"bundle": srv.url("/b.tar"), "sha256": sha, "signer": w.signer_id}
        for cid, params, attack, words in (
            ("d-1", {**base, "size": len(data)}, "server sends 1 MiB more than the signed "
             "size", "the command says"),
            ("d-2", base, "URL deploy without a size", "needs params.size"),
            ("d-3", {**base, "size": 1 << 50}, "signed size larger than the free disk",
             "downloading needs"),
        ):
            ack = w.acks.send(op.sign(Command(cid, "deploy", params), target))
            left = sum(p.stat().st_size for p in (w.root / "slots").rglob("*.part"))
            rows.append(w.row(f"oversized download: {attack}", f"rejected ({words}); "
                              "nothing past the size written", ack, before, words,
                              left <= len(data)))
    return rows


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        for r in run(Path(tmp)):
            print(f"{'HELD' if r.held else 'FAIL'} | {r.attack} | {r.observed}")
