"""Broker attacks: what the shipped Mosquitto config and ACL stop, and what the code stops
on a broker that checks nothing.

Run twice: against deploy/mosquitto/ verbatim (TLS, client certificates, the role ACL; the
paths and ports rewritten onto this run's files, tests/shipped_broker.py), and against an
open loopback listener (anonymous, no ACL). The second run shows which defences live in our
code and so survive a misconfigured broker: the cloud worker's response-topic confinement.
Command forgery on an open broker is the fleet area's to stop (signed commands); here it
is shown that only the ACL stops eavesdropping.

Each attack measures: a PUBACK/CONNACK reason code, or the deliveries counted by the victim
or the spy over SETTLE_S (loopback delivers in well under 5 ms).
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))

from mqtt_fixtures import Broker, issue_client  # noqa: E402
from shipped_broker import OPERATOR, WORKER, ShippedBroker, shipped_broker  # noqa: E402

from edge_runtime.cloud.worker import CloudWorker  # noqa: E402
from edge_runtime.errors import BrokerError  # noqa: E402
from edge_runtime.mqtt.client import Message, MqttClient, TlsFiles  # noqa: E402
from edge_runtime.mqtt.types import PublishProps  # noqa: E402
from edge_runtime.rollout.provision import (  # noqa: E402
    Device,
    Options,
    load_or_create_ca,
    provision_device,
    replaced_certs,
)
from edge_runtime.rollout.revoke import revoke  # noqa: E402

from .row import Row  # noqa: E402

AREA = "broker"
SETTLE_S = 0.5
DEVICES = {"dev-a": ["lab"], "dev-b": ["prod"]}
CHAT = {"model": "any", "messages": [{"role": "user", "content": "hi"}]}


class _Peer:
    def __init__(self, url: str, name: str, tls: TlsFiles | None, *subs: str) -> None:
        self.got: list[Message] = []
        self.c = MqttClient(url, f"{name}-{time.monotonic_ns()}", tls=tls)
        for f in subs:
            self.c.subscribe(f, self.got.append)
        if not (self.c.start(wait_s=10) and self.c.wait_subscribed(10)):
            raise self.c.failure(10)

    def publish(self, topic: str, payload: bytes = b"x", props: PublishProps | None = None
                ) -> str:
        try:
            self.c.publish(topic, payload, props, wait_s=5)
        except BrokerError as e:
            return f"refused: {e}"
        return "accepted"


def _refused(observed: str) -> bool:
    return observed.startswith("refused") and "Not authorized" in observed


def run(workdir: Path) -> list[Row]:
    rows = _shipped(workdir / "shipped")
    rows += _open(workdir / "open")
    return rows


def _shipped(workdir: Path) -> list[Row]:
    sb = shipped_broker(workdir, DEVICES)
    sb.start()
    peers: list[_Peer] = []

    def peer(name: str, *subs: str) -> _Peer:
        p = _Peer(sb.cert_url, name, sb.tls(name), *subs)
        peers.append(p)
        return p

    rows: list[Row] = []

    def row(attack: str, expected: str, observed: str, held: bool) -> None:
        rows.append(Row(AREA, f"[shipped ACL+TLS] {attack}", expected, observed, held))

    try:
        victim = peer("dev-b", "fleet/dev-b/cmd", "edge/dev-b/offload/res/+")
        spy = peer("dev-a", "fleet/dev-b/#", "edge/dev-b/#", "fleet/group/+/cmd")
        op = peer(OPERATOR)
        # cross-device publish
        obs = {t: spy.publish(t, b'{"v": 1, "id": "x", "type": "drain", "params": {}}')
               for t in ("fleet/dev-b/cmd", "fleet/dev-b/status", "edge/dev-b/offload/res/s")}
        time.sleep(SETTLE_S)
        ok = all(_refused(o) for o in obs.values()) and not victim.got
        row("device dev-a publishes a drain to fleet/dev-b/cmd, a status for dev-b, an "
            "answer on dev-b's response topic",
            "PUBACK Not authorized naming dev-a's certificate; 0 deliveries to dev-b",
            f"{next(iter(obs.values()))}; {len(victim.got)} deliveries to dev-b", ok)
        # cross-device subscribe
        op.publish("fleet/dev-b/cmd", b"for-b")
        op.publish("fleet/group/prod/cmd", b"for-prod")
        victim.publish("fleet/dev-b/status", b"b")
        time.sleep(SETTLE_S)
        row("device dev-a subscribes to fleet/dev-b/#, edge/dev-b/# and every group's "
            "commands",
            "0 of dev-b's messages delivered to dev-a; dev-b gets its command",
            f"{len(spy.got)} delivered to dev-a; dev-b got "
            f"{[m.topic for m in victim.got]}",
            not spy.got and [m.topic for m in victim.got] == ["fleet/dev-b/cmd"])
        # a device commanding itself
        spy_own = peer("dev-a", "fleet/dev-a/cmd")
        own = spy_own.publish("fleet/dev-a/cmd", b'{"v": 1, "id": "y", "type": "undrain"}')
        grp = spy_own.publish("fleet/group/lab/cmd", b"{}")
        time.sleep(SETTLE_S)
        row("device dev-a publishes to its own fleet/dev-a/cmd and its group's command topic",
            "PUBACK Not authorized; no command delivered",
            f"{own}; group: {grp.split(':')[0]}; {len(spy_own.got)} delivered",
            _refused(own) and _refused(grp) and not spy_own.got)
        # another group's commands
        lab = peer("dev-a", "fleet/group/+/cmd")
        op.publish("fleet/group/prod/cmd", b"prod-only")
        op.publish("fleet/group/lab/cmd", b"lab")
        time.sleep(SETTLE_S)
        got = [m.topic for m in lab.got]
        row("device dev-a (group lab) subscribes to fleet/group/+/cmd",
            "only fleet/group/lab/cmd delivered", f"delivered: {got}",
            got == ["fleet/group/lab/cmd"])
        rows.extend(_worker_rows(sb.cert_url, sb.tls(WORKER), sb.tls("dev-a"),
                                 sb.tls("dev-b"), "[shipped ACL+TLS]", sb))
        rows.extend(_identity_rows(sb))
    finally:
        for p in peers:
            p.c.stop()
        sb.stop()
    return rows


def _worker_rows(url: str, worker_tls: TlsFiles | None, a_tls: TlsFiles | None,
                 b_tls: TlsFiles | None, label: str, sb: ShippedBroker | None) -> list[Row]:
    """A device asks the cloud worker to answer on a foreign topic: the worker's own check
    (topics.check_response_topic) must drop it; on the shipped broker the ACL would also
    refuse fleet/ topics, but not another device's response topic."""
    w = CloudWorker(url, None, tls=worker_tls, reconnect_min_s=0.1)
    victim = _Peer(url, "dev-b", b_tls, "fleet/dev-b/cmd", "edge/dev-b/offload/res/+")
    attacker = _Peer(url, "dev-a", a_tls, "edge/dev-a/offload/res/+")
    rows = []
    try:
        if not w.start(wait_s=10):
            raise w.mqtt.failure(10)
        for target in ("fleet/dev-b/cmd", "edge/dev-b/offload/res/s1"):
            before = w.counts["foreign_topic"]
            props = PublishProps(response_topic=target, correlation_data=b"1",
                                 message_expiry_s=10)
            sent = attacker.publish("edge/dev-a/offload/req", json.dumps(CHAT).encode(), props)
            time.sleep(SETTLE_S)
            counted = w.counts["foreign_topic"] - before
            delivered = [m.topic for m in victim.got]
            victim.got.clear()
            rows.append(Row(
                AREA, f"{label} dev-a's offload request names ResponseTopic {target}",
                "worker drops it, counts foreign_topic, logs why; 0 deliveries to the victim",
                f"request {sent}; foreign_topic +{counted}; victim got {delivered}; "
                f"answers published by the worker: {w.counts['messages']}",
                sent == "accepted" and counted == 1 and not delivered))
        # and the legitimate path still works on the same broker
        props = PublishProps(response_topic="edge/dev-a/offload/res/s1", correlation_data=b"2",
                             message_expiry_s=10)
        attacker.publish("edge/dev-a/offload/req", json.dumps(CHAT).encode(), props)
        deadline = time.monotonic() + 5
        while not attacker.got and time.monotonic() < deadline:
            time.sleep(0.01)
        rows.append(Row(AREA, f"{label} control: dev-a's request with its own response topic",
                        "answered on edge/dev-a/offload/res/s1",
                        f"answers received: {[m.topic for m in attacker.got]}",
                        [m.topic for m in attacker.got] == ["edge/dev-a/offload/res/s1"]))
        if sb is not None:  # the worker's own broker rights, tried directly
            wp = _Peer(url, WORKER, worker_tls)
            try:
                direct = wp.publish("fleet/dev-b/cmd", b"{}")
            finally:
                wp.c.stop()
            rows.append(Row(AREA, f"{label} the cloud worker's identity publishes to "
                            "fleet/dev-b/cmd itself", "PUBACK Not authorized", direct,
                            _refused(direct)))
    finally:
        w.stop(drain_s=0)
        victim.c.stop()
        attacker.c.stop()
    return rows


