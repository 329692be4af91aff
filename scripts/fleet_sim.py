#!/usr/bin/env python3
"""Fleet simulator: N real device agents on a real Mosquitto, and two staged rollouts.

    python scripts/fleet_sim.py --devices 1000 --procs 4          (writes docs/BENCHMARKS.md)
    python scripts/fleet_sim.py --devices 50 --procs 2 --no-write  (a smoke run)

Everything runs on loopback and is started here: Mosquitto (free port, `max_connections
-1`, its RLIMIT_NOFILE raised to the hard limit), and `--procs` worker processes that each
run their share of the devices as real `DeviceAgent`s (one MQTT connection each, real
bundle slots on disk, the command journal, acks, retained status, Last Will) with the fake
model of scripts/fleetsim/devices.py: signed tiny bundles whose build record says what the
device reports in telemetry and on what share of devices its quality probe fails.

1. **staged**: `edge-fleet deploy` (a subprocess, the real CLI) of a good bundle v2 to the
   whole group, canary 10% then batches of 25%, with the abort rule below. Faults: v2's
   quality probe fails on `--probe-fail-share` of the devices (they roll themselves back),
   and once the canary has passed, `--offline-share` of the devices go offline (their
   agents stop) — the ones in later batches time out after `--ack-timeout`. Both count
   against `--max-failures`; the rollout must complete.
2. **abort**: a bundle v3 whose devices report error_rate 0.08: the canary's soak trips
   the rule, the controller stops and rolls the canary back. Checked from the retained
   statuses: every canary device runs v2 again, and no device outside it got a command.

Per-phase times come from the rollout database's timeline (the controller writes one event
per transition). The table goes between the `fleet_sim` markers of docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import IO, Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import contextlib

from bench.report import cpu_model, update_section
from fleetsim.devices import SharedHost, make_sim_bundle, provision, raise_fd_limit, sim_agent, unit
from mosquitto_broker import Broker

from edge_runtime import signing

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "BENCHMARKS.md"
MARK = "fleet_sim"
RULE = "error_rate>0.02 or ttft_p95_ms>800 or quality_drop>0.05"
GROUP = "sim"
MAX_PER_PROC = 300


# -- worker process: a share of the fleet ---------------------------------------------------


def worker(a: argparse.Namespace) -> int:
    raise_fd_limit()
    threading.stack_size(512 << 10)  # ~3 threads per agent; 8 MiB stacks add up
    trusted = [signing.load_public_key(Path(a.pubkey))]
    devices = [f"dev-{i:05d}" for i in range(a.first, a.first + a.count)]
    # Host telemetry is sampled once for the whole process: a thousand agents each reading
    # /proc every interval would measure the simulator's own cost, not the rollout's.
    host = SharedHost()
    agents = {}
    for d in devices:
        root = Path(a.root) / d
        provision(root, Path(a.v1), trusted)
        agents[d] = sim_agent(d, a.broker, root, trusted, group=GROUP,
                              telemetry_interval_s=a.telemetry_interval, host=host)
        agents[d].start()
    deadline = time.monotonic() + 300
    for agent in agents.values():
        if not agent.mqtt.wait_subscribed(max(0.1, deadline - time.monotonic())):
            print(f"FAILED {agent.device} did not connect", flush=True)
            return 1
    print(f"READY {len(agents)}", flush=True)
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "offline":
            gone = [d for d in devices if unit(d, "offline") < a.offline_share]
            for d in gone:
                agents.pop(d).stop()
            print(f"OFFLINE {len(gone)}", flush=True)
        elif cmd == "quit":
            break
    for agent in agents.values():
        agent.stop()
    return 0


# -- the parent: broker, workers, two rollouts ----------------------------------------------


def start_broker(work: Path) -> Broker:
    """The shared launcher's broker (scripts/mosquitto_broker.py), sized for a fleet: no
    connection cap, deep queues. It inherits our RLIMIT_NOFILE, raised to the hard limit in
    simulate(): one fd per device connection."""
    return Broker(work, extra=["max_connections -1", "max_queued_messages 10000"],
                  own_group=True).start()


def _stop(proc: subprocess.Popen[Any]) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(20)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)


def run_rollout(a: argparse.Namespace, broker: str, db: Path, bundle: Path, pub: Path,
                rid: str, workers: list[subprocess.Popen[str]] | None = None) -> dict[str, Any]:
    """`edge-fleet deploy` as the operator would run it; take devices offline after the
    canary when `workers` is given. Returns exit code, wall time and the status JSON."""
    cmd = [sys.executable, "-m", "edge_runtime.rollout.cli", "--broker", broker, "--db", str(db),
           "deploy", str(bundle), "--group", GROUP, "--canary", a.canary, "--batch", a.batch,
           "--abort-if", RULE, "--soak", str(a.soak), "--ack-timeout", str(a.ack_timeout),
           "--max-failures", a.max_failures, "--pubkey", str(pub), "--id", rid,
           "--discover-wait", "3"]
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert proc.stdout is not None
    offline_sent = False
    for line in proc.stdout:
        print(f"  [{rid}] {line.rstrip()}", flush=True)
        if workers and not offline_sent and " passed " in line and "canary" in line:
            for w in workers:
                _say(w.stdin, "offline")
            offline_sent = True
    code = proc.wait()
    wall = time.monotonic() - t0
    out = subprocess.run([sys.executable, "-m", "edge_runtime.rollout.cli", "--db", str(db),
                          "status", rid, "--json"], capture_output=True, text=True, check=False,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    status = json.loads(out.stdout) if out.returncode == 0 else {}
    return {"code": code, "wall_s": wall, "status": status}


def _say(pipe: IO[str] | None, text: str) -> None:
    assert pipe is not None
    pipe.write(text + "\n")
    pipe.flush()


def phase_rows(status: dict[str, Any]) -> list[dict[str, Any]]:
    """Per phase: devices, deploy time (sent → last final ack or timeout), soak, total."""
    rows: dict[int, dict[str, Any]] = {}
    for e in status.get("events", []):
        rows.setdefault(e["phase"], {}).setdefault(e["kind"], e["ts"])
    counts: dict[int, dict[str, int]] = {}
    for d in status.get("devices", []):
        if d["phase"] >= 0:
            c = counts.setdefault(d["phase"], {})
            c[d["state"]] = c.get(d["state"], 0) + 1
    out = []
    for p in sorted(rows):
        r = rows[p]
        start = r.get("phase")
        end = r.get("passed") or r.get("aborting")
        out.append({
            "name": "canary" if p == 0 else f"batch {p}", "devices": sum(counts.get(p, {}
                                                                               ).values()),
            "counts": counts.get(p, {}),
            "deploy_s": (r["deployed"] - start) if "deployed" in r and start else None,
            "soak_s": (end - r["deployed"]) if end and "deployed" in r else None,
            "total_s": (end - start) if end and start else None,
            "rollback_s": (r["aborted"] - r["aborting"]) if "aborted" in r and "aborting" in r
            else None,
        })
    return out


def _f(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


def markdown(a: argparse.Namespace, staged: dict[str, Any], abort: dict[str, Any],
             checks: dict[str, Any], command: str) -> str:
    lines = [
        "## Fleet rollouts: staged deploy across simulated devices",
        "",
        "_Generated by `scripts/fleet_sim.py`; do not edit between the markers._",
        "",
        f"- **Command:** `{command}`",
        f"- **Date:** {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; **CPU:** "
        f"{cpu_model()}, {os.cpu_count()} logical cores; load average before "
        f"{checks['load_before']:.2f}, after {os.getloadavg()[0]:.2f}",
        f"- **Fleet:** {a.devices} real `DeviceAgent`s in {a.procs} processes, one MQTT "
        f"connection each, on one Mosquitto on loopback; telemetry every "
        f"{a.telemetry_interval:g}s; fake model (signed 4 KiB bundles, health check and "
        "metrics from the bundle's build record), real slots, journal, acks and statuses",
        f"- **Rollout:** canary {a.canary}, batches {a.batch}, soak {a.soak:g}s, ack timeout "
        f"{a.ack_timeout:g}s, max failures {a.max_failures}, `--abort-if \"{RULE}\"`",
        f"- **Faults (staged):** v2's quality probe fails on {a.probe_fail_share:.0%} of the "
        f"devices; {a.offline_share:.0%} of the devices go offline once the canary passed",
        "",
        "| Rollout | Phase | Devices | Outcome | Deploy s | Soak s | Phase s |",
        "|---|---|--:|---|--:|--:|--:|",
    ]
    for name, run in (("staged v1→v2", staged), ("abort (v3 error_rate 0.08)", abort)):
        for r in phase_rows(run["status"]):
            outcome = ", ".join(f"{n} {s}" for s, n in sorted(r["counts"].items(),
                                                               key=lambda x: -x[1]))
            lines.append(f"| {name} | {r['name']} | {r['devices']} | {outcome} | "
                         f"{_f(r['deploy_s'])} | {_f(r['soak_s'])} | {_f(r['total_s'])} |")
    s, b = staged["status"], abort["status"]
    ts = {e["kind"]: e["ts"] for e in reversed(s.get("events", []))}
    span = (ts["completed"] - ts["phase"]) if "completed" in ts and "phase" in ts else None
    lines += [
        "",
        f"- **Staged rollout:** {s.get('state')} in **{_f(span)} s** from the canary's first "
        f"deploy to the last batch's gate ({staged['wall_s']:.1f} s wall for the whole "
        f"`edge-fleet deploy`, bundle check and discovery of the retained statuses included); "
        f"devices "
        f"{', '.join(f'{n} {k}' for k, n in sorted(s.get('counts', {}).items()))}. Batches "
        "with offline devices last at least the ack timeout: the controller waits that long "
        "for a device that will not answer before counting it as failed.",
        f"- **Abort:** {b.get('state')} in {abort['wall_s']:.1f} s: \"{b.get('reason')}\"; "
        f"rollback of the canary took {_f(checks['rollback_s'])} s; canary devices back "
        f"on their previous bundle (retained status): "
        f"{checks['canary_back']}/{checks['canary']}; devices outside the canary that got a "
        f"command: {checks['outside_touched']}.",
        "",
        "Deploy s = first deploy sent to the last device's final ack (or its timeout); soak "
        "s = post-deploy telemetry window until the abort rule was evaluated (the soak, plus "
        "waiting for one post-switch sample from every active device); phase s = both.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="mode")
    w = sub.add_parser("worker")  # internal: one process's share of the fleet
    for name in ("--broker", "--root", "--pubkey", "--v1"):
        w.add_argument(name, required=True)
    w.add_argument("--first", type=int, required=True)
    w.add_argument("--count", type=int, required=True)
    w.add_argument("--offline-share", type=float, default=0.0)
    w.add_argument("--telemetry-interval", type=float, default=2.0)
    p.add_argument("--devices", type=int, default=1000)
    p.add_argument("--procs", type=int, default=4)
    p.add_argument("--canary", default="10%")
    p.add_argument("--batch", default="25%")
    p.add_argument("--soak", type=float, default=5.0)
    p.add_argument("--ack-timeout", type=float, default=20.0)
    p.add_argument("--max-failures", default="10%")
    p.add_argument("--telemetry-interval", type=float, default=2.0)
    p.add_argument("--offline-share", type=float, default=0.02)
    p.add_argument("--probe-fail-share", type=float, default=0.03)
    p.add_argument("--workdir", type=Path, default=None)
    p.add_argument("--no-write", action="store_true", help="do not touch docs/BENCHMARKS.md")
    a = p.parse_args(argv)
    if a.mode == "worker":
        return worker(a)
    return simulate(a, " ".join(["python", "scripts/fleet_sim.py", *(argv or sys.argv[1:])]))


def simulate(a: argparse.Namespace, command: str) -> int:
    raise_fd_limit()
    work = a.workdir or Path(tempfile.mkdtemp(prefix="fleet-sim-"))
    work.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()[0]
    signing.generate_keypair(work / "k.key", work / "k.pub", overwrite=True)
    key = signing.load_private_key(work / "k.key")
    v1 = make_sim_bundle(work / "v1", key, "1")
    v2 = make_sim_bundle(work / "v2", key, "2", fail_share=a.probe_fail_share)
    v3 = make_sim_bundle(work / "v3", key, "3", error_rate=0.08)
    broker_proc = start_broker(work)
    broker = broker_proc.url
    workers: list[subprocess.Popen[str]] = []
    try:
        # paho's network loop uses select(), which cannot watch fd numbers >= 1024 (FD_SETSIZE);
        # an agent holds 3 fds (socket + paho's wake-up pair), so at most ~300 per process.
        procs = max(a.procs, -(-a.devices // MAX_PER_PROC))
        per = -(-a.devices // procs)
        t0 = time.monotonic()
        for i in range(procs):
            first, count = i * per, min(per, a.devices - i * per)
            if count <= 0:
                break
            workers.append(subprocess.Popen(
                [sys.executable, __file__, "worker", "--broker", broker, "--root",
                 str(work / "devices"), "--pubkey", str(work / "k.pub"), "--v1", str(v1),
                 "--first", str(first), "--count", str(count), "--offline-share",
                 str(a.offline_share), "--telemetry-interval", str(a.telemetry_interval)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                start_new_session=True))
        for wp in workers:
            assert wp.stdout is not None
            line = wp.stdout.readline().strip()
            if not line.startswith("READY"):
                raise RuntimeError(f"a worker failed to start: {line!r}")
        print(f"{a.devices} devices up in {time.monotonic() - t0:.1f}s "
              f"({len(workers)} processes), broker {broker}", flush=True)
        db = work / "rollouts.db"
        staged = run_rollout(a, broker, db, v2, work / "k.pub", "sim-staged", workers)
        abort = run_rollout(a, broker, db, v3, work / "k.pub", "sim-abort")
        a.procs = len(workers)
        checks = check_abort(abort["status"], broker, a)
        checks["load_before"] = load_before
        table = markdown(a, staged, abort, checks, command)
        print("\n" + table, flush=True)
        ok = (staged["status"].get("state") == "completed"
              and abort["status"].get("state") == "aborted"
              and checks["canary_back"] == checks["canary"] and checks["outside_touched"] == 0)
        if not a.no_write:
            update_section(DOC, MARK, table)
            print(f"wrote the {MARK} section of {DOC}")
        return 0 if ok else 1
    finally:
        for wp in workers:
            with contextlib.suppress(BrokenPipeError, OSError):
                _say(wp.stdin, "quit")
        for wp in workers:
            try:
                wp.wait(60)
            except subprocess.TimeoutExpired:
                _stop(wp)
        broker_proc.stop(grace_s=20)
        if a.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


def check_abort(status: dict[str, Any], broker: str, a: argparse.Namespace) -> dict[str, Any]:
    """From the retained statuses: is every canary device back on its previous bundle?"""
    from edge_runtime.rollout.cli import read_statuses

    statuses = read_statuses(broker, wait_s=3.0)
    canary = [d for d in status.get("devices", []) if d["phase"] == 0]
    back = sum(1 for d in canary if statuses.get(d["device"], {}).get("bundle") == d["before"])
    outside = sum(1 for d in status.get("devices", [])
                  if d["phase"] != 0 and d["state"] != "pending" and d["state"] != "skipped")
    rows = phase_rows(status) if status else []
    return {"canary": len(canary), "canary_back": back, "outside_touched": outside,
            "rollback_s": rows[0]["rollback_s"] if rows else None}


if __name__ == "__main__":
    sys.exit(main())
