#!/usr/bin/env python3
"""Hot deploys to a serving daemon under load: failed requests, switch time, latency bump.

    python scripts/bench_deploy.py [--preset default|tiny] [--clients 4] [--deploys 3]
                                   [--gap-s 5] [--max-tokens 32] [--no-write]

Starts Mosquitto and `edge-runtime serve --fleet` (first boot: the demo bundle becomes the
active slot), keeps `--clients` concurrent chat completions going, and sends deploy commands
over MQTT as an operator would: `--deploys` rebuilt releases of the demo bundle (the same
model re-packaged with a new version and re-signed by the demo key, which is what a rebuild
without model changes produces), alternating, then one sick release (the same graph carrying
another model's probe references, re-signed) that must be rolled back. Per deploy: command →
final ack time, the probe's numbers (telemetry), and client latency inside the switch window
against outside it. Writes its section of docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from bench.report import cpu_model, update_section
from overload.load import pct
from overload.procs import Procs, edge_runtime_cmd, free_port, tail

from edge_runtime import signing
from edge_runtime.bundle.manifest import MANIFEST, verify_bundle, write_bundle
from edge_runtime.fleet.messages import Ack, Command
from edge_runtime.model import probe
from edge_runtime.mqtt import topics
from edge_runtime.mqtt.client import Message, MqttClient

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "BENCHMARKS.md"
MARK = "bench_deploy"
DEVICE = "bench-dev"


def release(src: Path, out: Path, key: Path, version: str, sick: bool = False) -> Path:
    """`src` re-packaged as `version` and re-signed; `sick`: with references it cannot meet."""
    fields = json.loads((src / MANIFEST).read_text())
    files = {rel: src / rel for rel in fields.pop("files")}
    del fields["schema_version"]
    fields["version"] = version
    if sick:
        ref = json.loads((src / probe.REFERENCE_FILE).read_text())
        ref["perplexity"] /= 2
        for p in ref["prompts"]:
            p["token_ids"] = [(t + 7) % 64 for t in p["token_ids"]]
        path = out.with_name(out.name + ".reference.json")
        path.write_text(json.dumps(ref))
        files[probe.REFERENCE_FILE] = path
    return write_bundle(out, files, fields, signing.load_private_key(key), overwrite=True)


@dataclass
class Call:
    start: float
    end: float
    status: int
    version: str | None


class Operator:
    """Sends deploys and collects acks and telemetry over the fleet broker."""

    def __init__(self, url: str) -> None:
        self.acks: list[tuple[float, Ack]] = []
        self.runtime: dict[str, Any] = {}
        self._cv = threading.Condition()
        self.mqtt = MqttClient(url, "bench-operator")
        self.mqtt.subscribe(topics.fleet_cmd_ack(DEVICE), self._on_ack)
        self.mqtt.subscribe(topics.fleet_telemetry(DEVICE), self._on_telemetry)
        self.mqtt.start()
        if not self.mqtt.wait_subscribed(10):
            raise SystemExit("operator could not subscribe")

    def _on_ack(self, m: Message) -> None:
        with self._cv:
            self.acks.append((time.monotonic(), Ack.from_json(m.payload)))
            self._cv.notify_all()

    def _on_telemetry(self, m: Message) -> None:
        with self._cv:
            self.runtime = json.loads(m.payload)["runtime"]

    def deploy(self, cid: str, bundle: Path, pubkey: Path) -> tuple[float, float, Ack]:
        kid = signing.key_id(signing.load_public_key(pubkey))
        sha = hashlib.sha256((bundle / MANIFEST).read_bytes()).hexdigest()
        sent = time.monotonic()
        cmd = Command(cid, "deploy", {"bundle": str(bundle), "sha256": sha, "signer": kid})
        self.mqtt.publish(topics.fleet_cmd(DEVICE), cmd.to_json(), wait_s=5)
        with self._cv:
            ok = self._cv.wait_for(lambda: any(a.id == cid and a.final for _, a in self.acks),
                                   300)
        if not ok:
            raise SystemExit(f"no final ack for {cid}")
        t, ack = next((t, a) for t, a in self.acks if a.id == cid and a.final)
        return sent, t, ack


async def clients(url: str, model: str, n: int, max_tokens: int, stop: asyncio.Event,
                  calls: list[Call]) -> None:
    body = {"model": model, "max_tokens": max_tokens, "temperature": 0.0,
            "messages": [{"role": "user", "content": "def parse(text):"}]}

    async def loop(client: httpx.AsyncClient) -> None:
        while not stop.is_set():
            t0 = time.monotonic()
            try:
                r = await client.post("/v1/chat/completions", json=body)
                status, version = r.status_code, r.headers.get("x-bundle-version")
            except httpx.HTTPError:
                status, version = 0, None
            calls.append(Call(t0, time.monotonic(), status, version))

    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        await asyncio.gather(*(loop(client) for _ in range(n)))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--preset", default="default", choices=("default", "tiny"))
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--deploys", type=int, default=3)
    ap.add_argument("--gap-s", type=float, default=5.0, help="steady traffic between deploys")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md")
    a = ap.parse_args(argv)

    from edge_build.demo import build_demo, cache_dir

    base = cache_dir() / f"bench-deploy-{a.preset}"
    if not (base / "bundle" / MANIFEST).is_file():
        build_demo(base / "bundle", preset=a.preset, work_dir=base / "work")
    key, pub = base / "work" / "signing.key", base / "work" / "signing.pub"
    trusted = [signing.load_public_key(pub)]
    if probe.load_reference(verify_bundle(base / "bundle", trusted)) is None:
        raise SystemExit(f"{base / 'bundle'} has no probe reference: delete it to rebuild")
    work = Path(tempfile.mkdtemp(prefix="bench-deploy-"))
    releases = [release(base / "bundle", work / f"r{i}", key, f"r{i}")
                for i in range(1, a.deploys + 1)]
    sick = release(base / "bundle", work / "sick", key, "sick", sick=True)
    procs = Procs(work)
    op: Operator | None = None
    try:
        _, broker = procs.mosquitto()
        port = free_port()
        conf = work / "edge.toml"
        conf.write_text("[fleet]\ntelemetry_interval_s = 0.5\n"
                        "probe_max_ttft_ms = 10000\n[log]\naccess_log = ''\n")
        daemon = procs.spawn("daemon", [
            *edge_runtime_cmd(), "serve", "--config", str(conf), "--fleet",
            "--fleet-broker", broker, "--fleet-root", str(work / "device"),
            "--device-id", DEVICE, "--bundle", str(base / "bundle"), "--pubkey", str(pub),
            "--port", str(port), "--threads", str(a.threads), "--log-level", "warning"])
        url = f"http://127.0.0.1:{port}"
        model = procs.wait_daemon(daemon, url)
        op = Operator(broker)
        calls: list[Call] = []
        windows: list[dict[str, Any]] = []

        async def run() -> None:
            stop = asyncio.Event()
            load = asyncio.ensure_future(clients(url, model, a.clients, a.max_tokens, stop,
                                                 calls))
            await asyncio.sleep(a.gap_s)
            for i, bundle in enumerate([*releases, sick]):
                sent, done, ack = await asyncio.to_thread(op.deploy, f"d{i}", bundle, pub)
                await asyncio.sleep(1.0)  # telemetry (every 0.5 s) catches up
                windows.append({"release": bundle.name, "state": ack.state,
                                "reason": ack.reason, "start": sent, "end": done,
                                "probe": op.runtime.get("probe")})
                print(f"{bundle.name}: {ack.state} in {done - sent:.2f} s", flush=True)
                await asyncio.sleep(a.gap_s)
            stop.set()
            await load

        asyncio.run(run())
        if not daemon.alive():
            raise SystemExit(f"the daemon died: {tail(daemon.log)}")
    finally:
        if op is not None:
            op.mqtt.stop()
        procs.close()
    return report(a, calls, windows)


def report(a: argparse.Namespace, calls: list[Call], windows: list[dict[str, Any]]) -> int:
    failed = [c for c in calls if c.status != 200]
    inside = [c.end - c.start for c in calls if c.status == 200 and any(
        c.end >= w["start"] and c.start <= w["end"] for w in windows)]
    outside = [c.end - c.start for c in calls if c.status == 200 and not any(
        c.end >= w["start"] and c.start <= w["end"] for w in windows)]
    versions: dict[str, int] = {}
    for c in calls:
        versions[str(c.version)] = versions.get(str(c.version), 0) + 1
    rows = []
    for w in windows:
        p = w["probe"] or {}
        cells = [_num(p.get(k), d) for k, d in (("greedy_match", 3), ("quality_drop", 3),
                                                ("ttft_ms", 1), ("tokens_per_s", 1))]
        rows.append(f"| {w['release']} | {w['state']} | {w['end'] - w['start']:.2f} | "
                    + " | ".join(cells) + " |")
    body = "\n".join([
        f"## Hot deploys under load: {a.preset} demo bundle, {a.clients} clients, CPU",
        "",
        f"Machine: {cpu_model()}, {a.threads} engine threads. Command: `python "
        f"scripts/bench_deploy.py --preset {a.preset} --clients {a.clients} --deploys "
        f"{a.deploys} --gap-s {a.gap_s} --max-tokens {a.max_tokens}`.",
        "",
        f"Requests: {len(calls)}, **failed: {len(failed)}**; served per bundle version: "
        f"{json.dumps(versions, sort_keys=True)}.",
        f"Client latency p50 / p99: {1000 * pct(outside, 50):.0f} / {1000 * pct(outside, 99):.0f} "
        f"ms outside deploys, {1000 * pct(inside, 50):.0f} / {1000 * pct(inside, 99):.0f} ms "
        "for requests overlapping a deploy (load, warm-up and probe run beside serving).",
        "",
        "| release | result | command → final ack (s) | greedy match | quality drop | "
        "probe TTFT (ms) | probe tokens/s |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
        *rows,
        "",
        "`sick` carries another model's probe references (re-signed): it must be rolled back "
        "without serving a request.",
    ])
    print(body)
    if not a.no_write:
        update_section(DOC, MARK, body)
        print(f"wrote {DOC}")
    ok = not failed and windows and windows[-1]["state"] == "rolled_back" and all(
        w["state"] == "active" for w in windows[:-1])
    return 0 if ok else 1


def _num(v: Any, digits: int) -> str:
    return f"{v:.{digits}f}" if isinstance(v, (int, float)) else "–"


if __name__ == "__main__":
    sys.exit(main())