def _identity_rows(sb: ShippedBroker) -> list[Row]:
    rows = []

    def attempt(attack: str, c: MqttClient, expected: str,
                check: Callable[[MqttClient, str], bool], up_expected: bool = False) -> None:
        seen = len(sb.broker.log.read_bytes())
        try:
            up = c.start(wait_s=2)
            msg = "connected" if up else str(c.failure(2))
            new = sb.broker.log.read_bytes()[seen:].decode(errors="replace").splitlines()
            why = next((ln.split(": ", 1)[-1] for ln in new
                        if "failed" in ln or "not authorised" in ln or "rror" in ln), None)
            if why:  # the broker's side of the refusal
                msg += f"; broker log: {why}"
            msg = re.sub(r"127\.0\.0\.1:\d+", "127.0.0.1:PORT", msg)  # stable doc diffs
            rows.append(Row(AREA, f"[shipped ACL+TLS] {attack}", expected, msg,
                            up == up_expected and check(c, msg)))
        finally:
            c.stop()

    attempt("anonymous connect on the password listener",
            MqttClient(sb.password_url, "anon", tls=sb.tls()),
            "CONNACK Not authorized, reported as such (not 'cannot reach')",
            lambda c, m: "Not authorized" in m and "anonymous" in m)
    attempt("anonymous connect on the certificate listener (TLS, no certificate)",
            MqttClient(sb.cert_url, "anon-cert", tls=sb.tls()),
            "TLS handshake refused: no connection",
            lambda c, m: c.refusal is None)
    attempt("plain MQTT (no TLS) on the certificate listener",
            MqttClient(f"mqtt://127.0.0.1:{sb.cert_port}", "plain"),
            "no connection", lambda c, m: c.refusal is None)
    log_before = sb.broker.log.read_text(errors="replace").count("certificate verify failed")
    attempt("client certificate (CN dev-1) from another CA",
            MqttClient(sb.cert_url, "rogue", tls=sb.rogue_tls()),
            "TLS handshake refused by the broker (certificate verify failed)",
            lambda c, m: sb.broker.log.read_text(errors="replace").count(
                "certificate verify failed") > log_before)
    # Last: dev-b's certificate goes onto the shipped crlfile (edge-fleet revoke's code) and
    # the broker re-reads it on SIGHUP, as deploy/mosquitto/README.md tells an operator.
    crl = sb.broker.workdir / "etc" / "crl.pem"
    revoke(sb.pki.ca.parent, crl, [("dev-b", sb.certs["dev-b"][0])])
    # dev-a re-issued with provision --force (its old key presumed stolen): the certificate it
    # replaced is revoked with `edge-fleet revoke dev-a --replaced` (these functions).
    stolen, fresh, replaced = _reissued(sb, "dev-a")
    revoke(sb.pki.ca.parent, crl, [("dev-a (replaced)", c) for c in replaced])
    os.kill(sb.broker.pid, signal.SIGHUP)
    time.sleep(1.0)  # the reload is asynchronous and logs nothing
    attempt("revoked device certificate (dev-b on the CRL, broker SIGHUPed)",
            MqttClient(sb.cert_url, "dev-b", tls=sb.tls("dev-b")),
            "TLS alert 'certificate revoked'; the device's log names the cause",
            lambda c, m: "certificate revoked" in m and "it is revoked" in m)
    attempt("a re-issued device's replaced certificate (CN dev-a, provision --force, then "
            "revoke dev-a --replaced)",
            MqttClient(sb.cert_url, "dev-a-stolen", tls=stolen),
            "TLS alert 'certificate revoked'; the device's log names the cause",
            lambda c, m: "certificate revoked" in m and "it is revoked" in m)
    attempt("control: the re-issued dev-a's new certificate",
            MqttClient(sb.cert_url, "dev-a-new", tls=fresh),
            "connected", lambda c, m: True, up_expected=True)
    cert, key = _expired(sb, "dev-a")
    attempt("expired device certificate (CN dev-a, same CA)",
            MqttClient(sb.cert_url, "dev-a-old", tls=TlsFiles(str(sb.pki.ca), cert, key)),
            "TLS alert 'certificate expired'; the device's log names the cause",
            lambda c, m: "certificate expired" in m and "it has expired" in m)
    attempt("control: dev-a's valid certificate after both",
            MqttClient(sb.cert_url, "dev-a", tls=sb.tls("dev-a")),
            "connected", lambda c, m: True, up_expected=True)
    return rows


