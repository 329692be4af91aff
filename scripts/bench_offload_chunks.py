#!/usr/bin/env python3
"""Token coalescing of the cloud worker: what a streamed cloud answer costs the device.

    python scripts/bench_offload_chunks.py [--settings 1:0,4:25,8:25,16:50] [--n 40]
        [--concurrency 4] [--max-tokens 96] [--bundle DIR --pubkey PEM]

For each `tokens:ms` setting it starts Mosquitto (loopback) and one `edge-runtime
cloud-worker --chunk-tokens T --chunk-ms MS` on the demo bundle (or --bundle), then sends
`--n` streamed completions, `--concurrency` at a time, through the daemon's OffloadClient
(MQTT I/O on this event loop, as in the daemon) and reports per answer: messages, this
process's CPU (what the device pays to take the answer in; the daemon adds an SSE event per
message on top), the worker's CPU, time to the first chunk and to the last, and the gap
between chunks as the device sees it (how "smooth" the stream stays). `1:0` is one message
per token, the behaviour before coalescing. The table also goes to docs/BENCHMARKS.md
between the `bench_offload_chunks` markers (`--no-write` to skip).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import itertools
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.report import cpu_model, process_cpu_s, update_section
from bench_offload_rtt import DOC, pct
from mosquitto_broker import Broker

from edge_runtime.offload.client import OffloadClient

PROMPTS = ("Once upon a time", "The robot arm picks up the red box and", "Hello, kiosk.",
           "Step one of the maintenance procedure is to")


def start_worker(url: str, bundle: Path, pubkey: Path, tokens: int, ms: float,
                 concurrency: int, threads: int) -> subprocess.Popen[str]:
    cmd = [sys.executable, "-c", "import sys; from edge_runtime.cli import main; "
           "sys.exit(main(sys.argv[1:]))", "cloud-worker", "--bundle", str(bundle),
           "--pubkey", str(pubkey), "--broker", url, "--concurrency", str(concurrency),
           "--threads", str(threads), "--chunk-tokens", str(tokens), "--chunk-ms", str(ms),
           "--log-level", "warning"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    if "subscribed" not in proc.stdout.readline():
        proc.kill()
        raise SystemExit("the cloud worker did not start")
    return proc


async def run(url: str, n: int, concurrency: int, max_tokens: int, seed: int,
              worker_pid: int) -> dict[str, float]:
    loop = asyncio.get_running_loop()
    client = OffloadClient(url, "bench")
    client.start(loop=loop)
    rng = random.Random(seed)
    msgs: list[int] = []
    first: list[float] = []
    last: list[float] = []
    gaps: list[float] = []
    tokens: list[int] = []
    try:
        if not await loop.run_in_executor(None, client.mqtt.wait_subscribed, 10.0):
            raise SystemExit("cannot connect to the broker")

        async def one(prompt: str) -> None:
            body = {"model": "m", "prompt": prompt, "max_tokens": max_tokens,
                    "temperature": 0}
            t0 = time.perf_counter()
            times = []
            async for c in client.submit(body, "completions", time.monotonic() + 60):
                times.append(time.perf_counter())
                if c.final:
                    assert c.usage is not None
                    tokens.append(c.usage.completion_tokens)
            msgs.append(len(times))
            first.append(times[0] - t0)
            last.append(times[-1] - t0)
            gaps.extend(b - a for a, b in itertools.pairwise(times))

        for p in PROMPTS[:concurrency]:  # warm-up, not counted
            await one(p)
        for kept in (msgs, first, last, gaps, tokens):
            kept.clear()
        cpu0, wcpu0 = process_cpu_s(), process_cpu_s(worker_pid)
        sem = asyncio.Semaphore(concurrency)

        async def bounded() -> None:
            async with sem:
                await one(rng.choice(PROMPTS))

        await asyncio.gather(*(bounded() for _ in range(n)))
        cpu, wcpu = process_cpu_s() - cpu0, process_cpu_s(worker_pid) - wcpu0
    finally:
        client.stop()
    return {"messages": sum(msgs) / n, "tokens": sum(tokens) / n,
            "device_cpu_ms": cpu / n * 1000, "worker_cpu_ms": wcpu / n * 1000,
            "first_p50_ms": pct(first, 0.5) * 1000, "last_p50_ms": pct(last, 0.5) * 1000,
            "last_p99_ms": pct(last, 0.99) * 1000, "gap_p50_ms": pct(gaps, 0.5) * 1000,
            "gap_max_ms": max(gaps) * 1000 if gaps else 0.0}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--settings", default="1:0,4:25,8:25,16:50",
                    help="tokens:ms pairs to compare (1:0 = one message per token)")
    ap.add_argument("--n", type=int, default=40, help="answers per setting (40)")
    ap.add_argument("--concurrency", type=int, default=4, help="requests at once (4)")
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--threads", type=int, default=1, help="worker engine threads (1)")
    ap.add_argument("--bundle", type=Path)
    ap.add_argument("--pubkey", type=Path)
    ap.add_argument("--no-write", action="store_true", help="print only; leave docs/ alone")
    args = ap.parse_args()
    load_before = os.getloadavg()
    if args.bundle:
        bundle, pubkey = args.bundle, args.pubkey
    else:
        from edge_build.demo import default_bundle
        bundle, pubkey = default_bundle()
    settings = [(int(t), float(m)) for t, m in (x.split(":") for x in args.settings.split(","))]
    print(f"{args.n} streamed completions per setting, {args.concurrency} at a time, "
          f"max_tokens {args.max_tokens}, bundle {bundle}")
    lines = ["| chunk tokens:ms | messages / answer | tokens / answer | device CPU ms / answer "
             "| worker CPU ms / answer | first chunk p50 ms | last chunk p50 / p99 ms "
             "| gap p50 / max ms |", "|---|--:|--:|--:|--:|--:|--:|--:|"]
    print("\n".join(lines))
    with tempfile.TemporaryDirectory() as tmp:
        broker = Broker(Path(tmp), log_types=("error",)).start()
        url = broker.url
        try:
            for tokens, ms in settings:
                w = start_worker(url, bundle, pubkey, tokens, ms, args.concurrency,
                                 args.threads)
                try:
                    r = asyncio.run(run(url, args.n, args.concurrency, args.max_tokens, 0,
                                        w.pid))
                finally:
                    w.terminate()
                    w.wait(10)
                lines.append(f"| {tokens}:{ms:g} | {r['messages']:.1f} | {r['tokens']:.1f} | "
                             f"{r['device_cpu_ms']:.2f} | {r['worker_cpu_ms']:.1f} | "
                             f"{r['first_p50_ms']:.1f} | {r['last_p50_ms']:.0f} / "
                             f"{r['last_p99_ms']:.0f} | {r['gap_p50_ms']:.1f} / "
                             f"{r['gap_max_ms']:.1f} |")
                print(lines[-1], flush=True)
        finally:
            broker.stop(grace_s=10)
    if not args.no_write:
        argv = " ".join(sys.argv[1:])
        update_section(DOC, "bench_offload_chunks", "\n".join([
            "## Offload: token coalescing of streamed cloud answers",
            "",
            "_Generated by `scripts/bench_offload_chunks.py`; do not edit between the "
            "markers._",
            "",
            f"- **Command:** `python scripts/bench_offload_chunks.py{' ' + argv if argv else ''}`",
            f"- **Date:** {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC",
            f"- **Machine:** {cpu_model()}, {os.cpu_count()} logical cores shared by this "
            f"client, Mosquitto and the worker ({args.threads} engine thread(s)); load "
            f"average before {load_before[0]:.2f}",
            f"- **Workload:** {args.n} streamed completions per setting, {args.concurrency} at "
            f"a time, max_tokens {args.max_tokens}, bundle `{bundle}`; the worker is "
            "restarted per setting (`--chunk-tokens T --chunk-ms MS`)",
            "",
            *lines,
            "",
            "Device CPU = what this process (the daemon's OffloadClient on its event loop) "
            "spends taking one answer in; the daemon adds an SSE event per message on top. "
            "`1:0` is one message per token, the behaviour before coalescing; the worker's "
            "default is 8 tokens / 25 ms.",
        ]))
        print(f"wrote {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
