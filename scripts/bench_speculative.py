#!/usr/bin/env python3
"""Speculative decoding: batch-1 decode tokens/s with and without the bundle's draft model.

    python scripts/bench_speculative.py [--recipe R.toml ...] [--bundle DIR --pubkey PEM]
        [--tokens 128] [--prompts 6] [--rounds 2] [--threads 2] [--ks 2,4] [--no-write]
        [--device cuda]

Needs: the repository's Python environment (`pip install -e '.[build]'`: torch,
transformers and optimum build the pairs when no --bundle is given). Each --recipe (default:
models/demo.toml, the demo recipe — teacher trained here, distilled 4 → 2 layers, pruned, AWQ
4-bit, fused, with a [draft] 2 → 1 layer — and models/speculative-pair.toml, an 8-layer
hidden-512 target with a one-layer draft) is built into --workdir/<recipe name> (a few
minutes each on two cores, once; cached after) and its bundle measured: the served model is
the target, the bundle's `draft` graph the draft.

For each held-out prompt (stdlib code the models never trained on, `--prompt-tokens` long)
and each round, contenders run interleaved on the same ONNX Runtime CPU engines: plain greedy
decoding (batch 1), speculative with the adaptive k (what the daemon runs), and speculative
with each fixed k of --ks. EOS is ignored (fixed-length outputs); every speculative output
must equal the plain one token for token, or the script fails. Decode tokens/s = (tokens −
1) / (first to last token), as GenerationStats reports it; the table gives the median over
prompts × rounds, the acceptance rate (accepted / drafted tokens over all runs) and the
cost model's terms: a target decode step, a draft step and a verify pass of k + 1 tokens.

`--device cuda` runs the same on ONNX Runtime's CUDA provider (onnxruntime-gpu; CUDA's
libraries loaded through torch first) and fails unless both graphs' sessions really run on
it; on a machine without one it exits 3. Where a GPU decode step costs about the same for 1
and k + 1 tokens (launch-bound small models), speculation's premise holds, unlike on 2 CPU cores.

Results go to docs/BENCHMARKS.md between the `bench_speculative` markers, or
`bench_speculative_gpu` with `--device cuda` (`--no-write` to skip).
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


def cuda_device() -> str:
    """The GPU's name where ONNX Runtime has a CUDA provider and torch sees a GPU, else ""."""
    try:
        import onnxruntime as ort
        import torch  # loads the CUDA libraries (cuBLAS, cuDNN) the CUDA provider links
    except ImportError:
        return ""
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return ""
    return str(torch.cuda.get_device_name(0)) if torch.cuda.is_available() else ""


def build_pair(recipe: Path, work: Path) -> tuple[Path, Path]:
    """`recipe`'s bundle (served model + draft), built into `work` (cached stages reused)."""
    from edge_build.pipeline import run_recipe
    from edge_build.recipe import load_recipe

    run_recipe(load_recipe(recipe), work, progress=True)
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
    for c in dec.decode_alone(ids, params):
        out.extend(c.token_ids)
        last = c
    assert last is not None and last.stats is not None
    st = last.stats
    return {"ids": out, "tps": st.decode_tokens_per_s, "drafted": st.draft_tokens,
            "accepted": st.accepted_tokens}


MAX_TIE = 0.01
"""A divergence from plain greedy output is accepted only at a near tie: the reference's
top-2 logit margin there below this (multi-token and one-token engine passes differ by up to
~3e-3 logits in their last bits; see speculative.GREEDY_MARGIN)."""


def divergence(gen: Generator, prompt: list[int], ref: list[int], got: list[int],
               c: Any) -> dict[str, Any]:
    """Where a speculative output first differs from the plain one, and the target's top-2
    margin there (from one prefill of the common prefix)."""
    j = next(i for i, (a, b) in enumerate(zip(ref, got, strict=False)) if a != b)
    seq = [*prompt, *ref[:j]]
    n = len(seq)
    logits, _ = gen.forward(np.asarray([seq], dtype=np.int64), gen.ones[:, :n],
                            gen.positions[:, :n], gen.empty_cache(1))
    top2 = np.sort(logits[0, -1])[-2:]
    return {"contender": str(c), "token": j, "margin": float(top2[1] - top2[0])}


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


