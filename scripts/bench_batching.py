#!/usr/bin/env python3
"""Continuous batching: aggregate decode tokens/s of 1, 2 and 4 concurrent greedy streams.

    python scripts/bench_batching.py [--bundle DIR --pubkey PEM] [--threads 2] [--tokens 128]
    python scripts/bench_batching.py --qwen05 [--workdir ~/.cache/edge-bench]

What is measured: the streams are decoded together by one `BatchDecoder`
(`Generator.batch(4)`, edge_runtime/batching.py) on one CPU engine with `--threads` intra-op
threads. Each stream has its own prompt (different lengths, so the batch cache is really
left-padded). All sequences are prefilled and joined first; then the clock runs over the
`step()` loop only, until every stream has produced `--tokens` tokens (EOS ignored, so every
stream has the same length). Aggregate decode tokens/s = tokens produced by the steps /
wall time of the steps; the median of `--repeats` runs (stream counts interleaved)
is reported. Every stream's token ids
are compared with a single-stream greedy `Generator.generate` of the same prompt: batching
must not change a single token.

The issue's bar: 4 streams give >= 2.5x the aggregate tokens/s of one stream. Without
`--bundle` the default demo bundle is used (built once, then cached in
~/.cache/edge-runtime/demo). `--qwen05` measures, one after the other, the two Qwen2-0.5B-shape
bundles of scripts/bench_decode.py (random weights; built through our pipeline into
`--workdir` if missing): the exported graph (left-padded batches) and its
GroupQueryAttention fusion (right-padded batches). Results are printed and written to
docs/BENCHMARKS.md between the `bench_batching` markers (`--no-write` to skip).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import os
import platform
import statistics
import time
from collections.abc import Hashable, Sequence
from pathlib import Path
from typing import Any

from bench.report import update_section

from edge_runtime.bundle import verify_bundle
from edge_runtime.generator import Generator
from edge_runtime.sampling import SamplingParams
from edge_runtime.signing import trusted_keys

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "BENCHMARKS.md"
MARK = "bench_batching"
PROMPTS = (
    "The robot arm picks up the red box and",
    "Once upon a time",
    "In the factory cell, the inspection camera reports that the weld seam on part",
    "Hello, kiosk. Please tell me",
)
STREAMS = (1, 2, 4)


def load_generator(bundle_dir: Path | None, pubkey: Path | None, threads: int) -> Generator:
    """The bundle's generator on the CPU engine, with EOS ignored (fixed-length streams)."""
    if bundle_dir is None:
        from edge_build.demo import default_bundle

        bundle_dir, pubkey = default_bundle()
    bundle = verify_bundle(bundle_dir, trusted_keys([pubkey] if pubkey else None))
    gen = Generator.from_bundle(bundle, backend="auto", threads=threads)
    no_eos = dataclasses.replace(gen.defaults, eos_token_ids=[])
    return Generator(gen.engine, gen.graph, gen.tokenizer, no_eos)


def run_batch(
    gen: Generator, prompts: Sequence[list[int]], tokens: int
) -> tuple[float, int, dict[Hashable, list[int]]]:
    """(decode seconds, tokens produced by steps, token ids per stream)."""
    params = SamplingParams(max_tokens=tokens, temperature=0.0)
    dec = gen.batch(max(len(prompts), 1))
    ids: dict[Hashable, list[int]] = {}
    for i, p in enumerate(prompts):
        ids[i] = [t for c in dec.add(i, p, params) for t in c.token_ids]
    before = sum(len(v) for v in ids.values())
    t0 = time.perf_counter()
    while dec.active:
        for key, chunks in dec.step().items():
            ids[key].extend(t for c in chunks for t in c.token_ids)
    elapsed = time.perf_counter() - t0
    produced = sum(len(v) for v in ids.values()) - before
    return elapsed, produced, ids


