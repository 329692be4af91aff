#!/usr/bin/env python3
"""Speculative decoding: batch-1 decode tokens/s with and without the bundle's draft model.

    python scripts/bench_speculative.py [--bundle DIR --pubkey PEM] [--tokens 128]
        [--prompts 6] [--rounds 2] [--threads 2] [--ks 2,4] [--no-write]

Needs: the repository's Python environment (`pip install -e '.[build]'`: torch,
transformers and optimum build the pair when no --bundle is given). Without --bundle the
demo recipe (models/demo.toml: a teacher trained here, distilled 4 → 2 layers, pruned,
AWQ 4-bit, fused; its [draft] 2 → 1 layer distilled on the served model's logits) is built
into --workdir (about 15 minutes on two cores, once) and its bundle is measured: the served
model is the target, the bundle's `draft` graph the draft.

For each held-out prompt (stdlib code the models never trained on, `--prompt-tokens` long)
and each round, contenders run interleaved on the same ONNX Runtime CPU engines: plain greedy
decoding (batch 1), speculative with the adaptive k (what the daemon runs), and speculative
with each fixed k of --ks. EOS is ignored (fixed-length outputs); every speculative output
must equal the plain one token for token, or the script fails. Decode tokens/s = (tokens −
1) / (first to last token), as GenerationStats reports it; the table gives the median over
prompts × rounds, the acceptance rate (accepted / drafted tokens over all runs) and the
cost model's terms: a target decode step, a draft step and a verify pass of k + 1 tokens.

Results go to docs/BENCHMARKS.md between the `bench_speculative` markers (`--no-write` to
skip).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import os
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "build"), str(ROOT / "scripts")]

from bench.report import cpu_model, update_section  # noqa: E402

from edge_runtime.bundle.manifest import verify_bundle  # noqa: E402
from edge_runtime.model.batching import BatchDecoder  # noqa: E402
from edge_runtime.model.generator import Generator  # noqa: E402
from edge_runtime.model.sampling import SamplingParams  # noqa: E402
from edge_runtime.model.speculative import Speculator  # noqa: E402
from edge_runtime.signing import load_public_key  # noqa: E402

DOC = ROOT / "docs" / "BENCHMARKS.md"
MARK = "bench_speculative"


def build_demo_pair(work: Path) -> tuple[Path, Path]:
    """The demo recipe's bundle (served model + draft), built into `work` once."""
    from edge_build.demo import demo_recipe
    from edge_build.pipeline import run_recipe
    from edge_build.recipe import load_recipe

    if not (work / "bundle" / "manifest.json").is_file():
        run_recipe(load_recipe(demo_recipe()), work, progress=True)
    return work / "bundle", work / "signing.pub"


def prompts(gen: Generator, count: int, length: int) -> list[list[int]]:
    """`count` windows of `length` tokens from held-out stdlib sources, one per document."""
    from edge_build.corpus import stdlib_corpus

    out: list[list[int]] = []
    for text in stdlib_corpus(max_chars=400_000).heldout:
        ids = gen.text_prompt(text)
        if len(ids) >= 2 * length:
            mid = len(ids) // 2  # past the license header every file starts with
            out.append(ids[mid:mid + length])
        if len(out) == count:
            break
    return out


def run(gen: Generator, ids: list[int], tokens: int, k: int | str | None) -> dict[str, Any]:
    """One greedy generation; k: None = plain, "auto" = adaptive, an int = fixed."""
    dec = BatchDecoder(gen, max_batch=1)
    if k is None:
        dec.spec = None
    elif k != "auto":
        assert gen.draft is not None
        dec.spec = Speculator(gen, gen.draft, fixed_k=int(k))
    params = SamplingParams(max_tokens=tokens, temperature=0.0)
    out: list[int] = []
    last = None
    for c in dec.add(0, ids, params):
        out.extend(c.token_ids)
        last = c
    while dec.active:
        for c in dec.step()[0]:
            out.extend(c.token_ids)
            last = c
    assert last is not None and last.stats is not None
    st = last.stats
    return {"ids": out, "tps": st.decode_tokens_per_s, "drafted": st.draft_tokens,
            "accepted": st.accepted_tokens}


