"""The agent's drain, set-config, download and telemetry wired into a serving daemon: a real
uvicorn daemon assembled by the CLI's own `fleet_serving.attach`, a real Mosquitto, the real
DeviceAgent, the tiny model on ONNX Runtime; and `edge-runtime serve --fleet` as a process,
with a real cloud worker for a drained device's offload."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from agent_fixtures import DEVICE, Controller, deploy, operator_pub, serve_process
from http_fixtures import RangeServer
from live_server import serve_in_thread, stop_process, wait_until
from mqtt_fixtures import Broker, Pki
from test_cli import _read_line
from test_fleet_serving import Releases, releases  # noqa: F401  (a module-scoped fixture)

from edge_runtime import signing
from edge_runtime.api.app import create_app
from edge_runtime.bundle.manifest import verify_bundle
from edge_runtime.config import Config, FleetConfig, LogConfig, ServerConfig, load_config
from edge_runtime.errors import ConfigError
from edge_runtime.fleet.agent import AGENT_STATE, DeviceAgent
from edge_runtime.fleet.daemon import (
    CONFIG_FILE,
    SLOTS,
    FleetServing,
    agent_config,
    attach,
    config_path,
    install_initial,
)
from edge_runtime.fleet.download import DownloadPolicy
from edge_runtime.fleet.live_config import plan_config
from edge_runtime.fleet.messages import Command
from edge_runtime.fleet.remote_config import REMOTE_FILE, overlay_path, read_overlay
from edge_runtime.fleet.slots import Slots
from edge_runtime.fleet.telemetry import RUNTIME_FIELDS
from edge_runtime.model.generator import Generator
from edge_runtime.serving.engine_loop import LocalWorker
from edge_runtime.serving.request import ModelInfo
from edge_runtime.serving.scheduler import SchedulerConfig

# Loose probe limits (CI's 2 cores are shared); telemetry only when a test asks for it.
FLEET_TOML = """\
[fleet]
telemetry_interval_s = 3600
tegrastats = "off"
probe_max_ttft_ms = 20000
probe_min_tokens_per_s = 0.5
"""


@dataclass
class Daemon:
    url: str
    worker: LocalWorker
    hooks: FleetServing
    agent: DeviceAgent
    config_file: Path
    drained_before_start: bool
    """LocalWorker.drained once wired, before the server (or the agent) started."""


@contextmanager
def wired_daemon(broker: Broker, root: Path, initial: Path | None, pubkey: Path,
                 config_file: Path, flags: Mapping[str, Any] | None = None) -> Iterator[Daemon]:
    """What `edge-runtime serve --fleet --config FILE` assembles (cli._run_server)."""
    flags = {"fleet.enabled": True, "fleet.broker": broker.url, "fleet.root": root,
             "fleet.device_id": DEVICE,
             "fleet.operator_keys": (operator_pub(root.parent / "trust"),), **(flags or {})}
    cfg = load_config(config_file).override(flags)
    trusted = [signing.load_public_key(pubkey)]
    serving = install_initial(Slots(root / SLOTS, trusted), initial)
    bundle = verify_bundle(serving, trusted)
    worker = LocalWorker(lambda: Generator.from_bundle(bundle, threads=1), cfg.scheduler)
    app = create_app(worker, ModelInfo.from_bundle(bundle), cfg)
    hooks = attach(app, worker, cfg, trusted, serving, config_file, flags)
    assert hooks.agent is not None
    drained = worker.drained
    with serve_in_thread(app) as url:
        assert worker.wait_ready(30)
        wait_until(lambda: hooks.agent is not None and hooks.agent.mqtt.connected, 10)
        assert hooks.agent.mqtt.wait_subscribed(10)
        yield Daemon(url, worker, hooks, hooks.agent, config_file, drained)


def _chat(url: str, max_tokens: int = 8, **kw: Any) -> httpx.Response:
    body = {"model": "edge-demo", "max_tokens": max_tokens, "temperature": 0.0,
            "messages": [{"role": "user", "content": "def f():"}]}
    return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120, **kw)


def _model(url: str) -> str:
    return str(httpx.get(f"{url}/v1/models").json()["data"][0]["id"])


def _assert_drained_refusal(r: httpx.Response) -> None:
    assert r.status_code == 503, r.text
    assert r.headers["retry-after"] == "30" and r.headers["x-served-by"] == "none"
    err = r.json()["error"]
    assert err["code"] == "drained" and err["type"] == "server_error" and "drained" in err[
        "message"]


def test_drain_refuses_new_requests_lets_running_ones_finish_and_undrain_restores(
    broker: Broker, controller: Controller, tiny_bundle: Any, releases: Releases,  # noqa: F811
    tmp_path: Path,
) -> None:
    config_file = tmp_path / "edge.toml"
    # One sequence at a time, so the long requests below queue up and are still in flight
    # when the drain arrives; a deadline no busy CI machine misses, so all are served here.
    config_file.write_text(FLEET_TOML + "\n[scheduler]\nmax_batch = 1\n"
                           "default_deadline_s = 600\n")
    with wired_daemon(broker, tmp_path / "dev", releases.v1, tiny_bundle.pubkey,
                      config_file) as d:
        model = _model(d.url)
        assert model == "edge-demo" and _chat(d.url).status_code == 200
        # Long answers, queued: requests are running and waiting when the drain arrives.
        long = min(512, d.worker.generator.context_length - 32)  # type: ignore[union-attr]
        outcomes: list[tuple[int, bool, float]] = []

        def run() -> None:
            r = _chat(d.url, max_tokens=long)
            outcomes.append((r.status_code, d.worker.drained, time.monotonic()))

        running = [threading.Thread(target=run) for _ in range(12)]
        for t in running:
            t.start()
        # Every one admitted (queued, running or done) before the drain is sent.
        wait_until(lambda: d.worker.depth + len(outcomes) >= len(running), 30)
        controller.send(Command("drain-1", "drain", {}))
        wait_until(lambda: d.worker.drained, 10)
        _assert_drained_refusal(_chat(d.url))
        ready = httpx.get(f"{d.url}/readyz")
        assert ready.status_code == 503 and ready.json()["status"] == "drained"
        final = controller.final("drain-1")
        # The ack waited for the engine: nothing was queued or running when it arrived.
        # (Measured on the server, not by when each client thread got round to reading its
        # response: that can trail the ack by a few ms on a busy machine.)
        depth_at_ack = d.worker.depth
        for t in running:
            t.join(120)
        # Every running request finished (some after the drain began).
        assert [o[0] for o in outcomes] == [200] * len(running)
        assert any(drained for _, drained, _ in outcomes)
        assert depth_at_ack == 0 and d.worker.depth == 0
        assert final.state == "drained"
        controller.wait(lambda: controller.status.get("drained") is True)
        assert json.loads((tmp_path / "dev" / AGENT_STATE).read_text()) == {"drained": True}
        # Refusals are not errors: the rollout's error_rate must not trip on a drain.
        runtime = d.hooks.runtime_metrics()
        assert runtime["drained"] is True and runtime["error_rate"] == 0.0
        controller.send(Command("undrain-1", "undrain", {}))
        assert controller.final("undrain-1").state == "undrained"
        assert not d.worker.drained and httpx.get(f"{d.url}/readyz").status_code == 200
        ok = _chat(d.url)
        assert ok.status_code == 200 and ok.headers["x-served-by"] == "local"
        controller.wait(lambda: controller.status.get("drained") is False)


def test_a_persisted_drain_holds_from_start_up(
    broker: Broker, controller: Controller, tiny_bundle: Any, releases: Releases,  # noqa: F811
    tmp_path: Path,
) -> None:
    root, config_file = tmp_path / "dev", tmp_path / "edge.toml"
    config_file.write_text(FLEET_TOML)
    with wired_daemon(broker, root, releases.v1, tiny_bundle.pubkey, config_file) as d:
        assert not d.drained_before_start
        controller.send(Command("drain-1", "drain", {}))
        assert controller.final("drain-1").state == "drained"
    with wired_daemon(broker, root, None, tiny_bundle.pubkey, config_file) as d:
        assert d.drained_before_start  # no request slips in before the agent is up
        _assert_drained_refusal(_chat(d.url))
        assert httpx.get(f"{d.url}/readyz").json()["status"] == "drained"
        # Maintenance on a drained device: a deploy probes and checks readiness past the
        # drain, and the device stays drained on the new bundle.
        controller.send(deploy("up-2", releases.v2, tiny_bundle))
        assert controller.final("up-2", 120).state == "active"
        ready = httpx.get(f"{d.url}/readyz").json()
        assert ready["status"] == "drained" and ready["version"] == "2"


def test_set_config_applies_live_keys_atomically_and_names_the_restart_ones(
    broker: Broker, controller: Controller, tiny_bundle: Any, releases: Releases,  # noqa: F811
    tmp_path: Path,
) -> None:
    config_file = tmp_path / "edge.toml"
    config_file.write_text(FLEET_TOML + "\n[scheduler]\nmax_batch = 2\n")
    level = logging.getLogger().level
    with wired_daemon(broker, tmp_path / "dev", releases.v1, tiny_bundle.pubkey, config_file,
                      flags={"server.port": 0}) as d:
        try:
            controller.send(Command("cfg-1", "set-config", {"set": {
                "scheduler": {"max_queue": 0, "default_deadline_s": 12.5, "max_batch": 3},
                "fleet.telemetry_interval_s": 1800.0, "fleet.probe_max_ttft_ms": 9000.0,
                "log.level": "debug"}}))
            final = controller.final("cfg-1")
            assert final.state == "applied", final.reason
            detail = final.detail or {}
            assert detail["applied_live"] == [
                "fleet.probe_max_ttft_ms", "fleet.telemetry_interval_s", "log.level",
                "scheduler.default_deadline_s", "scheduler.max_queue"]
            assert detail["needs_restart"] == ["scheduler.max_batch"]
            assert detail["overridden_by_flags"] == []
            assert detail["changed"]["scheduler.max_queue"] == [None, 0]  # None: measured
            w = d.worker
            assert (w.config.max_queue, w.scheduler.config.max_queue) == (0, 0)
            assert w.config.default_deadline_s == 12.5 and w.config.max_batch == 2
            assert d.agent.config.telemetry_interval_s == 1800.0
            assert d.hooks.limits.max_ttft_ms == 9000.0
            assert logging.getLogger().level == logging.DEBUG
            # The provisioned file is untouched; the change waits in the overlay.
            assert "max_batch = 2" in config_file.read_text()
            overlay = tmp_path / "dev" / REMOTE_FILE
            assert read_overlay(overlay)["scheduler"]["max_batch"] == 3
            # Live through the API: a queue bound of 0 admits nothing locally (no cloud: 429).
            refused = _chat(d.url)
            assert refused.status_code == 429 and "queue is full" in refused.text

            before = config_file.read_bytes(), overlay.read_bytes()
            cases = {  # refused by the loader, or as keys only provisioning sets
                "bad-1": ({"scheduler": {"max_queue": -1}}, "invalid config, nothing changed"),
                "bad-2": ({"server": {"api_key_file": "missing.key"}},
                          "may not change server.api_key_file"),
                "bad-3": ({"fleet": {"password_file": "missing.txt"}},
                          "may not change fleet.password_file"),
                "bad-4": ({"server": {"port": 9999, "host": "127.0.0.2"}},
                          "may not change server.host, server.port"),
            }
            for cid, (keys, why) in cases.items():
                controller.send(Command(cid, "set-config", {"set": keys}))
                r = controller.final(cid)
                assert r.state == "rejected" and why in (r.reason or ""), r.reason
                assert (config_file.read_bytes(), overlay.read_bytes()) == before
            assert w.config.max_queue == 0 and d.hooks.config.fleet.enabled

            controller.send(Command("cfg-2", "set-config", {"set": {"scheduler.max_queue": 8}}))
            assert controller.final("cfg-2").detail["applied_live"] == ["scheduler.max_queue"]
            assert _chat(d.url).status_code == 200
        finally:
            logging.getLogger().setLevel(level)


def test_deploy_downloads_over_https_with_the_fleet_download_ca(
    broker: Broker, controller: Controller, tiny_bundle: Any, releases: Releases,  # noqa: F811
    tmp_path: Path, pki: Pki,
) -> None:
    tar = tmp_path / "v2.tar"
    with tarfile.open(tar, "w") as tf:
        tf.add(releases.v2, arcname="bundle")
    data = tar.read_bytes()
    config_file = tmp_path / "edge.toml"
    config_file.write_text(FLEET_TOML + f'download_ca_file = "{pki.ca}"\ndownload_attempts = 2\n')
    with wired_daemon(broker, tmp_path / "dev", releases.v1, tiny_bundle.pubkey,
                      config_file) as d:
        assert d.agent.config.download.ca_file == str(pki.ca)
        with RangeServer({"/v2.tar": data}, tls=(pki.server_cert, pki.server_key)) as srv:
            url = srv.url("/v2.tar")
            assert url.startswith("https://")
            controller.send(deploy("dl-2", url, tiny_bundle, hashlib.sha256(data).hexdigest(),
                                   size=len(data)))
            final = controller.final("dl-2", 120)
        assert final.state == "active", final.reason
        assert httpx.get(f"{d.url}/v1/models").json()["data"][0]["version"] == "2"


def test_serve_fleet_cli_config_under_the_root_drain_to_cloud_and_telemetry_names(
    broker: Broker, controller: Controller, tiny_bundle: Any, releases: Releases,  # noqa: F811
    tmp_path: Path,
) -> None:
    """`serve --fleet` without --config: set-config writes FLEET_ROOT/config.toml, which the
    next start loads; a persisted drain holds across it and, with the offload path that file
    turned on, a drained device's requests go to the cloud. Its MQTT telemetry carries the
    names a rollout's abort rule reads."""
    root = tmp_path / "dev"
    root.mkdir()
    (root / CONFIG_FILE).write_text(FLEET_TOML.replace("3600", "0.5") +
                                    f'operator_keys = ["{operator_pub(tmp_path / "trust")}"]\n')
    exe = Path(sys.executable).with_name("edge-runtime")
    cmd = [str(exe), "serve", "--fleet", "--fleet-broker", broker.url, "--fleet-root",
           str(root), "--device-id", DEVICE, "--pubkey", str(tiny_bundle.pubkey), "--port",
           "0", "--threads", "1", "--access-log", "", "--log-level", "warning"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}

    @contextmanager
    def daemon(argv: list[str]) -> Iterator[str]:
        proc = subprocess.Popen(cmd + argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, env=env)
        with serve_process(proc, controller):
            match = re.search(r"at (http://127\.0\.0\.1:\d+)/v1", _read_line(proc, 120))
            assert match
            controller.wait(lambda: controller.status.get("online") is True)
            yield match.group(1)
        assert "Traceback" not in (proc.stderr.read() if proc.stderr else "")

    with daemon(["--bundle", str(releases.v1)]) as url:
        for _ in range(3):
            assert _chat(url).status_code == 200
        controller.wait(lambda: any(
            (t["runtime"].get("requests") or 0) >= 3 for t in controller.telemetry), 30)
        runtime = controller.telemetry[-1]["runtime"]
        assert set(RUNTIME_FIELDS) <= set(runtime), runtime
        assert runtime["tokens_per_s"] > 0 and runtime["ttft_p95_ms"] > 0
        assert runtime["p95_latency_ms"] > 0 and runtime["error_rate"] == 0.0
        assert runtime["offload_share"] == 0.0 and runtime["queue_depth"] == 0
        assert "decode_tokens_per_s" not in runtime
        controller.send(Command("cfg-1", "set-config", {"set": {
            "offload.broker": broker.url, "offload.device_id": DEVICE}}))
        ack = controller.final("cfg-1")
        assert ack.state == "rejected" and "may not change offload.broker" in (ack.reason or "")
        # Brokers are provisioning's: written on the device, read at the next start.
        with open(root / CONFIG_FILE, "a") as f:
            f.write(f'\n[offload]\nbroker = "{broker.url}"\ndevice_id = "{DEVICE}"\n')
        assert load_config(root / CONFIG_FILE).offload.broker == broker.url
        controller.send(Command("drain-1", "drain", {}))
        assert controller.final("drain-1").state == "drained"
        _assert_drained_refusal(_chat(url))

    cloud = subprocess.Popen(
        [str(exe), "cloud-worker", "--bundle", str(releases.v1), "--pubkey",
         str(tiny_bundle.pubkey), "--broker", broker.url, "--threads", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert "cloud worker" in _read_line(cloud, 120)
        with daemon([]) as url:  # the deployed slot, the root's config, still drained
            assert httpx.get(f"{url}/readyz").json()["status"] == "drained"
            served: list[httpx.Response] = []
            wait_until(lambda: served.append(_chat(url)) or served[-1].status_code == 200, 30)
            assert served[-1].headers["x-served-by"] == "cloud", served[-1].text
            assert served[-1].json()["choices"][0]["message"]["content"]
            controller.send(Command("undrain-1", "undrain", {}))
            assert controller.final("undrain-1").state == "undrained"
            assert _chat(url).headers["x-served-by"] == "local"
    finally:
        stop_process(cloud)


def test_config_path_and_the_fleet_section_reach_the_agent(tmp_path: Path, pki: Pki) -> None:
    assert config_path(tmp_path, None) == tmp_path / CONFIG_FILE
    assert config_path(tmp_path, tmp_path / "x.toml") == tmp_path / "x.toml"
    (tmp_path / "edge.toml").write_text(
        '[fleet]\nbroker = "mqtt://127.0.0.1:1"\nroot = "dev"\ntegrastats = "off"\n'
        f'download_ca_file = "{pki.ca}"\ndownload_timeout_s = 5\ndownload_attempts = 3\n')
    cfg = load_config(tmp_path / "edge.toml")
    a = agent_config(cfg, tmp_path / "edge.toml", overlay_path(cfg.fleet))
    assert a.config_path == tmp_path / "edge.toml" and a.root == tmp_path / "dev"
    assert a.remote_config == tmp_path / "dev" / REMOTE_FILE  # the default: under the root
    assert agent_config(cfg, tmp_path / "edge.toml").remote_config is None  # set-config off
    assert a.download == DownloadPolicy(timeout_s=5, attempts=3, ca_file=str(pki.ca))
    assert a.tegrastats is None and agent_config(Config(fleet=cfg.fleet)).config_path is None
    missing = Config(fleet=dataclasses.replace(cfg.fleet, download_ca_file=tmp_path / "no.pem"))
    with pytest.raises(ConfigError, match=r"no\.pem"):
        agent_config(missing)
    with pytest.raises(ConfigError, match=r"download_attempts >= 1, got 5\.0 and 0"):
        FleetConfig(download_attempts=0, download_timeout_s=5.0)


def test_plan_config_splits_live_and_restart_keys() -> None:
    running = Config(scheduler=SchedulerConfig(offload_enabled=False))
    new = Config(scheduler=SchedulerConfig(offload_enabled=True, safety=1.5, max_batch=8),
                 log=LogConfig(level="debug"), server=ServerConfig(port=9000))
    plan = plan_config(running, new, {"log.level": "info", "server.host": None}, cloud_path=False)
    # No offload client was started: turning offload on waits for a restart.
    assert plan.live == ["scheduler.safety"]
    assert plan.restart == ["scheduler.max_batch", "scheduler.offload_enabled", "server.port"]
    assert plan.overridden == ["log.level"]
    assert plan.running.scheduler == SchedulerConfig(offload_enabled=False, safety=1.5)
    assert plan.running.server == running.server and plan.target.server.port == 9000
    on = plan_config(running, new, {}, cloud_path=True)
    assert on.running.scheduler.offload_enabled and "log.level" in on.live


def test_a_config_that_turns_the_agent_off_is_refused_and_changes_nothing(
    tmp_path: Path,
) -> None:
    fleet = FleetConfig(enabled=True, broker="mqtt://127.0.0.1:1", root=tmp_path)
    running = Config(fleet=fleet)
    worker = LocalWorker(lambda: None)  # type: ignore[arg-type, return-value]  # never started
    hooks = FleetServing(worker, [], tmp_path, config=running)
    with pytest.raises(ConfigError, match=r"fleet\.enabled = false"):
        hooks.on_config(Config(scheduler=SchedulerConfig(max_queue=1)))
    assert hooks.config is running and worker.config.max_queue is None  # unchanged: measured
    # The same file under a daemon whose --fleet flag pins the agent on is fine.
    hooks.flags = {"fleet.enabled": True, "fleet.broker": fleet.broker, "fleet.root": tmp_path}
    assert hooks.on_config(Config(scheduler=SchedulerConfig(max_queue=1)))["applied_live"] == [
        "scheduler.max_queue"]
    assert worker.config.max_queue == 1


def test_recent_window_speaks_the_rollout_names_and_refusals_are_not_errors() -> None:
    from edge_runtime.api.metrics import REFUSED, Metrics
    from edge_runtime.model.stream import GenerationStats

    m = Metrics()
    m.observe_request("/v1/chat/completions", 200, "local", 0.2)
    m.observe_request("/v1/chat/completions", 503, REFUSED, 0.001)
    m.observe_request("/v1/chat/completions", 500, "local", 0.1)
    m.observe_generation(GenerationStats(prompt_tokens=4, completion_tokens=11, ttft_s=0.05,
                                         decode_s=0.5), 0.01, "local")
    snap = m.recent.snapshot()
    assert set(RUNTIME_FIELDS) - {"quality_drop", "queue_depth"} <= set(snap)
    assert snap["error_rate"] == pytest.approx(1 / 3) and snap["tokens_per_s"] == 20.0
    assert snap["p95_latency_ms"] == 200.0 and snap["ttft_p95_ms"] == 60.0
