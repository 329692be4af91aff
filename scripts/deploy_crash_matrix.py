#!/usr/bin/env python3
"""kill -9 of the device agent at every deploy stage, N times each: count inconsistent states.

    python scripts/deploy_crash_matrix.py --runs 10 [--size-mb 8] [--points all] [--json F]

One run = one crash point × one fresh device:
  1. a device root serving bundle v1 (synthetic, signed: slots never look inside a graph);
  2. the agent as a real process (`python -m edge_runtime.fleet.agent_process --health verify`)
     with EDGE_FLEET_CRASH_AT=<point>, connected to a real, persistent Mosquitto;
  3. a deploy command for bundle v2 as an http URL (a real HTTP server with Range, here);
  4. the agent prints `PAUSED <point>` there and gets SIGKILL;
  5. check A — what a restart serves: `Slots.recover()` leaves a whole, verified bundle,
     v1 or v2, and no staging leftovers;
  6. the agent restarts (no crash point) and resumes the command from its journal;
  7. check B — exactly once: one `received` ack, one final ack (not a duplicate), and it
     is `active` with v2 verified; the download was resumed with Range when it was cut.
A run that fails any check counts as inconsistent; the table has stage × runs × that count.

Uses the shared broker launcher (scripts/mosquitto_broker.py) and the test suite's HTTP
helpers (tests/http_fixtures.py);
needs `mosquitto` on PATH. The smoke run: `--runs 1` (about 3 s per run on 2 cores).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from bundle_fixtures import make_bundle  # noqa: E402
from http_fixtures import RangeServer  # noqa: E402
from mosquitto_broker import Broker  # noqa: E402

from edge_runtime import signing  # noqa: E402
from edge_runtime.bundle.manifest import verify_bundle  # noqa: E402
from edge_runtime.fleet.messages import Ack, Command  # noqa: E402
from edge_runtime.fleet.slots import Slots  # noqa: E402
from edge_runtime.mqtt import topics  # noqa: E402
from edge_runtime.mqtt.client import Message, MqttClient  # noqa: E402

STAGES: dict[str, list[str]] = {
    "download": ["download:partial"],
    "verify": ["download:verified", "stage:verified"],
    "stage": ["stage:copying", "stage:copied", "stage:renamed"],
    "switch": ["activate:tmp", "activate:done"],
    "health check": ["agent:checking"],
    "commit": ["commit:tmp", "commit:done"],
}


@dataclass
class Outcome:
    stage: str
    point: str
    runs: int = 0
    inconsistent: int = 0
    resumed: int = 0
    failures: list[str] = field(default_factory=list)


class Acks:
    """Every ack of every device, from one persistent-session subscriber."""

    def __init__(self, url: str) -> None:
        self.acks: list[tuple[str, Ack]] = []
        self._cv = threading.Condition()
        self.mqtt = MqttClient(url, "crash-matrix", clean_start=False, session_expiry_s=3600,
                               reconnect_min_s=0.1, reconnect_max_s=1.0)
        self.mqtt.subscribe("fleet/+/cmd/ack", self._on)
        self.mqtt.start(10)
        if not self.mqtt.wait_subscribed(10):
            raise RuntimeError(f"cannot subscribe at {url}")

    def _on(self, m: Message) -> None:
        with self._cv:
            self.acks.append((topics.device_of(m.topic), Ack.from_json(m.payload)))
            self._cv.notify_all()

    def of(self, device: str) -> list[Ack]:
        with self._cv:
            return [a for d, a in self.acks if d == device]

    def wait(self, pred: Callable[[], bool], timeout_s: float) -> bool:
        with self._cv:
            return self._cv.wait_for(pred, timeout_s)


class Matrix:
    def __init__(self, work: Path, size: int) -> None:
        self.work = work
        self.key, self.pub = work / "k.key", work / "k.pub"
        signing.generate_keypair(self.key, self.pub)
        self.trusted = [signing.load_public_key(self.pub)]
        self.signer = signing.key_id(self.trusted[0])
        v1 = make_bundle(work / "b1", self.key, "1", size)
        v2 = make_bundle(work / "b2", self.key, "2", size)
        self.tar = work / "b2.tar"
        with tarfile.open(self.tar, "w") as tf:
            tf.add(v2, arcname="bundle")
        self.tar_bytes = self.tar.read_bytes()
        self.sha = hashlib.sha256(self.tar_bytes).hexdigest()
        self.template = work / "template"
        slots = Slots(self.template / "slots", self.trusted)
        slots.activate(slots.stage(v1))
        slots.commit()
        (work / "broker").mkdir()
        self.broker = Broker(work / "broker", persistence=True)
        self.broker.start()
        self.acks = Acks(self.broker.url)
        self.http = RangeServer({"/b2.tar": self.tar_bytes}, delay_s=0.002).__enter__()
        self.n = 0

    def close(self) -> None:
        self.acks.mqtt.stop()
        self.http.__exit__(None, None, None)
        self.broker.stop()

    def agent(self, root: Path, device: str, crash_at: str | None) -> subprocess.Popen[str]:
        env = {k: v for k, v in os.environ.items() if k != "EDGE_FLEET_CRASH_AT"}
        if crash_at:
            env["EDGE_FLEET_CRASH_AT"] = crash_at
        return subprocess.Popen(
            [sys.executable, "-m", "edge_runtime.fleet.agent_process", "--root", str(root),
             "--device", device, "--broker", self.broker.url, "--pubkey", str(self.pub),
             "--health", "verify", "--telemetry-s", "3600"],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)

    def run(self, point: str) -> tuple[list[str], bool]:
        """One crash-and-recover run; returns (what was inconsistent, resumed a download)."""
        self.n += 1
        device, cid = f"dev-{self.n}", f"deploy-{self.n}"
        root = self.work / device
        shutil.copytree(self.template, root)
        bad: list[str] = []
        proc = self.agent(root, device, point)
        try:
            if _read_until(proc, "READY", 60) is None:
                return [f"agent {device} never came up"], False
            cmd = Command(cid, "deploy", {"bundle": self.http.url("/b2.tar"), "sha256": self.sha,
                                          "signer": self.signer, "size": len(self.tar_bytes)})
            before = len(self.http.requests)
            self.acks.mqtt.publish(topics.fleet_cmd(device), cmd.to_json(), wait_s=5)
            if _read_until(proc, f"PAUSED {point}", 60) is None:
                return [f"never reached {point}"], False
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
        # A: what the device serves after the crash.
        slots = Slots(root / "slots", self.trusted)
        active = slots.recover()
        try:
            if active is None:
                bad.append("no active bundle after the crash")
            elif verify_bundle(slots.path(active), self.trusted).manifest.version not in ("1", "2"):
                bad.append(f"active {active} is neither v1 nor v2")
        except Exception as e:
            bad.append(f"active bundle does not verify: {e}")
        if [p.name for p in slots.bundles.iterdir() if p.name.startswith(".")]:
            bad.append("staging leftovers after recover")
        # B: restart, resume, exactly once.
        proc = self.agent(root, device, None)
        try:
            if not self.acks.wait(lambda: any(a.final for a in self.acks.of(device)
                                              if a.id == cid), 60):
                bad.append("no final ack after the restart")
            time.sleep(0.2)  # a second final, if there were one, would arrive by now
        finally:
            proc.terminate()
            proc.wait(10)
        acks = [a for a in self.acks.of(device) if a.id == cid]
        finals = [a for a in acks if a.final and not a.duplicate]
        if [a.state for a in acks].count("received") != 1:
            bad.append(f"{[a.state for a in acks].count('received')} received acks")
        if len(finals) != 1:
            bad.append(f"{len(finals)} final acks: {[a.state for a in finals]}")
        elif finals[0].state != "active":
            bad.append(f"final {finals[0].state}: {finals[0].reason}")
        slots = Slots(root / "slots", self.trusted)
        st = slots.state()
        v = verify_bundle(slots.path(st["active"]), self.trusted).manifest.version \
            if st["active"] else None
        if v != "2" or not st["confirmed"]:
            bad.append(f"after the command: active v{v}, confirmed={st['confirmed']}")
        resumed = any(r is not None and r != "bytes=0-"
                      for _, r in self.http.requests[before:])
        if point == "download:partial" and not resumed:
            bad.append("the download restarted from zero instead of resuming")
        shutil.rmtree(root, ignore_errors=True)
        return bad, resumed


def _read_until(proc: subprocess.Popen[str], line: str, timeout_s: float) -> str | None:
    """Read the agent's stdout until `line` (on a thread: readline has no timeout)."""
    found: list[str] = []

    def read() -> None:
        assert proc.stdout is not None
        for got in proc.stdout:
            if got.strip() == line:
                found.append(got)
                return

    t = threading.Thread(target=read, daemon=True)
    t.start()
    t.join(timeout_s)
    return found[0] if found else None


