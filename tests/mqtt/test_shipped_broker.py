"""deploy/mosquitto/ enforced by a real Mosquitto: the shipped config and ACL, certificates
made here (shipped_broker.py). Every refusal is measured: a PUBACK/CONNACK reason code, or
zero deliveries where the broker grants a subscription but filters what reaches it."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from live_server import wait_until
from mqtt_fixtures import MOSQUITTO
from shipped_broker import OPERATOR, WORKER, ShippedBroker, shipped_broker

from edge_runtime.cloud.worker import CloudWorker
from edge_runtime.config import OffloadConfig
from edge_runtime.errors import BrokerError
from edge_runtime.fleet.messages import status_payload
from edge_runtime.mqtt.client import Message, MqttClient, TlsFiles
from edge_runtime.mqtt.types import PublishProps
from edge_runtime.offload.client import OffloadClient
from edge_runtime.rollout import cli as fleet_cli

pytestmark = pytest.mark.skipif(MOSQUITTO is None, reason="mosquitto is not installed")

DEVICES = {"dev-a": ["lab"], "dev-b": ["prod"]}
SETTLE_S = 0.5
"""How long a test listens for deliveries that must not come (loopback delivers in <5 ms)."""


@pytest.fixture
def sb(tmp_path: Path) -> Iterator[ShippedBroker]:
    b = shipped_broker(tmp_path, DEVICES, password_users=("operator-pw", "worker-pw"))
    b.start()
    yield b
    b.stop()


class Peer:
    """A connected client that records what it receives."""

    def __init__(self, sb: ShippedBroker, identity: str, *subs: str) -> None:
        self.got: list[Message] = []
        self.c = MqttClient(sb.cert_url, f"{identity}-{time.monotonic_ns()}",
                            tls=sb.tls(identity))
        for f in subs:
            self.c.subscribe(f, self.got.append)
        assert self.c.start(wait_s=10) and self.c.wait_subscribed(10), self.c.failure(10)

    def publish(self, topic: str, payload: bytes = b"x", props: PublishProps | None = None
                ) -> str | None:
        """None when the broker took it, else its refusal."""
        try:
            self.c.publish(topic, payload, props, wait_s=5)
        except BrokerError as e:
            return str(e)
        return None

    def topics(self) -> list[str]:
        return [m.topic for m in self.got]


@pytest.fixture
def peers(sb: ShippedBroker) -> Iterator[list[Peer]]:
    made: list[Peer] = []
    yield made
    for p in made:
        p.c.stop()


def peer(peers: list[Peer], sb: ShippedBroker, identity: str, *subs: str) -> Peer:
    p = Peer(sb, identity, *subs)
    peers.append(p)
    return p


def test_a_device_cannot_publish_to_or_read_another_devices_topics(
        sb: ShippedBroker, peers: list[Peer]) -> None:
    b = peer(peers, sb, "dev-b", "fleet/dev-b/cmd", "edge/dev-b/offload/res/+")
    op = peer(peers, sb, OPERATOR, "fleet/+/status", "fleet/+/cmd/ack", "fleet/+/telemetry")
    spy = peer(peers, sb, "dev-a", "fleet/dev-b/#", "edge/dev-b/#", "fleet/+/cmd", "#")
    for topic in ("fleet/dev-b/cmd", "fleet/dev-b/status", "fleet/dev-b/telemetry",
                  "fleet/dev-b/cmd/ack", "edge/dev-b/offload/req", "edge/dev-b/offload/res/s"):
        refusal = spy.publish(topic)
        assert refusal is not None and "Not authorized" in refusal and "CN=dev-a" in refusal
    # What B legitimately gets and sends: A, subscribed to everything, sees none of it.
    assert op.publish("fleet/dev-b/cmd", b"for-b") is None
    assert b.publish("fleet/dev-b/status", b"b-status") is None
    assert b.publish("fleet/dev-b/cmd/ack", b"b-ack") is None
    time.sleep(SETTLE_S)
    assert b.topics() == ["fleet/dev-b/cmd"]
    assert sorted(op.topics()) == ["fleet/dev-b/cmd/ack", "fleet/dev-b/status"]
    assert spy.got == []


def test_a_device_cannot_command_itself(sb: ShippedBroker, peers: list[Peer]) -> None:
    a = peer(peers, sb, "dev-a", "fleet/dev-a/cmd", "fleet/group/lab/cmd")
    for topic in ("fleet/dev-a/cmd", "fleet/group/lab/cmd"):
        refusal = a.publish(topic, b'{"op": "drain"}')
        assert refusal is not None and "Not authorized" in refusal
    time.sleep(SETTLE_S)
    assert a.got == []


def test_a_device_reads_only_its_groups_commands(sb: ShippedBroker, peers: list[Peer]) -> None:
    a = peer(peers, sb, "dev-a", "fleet/group/+/cmd")
    b = peer(peers, sb, "dev-b", "fleet/group/+/cmd")
    op = peer(peers, sb, OPERATOR)
    for group in ("lab", "prod", "other"):
        assert op.publish(f"fleet/group/{group}/cmd", group.encode()) is None
    time.sleep(SETTLE_S)
    assert a.topics() == ["fleet/group/lab/cmd"]
    assert b.topics() == ["fleet/group/prod/cmd"]


def test_a_worker_reads_requests_and_writes_only_responses(
        sb: ShippedBroker, peers: list[Peer]) -> None:
    w = peer(peers, sb, WORKER, "$share/cloud/edge/+/offload/req", "fleet/#",
             "edge/+/offload/res/+")
    a = peer(peers, sb, "dev-a", "edge/dev-a/offload/res/+")
    op = peer(peers, sb, OPERATOR)
    assert a.publish("edge/dev-a/offload/req", b"{}") is None
    assert op.publish("fleet/dev-a/cmd") is None
    assert a.publish("fleet/dev-a/status") is None
    for topic in ("fleet/victim/cmd", "fleet/dev-a/cmd", "fleet/group/lab/cmd",
                  "fleet/dev-a/status", "edge/dev-a/offload/req"):
        refusal = w.publish(topic)
        assert refusal is not None and "Not authorized" in refusal, topic
    assert w.publish("edge/dev-a/offload/res/s1", b"answer") is None
    time.sleep(SETTLE_S)
    # Its own answer is no delivery to it (it may write responses, not read them).
    assert w.topics() == ["edge/dev-a/offload/req"]
    assert a.topics() == ["edge/dev-a/offload/res/s1"]


def test_certificate_of_another_ca_and_anonymous_are_refused(sb: ShippedBroker) -> None:
    rogue = MqttClient(sb.cert_url, "rogue", tls=sb.rogue_tls())
    anon = MqttClient(sb.password_url, "anon", tls=sb.tls())
    wrong = MqttClient(sb.password_url, "wrong", username="operator-pw", password="nope",
                       tls=sb.tls())
    plain = MqttClient(f"mqtt://127.0.0.1:{sb.cert_port}", "plain")  # no TLS at all
    try:
        for c in (rogue, anon, wrong, plain):
            assert not c.start(wait_s=1.5)
        assert rogue.refusal is None  # the TLS handshake failed: no CONNACK ever came
        assert "certificate verify failed" in sb.broker.log.read_text()
        # The broker's TLS alert is what the client reports, not a timeout.
        err = str(rogue.failure(1.5))
        assert "another CA signed it" in err and "unknown ca" in err and "CN=dev-1" in err
        for c, who in ((anon, "anonymous"), (wrong, "user 'operator-pw'")):
            err = str(c.failure(1.5))
            assert "Not authorized" in err and who in err and "cannot reach" not in err
            assert "nope" not in err
    finally:
        for c in (rogue, anon, wrong, plain):
            c.stop()


def _retained_status(sb: ShippedBroker, device: str) -> None:
    c = MqttClient(sb.cert_url, device, tls=sb.tls(device))
    try:
        assert c.start(wait_s=10)
        c.publish(f"fleet/{device}/status", status_payload(device, True, bundle="b-1"),
                  wait_s=5, retain=True)
    finally:
        c.stop()


def _fleet_args(sb: ShippedBroker, tls: TlsFiles, url: str) -> list[str]:
    args = ["--broker", url, "--connect-timeout", "5", "--ca-file", str(tls.ca_file)]
    if tls.cert_file:
        args += ["--cert-file", str(tls.cert_file), "--key-file", str(tls.key_file)]
    return args


def test_edge_fleet_logs_in_with_a_certificate_or_a_password(
        sb: ShippedBroker, tmp_path: Path, capsys: Any, monkeypatch: Any) -> None:
    _retained_status(sb, "dev-a")
    cert = _fleet_args(sb, sb.tls(OPERATOR), sb.cert_url)
    assert fleet_cli.main([*cert, "devices", "--json", "--wait", "0.5"]) == 0
    assert json.loads(capsys.readouterr().out)["dev-a"]["online"] is True

    pw = tmp_path / "operator.pw"
    pw.write_text(sb.passwords["operator-pw"] + "\n")
    by_file = [*_fleet_args(sb, sb.tls(), sb.password_url), "--username", "operator-pw",
               "--password-file", str(pw)]
    assert fleet_cli.main([*by_file, "devices", "--json", "--wait", "0.5"]) == 0
    assert "dev-a" in json.loads(capsys.readouterr().out)

    monkeypatch.setenv("EDGE_FLEET_PASSWORD", sb.passwords["operator-pw"])
    by_env = [*_fleet_args(sb, sb.tls(), sb.password_url), "--username", "operator-pw"]
    assert fleet_cli.main([*by_env, "devices", "--json", "--wait", "0.5"]) == 0
    capsys.readouterr()

    # A wrong password and a device's certificate: refusals, said as such.
    monkeypatch.setenv("EDGE_FLEET_PASSWORD", "wrong-password")
    assert fleet_cli.main([*by_env, "devices"]) == 1
    err = capsys.readouterr().err
    assert "Not authorized" in err and "operator-pw" in err and "cannot reach" not in err
    assert "wrong-password" not in err
    monkeypatch.delenv("EDGE_FLEET_PASSWORD")
    as_device = _fleet_args(sb, sb.tls("dev-a"), sb.cert_url)
    assert fleet_cli.main([*as_device, "telemetry", "dev-b", "--count", "1",
                           "--timeout", "0.5"]) == 1
    err = capsys.readouterr().err
    assert "no telemetry from dev-b" in err  # granted SUBACK, filtered deliveries


def test_cloud_worker_and_offload_client_with_tls_and_role_certificates(
        sb: ShippedBroker, tmp_path: Path) -> None:
    wcert = sb.tls(WORKER)
    worker = CloudWorker(sb.cert_url, None, tls=wcert, reconnect_min_s=0.1)
    assert worker.start(wait_s=10), worker.mqtt.failure(10)
    cert, key = sb.certs["dev-a"]
    cfg = OffloadConfig(broker=sb.cert_url, device_id="dev-a", ca_file=sb.pki.ca,
                        cert_file=cert, key_file=key)
    device = OffloadClient.from_config(cfg)
    try:
        assert device.start(wait_s=10)
        body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}

        async def one() -> list[Any]:
            s = device.submit(body, "chat", time.monotonic() + 10, stream=False)
            return [c async for c in s]

        chunks = asyncio.run(one())
        assert chunks[-1].finish_reason == "length"
        # the worker counts an answer once its last chunk is out: the count trails the answer
        wait_until(lambda: worker.counts["served"] == 1, 5)
    finally:
        device.stop()
        worker.stop()


def test_cloud_worker_with_a_password_and_a_refused_one(sb: ShippedBroker) -> None:
    ok = CloudWorker(sb.password_url, None, tls=sb.tls(), username="worker-pw",
                     password=sb.passwords["worker-pw"])
    bad = CloudWorker(sb.password_url, None, tls=sb.tls(), username="worker-pw",
                      password="wrong")
    try:
        assert ok.start(wait_s=10)
        assert not bad.start(wait_s=1.5)
        assert "Not authorized" in str(bad.mqtt.failure(1.5))
    finally:
        ok.stop()
        bad.stop()


def test_rollout_driver_logs_in_and_reports_a_refusal(sb: ShippedBroker, tmp_path: Path,
                                                     capsys: Any) -> None:
    import threading

    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from edge_runtime.errors import RolloutError
    from edge_runtime.fleet.command_auth import CommandSigner
    from edge_runtime.mqtt.auth import BrokerAuth
    from edge_runtime.rollout.driver import create_rollout, drive
    from edge_runtime.rollout.plan import RolloutSpec
    from edge_runtime.rollout.store import RolloutStore

    spec = RolloutSpec(group="lab", bundle="/b.tar", sha256="0" * 64, signer="k",
                       version="v2", broker=sb.password_url, ack_timeout_s=1)
    store = RolloutStore(tmp_path / "rollouts.db")
    signer = CommandSigner(Ed25519PrivateKey.generate())  # devices refuse unsigned commands
    try:
        create_rollout(store, spec, {"dev-a": {"online": True, "groups": ["lab"],
                                               "bundle": "v1"}}, "r-1")
        wrong = BrokerAuth("operator-pw", "wrong", sb.tls())
        with pytest.raises(RolloutError, match="refused the connection of user "
                           "'operator-pw': Not authorized"):
            drive(store, "r-1", auth=wrong, connect_timeout_s=2, signer=signer)
        stop = threading.Event()
        stop.set()  # connect, subscribe, and stop at the first tick: resumable
        right = BrokerAuth("operator-pw", sb.passwords["operator-pw"], sb.tls())
        record = drive(store, "r-1", auth=right, connect_timeout_s=10, stop=stop,
                       signer=signer)
        assert record.state == "running"
    finally:
        store.close()


def _cloud_worker_cli(sb: ShippedBroker, *auth: str, env: dict[str, str] | None = None
                      ) -> subprocess.Popen[str]:
    cmd = [sys.executable, "-c", "import sys; from edge_runtime.cli import main; "
           "sys.exit(main(sys.argv[1:]))", "cloud-worker", "--echo", "--log-level", "error",
           "--ca-file", str(sb.pki.ca), *auth]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})


def test_cloud_worker_cli_with_a_certificate_answers_mosquitto_rr_over_tls(
        sb: ShippedBroker) -> None:
    rr = shutil.which("mosquitto_rr")
    if rr is None:
        pytest.skip("mosquitto_rr is not installed")
    cert, key = sb.certs[WORKER]
    p = _cloud_worker_cli(sb, "--broker", sb.cert_url, "--cert-file", str(cert),
                          "--key-file", str(key))
    try:
        assert p.stdout is not None
        assert "subscribed" in p.stdout.readline()
        dcert, dkey = sb.certs["dev-a"]
        out = subprocess.run(
            [rr, "-V", "5", "-h", "127.0.0.1", "-p", str(sb.cert_port), "--cafile",
             str(sb.pki.ca), "--cert", str(dcert), "--key", str(dkey), "-q", "1", "-W", "10",
             "-t", "edge/dev-a/offload/req", "-e", "edge/dev-a/offload/res/cli",
             "-m", json.dumps({"model": "tiny", "prompt": "Hello"})],
            capture_output=True, text=True, timeout=20, check=True)
        answer = json.loads(out.stdout)
        assert answer["v"] == 1 and answer["finish_reason"] == "length"
    finally:
        p.terminate()
        p.wait(10)


def test_cloud_worker_cli_says_not_authorized(sb: ShippedBroker) -> None:
    p = _cloud_worker_cli(sb, "--broker", sb.password_url, "--username", "worker-pw",
                          env={"EDGE_CLOUD_PASSWORD": "wrong-password"})
    try:
        _, err = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 1
    assert "Not authorized" in err and "worker-pw" in err and "wrong-password" not in err


def _tls_alert(sb: ShippedBroker, identity: str, attempts: int = 3) -> str | None:
    """The broker's TLS alert to a plain TLS client with `identity`'s certificate, or None
    when it is let in. Tried `attempts` times: the broker closes right after its alert, and
    when the close overtakes the alert the client sees only an EOF (CI saw it once), while a
    certificate that is let in never draws an alert."""
    for _ in range(attempts):
        alert = _tls_alert_once(sb, identity)
        if alert is not None:
            return alert
    return None


def _tls_alert_once(sb: ShippedBroker, identity: str) -> str | None:
    t = sb.tls(identity)
    ctx = ssl.create_default_context(cafile=t.ca_file)
    assert t.cert_file is not None
    ctx.load_cert_chain(t.cert_file, t.key_file)
    with socket.create_connection(("127.0.0.1", sb.cert_port), timeout=5) as raw:
        try:
            with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s:
                s.sendall(b"\xc0\x00")  # PINGREQ before CONNECT: the broker just closes
                s.recv(1)
        except ssl.SSLError as e:
            return str(e) if "alert" in str(e) else None
    return None


def test_a_revoked_device_is_refused_after_sighup(sb: ShippedBroker, peers: list[Peer],
                                                  caplog: pytest.LogCaptureFixture) -> None:
    """The shipped crlfile: `edge-fleet revoke` writes it, SIGHUP makes the broker read it,
    and the device's client logs why it is refused; another device of the CA connects."""
    peer(peers, sb, "dev-a")  # connected before the revocation
    assert _tls_alert(sb, "dev-a") is None
    crl = sb.broker.workdir / "etc" / "crl.pem"
    assert fleet_cli.main(["revoke", "--cert", str(sb.certs["dev-a"][0]),
                           "--ca", str(sb.pki.ca.parent), "--out", str(crl)]) == 0
    os.kill(sb.broker.pid, signal.SIGHUP)
    wait_until(lambda: _tls_alert(sb, "dev-a") is not None, 5)  # the reload is asynchronous
    assert "certificate revoked" in str(_tls_alert(sb, "dev-a"))
    assert _tls_alert(sb, "dev-b") is None
    again = MqttClient(sb.cert_url, "dev-a-again", tls=sb.tls("dev-a"), reconnect_min_s=0.1,
                       reconnect_max_s=0.3)
    other = MqttClient(sb.cert_url, "dev-b", tls=sb.tls("dev-b"))
    try:
        with caplog.at_level(logging.ERROR, logger="edge_runtime.mqtt.client"):
            assert other.start(wait_s=10)
            assert not again.start(wait_s=1.5)
        assert "it is revoked" in str(again.failure(1.5))
        assert any("CN=dev-a" in r.getMessage() and "certificate revoked" in r.getMessage()
                   for r in caplog.records if r.levelno == logging.ERROR)
    finally:
        again.stop()
        other.stop()