def measure(gen: Generator, tokens: int, repeats: int) -> list[dict[str, Any]]:
    """Rows for 1/2/4 streams: median aggregate tok/s, runs, ratio, identical tokens."""
    prompts = [gen.text_prompt(p) for p in PROMPTS]
    gen.warmup()
    # Reference: each prompt alone, greedy, through the single-stream path.
    params = SamplingParams(max_tokens=tokens, temperature=0.0)
    reference = [gen.generate(p, params).token_ids for p in prompts]
    # Stream counts interleaved within each repeat, so that a change in the machine's load
    # hits all of them alike; the median per count is reported.
    runs: dict[int, list[float]] = {n: [] for n in STREAMS}
    identical = {n: True for n in STREAMS}
    for _ in range(repeats):
        for n in STREAMS:
            secs, produced, ids = run_batch(gen, prompts[:n], tokens)
            runs[n].append(produced / secs)
            identical[n] &= all(ids[i] == reference[i] for i in range(n))
    rows: list[dict[str, Any]] = []
    for n in STREAMS:
        med = statistics.median(runs[n])
        rows.append({"streams": n, "tok_s": med, "runs": runs[n], "per_stream_tok_s": med / n,
                     "identical": identical[n]})
    for r in rows:
        r["ratio"] = r["tok_s"] / rows[0]["tok_s"]
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bundle", type=Path, help="bundle directory (default: the demo bundle)")
    ap.add_argument("--pubkey", type=Path, help="the bundle's public key (PEM)")
    ap.add_argument("--qwen05", action="store_true",
                    help="the Qwen2-0.5B-shape bundles, exported and fused (bench_decode's)")
    ap.add_argument("--workdir", type=Path, default=Path("~/.cache/edge-bench"),
                    help="bench_decode's artifact cache (for --qwen05)")
    ap.add_argument("--threads", type=int, default=2, help="CPU engine threads (2)")
    ap.add_argument("--tokens", type=int, default=128, help="tokens per stream (128)")
    ap.add_argument("--repeats", type=int, default=7, help="runs per stream count; median (7)")
    ap.add_argument("--no-write", action="store_true", help="print only; leave docs/ alone")
    args = ap.parse_args(argv)

    t_start = time.time()
    load_before = os.getloadavg()
    targets: list[tuple[str, Path | None, Path | None]]
    if args.qwen05:
        from bench import artifacts

        work = args.workdir.expanduser().resolve()
        hf = artifacts.build_hf_model(work)
        key = work / "keys" / "bench.pub"
        targets = [
            ("Qwen2-0.5B shapes, exported graph", artifacts.build_bundle(work, hf), key),
            ("Qwen2-0.5B shapes, fused GQA graph", artifacts.build_fused_bundle(work, hf), key),
        ]
    else:
        targets = [(str(args.bundle) if args.bundle else "default demo bundle", args.bundle,
                    args.pubkey)]
    results: list[tuple[str, Generator, list[dict[str, Any]]]] = []
    for label, bundle_dir, pubkey in targets:
        gen = load_generator(bundle_dir, pubkey, args.threads)
        results.append((label, gen, measure(gen, args.tokens, args.repeats)))
    load_after = os.getloadavg()
    wall = time.time() - t_start

    header = ("| Model | Streams | Aggregate decode tok/s | Per stream tok/s | vs 1 stream "
              "| Tokens = single-stream greedy |")
    lines = [header, "|:--|--:|--:|--:|--:|:-:|"]
    verdicts = []
    for label, gen, rows in results:
        padding = "right" if gen.graph.right_padded_batch else "left"
        for r in rows:
            lines.append(
                f"| {label} ({padding}-padded cache) | {r['streams']} | {r['tok_s']:.1f} | "
                f"{r['per_stream_tok_s']:.1f} | {r['ratio']:.2f}x | "
                f"{'yes' if r['identical'] else '**NO**'} |"
            )
        ratio4 = rows[-1]["ratio"]
        verdicts.append(f"{label}: **{ratio4:.2f}x** "
                        f"({'meets' if ratio4 >= 2.5 else 'misses'} the 2.5x target)")
    table = "\n".join(lines)
    print(table)
    print("4 streams / 1 stream: " + "; ".join(verdicts))
    if args.no_write:
        return 0

    cmd = "python scripts/bench_batching.py" + (" --qwen05" if args.qwen05 else "") + (
        f" --threads {args.threads}" if args.threads != 2 else ""
    ) + (f" --tokens {args.tokens}" if args.tokens != 128 else "") + (
        f" --repeats {args.repeats}" if args.repeats != 7 else "")
    models = "; ".join(
        f"{label}: {gen.graph.kv_cache.num_layers if gen.graph.kv_cache else '?'} layers"
        for label, gen, _ in results)
    first = results[0][1]
    lengths = ", ".join(str(len(first.text_prompt(p))) for p in PROMPTS[: max(STREAMS)])
    now = dt.datetime.now(dt.timezone.utc)
    body = "\n".join([
        "## Continuous batching: aggregate decode tokens/s, 1 / 2 / 4 streams, CPU",
        "",
        "_Generated by `scripts/bench_batching.py`; do not edit between the markers._",
        "",
        f"- **Command:** `{cmd}`",
        f"- **Date:** {now:%Y-%m-%d %H:%M} UTC (total wall time {wall:.0f} s)",
        f"- **Machine:** {platform.machine()}, {os.cpu_count()} logical cores shared with "
        f"other jobs, engine threads {args.threads}; load average before "
        f"{load_before[0]:.2f}, after {load_after[0]:.2f} (absolute numbers move with the "
        "load; the ratio is the point)",
        f"- **Models:** {models} (int4 MatMulNBits, block 128, accuracy level 4; ONNX "
        "Runtime on CPU)",
        f"- **Workload:** prompts of {lengths} tokens; greedy, EOS ignored, {args.tokens} "
        "tokens per stream; all streams prefilled and joined first, then only the "
        f"`BatchDecoder.step()` loop is timed; median of {args.repeats} runs, stream counts "
        "interleaved",
        "",
        table,
        "",
        "4 streams / 1 stream — " + "; ".join(verdicts) + ". \"Tokens = single-stream "
        "greedy\" compares every stream's token ids with `Generator.generate` of the same "
        "prompt alone." + ("" if all(r["identical"] for _, _, rows in results for r in rows)
                           else _DIVERGENCE),
    ])
    update_section(DOC, MARK, body)
    print(f"wrote {DOC}")
    return 0


_DIVERGENCE = (
    " Where it says NO (random weights only): ONNX Runtime's int4 "
    "`MatMulNBits` at accuracy level 4 rounds activations to int8 on one kernel path "
    "for a single row and another for two or more rows (logits ~0.07 apart on a scale "
    "of ~3, `python scripts/experiments/batch_kernel_paths.py`); random weights leave "
    "near-tied top logits at almost every step, so greedy tokens drift. On trained "
    "models (tests/test_batching.py, both cache layouts) batched tokens equal "
    "single-stream tokens.")


if __name__ == "__main__":
    raise SystemExit(main())