def step_costs(gen: Generator, ids: list[int], ks: Sequence[int], reps: int = 200
               ) -> dict[str, float]:
    """Median seconds of one target decode step, one draft step, and a verify pass of k + 1
    tokens, each over the cache of `ids`."""
    assert gen.draft is not None
    out: dict[str, float] = {}

    def timed(g: Generator, n: int) -> float:
        _, past = g.forward(np.asarray([ids], dtype=np.int64), g.ones[:, :len(ids)],
                            g.positions[:, :len(ids)], g.empty_cache(1))
        p = len(ids)
        feed = np.asarray([ids[-n:]], dtype=np.int64)
        samples = []
        for _ in range(reps):
            t = time.perf_counter()
            g.forward(feed, g.ones[:, :p + n], g.positions[:, p:p + n], past, window=n)
            samples.append(time.perf_counter() - t)
        return statistics.median(samples)

    out["target_step"] = timed(gen, 1)
    out["draft_step"] = timed(gen.draft, 1)
    for k in ks:
        out[f"verify_{k}"] = timed(gen, k + 1)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bundle", type=Path, help="a bundle with a draft graph (default: the "
                    "demo recipe's, built into --workdir)")
    ap.add_argument("--pubkey", type=Path)
    ap.add_argument("--workdir", type=Path, default=Path("~/.cache/edge-bench/spec-demo"))
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--prompts", type=int, default=6)
    ap.add_argument("--prompt-tokens", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ks", default="2,4")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    ks = [int(k) for k in args.ks.split(",") if k]
    if args.bundle is None:
        bundle_dir, pub = build_demo_pair(args.workdir.expanduser().resolve())
    else:
        if args.pubkey is None:
            ap.error("--bundle needs --pubkey (the key its manifest is signed with)")
        bundle_dir, pub = args.bundle, args.pubkey
    bundle = verify_bundle(bundle_dir, [load_public_key(pub)])
    gen = Generator.from_bundle(bundle, backend="onnxruntime", threads=args.threads)
    if not gen.speculative or gen.draft is None:
        ap.error(f"{bundle_dir} has no draft graph (package it with a [draft] recipe table)")
    gen.defaults = dataclasses.replace(gen.defaults, eos_token_ids=[])
    gen._eos = frozenset()  # fixed-length outputs: the same work for every contender
    m = bundle.manifest
    layers = (m.graphs["decoder"].kv_cache, m.graphs["draft"].kv_cache)
    ps = prompts(gen, args.prompts, args.prompt_tokens)
    gen.warmup()
    contenders: list[int | str | None] = [None, "auto", *ks]
    names = {None: "plain greedy", "auto": "speculative, adaptive k",
             **{k: f"speculative, k = {k}" for k in ks}}
    results: dict[Any, list[dict[str, Any]]] = {c: [] for c in contenders}
    load_before = os.getloadavg()
    t0 = time.time()
    mismatches = 0
    for r in range(args.rounds):
        for i, ids in enumerate(ps):
            ref = None
            for c in contenders:
                res = run(gen, ids, args.tokens, c)
                results[c].append(res)
                if c is None:
                    ref = res["ids"]
                elif res["ids"] != ref:
                    mismatches += 1
            print(f"round {r + 1} prompt {i + 1}: " + ", ".join(
                f"{names[c]} {results[c][-1]['tps']:.0f} tok/s" for c in contenders), flush=True)
    costs = step_costs(gen, ps[0], ks)
    wall = time.time() - t0
    load_after = os.getloadavg()
    if mismatches:
        print(f"FAIL: {mismatches} speculative outputs differ from plain greedy decoding")
        return 1
    base = statistics.median(x["tps"] for x in results[None])
    table = ["| Decoding | Decode tok/s (median) | vs plain | Acceptance rate | Tokens per "
             "target pass |", "|---|--:|--:|--:|--:|"]
    for c in contenders:
        tps = statistics.median(x["tps"] for x in results[c])
        drafted = sum(x["drafted"] for x in results[c])
        accepted = sum(x["accepted"] for x in results[c])
        rate = f"{accepted / drafted:.2f}" if drafted else "-"
        passes = f"{1 + accepted / (drafted / int(c)):.2f}" if drafted and c != "auto" \
            and c is not None else "-"
        table.append(f"| {names[c]} | {tps:.0f} | {tps / base:.2f}x | {rate} | {passes} |")
    text = "\n".join(table)
    cost = (f"target decode step {costs['target_step'] * 1e3:.3f} ms, draft step "
            f"{costs['draft_step'] * 1e3:.3f} ms "
            f"({costs['draft_step'] / costs['target_step']:.2f} of a target step), verify "
            "pass " + ", ".join(f"k = {k}: {costs[f'verify_{k}'] * 1e3:.3f} ms" for k in ks))
    print(text)
    print(cost)
    if args.no_write:
        return 0
    cmd = "python scripts/bench_speculative.py" + (
        f" --bundle {args.bundle} --pubkey {args.pubkey}" if args.bundle else "") + "".join(
        f" --{k.replace('_', '-')} {v}" for k, v in (
            ("tokens", args.tokens), ("prompts", args.prompts), ("rounds", args.rounds),
            ("threads", args.threads), ("ks", args.ks))
        if str(v) != str(ap.get_default(k)))
    body = [
        "## Speculative decoding: batch-1 decode with the bundle's draft model, CPU",
        "",
        "_Generated by `scripts/bench_speculative.py`; do not edit between the markers._",
        "",
        f"- **Command:** `{cmd}`",
        f"- **Date:** {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC (wall time "
        f"{wall:.0f} s)",
        f"- **Machine:** {cpu_model()}, {os.cpu_count()} logical cores, ONNX Runtime CPU, "
        f"{args.threads} threads; load average before {load_before[0]:.2f}, after "
        f"{load_after[0]:.2f} (a shared machine: other work ran meanwhile)",
        f"- **Pair:** {m.name} {m.version}: target = the served decoder "
        f"({layers[0].num_layers if layers[0] else '?'} layers), draft = the bundle's `draft` "
        f"graph ({layers[1].num_layers if layers[1] else '?'} layer(s)), distilled on the "
        "served model's logits by the recipe's [draft] stage, same int4/fused stages",
        f"- **Workload:** {len(ps)} held-out stdlib prompts of {args.prompt_tokens} tokens, "
        f"{args.tokens} new tokens each, greedy, EOS ignored; {args.rounds} round(s), "
        "contenders interleaved per prompt; every speculative output was identical to plain "
        "greedy decoding, token for token",
        f"- **Step costs** (median of 200, over a {args.prompt_tokens}-token cache): {cost}",
        "",
        text,
    ]
    update_section(DOC, MARK, "\n".join(body))
    print(f"wrote {DOC}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