def run_matrix(runs: int, size: int, points: list[str] | None = None,
               progress: Callable[[str], None] = print) -> list[Outcome]:
    outcomes = [Outcome(stage, p) for stage, ps in STAGES.items() for p in ps
                if points is None or p in points or stage in points]
    with tempfile.TemporaryDirectory(prefix="crash-matrix-") as tmp:
        m = Matrix(Path(tmp), size)
        try:
            for o in outcomes:
                for i in range(runs):
                    bad, resumed = m.run(o.point)
                    o.runs += 1
                    o.resumed += resumed
                    if bad:
                        o.inconsistent += 1
                        o.failures.append("; ".join(bad))
                    progress(f"{o.stage:>12} {o.point:<18} run {i + 1}/{runs}: "
                             f"{'INCONSISTENT ' + '; '.join(bad) if bad else 'ok'}")
        finally:
            m.close()
    return outcomes


def table(outcomes: list[Outcome]) -> str:
    rows = ["| stage | kill -9 at | runs | inconsistent | download resumed |",
            "| --- | --- | ---: | ---: | ---: |"]
    for o in outcomes:
        rows.append(f"| {o.stage} | `{o.point}` | {o.runs} | {o.inconsistent} | "
                    f"{o.resumed if o.point.startswith('download') else '-'} |")
    total = sum(o.runs for o in outcomes), sum(o.inconsistent for o in outcomes)
    rows.append(f"| **all** | | {total[0]} | {total[1]} | |")
    return "\n".join(rows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=10, help="runs per crash point")
    ap.add_argument("--size-mb", type=float, default=8.0, help="size of each bundle's graph")
    ap.add_argument("--points", default="all",
                    help="comma-separated crash points or stage names (default: all)")
    ap.add_argument("--json", type=Path, help="also write the outcomes here")
    args = ap.parse_args()
    points = None if args.points == "all" else [p.strip() for p in args.points.split(",")]
    outcomes = run_matrix(args.runs, int(args.size_mb * (1 << 20)), points)
    print()
    print(table(outcomes))
    if args.json:
        args.json.write_text(json.dumps([o.__dict__ for o in outcomes], indent=2) + "\n")
    return 1 if any(o.inconsistent for o in outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())
