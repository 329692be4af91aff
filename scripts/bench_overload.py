#!/usr/bin/env python3
"""Overload: p99 latency vs offered load, FIFO (Ollama-like) vs ours (batching + SLO + offload).

    pip install matplotlib        # the plot needs it; it is not a project dependency
    python scripts/bench_overload.py [--workers 1] [--slo-ms MS] [--requests 60]

Everything runs on loopback and is started by this script: its own Mosquitto (free port,
TCP_NODELAY, no persistence), K `edge-runtime cloud-worker` processes (`--workers`, default
1) on the default demo bundle, and one `edge-runtime serve` daemon at a time with a generated
TOML config. All processes are in their own process groups and are stopped on exit.

1. Calibration (daemon with max_batch 4, no offload, no deadline): closed-loop clients at
   concurrency 1, 2, 4. The unloaded latency is the concurrency-1 p95; the SLO defaults
   to 4x it (`--slo-factor`, `--slo-ms`). The device's *capacity* is the highest closed-loop
   throughput (req/s) whose p95 latency stays within the SLO.
2. Open-loop load at 0.5x, 1x, 2x, 4x capacity (`--levels`): Poisson arrivals from a fixed
   seed, at most `--requests` per level and at most `--max-level-s` seconds of arrivals, each
   request a streamed `/v1/completions` (greedy, `--max-tokens`), in two modes:
   - fifo: max_batch 1, huge max_queue and deadline, offload off: requests wait in line.
   - ours: continuous batching (max_batch 4), a deadline of 0.8 x SLO from each request's
     scheduled arrival (`--deadline-margin`; the client sends what is left of it as
     `x-request-deadline-ms`), offload to the cloud workers over MQTT 5.
   Per request: TTFT and latency from the *scheduled* arrival (open loop), `x-served-by`,
   status; 429/503 count as rejected; no answer within `--hard-cap-s` counts as hung.
   Each request asks for one of `--max-tokens` (32 or 96 by default): a table gives local
   and cloud p99 per length, which the scheduler compares per length too.
3. Faults, on the `ours` daemon at `--fault-load` x capacity (overload/faults.py; skip with
   `--no-faults`): the broker is SIGKILLed under load and restarted (time until offload is
   reported unavailable = the breaker opened, until it is available again, until the first
   cloud answer; local requests during the outage must not fail); then one of two cloud
   workers is SIGKILLed mid-request (every request answered, refused or failed explicitly
   within its deadline; counts by outcome).
4. A table in docs/BENCHMARKS.md (between the `bench_overload` markers) and a plot of p99
   latency vs offered load in docs/overload_p99.png (`--no-write` to skip both).

Without pinning the device and the "cloud" share this machine's cores, so the cloud path
is no faster than the device here: the SLO (`--slo-factor` 8 x the unloaded p95 by default)
leaves room for a cloud answer. `--device-cpus 0 --cloud-cpus 1` gives each its own core
(as a deployment would: the cloud is other machines); on this machine that leaves the
daemon's HTTP side, its engine and the load generator fighting over one core, and answers
then end up to ~0.1 s after their deadline, so the default run is unpinned.
Each cloud worker decodes its requests in one continuous batch (`--worker-concurrency`) and
streams them back in chunks (`--chunk-tokens/--chunk-ms`), so the device spends little on
taking the cloud's answers in. Per level the table gives
the share served by the cloud and its p99; the broker phase gives the time from the
broker's restart to the first answer served by the cloud.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import math
import os
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from bench.report import cpu_model, update_section
from overload import faults
from overload.load import Result, Workload, closed_loop, open_loop, pct, summarize
from overload.procs import Proc, Procs, daemon_config, free_port, tail
from overload.report import fault_report, fmt, length_table, plot, table

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "BENCHMARKS.md"
PLOT = ROOT / "docs" / "overload_p99.png"
MARK = "bench_overload"


def _on_signal(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # unwinds into the finally that stops every process


class Bench:
    def __init__(self, args: argparse.Namespace, procs: Procs) -> None:
        self.args = args
        self.procs = procs
        from edge_build.demo import default_bundle

        self.bundle: Path
        self.pubkey: Path
        self.bundle, self.pubkey = (
            (args.bundle, args.pubkey) if args.bundle else default_bundle()
        )
        self.broker = ""
        self.broker_proc: Proc | None = None
        self.workers: list[Proc] = []
        self.log: list[str] = []

    def say(self, msg: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')}] {msg}"
        print(line, flush=True)
        self.log.append(line)

    def daemon(self, name: str, **cfg: Any) -> tuple[Any, str, str]:
        port = free_port()
        toml = daemon_config(bundle=self.bundle, pubkey=self.pubkey,
                             threads=self.args.daemon_threads, **cfg)
        proc = self.procs.daemon(name, toml, port)
        base = f"http://127.0.0.1:{port}"
        model = self.procs.wait_daemon(proc, base)
        return proc, base, model

    def workload(self, base: str, model: str, deadline_ms: float | None) -> Workload:
        return Workload(base, model, tuple(self.args.max_tokens), self.args.hard_cap_s,
                        deadline_ms)

    def fault_phases(self, base: str, model: str, budget_ms: float,
                     capacity: float) -> dict[str, Any]:
        """Kill the broker under load, then one of two cloud workers (overload/faults.py)."""
        a = self.args
        w = self.workload(base, model, budget_ms)
        rate = a.fault_load * capacity
        n = max(a.min_requests, int(rate * a.fault_span_s))
        port = int(self.broker.rsplit(":", 1)[1])

        def kill_broker() -> None:
            assert self.broker_proc is not None
            self.procs.kill(self.broker_proc)

        def restart_broker() -> None:
            self.broker_proc, _ = self.procs.mosquitto(port)

        out: dict[str, Any] = {"rate": rate, "n": n}
        b = out["broker"] = faults.broker_phase(w, rate, n, a.seed + 100, kill_broker,
                                                restart_broker)
        self.say(f"broker phase ({a.fault_load:g}x, n={n}): {b['marks']}, offload recovered "
                 f"{b['offload_recovered_after_s']} s after the restart; during the outage "
                 f"{b['outage']}; local {b['local_during_outage']}")
        while len(self.workers) < 2:  # the worker phase needs two to kill one of
            wp = self.procs.cloud_worker(len(self.workers), self.bundle, self.pubkey,
                                         self.broker, a.worker_concurrency, a.worker_threads,
                                         (a.chunk_tokens, a.chunk_ms))
            self.procs.wait_worker(wp)
            self.workers.append(wp)
        # Before the worker phase: offload available again and the workers back from their
        # own reconnects (paho's backoff) after the broker phase.
        deadline = time.monotonic() + 60
        while not faults.offload_available(base) and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(3.0)
        victim = self.workers.pop(0)
        k = out["worker"] = faults.worker_phase(w, rate, n, a.seed + 200,
                                                lambda: self.procs.kill(victim))
        self.say(f"worker phase ({a.fault_load:g}x, n={n}): {k['marks']}, {k['counts']}; "
                 f"unexplained (lost, hung or past the deadline) {k['unexplained']}"
                 + (f"; late: {k['late']}" if k["late"] else ""))
        return out

    def calibrate(self) -> dict[str, Any]:
        a = self.args
        proc, base, model = self.daemon("daemon-calib", max_batch=4, max_queue=1000,
                                        default_deadline_s=3600.0, broker=None)
        try:
            w = self.workload(base, model, None)
            asyncio.run(closed_loop(w, 1, 3, seed=a.seed))  # warm the HTTP path
            rows = []
            for c, n in ((1, 10), (2, 16), (4, 24)):
                rate, res = asyncio.run(closed_loop(w, c, n, seed=a.seed + c))
                lat = [r.latency_s for r in res if r.outcome == "ok" and r.latency_s]
                rows.append({"concurrency": c, "req_s": rate, "p50_s": pct(lat, 50),
                             "p95_s": pct(lat, 95), "ok": len(lat), "n": n})
                self.say(f"calibration c={c}: {rate:.2f} req/s, p50 {pct(lat, 50):.3f} s, "
                         f"p95 {pct(lat, 95):.3f} s ({len(lat)}/{n} ok)")
        finally:
            self.procs.stop(proc)
        # The unloaded latency of the *longest* requests (concurrency-1 p95): with mixed
        # generation lengths a median is a short request's, and an SLO built on it would be
        # one a long request cannot meet even on an idle device (nor in the cloud).
        unloaded = rows[0]["p95_s"]
        slo_s = a.slo_ms / 1000 if a.slo_ms else math.ceil(a.slo_factor * unloaded * 20) / 20
        eligible = [r for r in rows if r["p95_s"] <= slo_s] or rows[:1]
        best = max(eligible, key=lambda r: r["req_s"])
        self.say(f"unloaded latency {unloaded:.3f} s, SLO {slo_s:.3f} s, capacity "
                 f"{best['req_s']:.2f} req/s (closed loop, concurrency {best['concurrency']})")
        return {"rows": rows, "unloaded_s": unloaded, "slo_s": slo_s,
                "capacity": best["req_s"], "capacity_concurrency": best["concurrency"]}

    def run_levels(self, mode: str, base: str, model: str, deadline_ms: float | None,
                   capacity: float) -> list[dict[str, Any]]:
        a = self.args
        out = []
        for i, mult in enumerate(a.levels):
            rate = mult * capacity
            n = min(a.requests, max(a.min_requests, int(rate * a.max_level_s)))
            t0 = time.perf_counter()
            results: list[Result] = asyncio.run(
                open_loop(self.workload(base, model, deadline_ms), rate, n, seed=a.seed + i)
            )
            s = summarize(results)
            details = sorted({r.detail for r in results
                              if r.outcome in ("error", "lost", "hung", "expired")})
            slowest = sorted((r for r in results if r.outcome == "ok"),
                             key=lambda r: -(r.latency_s or 0.0))[:5]
            row = {"mode": mode, "mult": mult, "rate": rate, "wall_s": time.perf_counter() - t0,
                   **s, "details": details[:5],
                   "slowest": [{"served_by": r.served_by, "latency_s": r.latency_s,
                                "ttft_s": r.ttft_s, "send_lag_s": r.send_lag_s,
                                "max_tokens": r.max_tokens} for r in slowest]}
            out.append(row)
            self.say(
                f"{mode} {mult:g}x ({rate:.2f} req/s, n={n}): ok {s['ok']} (local {s['local']}, "
                f"cloud {s['cloud']}), rejected {s['rejected']}, expired {s['expired']}, "
                f"errors {s['errors']}, lost "
                f"{s['lost']}, hung {s['hung']}; p50/p99 {s['lat_p50']:.2f}/{s['lat_p99']:.2f} s, "
                f"local p99 {s['lat_local_p99']:.2f} s, cloud {100 * s['offload_share']:.0f}% "
                f"p99 {s['lat_cloud_p99']:.2f} s" + (f"; {details[:2]}" if details else "")
            )
            time.sleep(1.0)  # let the last streams close before the next level
        return out


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bundle", type=Path, help="bundle directory (default: the demo bundle)")
    ap.add_argument("--pubkey", type=Path, help="the bundle's public key (PEM)")
    ap.add_argument("--workers", type=int, default=1, help="cloud-worker processes (1)")
    ap.add_argument("--worker-concurrency", type=int, default=4,
                    help="requests each cloud worker decodes together in one batch (4)")
    ap.add_argument("--chunk-tokens", type=int, default=8,
                    help="cloud workers' --chunk-tokens: streamed tokens per message (8)")
    ap.add_argument("--chunk-ms", type=float, default=25.0,
                    help="cloud workers' --chunk-ms: longest a token is held (25)")
    ap.add_argument("--worker-threads", type=int, default=1, help="threads per worker engine (1)")
    ap.add_argument("--daemon-threads", type=int, default=2, help="daemon engine threads (2)")
    ap.add_argument("--slo-ms", type=float, help="latency SLO (default: --slo-factor x unloaded)")
    ap.add_argument("--slo-factor", type=float, default=8.0,
                    help="default SLO = this x the unloaded latency (8: the cloud here is the "
                         "same model on the same cores, no faster than the device; at 4x a "
                         "96-token answer from a busy cloud plus transport cannot fit, and the "
                         "run would measure admission control only)")
    ap.add_argument("--deadline-margin", type=float, default=0.2,
                    help="share of the SLO the client keeps for itself and the network: "
                         "x-request-deadline-ms = SLO x (1 - this) (0.2: the load client, the "
                         "broker and the daemon's HTTP side share the cores here, so an answer "
                         "finished at its deadline can take tens of ms to be read)")
    ap.add_argument("--safety", type=float, default=1.5,
                    help="scheduler.safety of ours (1.5: the cloud workers share the "
                         "device's cores here, so steps under load are slower than measured)")
    ap.add_argument("--levels", type=lambda s: [float(x) for x in s.split(",")],
                    default=[0.5, 1.0, 2.0, 4.0], help="load multiples of capacity (0.5,1,2,4)")
    ap.add_argument("--requests", type=int, default=60, help="max requests per level (60)")
    ap.add_argument("--min-requests", type=int, default=30, help="min requests per level (30)")
    ap.add_argument("--max-level-s", type=float, default=12.0,
                    help="arrivals span at most about this long per level (12 s)")
    ap.add_argument("--max-tokens", type=lambda s: [int(x) for x in s.split(",")],
                    default=[32, 96], help="max_tokens of each request, one of these "
                    "(seeded): the cloud's p99 is compared per length (32,96)")
    ap.add_argument("--fault-load", type=float, default=2.0,
                    help="load (x capacity) of the broker-kill and worker-kill phases (2)")
    ap.add_argument("--fault-span-s", type=float, default=15.0,
                    help="arrivals of each fault phase span about this long; the broker dies "
                         "at 1/4 and returns at 1/2 of it, the worker dies at 1/3 (15 s)")
    ap.add_argument("--no-faults", action="store_true", help="skip the fault phases")
    ap.add_argument("--hard-cap-s", type=float, default=45.0,
                    help="a request with no end after this is hung (45 s)")
    ap.add_argument("--device-cpus", type=_cpus, default=None,
                    help="pin the daemon to these CPUs, e.g. 0 (default: any)")
    ap.add_argument("--cloud-cpus", type=_cpus, default=None,
                    help="pin the cloud workers to these CPUs, e.g. 1: a cloud with cores of "
                    "its own, as in a deployment (default: any, shared with the daemon)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-write", action="store_true", help="print only; leave docs/ alone")
    ap.add_argument("--json", type=Path, help="also write every number to this JSON file")
    args = ap.parse_args(argv)
    if args.bundle and not args.pubkey:
        ap.error("--bundle needs --pubkey")
    return args


def _cpus(text: str) -> set[int]:
    return {int(c) for c in text.split(",") if c.strip()}


def _fmt_cpus(cpus: set[int] | None) -> str:
    return ",".join(map(str, sorted(cpus))) if cpus else "any"


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.no_write:
        import matplotlib  # noqa: F401  (fail before the run, not after it)
    signal.signal(signal.SIGTERM, _on_signal)
    t_start = time.time()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench_overload.") as tmp:
        procs = Procs(Path(tmp), device_cpus=args.device_cpus, cloud_cpus=args.cloud_cpus)
        bench = Bench(args, procs)
        try:
            bench.broker_proc, bench.broker = procs.mosquitto()
            bench.workers = [
                procs.cloud_worker(i, bench.bundle, bench.pubkey, bench.broker,
                                   args.worker_concurrency, args.worker_threads,
                                   (args.chunk_tokens, args.chunk_ms))
                for i in range(args.workers)
            ]
            bench.say(f"mosquitto on {bench.broker}; {args.workers} cloud worker(s) starting")
            for wp in bench.workers:  # loaded before calibrating: loading competes for the CPU
                procs.wait_worker(wp)
            calib = bench.calibrate()
            slo_s, capacity = calib["slo_s"], calib["capacity"]

            proc, base, model = bench.daemon("daemon-fifo", max_batch=1, max_queue=100_000,
                                             default_deadline_s=86_400.0, broker=None)
            rows = bench.run_levels("fifo", base, model, None, capacity)
            procs.stop(proc)

            proc, base, model = bench.daemon(
                "daemon-ours", max_batch=4, max_queue=64, default_deadline_s=slo_s,
                broker=bench.broker, cloud_p99_prior_s=0.5 * slo_s, safety=args.safety,
            )
            budget_ms = slo_s * 1000 * (1 - args.deadline_margin)
            rows += bench.run_levels("ours", base, model, budget_ms, capacity)
            fault = None if args.no_faults else bench.fault_phases(base, model, budget_ms,
                                                                    capacity)
            procs.stop(proc)
            dead = [p.name for p in procs.procs if not p.alive()]
            if dead:
                bench.say(f"processes that died during the run: {dead}")
        except BaseException:
            for p in procs.procs:
                print(f"--- {p.name} log tail ---\n{tail(p.log)}", file=sys.stderr)
            raise
        finally:
            procs.close()
    wall = time.time() - t_start
    load_after = os.getloadavg()

    md = table(rows, slo_s)
    print(md)
    top = max(args.levels)
    at_top = next(r for r in rows if r["mode"] == "ours" and r["mult"] == top)
    fifo_top = next(r for r in rows if r["mode"] == "fifo" and r["mult"] == top)
    ok_local = not math.isnan(at_top["lat_local_p99"]) and at_top["lat_local_p99"] <= slo_s
    verdict = (
        f"At {top:g}x capacity, ours: p99 of locally served requests "
        f"{fmt(at_top['lat_local_p99'])} s {'<=' if ok_local else '>'} SLO {slo_s:.2f} s; "
        f"{at_top['cloud']} of {at_top['n']} served in the cloud (p99 "
        f"{fmt(at_top['lat_cloud_p99'])} s), {at_top['rejected']} rejected "
        f"(429/503), {at_top['expired']} failed explicitly at the deadline, "
        f"{at_top['errors']} errors, {at_top['lost']} lost, {at_top['hung']} hung. "
        f"FIFO: p99 {fmt(fifo_top['lat_p99'])} s, {fifo_top['lost']} lost, "
        f"{fifo_top['hung']} hung."
    )
    print(verdict)
    lengths = length_table(rows)
    print(lengths)
    fault_md = fault_report(fault, slo_s, args) if fault else ""
    print(fault_md)
    if args.json:
        args.json.write_text(json.dumps({"calibration": calib, "rows": rows, "faults": fault,
                                         "log": bench.log}, indent=2, default=str) + "\n")
    if args.no_write:
        return 0

    plot(rows, slo_s, capacity, PLOT)
    shown = [a for a in (argv or sys.argv[1:]) if a != "--json" and a != str(args.json)]
    cmd = "python " + " ".join(["scripts/bench_overload.py", *shown])
    cal = " · ".join(
        f"c={r['concurrency']}: {r['req_s']:.2f} req/s, p95 {r['p95_s']:.2f} s"
        for r in calib["rows"]
    )
    now = dt.datetime.now(dt.timezone.utc)
    body = "\n".join([
        "## Overload: p99 latency vs offered load, FIFO vs batching + SLO + cloud offload",
        "",
        "_Generated by `scripts/bench_overload.py`; do not edit between the markers._",
        "",
        f"- **Command:** `{cmd}` (needs `pip install matplotlib` for the plot)",
        f"- **Date:** {now:%Y-%m-%d %H:%M} UTC (total wall time {wall / 60:.1f} min)",
        f"- **Machine:** {cpu_model()}, {os.cpu_count()} logical cores shared by the load "
        f"generator, the daemon ({args.daemon_threads} engine threads), Mosquitto and "
        f"{args.workers} cloud worker(s) (concurrency {args.worker_concurrency}, "
        f"{args.worker_threads} thread(s) each) — and by other jobs on the machine: load "
        f"average before {load_before[0]:.2f}, after {load_after[0]:.2f}"
        + (f"; daemon pinned to CPU {_fmt_cpus(args.device_cpus)}, cloud workers to CPU "
           f"{_fmt_cpus(args.cloud_cpus)} (a cloud with a core of its own)"
           if args.device_cpus or args.cloud_cpus else ""),
        f"- **Model:** demo bundle (`{bench.bundle}`), int4 ONNX on ONNX Runtime CPU; each "
        f"request a streamed `/v1/completions`, greedy, max_tokens one of "
        f"{', '.join(map(str, args.max_tokens))}, one "
        "of 8 short prompts (seeded)",
        f"- **Calibration** (closed loop, max_batch 4, no deadline): {cal}. Unloaded latency "
        f"{calib['unloaded_s']:.3f} s; **SLO {slo_s:.2f} s** "
        f"({'--slo-ms' if args.slo_ms else f'{args.slo_factor:g}x unloaded'}); **capacity "
        f"{capacity:.2f} req/s** = the best closed-loop throughput with p95 <= SLO",
        f"- **Load:** open loop, Poisson arrivals (seed {args.seed}), per level at most "
        f"{args.requests} requests and about {args.max_level_s:g} s of arrivals (at least "
        f"{args.min_requests}); latency and TTFT count from the scheduled arrival; hard cap "
        f"{args.hard_cap_s:g} s (then *hung*)",
        "- **fifo** = Ollama-like: max_batch 1, max_queue 100000, no deadline, no offload. "
        "**ours** = continuous batching (max_batch 4), max_queue 64, "
        f"`x-request-deadline-ms` = {1 - args.deadline_margin:g} x SLO from each request's "
        "scheduled arrival (the client sends what is left of it when it gets to send; it "
        "keeps the rest of the SLO for the network; latency counts from the scheduled "
        "arrival too), offload over MQTT 5 to the cloud "
        f"worker(s) (`cloud_p99_prior_s` = {0.5 * slo_s:.2f} s until measured; "
        f"`scheduler.safety` = {args.safety:g})",
        "",
        md,
        "",
        f"**{verdict}**",
        "",
        "Rejected = an explicit 429/503 with Retry-After (the scheduler's answer when neither "
        "path can meet the deadline); failed at deadline = the request ended with an explicit "
        "`deadline_exceeded` error (a 504, or an error event once streaming) at its deadline: "
        "an offloaded answer the cloud could not finish in time, or a local generation the "
        "engine loop stopped (in brackets) because the next step would end past it; "
        "errors = other statuses or error events; lost = connection failed "
        "or the stream ended without a finish. Latency "
        "percentiles are over completed requests. Client send lag = scheduled arrival to the "
        "moment the load generator (same machine, same cores) actually sends: time the "
        "daemon never sees, counted in every latency here. "
        + ("The daemon and the cloud workers are pinned to cores of their own (above); "
           "Mosquitto and the load generator run on any core."
           if args.device_cpus or args.cloud_cpus else
           "The cloud workers run on the same two cores as the device, so offloading here "
           "adds capacity only by taking CPU time from the device's own engine."),
        "",
        "![p99 latency vs offered load](overload_p99.png)",
        "",
        "**By generation length** (ours; the scheduler compares a request's remaining "
        "deadline with the cloud's p99 round trip measured for its own length bucket):",
        "",
        lengths,
        "",
        fault_md,
    ])
    update_section(DOC, MARK, body)
    print(f"wrote {DOC} and {PLOT}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
