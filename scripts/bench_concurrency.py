#!/usr/bin/env python3
"""15 concurrent requests against `edge-runtime serve`: the slowest ÷ one request alone, with
max_batch fixed at 4 (before) and chosen by measurement (after: the default configuration).

    python scripts/bench_concurrency.py [--demo-bundle DIR --demo-pubkey PEM] [--no-qwen05]
        [--workdir ~/.cache/edge-bench] [--concurrent 15] [--tokens 32] [--rounds 5]
        [--single 7] [--device cuda] [--no-write]

What is measured (issue #14's scenario): a real daemon (`edge-runtime serve`, uvicorn, the
default configuration apart from the bundle: `[model] bundle` and `pubkeys`; "before" adds
`[scheduler] max_batch = 4`, the former default) on a free loopback port. The official
`openai` client (AsyncOpenAI, no retries: a 429 counts as not answered) sends chat requests
of `--tokens` max tokens, greedy, each with a prompt of its own:

- **alone**: `--single` requests one after the other (after two warm-up requests); the
  median latency is the reference;
- **concurrent**: `--rounds` rounds of `--concurrent` requests sent at once; every latency
  (send → whole response) of every round is kept; p50, p99 (nearest rank) and max ÷ alone.

Also reported: max_batch and what bound it (/metrics `edge_runtime_max_batch{bound}`), the
decode step time per batch size the daemon measured at start-up
(`edge_runtime_capacity_step_seconds`), and the completion tokens per answer (EOS can end an
answer early; alone and concurrent use the same prompts). The client runs on the same
machine as the daemon (as in the issue's measurement): on two cores the 15 clients' JSON work
competes with the daemon's.

Bundles: the demo bundle (`edge-build demo --out DIR`, or the cached default bundle of
`edge-runtime serve`, built on first use) and, unless `--no-qwen05`, the Qwen2-0.5B-shape
int4 fused bundle of scripts/bench_decode.py (random weights; built into `--workdir` by
scripts/bench/artifacts.py if missing, which needs torch). Results are printed and written to
docs/BENCHMARKS.md between the `bench_concurrency` markers (`--no-write` to skip).

`--device cuda` (onnxruntime-gpu installed, CUDA's libraries loadable by the daemon): the same
on ONNX Runtime's CUDA provider, with the Qwen2-0.5B shapes' fused graph in float16 (ONNX
Runtime's CUDA GroupQueryAttention takes float16 only; give a demo bundle built with
`fuse.activations = "float16"` for the same reason); each daemon must log that it loaded its
decoder on CUDAExecutionProvider, else the run stops. Results go between the
`bench_concurrency_gpu` markers, with the GPU's name.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import math
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from bench import artifacts
from bench.report import cpu_model, process_cpu_s, update_section
from overload.procs import Procs, free_port, tail
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "BENCHMARKS.md"
MARK = "bench_concurrency"


@dataclass
class Run:
    bundle: str
    mode: str
    max_batch: int = 0
    bound: str = ""
    step_ms: dict[int, float] = field(default_factory=dict)
    alone: list[float] = field(default_factory=list)
    together: list[float] = field(default_factory=list)
    refused: int = 0
    tokens: list[int] = field(default_factory=list)
    capacity_line: str = ""
    cpu: dict[str, list[float]] = field(default_factory=dict)
    """CPU seconds by who and when: `daemon`/`clients` x `alone`/`round` (one request
    alone; one round of concurrent requests), with `wall_round` the rounds' wall time."""

    def cpu_ms(self, key: str) -> float:
        return 1000 * statistics.median(self.cpu.get(key) or [0.0])

    @property
    def single(self) -> float:
        return statistics.median(self.alone)

    def ratio(self, q: float) -> float:
        return pct(self.together, q) / self.single


