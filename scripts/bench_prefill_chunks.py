#!/usr/bin/env python3
"""Chunked prefill: how long a long prompt stalls the streams already decoding.

    python scripts/bench_prefill_chunks.py [--prompt-tokens 1024] [--chunks 0,512,256,128,64]
        [--bundle DIR --pubkey PEM | --qwen05] [--threads 2] [--repeats 3]

What is measured: three streams decode together in one `BatchDecoder` (greedy, EOS
ignored). Then a prompt of `--prompt-tokens` tokens arrives (`add`), and the loop keeps
stepping until it has its first token. For each `prefill_chunk` setting (0 = the whole prompt
in one engine run), the script records:
- **stall**: the longest time the running streams wait between two of their tokens.
- **their tokens**: how many tokens they got while the long prompt prefilled.
- **TTFT**: the long prompt's time to first token.
- **step**: the decode step time before it arrived, for reference.

Medians are taken over `--repeats` runs, with the settings interleaved. The Qwen2-0.5B-shape
bundle (`--qwen05`, the default; built by scripts/bench_decode.py's artifacts into
~/.cache/edge-bench if missing) is the case where it matters on a CPU. The served demo model
prefills 1,000 tokens in milliseconds.

Results go to docs/BENCHMARKS.md between the `bench_prefill_chunks` markers (`--no-write`
to skip), and a timeline plot of the running streams' token gaps to
docs/prefill_chunks.png (needs matplotlib).
"""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
import os
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.report import cpu_model, update_section
from bench_batching import PROMPTS, load_generator

from edge_runtime.model.generator import Generator
from edge_runtime.model.sampling import SamplingParams

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "BENCHMARKS.md"
PLOT = ROOT / "docs" / "prefill_chunks.png"
MARK = "bench_prefill_chunks"
RUNNING = 3


def long_prompt(gen: Generator, tokens: int) -> list[int]:
    """`tokens` ids of ordinary text (this script's own source, repeated as needed)."""
    text = Path(__file__).read_text()
    ids: list[int] = []
    while len(ids) < tokens:
        ids += gen.text_prompt(text)
    return ids[:tokens]