def measure(bundle_dir: Path, pub: Path, args: argparse.Namespace, ks: Sequence[int]
            ) -> dict[str, Any]:
    """One pair's runs: the table rows, step costs and what the pair is."""
    bundle = verify_bundle(bundle_dir, [load_public_key(pub)])
    gen = Generator.from_bundle(bundle, backend="onnxruntime", threads=args.threads)
    if not gen.speculative or gen.draft is None:
        raise SystemExit(f"{bundle_dir} has no draft graph (build it with a [draft] table)")
    want = "CUDAExecutionProvider" if args.device == "cuda" else "CPUExecutionProvider"
    for name, g in (("decoder", gen), ("draft", gen.draft)):
        got = g.engine.name.split(":", 1)[-1]  # "onnxruntime:<first active provider>"
        if got != want:
            raise SystemExit(f"FAIL: the {name} graph runs on {got}, not {want}")
    gen.defaults = dataclasses.replace(gen.defaults, eos_token_ids=[])
    gen._eos = frozenset()  # fixed-length outputs: the same work for every contender
    m = bundle.manifest
    kv = (m.graphs["decoder"].kv_cache, m.graphs["draft"].kv_cache)
    params = m.build.get("package", {}).get("parameters", {})
    ps = prompts(gen, args.prompts, args.prompt_tokens)
    gen.warmup()
    contenders: list[int | str | None] = [None, "auto", *ks]
    results: dict[Any, list[dict[str, Any]]] = {c: [] for c in contenders}
    diverged: list[dict[str, Any]] = []
    outputs = 0
    for r in range(args.rounds):
        for i, ids in enumerate(ps):
            ref = None
            for c in contenders:
                res = run(gen, ids, args.tokens, c)
                results[c].append(res)
                if c is None:
                    ref = res["ids"]
                else:
                    outputs += 1
                    if res["ids"] != ref:
                        assert ref is not None
                        diverged.append(divergence(gen, ids, ref, res["ids"], c))
            print(f"{m.name} round {r + 1} prompt {i + 1}: " + ", ".join(
                f"{NAMES.get(c, f'k = {c}')} {results[c][-1]['tps']:.0f} tok/s"
                for c in contenders), flush=True)
    real = [d for d in diverged if d["margin"] > MAX_TIE]
    if real:
        raise SystemExit(f"FAIL: speculative outputs of {m.name} differ from plain greedy "
                         f"decoding where the choice was no near tie: {real}")
    costs = step_costs(gen, ps[0], ks)
    n = len(ps)
    per_prompt = {  # speed-up of each contender on each prompt, median over rounds
        str(c): [statistics.median(results[c][r * n + i]["tps"] / results[None][r * n + i]["tps"]
                                   for r in range(args.rounds)) for i in range(n)]
        for c in contenders if c is not None}
    base = statistics.median(x["tps"] for x in results[None])
    rows = []
    for c in contenders:
        tps = statistics.median(x["tps"] for x in results[c])
        drafted = sum(x["drafted"] for x in results[c])
        accepted = sum(x["accepted"] for x in results[c])
        rows.append({"name": NAMES.get(c, f"speculative, k = {c}"), "tps": tps,
                     "ratio": tps / base, "drafted": drafted, "accepted": accepted,
                     "per_pass": 1 + accepted / (drafted / int(c))
                     if drafted and isinstance(c, int) else None})
    return {"name": f"{m.name} {m.version}", "layers": (kv[0].num_layers if kv[0] else 0,
                                                        kv[1].num_layers if kv[1] else 0),
            "hidden": params.get("hidden_size"), "prompts": len(ps), "rows": rows,
            "outputs": outputs, "diverged": diverged, "per_prompt": per_prompt,
            "costs": costs, "ks": list(ks)}


NAMES: dict[Any, str] = {None: "plain greedy", "auto": "speculative, adaptive k"}


def section(pair: dict[str, Any]) -> list[str]:
    c, ks = pair["costs"], pair["ks"]
    t = c["target_step"]
    table = ["| Decoding | Decode tok/s (median) | vs plain | Acceptance rate | Tokens per "
             "target pass | Engine-time ceiling |", "|---|--:|--:|--:|--:|--:|"]
    for r in pair["rows"]:
        rate = f"{r['accepted'] / r['drafted']:.2f}" if r["drafted"] else "-"
        per = f"{r['per_pass']:.2f}" if r["per_pass"] else "-"
        k = int(r["name"].rsplit("= ", 1)[1]) if "k = " in r["name"] else 0
        # What the engine runs alone allow: tokens per pass × a step / (k drafts + verify).
        ceiling = (f"{r['per_pass'] * t / (k * c['draft_step'] + c[f'verify_{k}']):.2f}x"
                   if k and r["per_pass"] else "-")
        table.append(f"| {r['name']} | {r['tps']:.0f} | {r['ratio']:.2f}x | {rate} | {per} "
                     f"| {ceiling} |")
    cost = (f"target decode step {t * 1e3:.3f} ms, draft step {c['draft_step'] * 1e3:.3f} ms "
            f"(**{c['draft_step'] / t:.2f}** of a target step), verify pass of k + 1 tokens "
            + ", ".join(f"k = {k}: {c[f'verify_{k}'] * 1e3:.3f} ms "
                        f"({c[f'verify_{k}'] / t:.2f}x a step)" for k in ks))
    return [
        f"### {pair['name']}: target {pair['layers'][0]} layers (hidden {pair['hidden']}), "
        f"draft {pair['layers'][1]} layer(s)",
        "",
        f"- **Step costs** (median of 200 engine runs over a {PROMPT_TOKENS[0]}-token cache): "
        f"{cost}",
        "",
        *table,
        "",
        "Per prompt (speed-up over plain, median over rounds): " + "; ".join(
            f"{NAMES.get(c, f'k = {c}') if c != 'auto' else 'adaptive k'}: "
            + ", ".join(f"{x:.2f}x" for x in v) for c, v in pair["per_prompt"].items()) + ".",
        "",
        identical_line(pair),
        "",
    ]


