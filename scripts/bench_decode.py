#!/usr/bin/env python3
"""Benchmark batch-1 decode on CPU: our int4 runtime against three reference points.

What it measures, for a model with Qwen2-0.5B's shapes (hidden 896, 24 layers, 14 heads /
2 KV heads, intermediate 4864, vocab 151936, tied embeddings) and random weights
(`torch.manual_seed(0)`, no download), at one thread count for every contender:
decode tokens/s, prefill tokens/s, time to first token, and peak RSS. Contenders:

    ours        edge_runtime's Generator on the int4 bundle (see bench/contenders.py)
    ort-bare    a careful bare ONNX Runtime loop (IOBinding, KV cache kept as OrtValues) on
                the same int4 ONNX (MatMulNBits, block 128, symmetric, accuracy level 4)
    torch-fp32  PyTorch eager fp32, manual greedy loop with the HF KV cache
    llama.cpp   llama-cpp-python on the same weights as GGUF Q4_0

Each contender runs in its own subprocess (peak RSS = that process's VmHWM), does one warm-up
run, then `--runs` measured runs; the report holds medians. Artifacts (random HF checkpoint +
a small BPE tokenizer, ONNX fp32/int4, GGUF f16/Q4_0, the llama.cpp converter) are built once
and cached in `--workdir`.

Results go to docs/BENCHMARKS.md (the section between `<!-- bench_decode:begin -->` and
`<!-- bench_decode:end -->` is created or replaced) and raw JSON to docs/bench_decode.json.

Reproduce (CPU machine, from the repo root):

    pip install -e '.[build]'            # or: torch transformers optimum optimum-onnx onnx
    pip install llama-cpp-python==0.3.16 # compiles llama.cpp (2-15 min on 2 cores); optional,
                                         # without it the llama.cpp row says "skipped"
    uptime                               # a benchmark on a busy machine measures the load
    python scripts/bench_decode.py                        # all contenders, threads 2
    python scripts/bench_decode.py --rounds 2             # contenders interleaved twice
    python scripts/bench_decode.py --only ort-bare,llama.cpp --threads 4 --runs 5

First run: ~7 min of artifact building on 2 cores (random checkpoint ~1 min, ONNX export +
int4 quantization ~4 min, GGUF conversion + Q4_0 ~1 min; ~8 GB RAM at peak), then ~1.5 min
of measuring per round with the defaults. Later runs reuse the artifacts. Measure on a quiet
machine: the "Other CPU" column reports how much CPU everything else used during each
contender, and llama.cpp's OpenMP threads in particular collapse under contention.
0.3.16, not the newest: 0.3.36 crashed (SIGSEGV) in its first `llama_decode` of this model,
through the high-level API too, on the Intel Xeon with AVX-512/AMX of 2026-12-04.
The GGUF conversion uses the converter from the llama-cpp-python sdist of the installed
version (fetched with `pip download`, cached in the work dir); its BPE pre-tokenizer check
does not know our home-made tokenizer, so it is pinned to "qwen2" for the conversion.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench import artifacts, report
from bench.contenders import (
    CONTENDERS,
    LABELS,
    RESULT_PREFIX,
    BenchConfig,
    ContenderResult,
    run_child,
)

REPO = Path(__file__).resolve().parent.parent
PROMPT_SEED = 0
# Which artifact each contender needs (prepared in a subprocess before measuring).
NEEDS: dict[str, str] = {
    "ours": "onnx-int4",
    "ours-fused": "onnx-int4-fused",
    "ort-bare": "onnx-int4",
    "torch-fp32": "hf",
    "llama.cpp": "gguf-q4_0",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Batch-1 CPU decode benchmark (ours / ORT bare / torch fp32 / llama.cpp).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="cuda: the GPU table instead (scripts/bench/gpu.py; its own options)")
    p.add_argument("--threads", type=int, default=2, help="threads for every contender")
    p.add_argument("--runs", type=int, default=3, help="measured runs per contender (median)")
    p.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run the contender set this many times, interleaved; medians pool all runs",
    )
    p.add_argument("--prompt-len", type=int, default=128, help="prompt tokens")
    p.add_argument("--new-tokens", type=int, default=128, help="tokens to generate")
    p.add_argument(
        "--torch-new-tokens",
        type=int,
        default=32,
        help="tokens to generate for torch-fp32 (slow; ~7 tok/s on 2 cores)",
    )
    p.add_argument(
        "--only",
        default=",".join(CONTENDERS),
        help=f"comma-separated subset of: {', '.join(CONTENDERS)}",
    )
    p.add_argument(
        "--workdir",
        type=Path,
        default=Path("~/.cache/edge-bench").expanduser(),
        help="artifact cache",
    )
    p.add_argument("--md", type=Path, default=REPO / "docs" / "BENCHMARKS.md", help="report")
    p.add_argument("--json", type=Path, default=REPO / "docs" / "bench_decode.json", help="raw")
    p.add_argument("--no-write", action="store_true", help="print only; write no docs")
    p.add_argument("--prepare-only", action="store_true", help="build artifacts and exit")
    # Internal: subprocess entry points.
    p.add_argument("--_child", dest="child", help=argparse.SUPPRESS)
    p.add_argument("--_prepare", dest="prepare", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.only = [c.strip() for c in args.only.split(",") if c.strip()]
    unknown = [c for c in args.only if c not in CONTENDERS]
    if unknown:
        p.error(f"unknown contender(s) {unknown}; known: {list(CONTENDERS)}")
    if min(args.threads, args.runs, args.rounds, args.prompt_len) < 1 or args.new_tokens < 2:
        p.error("--threads/--runs/--rounds/--prompt-len must be >= 1, --new-tokens >= 2")
    return args


def prompt_ids(n: int) -> list[int]:
    """Fixed prompt token ids inside the trained tokenizer's vocabulary (same for everyone)."""
    import random

    rng = random.Random(PROMPT_SEED)
    return [rng.randrange(3, artifacts.TOKENIZER_VOCAB) for _ in range(n)]


