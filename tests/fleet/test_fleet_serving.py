"""The fleet agent inside a serving daemon: a real uvicorn daemon, a real Mosquitto, the real
DeviceAgent, the tiny model on ONNX Runtime. Deploys happen while clients keep sending
requests; none may fail, and a refused or sick bundle must leave the serving model alone."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from agent_fixtures import DEVICE, Controller, deploy, operator_pub, serve_process
from live_server import serve_in_thread, wait_until
from mqtt_fixtures import Broker
from test_cli import _read_line

from edge_runtime import signing
from edge_runtime.api.app import create_app
from edge_runtime.bundle.manifest import MANIFEST, verify_bundle, write_bundle
from edge_runtime.fleet.agent import AgentConfig, DeviceAgent
from edge_runtime.fleet.daemon import SLOTS, FleetServing, install_initial
from edge_runtime.fleet.slots import Slots
from edge_runtime.model import probe
from edge_runtime.model.generator import Generator
from edge_runtime.mqtt import topics
from edge_runtime.mqtt.client import MqttClient
from edge_runtime.serving.engine_loop import LocalWorker
from edge_runtime.serving.request import ModelInfo

# Loose latency limits: the point here is the quality gate; CI's 2 cores are shared.
LIMITS = probe.ProbeThresholds(max_ttft_ms=20_000, min_tokens_per_s=0.5)


@dataclass(frozen=True)
class Releases:
    v1: Path
    v2: Path
    """The same model rebuilt as version 2, signed by the same key."""
    sick: Path
    """Version 3: signed, hashes right, but its model does not reproduce its references."""


def repackage(src: Path, out: Path, key: Path, version: str,
              reference: dict | None = None) -> Path:
    """`src` re-released as `version` (and with `reference` as its probe file), re-signed."""
    fields = json.loads((src / MANIFEST).read_text())
    files = {rel: src / rel for rel in fields.pop("files")}
    del fields["schema_version"]
    fields["version"] = version
    if reference is not None:
        ref = out.with_name(out.name + ".reference.json")
        ref.write_text(json.dumps(reference))
        files[probe.REFERENCE_FILE] = ref
    return write_bundle(out, files, fields, signing.load_private_key(key))


@pytest.fixture(scope="module")
def releases(tiny_bundle: Any, tmp_path_factory: pytest.TempPathFactory) -> Releases:
    root = tmp_path_factory.mktemp("releases")
    trusted = [signing.load_public_key(tiny_bundle.pubkey)]
    bundle = verify_bundle(tiny_bundle.path, trusted)
    ref = probe.load_reference(bundle)
    if ref is None:  # a bundle packaged before package.py wrote probes: make it the same way
        gen = Generator.from_bundle(bundle)
        prompts, windows = probe.reference_inputs(
            gen.tokenizer.encode, [Path(asyncio.__file__).with_name("events.py").read_text()])
        ref = probe.make_reference(gen, prompts, windows)
    v1 = repackage(tiny_bundle.path, root / "v1", tiny_bundle.key, "1", ref)
    v2 = repackage(tiny_bundle.path, root / "v2", tiny_bundle.key, "2", ref)
    # Another model's references: other greedy tokens and a perplexity it does not reach.
    claimed = {**ref, "perplexity": ref["perplexity"] / 2,
               "prompts": [{**p, "token_ids": [(t + 7) % 64 for t in p["token_ids"]]}
                           for p in ref["prompts"]]}
    sick = repackage(tiny_bundle.path, root / "sick", tiny_bundle.key, "3", claimed)
    return Releases(v1, v2, sick)


@dataclass
class Daemon:
    url: str
    worker: LocalWorker
    hooks: FleetServing
    agent: DeviceAgent


@contextmanager
def fleet_daemon(broker: Broker, root: Path, initial: Path | None,
                 pubkey: Path) -> Iterator[Daemon]:
    """What `edge-runtime serve --fleet` runs (cli._run_server), on a free port."""
    trusted = [signing.load_public_key(pubkey)]
    serving = install_initial(Slots(root / SLOTS, trusted), initial)
    bundle = verify_bundle(serving, trusted)
    worker = LocalWorker(lambda: Generator.from_bundle(bundle, threads=1))
    app = create_app(worker, ModelInfo.from_bundle(bundle))
    from edge_runtime.config import Config, FleetConfig

    ops = Config(fleet=FleetConfig(operator_keys=(operator_pub(root.parent / "trust"),)))
    hooks = FleetServing(worker, trusted, serving, LIMITS, app.state.metrics, threads=1,
                         config=ops)
    agent = hooks.make_agent(AgentConfig(DEVICE, broker.url, root, telemetry_interval_s=3600,
                                         reconnect_min_s=0.1, reconnect_max_s=1.0))
    app.state.fleet = hooks  # as the CLI does: the lifespan starts and stops the agent
    with serve_in_thread(app) as url:
        assert worker.wait_ready(30)
        wait_until(lambda: agent.mqtt.connected, 10)
        assert agent.mqtt.wait_subscribed(10)
        yield Daemon(url, worker, hooks, agent)


class Traffic:
    """`clients` threads sending completions until stopped; every outcome is recorded."""

    def __init__(self, url: str, clients: int = 3, max_tokens: int = 12) -> None:
        self.url = url
        self.max_tokens = max_tokens
        self.model = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
        self.versions: list[str] = []
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,)) for i in range(clients)]

    def __enter__(self) -> Traffic:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(60)

    def _run(self, i: int) -> None:
        body = {"model": self.model, "max_tokens": self.max_tokens, "temperature": 0.0,
                "messages": [{"role": "user", "content": f"def f{i}():"}]}
        with httpx.Client(base_url=self.url, timeout=60) as client:
            while not self._stop.is_set():
                try:
                    r = client.post("/v1/chat/completions", json=body)
                except httpx.HTTPError as e:
                    self.failures.append(f"{type(e).__name__}: {e}")
                    continue
                if r.status_code != 200 or not r.json()["choices"][0]["message"]["content"]:
                    self.failures.append(f"{r.status_code}: {r.text[:200]}")
                else:
                    self.versions.append(r.headers["x-bundle-version"])

    def wait_for(self, n: int) -> None:
        """Until `n` requests have been answered (or failed) in all."""
        wait_until(lambda: len(self.versions) + len(self.failures) >= n, 30)


def _version(url: str) -> str:
    return str(httpx.get(f"{url}/v1/models").json()["data"][0]["version"])


def test_deploy_under_traffic_fails_no_request(
    broker: Broker, controller: Controller, tiny_bundle: Any, releases: Releases,
    tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="edge_runtime.serving.engine_loop")
    telemetry: list[dict[str, Any]] = []
    listener = MqttClient(broker.url, "telemetry-listener")
    listener.subscribe(topics.fleet_telemetry(DEVICE),
                       lambda m: telemetry.append(json.loads(m.payload)))
    listener.start()
    assert listener.wait_subscribed(10)
    with fleet_daemon(broker, tmp_path / "dev", releases.v1, tiny_bundle.pubkey) as d:
        assert _version(d.url) == "1"
        old = d.worker.generator
        # Long enough answers (the tiny model never stops early) from enough clients that the
        # engine is always busy: the switch happens with sequences running on the old model.
        # (3 clients of 64 tokens were once all between requests at the switch, while the new
        # model's capacity probe shared the two cores.)
        with Traffic(d.url, clients=6, max_tokens=128) as traffic:
            traffic.wait_for(6)
            controller.send(deploy("up-2", releases.v2, tiny_bundle))
            final = controller.final("up-2")
            n = len(traffic.versions)
            traffic.wait_for(n + 6)
        assert final.state == "active", final.reason
        assert traffic.failures == []
        assert traffic.versions[0] == "1" and traffic.versions[-1] == "2"
        assert _version(d.url) == "2" and d.worker.generator is not old
        assert d.agent.slots.active == final.bundle and "-2-" in (final.bundle or "")
        assert not d.worker._draining  # the old generator is released
        # Requests were running on the old model at the switch, and finished there.
        swaps = [r.getMessage() for r in caplog.records if r.getMessage().startswith("now serv")]
        assert len(swaps) == 1 and re.match(r"now serving 2; [1-9]\d* sequences finish", swaps[0])
        d.agent.publish_telemetry()  # what the operator sees, through the real agent
        wait_until(lambda: bool(telemetry), 10)
    listener.stop()
    m = telemetry[-1]["runtime"]
    assert m["bundle_version"] == "2" and m["error_rate"] == 0.0 and m["requests"] >= 12
    assert m["tokens_per_s"] > 0 and m["ttft_p95_ms"] > 0 and m["quality_drop"] < 0.01
    assert m["queue_depth"] >= 0 and m["offload_share"] == 0.0 and m["probe"]["ttft_ms"] > 0


def test_bad_signature_or_hash_is_refused_and_the_model_untouched(
    broker: Broker, controller: Controller, tiny_bundle: Any, releases: Releases,
    tmp_path: Path,
) -> None:
    tampered = tmp_path / "tampered"
    shutil.copytree(releases.v2, tampered)
    graph = next(tampered.rglob("*.onnx"))
    graph.write_bytes(graph.read_bytes()[:-1] + b"\0")
    forged = tmp_path / "forged"
    shutil.copytree(releases.v2, forged)
    (forged / "manifest.sig").write_bytes(bytes(64))
    with fleet_daemon(broker, tmp_path / "dev", releases.v1, tiny_bundle.pubkey) as d:
        gen, before = d.worker.generator, d.agent.slots.active
        with Traffic(d.url, clients=2) as traffic:
            traffic.wait_for(4)
            for cid, src in (("bad-hash", tampered), ("bad-sig", forged)):
                controller.send(deploy(cid, src, tiny_bundle))
                r = controller.final(cid)
                assert r.state == "rejected" and "refused before staging" in (r.reason or "")
                assert "staged" not in controller.states(cid), controller.states(cid)
            traffic.wait_for(len(traffic.versions) + 4)
        assert graph.name in (controller.final("bad-hash").reason or "")
        assert "signature" in (controller.final("bad-sig").reason or "")
        assert traffic.failures == [] and set(traffic.versions) == {"1"}
        assert d.worker.generator is gen and d.agent.slots.active == before
        assert [p.name for p in (tmp_path / "dev" / SLOTS / "bundles").iterdir()] == [before]


def test_bundle_failing_its_quality_probe_is_rolled_back(
    broker: Broker, controller: Controller, tiny_bundle: Any, releases: Releases,
    tmp_path: Path,
) -> None:
    with fleet_daemon(broker, tmp_path / "dev", releases.v1, tiny_bundle.pubkey) as d:
        gen, before = d.worker.generator, d.agent.slots.active
        with Traffic(d.url, clients=2) as traffic:
            traffic.wait_for(4)
            controller.send(deploy("sick-3", releases.sick, tiny_bundle))
            final = controller.final("sick-3")
            traffic.wait_for(len(traffic.versions) + 4)
        assert final.state == "rolled_back" and final.bundle == before
        assert controller.states("sick-3")[-2:] == ["checking", "rolled_back"]
        reason = final.reason or ""
        assert "greedy match 0.000 < 0.75" in reason and "perplexity" in reason, reason
        # The sick model never answered a client: it was probed before it was swapped in.
        assert traffic.failures == [] and set(traffic.versions) == {"1"}
        assert d.worker.generator is gen and d.agent.slots.active == before
        assert _version(d.url) == "1" and d.agent.slots.recover() == before
        m = d.hooks.runtime_metrics()
        assert m["probe"]["greedy_match"] == 0.0 and m["quality_drop"] >= 1.0


def test_serve_fleet_cli_first_boot_deploy_and_restart(
    broker: Broker, controller: Controller, tiny_bundle: Any, releases: Releases,
    tmp_path: Path,
) -> None:
    """`edge-runtime serve --fleet` as a device runs it: first boot installs --bundle as the
    active slot; a deploy switches it; a restart without --bundle serves the deployed one."""
    config = tmp_path / "edge.toml"
    config.write_text("[fleet]\ntelemetry_interval_s = 3600\nprobe_max_ttft_ms = 20000\n"
                      "probe_min_tokens_per_s = 0.5\n"
                      f'operator_keys = ["{operator_pub(tmp_path / "trust")}"]\n')
    exe = Path(sys.executable).with_name("edge-runtime")
    cmd = [str(exe), "serve", "--config", str(config), "--fleet", "--fleet-broker", broker.url,
           "--fleet-root", str(tmp_path / "dev"), "--device-id", DEVICE,
           "--pubkey", str(tiny_bundle.pubkey), "--port", "0", "--threads", "1",
           "--access-log", "", "--log-level", "warning"]
    for argv, version in ((["--bundle", str(releases.v1)], "1"), ([], "2")):
        proc = subprocess.Popen(cmd + argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        with serve_process(proc, controller):
            match = re.search(r"at (http://127\.0\.0\.1:\d+)/v1", _read_line(proc, 120))
            assert match
            url = match.group(1)
            assert _version(url) == version
            controller.wait(lambda: controller.status.get("online") is True)
            if version == "1":
                controller.send(deploy("cli-2", releases.v2, tiny_bundle))
                assert controller.final("cli-2").state == "active"
                assert _version(url) == "2"
        assert "Traceback" not in (proc.stderr.read() if proc.stderr else "")


def test_an_unconfirmed_active_slot_is_probed_when_its_deploy_resumes(
    broker: Broker, controller: Controller, tiny_bundle: Any, releases: Releases,
    tmp_path: Path,
) -> None:
    """The device died after switching to v2 and before its health check, with nothing to go
    back to: it serves v2, and the re-run deploy probes it beside the serving generator."""
    root = tmp_path / "dev"
    slots = Slots(root / SLOTS, [signing.load_public_key(tiny_bundle.pubkey)])
    slots.activate(slots.stage(releases.v2))  # never committed
    with fleet_daemon(broker, root, None, tiny_bundle.pubkey) as d:
        gen = d.worker.generator
        assert _version(d.url) == "2" and not d.agent.slots.state()["confirmed"]
        controller.send(deploy("again-2", releases.v2, tiny_bundle))
        assert controller.final("again-2").state == "active"
        assert d.agent.slots.state()["confirmed"] and d.worker.generator is gen
        assert d.hooks.last_probe is not None and d.hooks.last_probe.greedy_match == 1.0