def one_run(gen: Generator, chunk: int, long_ids: Sequence[int]) -> dict[str, Any]:
    """Three streams decode; the long prompt arrives; step until it has its first token."""
    params = SamplingParams(max_tokens=gen.context_length - len(long_ids) - 1, temperature=0.0)
    short = SamplingParams(max_tokens=400, temperature=0.0)
    dec = gen.batch(RUNNING + 1, chunk)
    for i, p in enumerate(PROMPTS[:RUNNING]):
        dec.add(i, gen.text_prompt(p), short)
    while dec.prefilling:
        dec.step()
    ticks = []  # when the running streams got a token
    for _ in range(8):  # warm, and the step time before the long prompt comes
        dec.step()
        ticks.append(time.perf_counter())
    step_s = statistics.median(b - a for a, b in itertools.pairwise(ticks[-5:]))
    arrive = time.perf_counter()
    got = dec.add("long", list(long_ids), params)
    first = time.perf_counter() if got or "long" not in dec.keys else None
    times = [ticks[-1]]  # the running streams' token times, from the last one before
    while True:  # at least one step: the running streams' next token comes after add()
        out = dec.step()
        now = time.perf_counter()
        times.append(now)
        if first is None and "long" in out:  # its prefill ended in this step
            first = now
        if first is not None:
            break
    gaps = [b - a for a, b in itertools.pairwise(times)]
    return {
        "stall_s": max(gaps),
        "their_tokens": len(gaps),
        "ttft_s": first - arrive,
        "step_s": step_s,
        "timeline": [(t - arrive, g) for t, g in zip(times[1:], gaps, strict=True)],
    }


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bundle", type=Path, help="bundle directory (default: --qwen05)")
    ap.add_argument("--pubkey", type=Path)
    ap.add_argument("--workdir", type=Path, default=Path("~/.cache/edge-bench"))
    ap.add_argument("--prompt-tokens", type=int, default=1024)
    ap.add_argument("--chunks", default="0,512,256,128,64")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    chunks = [int(c) for c in args.chunks.split(",")]
    if args.bundle is None:
        from bench import artifacts

        work = args.workdir.expanduser().resolve()
        bundle, pubkey = artifacts.build_bundle(work, artifacts.build_hf_model(work)), \
            work / "keys" / "bench.pub"
        label = "Qwen2-0.5B shapes, exported int4 graph (random weights)"
    else:
        bundle, pubkey, label = args.bundle, args.pubkey, str(args.bundle)
    gen, _ = load_generator(bundle, pubkey, args.threads)
    if args.prompt_tokens + 2 > gen.context_length:
        ap.error(f"--prompt-tokens {args.prompt_tokens} does not fit the context "
                 f"({gen.context_length})")
    long_ids = long_prompt(gen, args.prompt_tokens)
    gen.warmup()
    load_before = os.getloadavg()
    t0 = time.time()
    runs: dict[int, list[dict[str, Any]]] = {c: [] for c in chunks}
    for r in range(args.repeats):
        for c in chunks:
            runs[c].append(one_run(gen, c, long_ids))
            print(f"run {r + 1}/{args.repeats} chunk {c or 'off'}: stall "
                  f"{runs[c][-1]['stall_s'] * 1e3:.0f} ms, TTFT "
                  f"{runs[c][-1]['ttft_s'] * 1e3:.0f} ms", flush=True)
    wall = time.time() - t0
    rows = []
    for c in chunks:
        med = {k: statistics.median(x[k] for x in runs[c])
               for k in ("stall_s", "their_tokens", "ttft_s", "step_s")}
        rows.append({"chunk": c, **med})
    table = ["| prefill_chunk | Longest wait of a running stream | Their tokens meanwhile "
             "| Long prompt's TTFT | Decode step before |", "|--:|--:|--:|--:|--:|"]
    base_ttft = rows[0]["ttft_s"] if chunks[0] == 0 else None
    for row in rows:
        ttft = f"{row['ttft_s'] * 1e3:.0f} ms"
        if base_ttft:
            ttft += f" ({row['ttft_s'] / base_ttft:.2f}x)"
        table.append(f"| {row['chunk'] or 'off (whole prompt)'} | {row['stall_s'] * 1e3:.0f} ms "
                     f"| {row['their_tokens']:.0f} | {ttft} | {row['step_s'] * 1e3:.1f} ms |")
    text = "\n".join(table)
    print(text)
    if args.no_write:
        return 0
    plotted = plot(runs, chunks, args.prompt_tokens)
    cmd = "python scripts/bench_prefill_chunks.py" + (
        f" --prompt-tokens {args.prompt_tokens}" if args.prompt_tokens != 1024 else "") + (
        f" --chunks {args.chunks}" if args.chunks != "0,512,256,128,64" else "") + (
        f" --repeats {args.repeats}" if args.repeats != 3 else "")
    update_section(DOC, MARK, "\n".join([
        "## Chunked prefill: a long prompt arriving while streams decode",
        "",
        "_Generated by `scripts/bench_prefill_chunks.py`; do not edit between the markers._",
        "",
        f"- **Command:** `{cmd}`",
        f"- **Date:** {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC (total wall time "
        f"{wall:.0f} s)",
        f"- **Machine:** {cpu_model()}, {os.cpu_count()} logical cores, engine threads "
        f"{args.threads}; load average before {load_before[0]:.2f}",
        f"- **Model:** {label}; ONNX Runtime on CPU",
        f"- **Workload:** {RUNNING} streams decode together (greedy); a {args.prompt_tokens}-"
        "token prompt joins (`BatchDecoder.add`); the loop steps until it has its first "
        f"token; median of {args.repeats} runs, settings interleaved",
        "",
        text,
        "",
        "Longest wait = the longest gap between two tokens of a running stream from the "
        "moment the long prompt arrived until its first token (without chunking, that is its "
        "whole prefill). The daemon's default is `scheduler.prefill_chunk = 128`."
        + (" The token gaps over time:\n\n![token gaps of the running streams]"
           "(prefill_chunks.png)" if plotted else ""),
    ]))
    print(f"wrote {DOC}" + (f" and {PLOT}" if plotted else ""))
    return 0


def plot(runs: dict[int, list[dict[str, Any]]], chunks: Sequence[int], tokens: int) -> bool:
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for c in chunks:
        run = sorted(runs[c], key=lambda r: r["stall_s"])[len(runs[c]) // 2]  # the median
        ax.step([t for t, _ in run["timeline"]], [g * 1e3 for _, g in run["timeline"]],
                where="pre", marker=".", label=f"prefill_chunk {c or 'off'}")
    ax.set_xlabel(f"seconds since a {tokens}-token prompt arrived")
    ax.set_ylabel("wait for the next token of a running stream, ms")
    ax.set_yscale("log")
    ax.set_title("Running streams while a long prompt prefills (until its first token)")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(PLOT, dpi=110)
    plt.close(fig)
    return True


if __name__ == "__main__":
    raise SystemExit(main())
