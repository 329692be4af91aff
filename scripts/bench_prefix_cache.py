#!/usr/bin/env python3
"""Prefix cache: time to first token of prompts that share a 1,024-token prefix, hit vs miss.

    python scripts/bench_prefix_cache.py [--demo-bundle DIR --demo-pubkey PEM] [--no-qwen05]
        [--workdir ~/.cache/edge-bench] [--prefix-tokens 1024] [--repeats 3] [--threads 2]

What is measured: a prompt = a shared prefix of `--prefix-tokens` tokens of ordinary text (a
long system prompt, or the chat history so far) + a question of its own (16 tokens), answered
with 8 greedy tokens (EOS ignored). TTFT is the generator's own: from `BatchDecoder.add` to the
first sampled token, prefix-cache lookup and copy included. Per repeat, on one generator:

- **miss**: no prefix cache (`use_prefix_cache(0)`): the whole prompt is prefilled;
- **hit, whole entry** (the chat-history case): the prefix alone was served before, so the
  cache holds exactly it; the new prompt extends it, and its KV is reused as the engine holds
  it (no copy) — only the question is prefilled;
- **hit, part of an entry** (same system prompt, another question): the cache holds the
  prefix + an earlier question; the prefix's KV is copied out of that entry once.

Each in two ways of running: one sequence prefilled whole (`Generator.stream`'s path) and the
daemon's way (a `BatchDecoder` with its default `prefill_chunk = 128`). Medians over
`--repeats` (cases interleaved). Every hit's tokens are compared with the miss's tokens of
the same prompt: the cache must not change a single one. The issue's bar: TTFT ≥ 5× lower
on a hit.

Bundles: the served demo model (`edge-build demo --out DIR` builds it, or the cached default
bundle of `edge-runtime serve`, built on first use: ~15 minutes on two cores; its context is
1,024 tokens, so its prefix is shortened to fit) and, unless `--no-qwen05`, the two
Qwen2-0.5B-shape bundles of scripts/bench_decode.py (random weights, context 4,096; built into
`--workdir` by scripts/bench/artifacts.py if missing, which needs torch): the exported graph
(left-padded batches) and its GroupQueryAttention fusion (right-padded batches). Results are
printed and written to docs/BENCHMARKS.md between the `bench_prefix_cache` markers
(`--no-write` to skip).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench import artifacts
from bench.report import cpu_model, update_section
from bench_batching import load_generator

from edge_runtime.model.generator import Generator
from edge_runtime.model.sampling import SamplingParams

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "BENCHMARKS.md"
MARK = "bench_prefix_cache"
QUESTION_TOKENS = 16
NEW_TOKENS = 8
CHUNK = 128  # the daemon's default scheduler.prefill_chunk
BUDGET = 256 * 2**20  # the default scheduler.prefix_cache_bytes


def text_ids(gen: Generator, tokens: int, skip: int = 0) -> list[int]:
    """`tokens` ids of ordinary text (the runtime's own sources, repeated as needed), from
    token `skip` on."""
    src = ROOT / "edge_runtime" / "model"
    text = "".join((src / f).read_text() for f in ("batching.py", "generator.py", "sampling.py"))
    ids: list[int] = []
    while len(ids) < tokens + skip:
        ids += gen.text_prompt(text)
    return ids[skip: skip + tokens]


def first_token(gen: Generator, ids: Sequence[int], chunk: int) -> tuple[float, list[int], int]:
    """(TTFT s, the greedy tokens, prompt tokens taken from the cache) of one prompt run alone
    through a BatchDecoder with `chunk` (0: the whole prompt at once)."""
    dec = gen.batch(1, chunk)
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0)
    tokens: list[int] = []
    chunks = dec.add(0, ids, params)
    while True:
        for c in chunks:
            tokens.extend(c.token_ids)
            if c.finish_reason is not None:
                assert c.stats is not None
                return c.stats.ttft_s, tokens, c.stats.cached_tokens
        chunks = dec.step().get(0, [])


def one_repeat(gen: Generator, prefix: list[int], questions: list[list[int]], chunk: int
               ) -> dict[str, Any]:
    a, b = prefix + questions[0], prefix + questions[1]
    gen.use_prefix_cache(0)
    miss_a, want_a, _ = first_token(gen, a, chunk)
    miss_b, want_b, _ = first_token(gen, b, chunk)
    gen.use_prefix_cache(BUDGET)
    first_token(gen, prefix, chunk)  # the cache now holds exactly the prefix
    whole, got_a, cached_a = first_token(gen, a, chunk)  # ... then prefix + question a
    part, got_b, cached_b = first_token(gen, b, chunk)  # the prefix, out of that entry
    assert cached_a == len(prefix) and cached_b >= len(prefix), (cached_a, cached_b)
    gen.use_prefix_cache(0)
    return {"miss": [miss_a, miss_b], "whole": whole, "part": part,
            "same": got_a == want_a and got_b == want_b}


def measure(gen: Generator, prefix_tokens: int, repeats: int) -> tuple[int, list[dict[str, Any]]]:
    room = gen.context_length - QUESTION_TOKENS - NEW_TOKENS - 1
    n = min(prefix_tokens, room)
    prefix = text_ids(gen, n)
    gen.warmup()
    rows = []
    for chunk in (0, CHUNK):
        runs = []
        for r in range(repeats):
            # A new pair of questions each repeat: nothing is left over from the last one.
            qs = [text_ids(gen, QUESTION_TOKENS, skip=n + QUESTION_TOKENS * (2 * r + i))
                  for i in (0, 1)]
            runs.append(one_repeat(gen, prefix, qs, chunk))
            last = runs[-1]
            print(f"  chunk {chunk or 'off'} run {r + 1}/{repeats}: miss "
                  f"{min(last['miss']) * 1e3:.1f} ms, hit {last['whole'] * 1e3:.1f} / "
                  f"{last['part'] * 1e3:.1f} ms, same tokens {last['same']}", flush=True)
        miss = statistics.median(t for x in runs for t in x["miss"])
        whole = statistics.median(x["whole"] for x in runs)
        part = statistics.median(x["part"] for x in runs)
        rows.append({"chunk": chunk, "miss": miss, "whole": whole, "part": part,
                     "same": all(x["same"] for x in runs)})
    return n, rows


def table(results: list[tuple[str, int, list[dict[str, Any]]]]) -> str:
    lines = ["| Model (graph) | Shared prefix | Prefill | TTFT miss | TTFT hit, whole entry "
             "| TTFT hit, part of an entry | Same tokens |", "|---|--:|---|--:|--:|--:|---|"]
    for label, n, rows in results:
        for row in rows:
            how = f"chunks of {row['chunk']}" if row["chunk"] else "whole prompt"
            m = row["miss"]
            lines.append(
                f"| {label} | {n} tokens | {how} | {m * 1e3:.1f} ms | {row['whole'] * 1e3:.1f} ms "
                f"(**{m / row['whole']:.1f}x** lower) | {row['part'] * 1e3:.1f} ms "
                f"(**{m / row['part']:.1f}x**) | {'yes' if row['same'] else '**no**'} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    artifacts.add_bundle_args(ap)
    ap.add_argument("--prefix-tokens", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    bundles: list[tuple[str, Path | None, Path | None]] = [
        ("demo recipe (fused, right-padded)", args.demo_bundle, args.demo_pubkey)]
    if not args.no_qwen05:
        work = args.workdir.expanduser().resolve()
        hf = artifacts.build_hf_model(work)
        pub = work / "keys" / "bench.pub"
        bundles += [("Qwen2-0.5B shapes (exported, left-padded)",
                     artifacts.build_bundle(work, hf), pub),
                    ("Qwen2-0.5B shapes (fused, right-padded)",
                     artifacts.build_fused_bundle(work, hf), pub)]
    load_before = os.getloadavg()
    t0 = time.time()
    results = []
    for label, bundle, pubkey in bundles:
        print(label, flush=True)
        gen, _ = load_generator(bundle, pubkey, args.threads)
        n, rows = measure(gen, args.prefix_tokens, args.repeats)
        results.append((label, n, rows))
        del gen
    wall, load_after = time.time() - t0, os.getloadavg()
    text = table(results)
    print(text)
    if args.no_write:
        return 0
    cmd = "python scripts/bench_prefix_cache.py" + (
        " --demo-bundle DIR --demo-pubkey PEM" if args.demo_bundle else "") + (
        " --no-qwen05" if args.no_qwen05 else "") + (
        f" --prefix-tokens {args.prefix_tokens}" if args.prefix_tokens != 1024 else "") + (
        f" --repeats {args.repeats}" if args.repeats != 3 else "")
    update_section(DOC, MARK, "\n".join([
        "## Prefix cache: TTFT of prompts sharing a 1,024-token prefix, hit vs miss",
        "",
        "_Generated by `scripts/bench_prefix_cache.py`; do not edit between the markers._",
        "",
        f"- **Command:** `{cmd}`" + (" (DIR: `edge-build demo --out DIR`'s bundle)"
                                      if args.demo_bundle else ""),
        f"- **Date:** {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC (total wall time "
        f"{wall:.0f} s)",
        f"- **Machine:** {cpu_model()}, {os.cpu_count()} logical cores, engine threads "
        f"{args.threads}; load average {load_before[0]:.2f} before, {load_after[0]:.2f} after "
        "(a machine shared with other work: single runs are noisy, the medians less so)",
        "- **Workload:** shared prefix (ordinary text) + a 16-token question of its own, 8 "
        "greedy tokens (EOS ignored); TTFT from `BatchDecoder.add` to the first sampled token, "
        f"prefix-cache lookup and copy included; median of {args.repeats} repeats, cases "
        "interleaved; ONNX Runtime on CPU. The demo model's context is 1,024 tokens: its "
        "prefix is what fits beside the question and the answer.",
        "",
        text,
        "",
        "Miss = no prefix cache, the whole prompt prefilled. Hit, whole entry = the cache held "
        "exactly the prefix (the chat-history case: the new prompt extends an earlier one): "
        "its KV is used as the engine holds it, only the question is prefilled. Hit, part of "
        "an entry = the cache held the prefix + another question (same system prompt, new "
        "question): the prefix's KV is copied out of that entry once, then the question is "
        "prefilled. Same tokens = every hit's greedy tokens equal the miss's for that prompt. "
        "The issue's bar: TTFT ≥ 5x lower on a hit. Served with `scheduler.prefix_cache_bytes` "
        "(default 256 MiB; model/prefix_cache.py).",
    ]))
    print(f"wrote {DOC}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