def pct(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile."""
    s = sorted(values)
    return s[max(0, math.ceil(q / 100 * len(s)) - 1)]


def config(bundle: Path, pubkey: Path, max_batch: int | None) -> str:
    lines = ["[model]", f'bundle = "{bundle}"', f'pubkeys = ["{pubkey}"]']
    if max_batch is not None:
        lines += ["", "[scheduler]", f"max_batch = {max_batch}"]
    return "\n".join(lines) + "\n"


def scrape(base: str) -> tuple[int, str, dict[int, float]]:
    text = httpx.get(f"{base}/metrics", timeout=10).text
    batch, bound, steps = 0, "", {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == "edge_runtime_max_batch":
                batch, bound = int(s.value), s.labels["bound"]
            elif s.name == "edge_runtime_capacity_step_seconds":
                steps[int(s.labels["batch"])] = 1000 * s.value
    return batch, bound, steps


async def measure(base: str, model: str, run: Run, args: argparse.Namespace,
                  daemon_pid: int) -> None:
    import openai

    def cpu_mark() -> tuple[float, float, float]:
        return process_cpu_s(daemon_pid), process_cpu_s(), time.perf_counter()

    def cpu_note(kind: str, since: tuple[float, float, float], n: int = 1) -> None:
        now = cpu_mark()
        run.cpu.setdefault(f"daemon_{kind}", []).append((now[0] - since[0]) / n)
        run.cpu.setdefault(f"clients_{kind}", []).append((now[1] - since[1]) / n)
        run.cpu.setdefault(f"wall_{kind}", []).append((now[2] - since[2]) / n)

    client = openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0,
                                timeout=120)

    async def ask(i: int) -> float | None:
        t = time.perf_counter()
        try:
            r = await client.chat.completions.create(
                model=model, max_tokens=args.tokens, temperature=0,
                messages=[{"role": "user", "content": f"Tell me a story about robot {i}."}])
        except openai.APIStatusError:
            return None
        if r.usage is not None:
            run.tokens.append(r.usage.completion_tokens)
        return time.perf_counter() - t

    for i in range(2):  # warm-up: first-request costs (connections, lazy imports)
        await ask(i)
    run.tokens.clear()
    mark = cpu_mark()
    for i in range(args.single):
        took = await ask(i % args.concurrent)
        if took is None:
            raise RuntimeError("a request alone was refused")
        run.alone.append(took)
    cpu_note("alone", mark, args.single)
    for _ in range(args.rounds):
        mark = cpu_mark()
        got = await asyncio.gather(*(ask(i) for i in range(args.concurrent)))
        cpu_note("round", mark)
        run.together += [g for g in got if g is not None]
        run.refused += sum(g is None for g in got)
        await asyncio.sleep(0.2)  # rounds do not overlap
    await client.close()


def providers_of(log: str) -> str:
    """The providers the daemon's decoder session got ("loaded PATH with providers [...]")."""
    for line in log.splitlines():
        if "decoder" in line and "with providers " in line:
            return line.split("with providers ", 1)[1].strip()
    return ""


def one(procs: Procs, label: str, bundle: Path, pubkey: Path, mode: str,
        args: argparse.Namespace) -> Run:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    run = Run(label, mode)
    proc = procs.daemon(f"{label.split(maxsplit=1)[0]}-{mode}",
                        config(bundle, pubkey, 4 if mode == "before" else None), port)
    try:
        model = procs.wait_daemon(proc, base, timeout_s=600)
        if args.device == "cuda":
            got = providers_of(tail(proc.log, 1_000_000))
            if not got.startswith("['CUDAExecutionProvider'"):
                raise RuntimeError(f"{label}: the daemon's decoder is not on CUDA: "
                                   f"{got or 'no providers line'}; {tail(proc.log)}")
        run.max_batch, run.bound, run.step_ms = scrape(base)
        asyncio.run(measure(base, model, run, args, proc.popen.pid))
        log = tail(proc.log, 1_000_000)
        run.capacity_line = next((line.split("capacity: ", 1)[1] for line in log.splitlines()
                                  if "capacity: " in line), "")
    finally:
        procs.stop(proc)
    return run


def table(runs: list[Run]) -> str:
    out = ["| bundle | config | max_batch (bound) | alone (median) | p50 ÷ alone | p99 ÷ alone "
           "| max ÷ alone | answered | tokens/answer |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        n = len(r.together) + r.refused
        mode = "before: max_batch = 4" if r.mode == "before" else "after: default"
        out.append(
            f"| {r.bundle} | {mode} | {r.max_batch} ({r.bound}) | {1000 * r.single:.0f} ms "
            f"| {r.ratio(50):.2f}× | **{r.ratio(99):.2f}×** | {max(r.together) / r.single:.2f}× "
            f"| {len(r.together)}/{n} {'yes' if not r.refused else 'NO'} "
            f"| {statistics.mean(r.tokens):.1f} |")
    return "\n".join(out)


def step_at(steps: dict[int, float], n: int) -> float | None:
    """The measured step time at `n` rows, linear between measured sizes (None: beyond)."""
    if n in steps:
        return steps[n]
    lo = max((b for b in steps if b < n), default=None)
    hi = min((b for b in steps if b > n), default=None)
    if lo is None or hi is None:
        return None
    return steps[lo] + (steps[hi] - steps[lo]) * (n - lo) / (hi - lo)


def steps_lines(runs: list[Run], concurrent: int) -> list[str]:
    lines = []
    for r in runs:
        if r.mode == "after" and r.step_ms:
            steps = ", ".join(f"{b}: {v:.2f}" for b, v in sorted(r.step_ms.items()))
            at = step_at(r.step_ms, min(concurrent, r.max_batch))
            floor = (f"; a step of {min(concurrent, r.max_batch)} rows costs "
                     f"{at / r.step_ms[1]:.1f}× a step of one, the engine's own floor for the "
                     f"slowest ÷ alone before any serving cost" if at and 1 in r.step_ms else "")
            lines.append(f"- **{r.bundle}, measured at start-up** (ms per token of one stream "
                         f"by batch size): {steps}{floor}. Start-up log: `capacity: "
                         f"{r.capacity_line}`")
    return lines


def cpu_lines(runs: list[Run], concurrent: int) -> list[str]:
    """Where a round's time goes: the CPU the daemon and the clients (same machine) used."""
    cores = os.cpu_count() or 1
    lines = []
    for r in runs:
        if r.mode != "after" or not r.cpu:
            continue
        wall, dae, cli = r.cpu_ms("wall_round"), r.cpu_ms("daemon_round"), r.cpu_ms("clients_round")
        lines.append(
            f"- **{r.bundle}, CPU per round** (median; {cores} cores = {cores * wall:.0f} ms of "
            f"CPU in a {wall:.0f} ms round): daemon {dae:.0f} ms, the {concurrent} `openai` "
            f"clients {cli:.0f} ms ({100 * cli / max(dae + cli, 1e-9):.0f}% of what both used); "
            f"alone, per request: daemon {r.cpu_ms('daemon_alone'):.1f} ms, client "
            f"{r.cpu_ms('clients_alone'):.1f} ms in {r.cpu_ms('wall_alone'):.1f} ms")
    return lines


def gpu_name() -> str:
    """The GPU's name from nvidia-smi ("" without one)."""
    import subprocess

    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.strip().splitlines()[0] if out.strip() else ""


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    artifacts.add_bundle_args(ap)
    ap.add_argument("--concurrent", type=int, default=15)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--single", type=int, default=7)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    if args.demo_bundle is None:
        from edge_build.demo import default_bundle

        args.demo_bundle, args.demo_pubkey = default_bundle()
    bundles = [("demo bundle", args.demo_bundle.resolve(), args.demo_pubkey.resolve())]
    if not args.no_qwen05:
        work = args.workdir.expanduser().resolve()
        hf = artifacts.build_hf_model(work)
        if args.device == "cuda":
            bundles.append(("Qwen2-0.5B shapes (int4, fused, fp16)",
                            artifacts.build_fused_fp16_bundle(work, hf),
                            work / "keys" / "bench.pub"))
        else:
            bundles.append(("Qwen2-0.5B shapes (int4, fused)",
                            artifacts.build_fused_bundle(work, hf), work / "keys" / "bench.pub"))
    load_before, t0 = os.getloadavg(), time.time()
    runs: list[Run] = []
    with tempfile.TemporaryDirectory(prefix="bench-concurrency-") as tmp:
        procs = Procs(Path(tmp))
        try:
            for label, bundle, pubkey in bundles:
                for mode in ("before", "after"):
                    print(f"{label}: {mode}", flush=True)
                    runs.append(one(procs, label, bundle, pubkey, mode, args))
                    print(table(runs[-1:]), flush=True)
        finally:
            procs.close()
    wall, load_after = time.time() - t0, os.getloadavg()
    text = table(runs)
    print(text)
    print("\n".join(steps_lines(runs, args.concurrent)))
    print("\n".join(cpu_lines(runs, args.concurrent)))
    if args.no_write:
        return 0
    cmd = "python scripts/bench_concurrency.py" + (
        " --no-qwen05" if args.no_qwen05 else "") + "".join(
        f" --{k} {getattr(args, k)}" for k, d in
        (("concurrent", 15), ("tokens", 32), ("rounds", 5), ("single", 7), ("device", "cpu"))
        if getattr(args, k) != d)
    gpu = gpu_name() if args.device == "cuda" else ""
    machine = (f"{gpu} (ONNX Runtime's CUDA provider), host {cpu_model()}, {os.cpu_count()} "
               "logical cores" if gpu else f"{cpu_model()}, {os.cpu_count()} logical cores")
    update_section(DOC, MARK + ("_gpu" if gpu else ""), "\n".join([
        f"## {args.concurrent} concurrent requests: the slowest ÷ one request alone, max_batch "
        "fixed vs measured" + (f" ({gpu})" if gpu else ""),
        "",
        "_Generated by `scripts/bench_concurrency.py`; do not edit between the markers._",
        "",
        f"- **Command:** `{cmd}` (the demo bundle: `edge-runtime serve`'s cached default, "
        "the same as `edge-build demo --out DIR`'s)",
        f"- **Date:** {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC (total wall time "
        f"{wall:.0f} s)",
        f"- **Machine:** {machine}; load average "
        f"{load_before[0]:.2f} before, {load_after[0]:.2f} after (shared with other work); "
        "the `openai` clients run on the same cores as the daemon",
        f"- **Workload:** `edge-runtime serve` with the default configuration apart from the "
        f"bundle (before: plus `scheduler.max_batch = 4`, the former default); chat requests "
        f"of max_tokens {args.tokens}, greedy, a prompt of their own each; alone: median of "
        f"{args.single} sequential requests; concurrent: {args.rounds} rounds of "
        f"{args.concurrent} sent at once (AsyncOpenAI, no retries), every latency kept, "
        "nearest-rank percentiles",
        "",
        text,
        "",
        *steps_lines(runs, args.concurrent),
        *cpu_lines(runs, args.concurrent),
    ]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