def prepare(what: str, workdir: Path, threads: int) -> None:
    """Subprocess body: build (or find cached) one artifact."""
    hf = artifacts.build_hf_model(workdir)
    if what == "onnx-int4":
        artifacts.build_bundle(workdir, hf)
    elif what == "onnx-int4-fused":
        artifacts.build_fused_bundle(workdir, hf)
    elif what == "gguf-q4_0":
        artifacts.build_gguf_q4_0(workdir, hf, threads)
    elif what != "hf":
        raise SystemExit(f"unknown artifact {what!r}")


def _self_cmd(*extra: str) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), *extra]


def _llama_cpp_installed() -> bool:
    from importlib.util import find_spec

    return find_spec("llama_cpp") is not None


def _children_cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def run_contender(cfg: BenchConfig) -> ContenderResult:
    """One contender in its own process; adds the CPU that others used meanwhile."""
    busy0, own0, t0 = report.cpu_busy_s(), _children_cpu_s(), time.perf_counter()
    proc = subprocess.run(
        _self_cmd("--_child", json.dumps(asdict(cfg))),
        stdout=subprocess.PIPE,
        text=True,
        check=False,
        cwd=REPO,
    )
    wall = time.perf_counter() - t0
    other = (report.cpu_busy_s() - busy0) - (_children_cpu_s() - own0)
    line = next(
        (ln for ln in reversed(proc.stdout.splitlines()) if ln.startswith(RESULT_PREFIX)),
        None,
    )
    if line is None:
        return ContenderResult(
            cfg.contender, "failed", note=f"child exited {proc.returncode} without a result"
        )
    res = ContenderResult(**json.loads(line[len(RESULT_PREFIX) :]))
    res.extra["wall_s"] = wall
    res.extra["other_cpu_cores"] = max(0.0, other / wall) if wall > 0 else 0.0
    return res


def merge_rounds(rounds: list[ContenderResult]) -> ContenderResult:
    """Pool the measured runs of several rounds of one contender; medians over all runs."""
    ok = [r for r in rounds if r.status == "ok"]
    if not ok:
        return rounds[-1]
    per_round = [
        {k: getattr(r, k) for k in ("decode_tps", "prefill_tps", "ttft_s", "peak_rss_mb")}
        | {"other_cpu_cores": r.extra.get("other_cpu_cores", 0.0)}
        for r in ok
    ]
    res = ok[0]
    if len(ok) > 1:
        runs = [run for r in ok for run in r.runs]
        res.runs = runs
        res.decode_tps = statistics.median(x["decode_tps"] for x in runs)
        res.ttft_s = statistics.median(x["ttft_s"] for x in runs)
        res.prefill_tps = statistics.median(res.prompt_len / x["ttft_s"] for x in runs)
        res.load_s = statistics.median(r.load_s for r in ok)
        res.peak_rss_mb = max(r.peak_rss_mb for r in ok)
        res.extra["other_cpu_cores"] = statistics.mean(x["other_cpu_cores"] for x in per_round)
        res.extra["rounds"] = per_round
    if len(ok) < len(rounds):
        res.note = (res.note + "; " if res.note else "") + (
            f"{len(rounds) - len(ok)} of {len(rounds)} rounds failed"
        )
    return res


