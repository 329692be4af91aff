"""The agent's commands beyond a local deploy, against a real Mosquitto (and a real HTTP
server): deploy from a URL, set-config, drain / undrain, and a batch of malformed or
unauthorised commands that must each be rejected with a reason, never crash the agent."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

from agent_fixtures import DEVICE, OPERATOR, Controller, deploy, make_agent
from bundle_fixtures import BuiltBundle
from http_fixtures import RangeServer
from mqtt_fixtures import Broker

from edge_runtime.config import Config
from edge_runtime.fleet.command_auth import device_target
from edge_runtime.fleet.messages import Command
from edge_runtime.fleet.remote_config import merged_config
from edge_runtime.serving.scheduler import SchedulerConfig
from edge_runtime.tomlconfig import read_toml


def test_deploy_from_url_resumes_over_dropped_connections(
    broker: Broker, controller: Controller, device_root: Path, tiny_bundle: BuiltBundle,
    bundle_v2_tar: Path,
) -> None:
    data = bundle_v2_tar.read_bytes()
    agent = make_agent(broker.url, device_root, tiny_bundle,
                       health_check=lambda p: {"quality_drop": 0.001, "ttft_ms": 41.0})
    agent.start(10)
    try:
        assert agent.mqtt.wait_subscribed(10)
        with RangeServer({"/v2.tar": data}, drops=[len(data) // 3, 2 * len(data) // 3]) as srv:
            controller.send(deploy("u-1", srv.url("/v2.tar"), tiny_bundle,
                                   hashlib.sha256(data).hexdigest(), size=len(data)))
            final = controller.final("u-1")
        assert final.state == "active", final.reason
        assert final.detail == {"health": {"quality_drop": 0.001, "ttft_ms": 41.0}}
        assert controller.states("u-1")[:3] == ["received", "downloading", "verifying"]
        assert [r for _, r in srv.requests] == [None, f"bytes={len(data) // 3}-",
                                                f"bytes={2 * len(data) // 3}-"]
        assert "-2-" in (agent.slots.active or "")
        assert list(agent.slots.downloads.iterdir()) == []  # extracted, then deleted
        # Refusals of URL deploys: disk too small for the size announced, wrong hash.
        controller.send(deploy("u-2", "http://127.0.0.1:9/x.tar", tiny_bundle, "a" * 64,
                               size=1 << 50))
        assert "downloading needs" in (controller.final("u-2").reason or "")
        with RangeServer({"/v2.tar": data}) as srv:
            controller.send(deploy("u-3", srv.url("/v2.tar"), tiny_bundle, "b" * 64,
                                   size=len(data)))
            assert "does not match" in (controller.final("u-3").reason or "")
    finally:
        agent.stop()


def test_set_config_validates_applies_atomically_and_reports_the_diff(
    broker: Broker, controller: Controller, device_root: Path, tiny_bundle: BuiltBundle,
    tmp_path: Path,
) -> None:
    path = tmp_path / "edge.toml"  # provisioned: read-only, never written by the agent
    path.write_text("# operator's file\n[server]\nport = 8000\n[log]\nlevel = \"info\"\n")
    path.chmod(0o444)
    provisioned = (path.read_bytes(), path.stat().st_mtime_ns, path.stat().st_ino)
    overlay = tmp_path / "remote.toml"
    applied: list[Config] = []
    refuse = {"on": False}

    def on_config(cfg: Config) -> None:
        if refuse["on"]:
            raise ValueError("server.port cannot change while serving")
        applied.append(cfg)

    def effective() -> Config:
        return merged_config(read_toml(path), tmp_path, str(path), overlay)[1]

    agent = make_agent(broker.url, device_root, tiny_bundle, config_path=path,
                       on_config=on_config)
    assert agent.config.remote_config == overlay
    agent.start(10)
    try:
        assert agent.mqtt.wait_subscribed(10)
        controller.send(Command("s-1", "set-config",
                                {"set": {"scheduler": {"max_batch": 3}, "log.level": "warning"}}))
        a = controller.final("s-1")
        assert a.state == "applied", a.reason
        default = SchedulerConfig().max_batch
        assert a.detail == {"changed": {"log.level": ["info", "warning"],
                                        "scheduler.max_batch": [default, 3]}}
        assert effective().scheduler.max_batch == 3 and effective().server.port == 8000
        assert applied[-1].log.level == "warning" and applied[-1].server.port == 8000
        controller.send(Command("s-1", "set-config", {"set": {"log.level": "error"}}))  # same id
        controller.wait(lambda: any(x.duplicate for x in controller.acks if x.id == "s-1"))
        dup = next(x for x in controller.acks if x.id == "s-1" and x.duplicate)
        assert (dup.state, dup.detail) == ("applied", a.detail)  # the stored result, not rerun
        assert len(applied) == 1 and effective().log.level == "warning"
        # A whole document replaces the overlay: what it leaves out is the base's again.
        doc = "[log]\nlevel = \"debug\"\n"
        controller.send(Command("s-2", "set-config", {"toml": doc}))
        a = controller.final("s-2")
        assert a.state == "applied" and overlay.read_text() == doc
        assert a.detail == {"changed": {"log.level": ["warning", "debug"],
                                        "scheduler.max_batch": [3, default]}}
        for cid, params, reason in [
            ("s-3", {"set": {"scheduler.max_batch": 0}}, "max_batch"),
            ("s-4", {"set": {"server.typo": 1}}, "may not change server.typo"),
            ("s-4b", {"set": {"scheduler.typo": 1}}, "may not change scheduler.typo"),
            ("s-5", {"toml": "[server\nport=1"}, "not valid TOML"),
            ("s-6", {"set": {"nosuch.key": 1}}, "may not change nosuch.key"),
            ("s-7", {"set": {"scheduler.max_queue": "80"}}, "must be int"),
            ("s-8", {"toml": doc, "set": {"a.b": 1}}, "exactly one"),
            ("s-9", {}, "exactly one"),
            ("s-9b", {"toml": doc, "path": "/etc/x"}, "unknown params ['path']"),
            ("s-9c", {"set": {"server.port": 8100}}, "may not change server.port"),
            ("s-9d", {"toml": doc + "[server]\nport = 8100\n"}, "may not change server.port"),
            ("s-9e", {"toml": doc + "[fleet]\nremote_config = \"/etc/passwd\"\n"},
             "may not change fleet.remote_config"),
        ]:
            controller.send(Command(cid, "set-config", params))
            r = controller.final(cid)
            assert r.state == "rejected" and reason in (r.reason or ""), (cid, r.reason)
            assert overlay.read_text() == doc  # untouched
        refuse["on"] = True
        controller.send(Command("s-10", "set-config", {"set": {"scheduler.max_queue": 9}}))
        r = controller.final("s-10")
        assert r.state == "rejected" and "cannot change while serving" in (r.reason or "")
        assert overlay.read_text() == doc  # the previous overlay is back
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".remote.toml")]
    finally:
        agent.stop()
    st = path.stat()
    assert (path.read_bytes(), st.st_mtime_ns, st.st_ino) == provisioned
    assert st.st_mode & 0o777 == 0o444


def test_drain_and_undrain_persist_across_restarts(
    broker: Broker, controller: Controller, device_root: Path, tiny_bundle: BuiltBundle,
) -> None:
    calls: list[bool] = []
    agent = make_agent(broker.url, device_root, tiny_bundle, on_drain=calls.append)
    agent.start(10)
    try:
        assert agent.mqtt.wait_subscribed(10)
        controller.send(Command("d-1", "drain"))
        assert controller.final("d-1").state == "drained"
        controller.wait(lambda: controller.status.get("drained") is True)
    finally:
        agent.stop()
    assert calls == [True]
    agent = make_agent(broker.url, device_root, tiny_bundle, on_drain=calls.append)
    agent.start(10)
    try:
        assert calls == [True, True]  # told again at start-up: still drained
        controller.send(Command("d-2", "undrain"))
        assert controller.final("d-2").state == "undrained"
        controller.wait(lambda: controller.status.get("drained") is False)
        controller.send(Command("d-3", "undrain"))
        assert "already serving" in (controller.final("d-3").reason or "")
        assert calls == [True, True, False, False]
    finally:
        agent.stop()


def _malformed(signer_ok: str) -> list[tuple[bytes, str | None, str]]:
    """(payload, id the rejection should carry, words its reason must contain)."""
    def cmd(cid: str, ctype: object, params: object = None, v: object = 1) -> bytes:
        d: dict[str, object] = {"v": v, "id": cid, "type": ctype}
        if params is not None:
            d["params"] = params
        return sign(d)

    def sign(d: dict[str, object]) -> bytes:  # well signed: what is wrong is the command
        return OPERATOR.sign_doc(d, device_target(DEVICE))

    ok = {"bundle": "/nonexistent", "sha256": "a" * 64, "signer": signer_ok}
    return [
        (b"{not json", None, "not valid JSON"),
        (b"\xff\xfe\x00garbage", None, "not valid JSON"),
        (cmd("big", "drain", {"pad": "x" * 300_000}), None, "more than"),
        (b"[" * 100_000 + b"]" * 100_000, None, "nested too deeply"),
        (b"[" * 50_000, None, "not valid JSON"),
        (b"[1, 2]", None, "JSON object"),
        (b"null", None, "JSON object"),
        (b"", None, "not valid JSON"),
        (cmd("m-1", "deploy", ok, v=2), "m-1", "schema v=2"),
        (sign({"v": 1, "type": "drain"}), None, "command id"),
        (sign({"v": 1, "id": 7, "type": "drain"}), None, "command id"),
        (cmd("x" * 200, "drain"), None, "at most 128"),
        (cmd("m-2", "reboot"), "m-2", "unknown command type 'reboot'"),
        (cmd("m-3", None), "m-3", "unknown command type"),
        (cmd("m-4", "deploy", [1]), "m-4", "params must be a JSON object"),
        (cmd("m-5", "deploy", {}), "m-5", "params.bundle"),
        (cmd("m-6", "deploy", {**ok, "sha256": "xyz"}), "m-6", "64 hex digits"),
        (cmd("m-7", "deploy", {**ok, "signer": "ab" * 8}), "m-7", "not trusted"),
        (cmd("m-8", "deploy", {**ok, "signer": "a/b"}), "m-8", "signer key id"),
        (cmd("m-9", "deploy", {**ok, "bundle": "ftp://h/b.tar"}), "m-9", "http:// and https"),
        (cmd("m-10", "deploy", {**ok, "bundle": "file:///etc/passwd"}), "m-10", "https"),
        (cmd("m-11", "deploy", {**ok, "size": -5}), "m-11", "positive integer"),
        (cmd("m-11b", "deploy", {**ok, "bundle": "http://127.0.0.1:9/b.tar"}), "m-11b",
         "needs params.size"),
        (cmd("m-12", "deploy", {**ok, "size": True}), "m-12", "positive integer"),
        (cmd("m-13", "deploy", {**ok, "sha256": 5}), "m-13", "params.sha256"),
        (cmd("m-14", "deploy", ok), "m-14", "does not exist"),
        (cmd("m-15", "drain", {"force": True}), "m-15", "takes no params"),
        (cmd("m-16", "rollback", {"to": "v1"}), "m-16", "unknown params ['to']"),
        (cmd("m-16b", "rollback", {"expect_active": 3}), "m-16b", "bundle version id"),
        (cmd("m-16c", "rollback", {"expect_active": "x-1-abc"}), "m-16c",
         "not x-1-abc: nothing to roll back"),
        (cmd("m-17", "set-config", {"set": []}), "m-17", "non-empty table"),
        (cmd("m-18", "set-config", {"toml": 5}), "m-18", "must be a string"),
        (cmd("m-19", "set-config", {"set": {"server.port": None}}), "m-19", "null"),
        (cmd("m-20", "set-config", {"set": {"server": {"port": {"deep": 1}}}}), "m-20",
         "is a table"),
        (cmd("m-21", "rollback"), "m-21", "no previous bundle"),
    ]


def test_malformed_and_unauthorised_commands_are_rejected_never_crash(
    broker: Broker, controller: Controller, device_root: Path, tiny_bundle: BuiltBundle,
    tmp_path: Path,
) -> None:
    from edge_runtime import signing
    kid = signing.key_id(signing.load_public_key(tiny_bundle.pubkey))
    path = tmp_path / "edge.toml"
    agent = make_agent(broker.url, device_root, tiny_bundle, config_path=path)
    before = agent.slots.active
    agent.start(10)
    try:
        assert agent.mqtt.wait_subscribed(10)
        cases = _malformed(kid)
        for payload, _, _ in cases:
            controller.send(payload)
        controller.wait(lambda: sum(a.state == "rejected" for a in controller.acks)
                        >= len(cases))
        rejected = [a for a in controller.acks if a.state == "rejected"]
        for (payload, cid, words), ack in zip(cases, rejected, strict=True):
            assert ack.id == cid and words in (ack.reason or ""), (payload[:60], ack)
        assert not any(a.state == "received" for a in controller.acks if a.id is None)
        # Still alive and still obeying: a good command after the storm works.
        controller.send(Command("ok-1", "drain"))
        assert controller.final("ok-1").state == "drained"
        assert agent.slots.active == before
    finally:
        agent.stop()


def test_telemetry_carries_host_and_runtime_fields(
    broker: Broker, controller: Controller, device_root: Path, tiny_bundle: BuiltBundle,
) -> None:
    runtime = {"error_rate": 0.01, "ttft_p95_ms": 180.0, "tokens_per_s": 31.5,
               "quality_drop": 0.002, "queue_depth": 2, "offload_share": 0.1}
    agent = make_agent(broker.url, device_root, tiny_bundle, runtime_metrics=lambda: runtime)
    agent.start(10)
    try:
        assert agent.mqtt.wait_subscribed(10)
        agent.publish_telemetry()
        agent.publish_telemetry()  # the second one has CPU shares (deltas)
        controller.wait(lambda: len(controller.telemetry) >= 2)
        t = controller.telemetry[-1]
        assert t["runtime"] == runtime
        system = t["system"]
        assert isinstance(system, dict) and system["source"] == "proc"
        for key in ("cpu_percent", "cpu_cores", "load1", "mem_used_mb", "mem_total_mb"):
            assert key in system, key
    finally:
        agent.stop()


def test_a_result_that_may_not_have_left_is_published_again(
    broker: Broker, controller: Controller, device_root: Path, tiny_bundle: BuiltBundle,
) -> None:
    """Killed after the journal stored a final ack but before the broker PUBACKed it: the
    next start publishes it again (as a duplicate) and then marks it delivered."""
    from edge_runtime.fleet.journal import JOURNAL, CommandJournal
    from edge_runtime.fleet.messages import Ack

    journal = CommandJournal(device_root / JOURNAL)
    assert journal.add("j-1", "drain", {}) is None
    journal.finish("j-1", "drain", Ack("j-1", "dev-1", "drained").to_dict())
    agent = make_agent(broker.url, device_root, tiny_bundle)
    agent.start(10)
    try:
        final = controller.final("j-1")
        assert (final.state, final.duplicate) == ("drained", True)
        deadline = time.monotonic() + 10  # the PUBACK lands on paho's thread
        while agent.journal.unacked() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert agent.journal.unacked() == []
    finally:
        agent.stop()
    assert CommandJournal(device_root / JOURNAL).unacked() == []
    assert CommandJournal(device_root / JOURNAL).pending() == []