def _reissued(sb: ShippedBroker, cn: str) -> tuple[TlsFiles, TlsFiles, list[Path]]:
    """Provision `cn` from the broker's CA, copy its key pair away (the thief's copy),
    re-provision it with --force: (the stolen pair, the new pair, the kept replaced certs)."""
    out = sb.broker.workdir / "provisioned"
    ca = load_or_create_ca(sb.pki.ca.parent)[0]
    opts = Options("mqtts://127.0.0.1:8883")
    tls = provision_device(out, ca, Device("", cn), opts) / "tls"
    thief = sb.broker.workdir / "stolen"
    thief.mkdir(exist_ok=True)
    for f in ("device.pem", "device.key"):
        (thief / f).write_bytes((tls / f).read_bytes())
        (thief / f).chmod(0o600)
    provision_device(out, ca, Device("", cn), Options(opts.broker, force=True))
    stolen = TlsFiles(str(sb.pki.ca), str(thief / "device.pem"), str(thief / "device.key"))
    fresh = TlsFiles(str(sb.pki.ca), str(tls / "device.pem"), str(tls / "device.key"))
    return stolen, fresh, replaced_certs(out, cn)


def _expired(sb: ShippedBroker, cn: str) -> tuple[str, str]:
    """A certificate of the broker's CA for `cn` that expired yesterday, and its key."""
    out = sb.broker.workdir / "expired"
    out.mkdir(exist_ok=True)
    cert, key = issue_client(sb.pki, cn, out, expired=True)
    return str(cert), str(key)


def _open(workdir: Path) -> list[Row]:
    """An anonymous listener without ACL: what our code alone still stops."""
    workdir.mkdir(parents=True, exist_ok=True)
    b = Broker(workdir)
    b.start()
    rows: list[Row] = []
    try:
        rows.extend(_worker_rows(b.url, None, None, None, "[open listener]", None))
        spy = _Peer(b.url, "spy", None, "fleet/dev-b/#", "edge/dev-b/#")
        dev = _Peer(b.url, "dev-b", None)
        try:
            dev.publish("fleet/dev-b/telemetry", b"{}")
            time.sleep(SETTLE_S)
            rows.append(Row(
                AREA, "[open listener] anonymous client subscribes to another device's topics",
                "delivered: only the broker ACL protects confidentiality (SECURITY.md: never "
                "run an open listener); nothing the device runs or trusts changes",
                f"{len(spy.got)} delivered to the anonymous spy", len(spy.got) == 1))
        finally:
            spy.c.stop()
            dev.c.stop()
    finally:
        b.stop()
    return rows