def main(argv: list[str] | None = None) -> int:
    from bench import gpu

    cuda_args = gpu.wants_cuda(argv)
    if cuda_args is not None:  # the GPU table: scripts/bench/gpu.py
        return gpu.main(cuda_args)
    args = parse_args(argv)
    workdir: Path = args.workdir.expanduser().resolve()

    if args.prepare:
        prepare(args.prepare, workdir, args.threads)
        return 0
    if args.child:
        run_child(BenchConfig(**json.loads(args.child)))
        return 0

    from rich.console import Console
    from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    command = "python scripts/bench_decode.py" + (
        " " + shlex.join(sys.argv[1:]) if argv is None and sys.argv[1:] else ""
    )
    t_start = time.perf_counter()
    results: dict[str, ContenderResult] = {}

    selected = list(args.only)
    if "llama.cpp" in selected and not _llama_cpp_installed():
        results["llama.cpp"] = ContenderResult(
            "llama.cpp",
            "skipped",
            note="llama-cpp-python not installed (pip install llama-cpp-python)",
        )
        selected.remove("llama.cpp")

    # 1. Artifacts, each built in its own process (export/convert peaks stay out of the
    #    measurements); output goes to a log in the work dir, shown if the step fails.
    workdir.mkdir(parents=True, exist_ok=True)
    for what in dict.fromkeys(NEEDS[c] for c in selected):
        log_path = workdir / f"prepare-{what}.log"
        with console.status(f"artifact [bold]{what}[/] (cached in {workdir}; log {log_path})"):
            t0 = time.perf_counter()
            with log_path.open("w") as log:
                proc = subprocess.run(
                    _self_cmd(
                        "--_prepare",
                        what,
                        "--workdir",
                        str(workdir),
                        "--threads",
                        str(args.threads),
                    ),
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    check=False,
                )
        console.log(
            f"artifact {what}: {'ok' if proc.returncode == 0 else 'FAILED'} "
            f"({time.perf_counter() - t0:.0f} s)"
        )
        if proc.returncode != 0:
            console.print("\n".join(log_path.read_text().splitlines()[-25:]))
            for c in [c for c in selected if NEEDS[c] == what]:
                results[c] = ContenderResult(c, "failed", note=f"building {what} failed")
                selected.remove(c)
    if args.prepare_only:
        return 0 if not any(r.status == "failed" for r in results.values()) else 1

    # 2. Measure: each contender in its own process; with --rounds > 1 the contenders take
    #    turns, so slow drifts in machine load hit all of them alike.
    load_before = report.load_average()
    gflops_before = report.numpy_gflops()
    console.log(
        f"before measuring: load average {load_before[0]:.2f} {load_before[1]:.2f} "
        f"{load_before[2]:.2f}; numpy check {gflops_before:.0f} GFLOP/s; "
        f"{len(os.sched_getaffinity(0))} usable cores"
    )
    ids = prompt_ids(args.prompt_len)
    per: dict[str, list[ContenderResult]] = {c: [] for c in selected}
    with Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        console=console,
    ) as progress:
        task = progress.add_task("contenders", total=len(selected) * args.rounds)
        for rnd in range(args.rounds):
            for name in selected:
                progress.update(task, description=f"round {rnd + 1}/{args.rounds}: [bold]{name}[/]")
                cfg = BenchConfig(
                    contender=name,
                    workdir=str(workdir),
                    threads=args.threads,
                    runs=args.runs,
                    prompt_len=args.prompt_len,
                    new_tokens=(args.torch_new_tokens if name == "torch-fp32" else args.new_tokens),
                    prompt_ids=ids,
                )
                res = run_contender(cfg)
                per[name].append(res)
                progress.console.log(
                    f"{name}: {res.status} decode {res.decode_tps:.1f} tok/s, prefill "
                    f"{res.prefill_tps:.1f} tok/s, TTFT {res.ttft_s * 1000:.0f} ms, peak RSS "
                    f"{res.peak_rss_mb:.0f} MiB, other CPU "
                    f"{res.extra.get('other_cpu_cores', 0.0):.2f} cores {res.note}"
                )
                progress.advance(task)
    for name, rounds in per.items():
        results[name] = merge_rounds(rounds)
    load_after = report.load_average()
    gflops_after = report.numpy_gflops()

    ordered = [asdict(results[c]) for c in args.only if c in results]
    env = report.environment()
    meta: dict[str, Any] = {
        "command": command,
        "threads": args.threads,
        "runs": args.runs,
        "rounds": args.rounds,
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        "torch_new_tokens": args.torch_new_tokens,
        "prompt_seed": PROMPT_SEED,
        "load_before": load_before,
        "load_after": load_after,
        "numpy_gflops_before": gflops_before,
        "numpy_gflops_after": gflops_after,
        "wall_s": time.perf_counter() - t_start,
        "workdir": str(workdir),
    }
    section = report.markdown_section(ordered, LABELS, env, meta)
    print(section)
    if not args.no_write:
        report.update_section(args.md, report.SECTION, section)
        report.write_json(args.json, {"environment": env, "meta": meta, "results": ordered})
        console.log(f"wrote {args.md} and {args.json}")
    return 0 if all(r["status"] != "failed" for r in ordered) else 1


if __name__ == "__main__":
    raise SystemExit(main())