def identical_line(pair: dict[str, Any]) -> str:
    d = pair["diverged"]
    n = pair["outputs"]
    if not d:
        return f"All {n} speculative outputs were identical to plain greedy decoding."
    where = "; ".join(f"{x['contender']} at token {x['token']} (top-2 margin "
                      f"{x['margin']:.4f})" for x in d)
    return (f"{n - len(d)} of {n} speculative outputs were identical to plain greedy decoding; "
            f"{len(d)} took the other side of a near tie ({where}): the target's two best "
            "logits there differ by less than what separates a one-token engine pass from a "
            "multi-token one over the same cache (up to ~3e-3 on this graph: int8 activation "
            "blocks and GroupQueryAttention take other kernel paths), so a cache built by "
            "verify passes can tip them. Prefills and chunked prefill build caches the same "
            "way.")


PROMPT_TOKENS = [48]


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--recipe", type=Path, action="append",
                    help="a recipe with a [draft] table, built into --workdir/<its name> once "
                    "(repeatable; default: models/demo.toml and models/speculative-pair.toml)")
    ap.add_argument("--bundle", type=Path, action="append",
                    help="measure this bundle instead of recipes (repeatable)")
    ap.add_argument("--pubkey", type=Path, action="append",
                    help="the key each --bundle is signed with, in the same order")
    ap.add_argument("--workdir", type=Path, default=Path("~/.cache/edge-bench/speculative"))
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--prompts", type=int, default=6)
    ap.add_argument("--prompt-tokens", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ks", default="2,4")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                    help="cuda: ONNX Runtime's CUDA provider (exit 3 where there is none)")
    args = ap.parse_args(argv)
    gpu = ""
    if args.device == "cuda":
        gpu = cuda_device()
        if not gpu:
            print("no CUDA provider here (onnxruntime-gpu and a GPU are needed)",
                  file=sys.stderr)
            return 3
    ks = [int(k) for k in args.ks.split(",") if k]
    PROMPT_TOKENS[0] = args.prompt_tokens
    if args.bundle is not None:
        if args.pubkey is None or len(args.pubkey) != len(args.bundle):
            ap.error("each --bundle needs its --pubkey (the key its manifest is signed with)")
        targets = list(zip(args.bundle, args.pubkey, strict=True))
    else:
        recipes = args.recipe or [ROOT / "models" / "demo.toml",
                                  ROOT / "models" / "speculative-pair.toml"]
        targets = [build_pair(r, args.workdir.expanduser().resolve() / r.stem)
                   for r in recipes]
    load_before = os.getloadavg()
    t0 = time.time()
    pairs = [measure(b, p, args, ks) for b, p in targets]
    wall = time.time() - t0
    load_after = os.getloadavg()
    body: list[str] = []
    for pair in pairs:
        body += section(pair)
    print("\n".join(body))
    if args.no_write:
        return 0
    defaults = {a.dest: a.default for a in ap._actions}
    cmd = "python scripts/bench_speculative.py" + "".join(
        f" --recipe {r}" for r in args.recipe or []) + "".join(
        f" --bundle {b} --pubkey {p}"
        for b, p in zip(args.bundle or [], args.pubkey or [], strict=True)) + "".join(
        f" --{k.replace('_', '-')} {v}" for k, v in vars(args).items()
        if k in ("tokens", "prompts", "prompt_tokens", "rounds", "threads", "ks", "device")
        and v != defaults[k])
    engine = (f"ONNX Runtime CUDA on {gpu}" if gpu else
              f"ONNX Runtime CPU, {args.threads} threads")
    head = [
        "## Speculative decoding: batch-1 decode with the bundle's draft model, "
        + ("GPU" if gpu else "CPU"),
        "",
        "_Generated by `scripts/bench_speculative.py`; do not edit between the markers._",
        "",
        f"- **Command:** `{cmd}`",
        f"- **Date:** {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC (measuring "
        f"{wall:.0f} s)",
        f"- **Machine:** {cpu_model()}, {os.cpu_count()} logical cores, {engine}; "
        f"load average before {load_before[0]:.2f}, after "
        f"{load_after[0]:.2f}. A shared machine (other engineers' builds and tests ran "
        "meanwhile): single runs vary by up to 2x, hence medians",
        "- **Pairs:** " + ("signed bundles given with --bundle, each built by a recipe "
                           "with a [draft] table" if args.bundle else
                           "trained here by their recipes") + "; the target is the bundle's served "
        "decoder, the draft its `draft` graph, distilled on the served model's logits by the "
        "[draft] stage and sent through the same AWQ int4 / fuse stages",
        f"- **Workload:** held-out stdlib prompts of {args.prompt_tokens} tokens (up to "
        f"{args.prompts}), {args.tokens} new tokens each, greedy, EOS ignored; {args.rounds} "
        "round(s), contenders interleaved per prompt; each speculative output is compared with "
        "plain greedy decoding token for token (the script fails on any difference that is "
        f"not a near tie, top-2 margin < {MAX_TIE}). Acceptance rate = accepted / drafted "
        "tokens over all runs",
        "",
    ]
    update_section(DOC, MARK + ("_gpu" if gpu else ""), "\n".join(
        head + body + ([] if gpu else NOTES)))
    print(f"wrote {DOC}")
    return 0


NOTES = [
    "Engine-time ceiling = tokens per target pass × one target step ÷ (k draft steps + one "
    "verify pass), all from the step costs above: the speed-up the engine runs alone would "
    "allow, with no Python between them. Where it is near or below 1, speculation cannot pay "
    "on this machine whatever the implementation, and the adaptive k (what the daemon runs) "
    "stands aside: it probes now and then, with a pause that doubles while it does not pay.",
    "",
    "**The issue's target (≥ 1.5x decode tokens/s at batch 1) is not reached on this CPU.** "
    "The best median is ~1.1x (fixed k = 2 on the 8-layer pair), short of the target by "
    "about 0.4x. Single prompts of predictable code reach 1.4-1.6x at k = 4 (nearly every "
    "draft accepted); others lose 30-40% where acceptance falls below ~0.5. The adaptive k "
    "(what the daemon runs: each k's verify pass timed separately in the loop, "
    "edge_runtime/model/spec_control.py) stands aside where those timings say no k pays, "
    "paying for its probing rounds (a probe after a pause also lets the draft catch up on "
    "every token it missed): its median is 0.86-0.97x across our runs. Under load (load "
    "average 2.6-3.8 on the 2 cores) a 3-token verify pass timed ~4x a one-token step in the "
    "loop, and speculation stood aside. Why, from the step costs:",
    "",
    "- **The verify pass is not free on a CPU.** k + 1 = 3 tokens cost ~1.5x a one-token "
    "step, 5 tokens ~2x: the int4 MatMulNBits kernels (int8 activations) are compute-bound "
    "at batch 1 for a model that fits in the caches (27 M parameters = 13 MiB int4), so "
    "extra positions cost nearly their own compute. Speculation's premise, a decode step "
    "bounded by reading the weights (a GPU, a Jetson's shared DRAM with a larger model), "
    "does not hold here.",
    "- **The draft is not cheap enough relative to the target.** The demo's served model "
    "decodes a token in ~0.12 ms, mostly ONNX Runtime's fixed per-run cost: its one-layer "
    "draft still costs ~0.57 of a step, so even with 0.9+ acceptance the ceiling is ~1.1x. "
    "On the 8-layer pair the draft costs ~0.22 of a step (more in the loop, where the two "
    "models evict each other's weights from the caches).",
    "- **Acceptance** of the pair's one-layer draft, distilled for 120 steps on the target's "
    "logits, is 0.47-0.63 per drafted token (top-1 agreement 0.70 on held-out text). For "
    "1.5x at k = 4 with this verify cost the draft would need ~0.9 acceptance at ≤ 0.1 of a "
    "step.",
    "- The daemon's own overhead is small: a speculator that stands aside decodes within ~3% "
    "of plain decoding, and the fixed-k rows sit within ~0.1x of their engine-time ceilings. A "
    "second ONNX Runtime thread pool for the draft did cost 2x (two pools spinning on two "
    "cores); the draft now runs on one thread.",
    "",
    "Effect on our batch-1 ratio to llama.cpp (0.85x on Qwen2-0.5B shapes, the `bench_decode` "
    "section): unchanged. Those weights are random, so no trained draft exists for them (a "
    "draft's acceptance would be ~0) and the adaptive k stands aside; on a trained Qwen2 "
    "pair, the verify cost above says a CPU would gain at most what the engine-time ceiling "
    "gives. On a GPU, where a verify pass costs about one step, the 8-layer pair gains "
    "1.69-1.89x at a fixed k (the GPU section below).",
]


if __name__ == "__main__":
    raise SystemExit(main())
