#!/usr/bin/env python3
"""Self-test of the TensorRT backend on a Jetson or any NVIDIA GPU: PASS or FAIL, with numbers.

What it does, on a bundle whose TensorRT graph the runtime can select (docs/TENSORRT.md):

1. builds the plan for this GPU (or finds it in the plan cache): `edge-runtime build-engine`;
2. opens the decoder twice: TensorRT (`load_engine(..., backend="tensorrt")`) and ONNX
   Runtime on the CPU (the reference: the backend every other test of the project checks);
3. logits: teacher-forced prefill + decode steps over the same tokens on both, compared by
   relative max |Δ| (max |Δ| over max |reference|) and top-1 agreement;
4. greedy tokens through `Generator` (prefill + decode, the KV cache kept on the GPU) on both;
5. continuous batching on TensorRT: 4 sequences in one batch must give each sequence the
   tokens it gets alone (this exercises the cache surgery, to_host / from_host);
6. decode tokens/s at batch 1 and batch 4, TensorRT and ONNX Runtime CPU.

Tolerances (defaults; fp16 kernels against an fp32 CPU reference): relative max |Δ| <= 0.03
for fp16 / strongly typed plans (0.002 for fp32 plans), top-1 agreement >= 0.98 over all
teacher-forced positions, greedy tokens identical for at least the first 8 tokens of every
prompt (fp16 may flip a near-tie later), batch-4 tokens identical to batch-1 tokens.

Exit status: 0 PASS, 1 FAIL, 3 no TensorRT / no GPU on this machine (nothing was tested),
2 bad command line.

    python scripts/trt_selftest.py --bundle DIR --pubkey PEM [--profile max_batch=4,...]
    python scripts/trt_selftest.py --make-demo WORKDIR     # GPU machine with the [build]
        # extra: builds the tiny demo and packages its float export, which TensorRT reads
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

EXIT_PASS, EXIT_FAIL, EXIT_NO_GPU = 0, 1, 3
PROMPTS = (
    "def fibonacci(n):\n",
    "import os\nimport sys\n\n",
    "class Stack:\n    def __init__(self):\n",
    "for i in range(10):\n    print(",
)


@dataclass(frozen=True)
class Tolerance:
    rel_logits: float
    top1: float = 0.98
    greedy_prefix: int = 8


def tolerance_for(precision: str) -> Tolerance:
    return Tolerance(rel_logits=0.002 if precision == "fp32" else 0.03)


def gpu_missing() -> str | None:
    """Why this machine cannot run the test (None: it can)."""
    from edge_runtime.engines.cuda_mem import import_cudart
    from edge_runtime.engines.trt import import_tensorrt
    from edge_runtime.errors import EngineError

    try:
        import_tensorrt()
        rt = import_cudart()
    except EngineError as e:
        return str(e)
    err, count = rt.cudaGetDeviceCount()
    if int(err) != 0:
        return f"CUDA reports {getattr(err, 'name', err)}: no usable NVIDIA driver / GPU"
    return None if count > 0 else "CUDA sees no GPU"


def compare(ref: list[np.ndarray], got: list[np.ndarray]) -> dict[str, float]:
    """Logit rows of the same positions: relative and absolute max |Δ|, top-1 agreement."""
    r, g = np.stack(ref).astype(np.float64), np.stack(got).astype(np.float64)
    max_abs = float(np.abs(r - g).max())
    return {
        "max_abs": max_abs,
        "rel": max_abs / max(float(np.abs(r).max()), 1e-12),
        "top1": float(np.mean(r.argmax(-1) == g.argmax(-1))),
        "positions": float(len(ref)),
    }


def failures(logits: dict[str, float], greedy_ok: list[bool], batch_ok: bool,
             tol: Tolerance) -> list[str]:  # fmt: skip
    """The failed checks, each quoting its numbers (empty: PASS)."""
    out = []
    if logits["rel"] > tol.rel_logits:
        out.append(f"relative max |Δlogits| {logits['rel']:.4f} > {tol.rel_logits}")
    if logits["top1"] < tol.top1:
        out.append(f"top-1 agreement {logits['top1']:.4f} < {tol.top1}")
    if not all(greedy_ok):
        out.append(f"greedy tokens differ within the first {tol.greedy_prefix} for prompts "
                   f"{[i for i, ok in enumerate(greedy_ok) if not ok]}")
    if not batch_ok:
        out.append("batch-4 tokens differ from batch-1 tokens on TensorRT")
    return out


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens two sequences share."""
    n = min(len(a), len(b))
    return next((i for i in range(n) if a[i] != b[i]), n)


def teacher_forced(gen: Any, prompt: list[int], tokens: list[int]) -> list[np.ndarray]:
    """Last-position logits after the prompt and after each of `tokens` fed in turn."""
    n = len(prompt)
    logits, cache = gen.forward(np.asarray([prompt], dtype=np.int64), gen.ones[:, :n],
                                gen.positions[:, :n], gen.empty_cache(1))  # fmt: skip
    rows = [np.array(logits[0, -1], dtype=np.float32)]
    for i, t in enumerate(tokens):
        m = n + i + 1
        logits, cache = gen.forward(np.asarray([[t]], dtype=np.int64), gen.ones[:, :m],
                                    gen.positions[:, m - 1 : m], cache)  # fmt: skip
        rows.append(np.array(logits[0, -1], dtype=np.float32))
    return rows


def batch_decode(gen: Any, prompts: list[list[int]], new: int) -> tuple[list[list[int]], float]:
    """Greedy tokens of `prompts` decoded as one batch, and decode tokens/s (steps only)."""
    from edge_runtime.model.sampling import SamplingParams

    params = SamplingParams(max_tokens=new, temperature=0.0)
    dec = gen.batch(len(prompts))
    tokens: dict[int, list[int]] = {i: [] for i in range(len(prompts))}
    for i, p in enumerate(prompts):
        for c in dec.add(i, p, params):
            tokens[i].extend(c.token_ids)
    steps_tokens, t0 = 0, time.perf_counter()
    while dec.active:
        for key, chunks in dec.step().items():
            for c in chunks:
                tokens[key].extend(c.token_ids)
                steps_tokens += len(c.token_ids)
    elapsed = time.perf_counter() - t0
    return [tokens[i] for i in range(len(prompts))], steps_tokens / elapsed if elapsed else 0.0


def make_demo(work: Path) -> tuple[Path, Path]:
    """The tiny demo model, packaged from its float export (TensorRT reads plain ONNX)."""
    from edge_build import package
    from edge_build.demo import build_demo

    build_demo(work / "int4-bundle", preset="tiny", work_dir=work / "work", progress=False)
    key = work / "work" / "signing.key"
    bundle = package.run(work / "work" / "onnx", work / "float-bundle", key,
                         name="edge-tiny-float", version="1", overwrite=True)  # fmt: skip
    return bundle, work / "work" / "signing.pub"


def run(args: argparse.Namespace) -> int:
    reason = gpu_missing()
    if reason is not None:
        print(f"trt_selftest: SKIPPED — no TensorRT/GPU on this machine: {reason}")
        return EXIT_NO_GPU
    from edge_runtime.bundle.manifest import verify_bundle
    from edge_runtime.engines.load import load_engine
    from edge_runtime.engines.ort import OrtEngine
    from edge_runtime.engines.trt_build import BuildOptions, build_engine
    from edge_runtime.engines.trt_cache import select_graph
    from edge_runtime.engines.trt_plan import ProfileLimits
    from edge_runtime.model.generator import Generator
    from edge_runtime.model.sampling import SamplingParams
    from edge_runtime.model.tokenizer import TextTokenizer
    from edge_runtime.signing import trusted_keys

    bundle_dir, pubkey = (make_demo(args.make_demo) if args.make_demo
                          else (args.bundle, args.pubkey))  # fmt: skip
    bundle = verify_bundle(bundle_dir, trusted_keys([pubkey]))
    m = bundle.manifest
    limits = ProfileLimits.parse(args.profile, 4, m.generation.context_length)
    built = build_engine(bundle, BuildOptions(limits, args.precision), args.cache_dir,
                         progress=print)  # fmt: skip
    if args.cache_dir:
        import os

        os.environ["EDGE_RUNTIME_TRT_CACHE"] = str(args.cache_dir)
    # The reference runs the graph TensorRT was built from (for a Q/DQ graph, ONNX Runtime's
    # CPU provider fuses it to int8-activation MatMulNBits: part of the measured Δ).
    ref_path = str(bundle.path(select_graph(m)[1].file))
    tok_cfg = bundle.path(m.tokenizer.config_file) if m.tokenizer.config_file else None
    tokenizer = TextTokenizer.from_files(bundle.path(m.tokenizer.file), tok_cfg)
    trt_engine, graph = load_engine(bundle, "decoder", backend="tensorrt")
    trt_gen = Generator(trt_engine, graph, tokenizer, m.generation)
    ort_gen = Generator(OrtEngine(ref_path, providers=["CPUExecutionProvider"]), graph, tokenizer,
                        m.generation)  # fmt: skip
    print(f"engines: {trt_gen.engine.name} vs {ort_gen.engine.name}")
    tol = tolerance_for(built.record.precision)
    prompts = [tokenizer.encode(p)[: m.generation.context_length // 2] or [0] for p in PROMPTS]
    new = min(args.new_tokens, m.generation.context_length // 2)
    greedy = SamplingParams(max_tokens=new, temperature=0.0)

    ref_rows, got_rows, greedy_ok, report = [], [], [], {}
    for i, p in enumerate(prompts):
        ref_tokens = ort_gen.generate(p, greedy).token_ids
        trt_tokens = trt_gen.generate(p, greedy).token_ids
        k = min(tol.greedy_prefix, len(ref_tokens))
        greedy_ok.append(trt_tokens[:k] == ref_tokens[:k])
        same = common_prefix(ref_tokens, trt_tokens)
        report[f"prompt{i}"] = {"tokens": len(ref_tokens), "identical_prefix": same}
        ref_rows += teacher_forced(ort_gen, p, ref_tokens)
        got_rows += teacher_forced(trt_gen, p, ref_tokens)
    logits = compare(ref_rows, got_rows)

    singles = [batch_decode(trt_gen, [p], new) for p in prompts]
    batched, trt_b4 = batch_decode(trt_gen, prompts, new)
    batch_ok = batched == [s[0][0] for s in singles]
    trt_b1 = float(np.median([s[1] for s in singles]))
    _, ort_b1 = batch_decode(ort_gen, prompts[:1], new)
    _, ort_b4 = batch_decode(ort_gen, prompts, new)
    speed = {"trt_b1": trt_b1, "trt_b4": trt_b4, "ort_cpu_b1": ort_b1, "ort_cpu_b4": ort_b4}

    failed = failures(logits, greedy_ok, batch_ok, tol)
    print(f"plan: {built.plan} ({built.record.precision}, profile {built.record.profile})")
    print(f"logits over {int(logits['positions'])} positions: relative max |Δ| "
          f"{logits['rel']:.5f} (tol {tol.rel_logits}), max |Δ| {logits['max_abs']:.4f}, "
          f"top-1 agreement {logits['top1']:.4f} (tol {tol.top1})")
    for name, r in report.items():
        print(f"{name}: {r['identical_prefix']}/{r['tokens']} greedy tokens identical to ORT")
    print(f"batch-4 tokens == batch-1 tokens on TensorRT: {batch_ok}")
    print("decode tok/s: " + ", ".join(f"{k} {v:.1f}" for k, v in speed.items()))
    if args.json:
        args.json.write_text(json.dumps({"logits": logits, "prompts": report, "speed": speed,
                                         "batch_ok": batch_ok, "failures": failed,
                                         "record": built.record.to_dict()}, indent=2) + "\n")
    for engine in (trt_gen.engine, ort_gen.engine):
        engine.close()
    if failed:
        print("trt_selftest: FAIL — " + "; ".join(failed))
        return EXIT_FAIL
    print("trt_selftest: PASS")
    return EXIT_PASS


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", type=Path, help="bundle directory")
    p.add_argument("--pubkey", type=Path, help="its signer's public key (PEM)")
    p.add_argument("--make-demo", type=Path, metavar="WORKDIR",
                   help="build the tiny demo's float bundle here and test it (needs [build])")
    p.add_argument("--profile", default="", help="max_batch=N,max_context=N (default 4, ctx)")
    p.add_argument("--precision", default="auto")
    p.add_argument("--cache-dir", type=Path, help="plan cache (default: the runtime's)")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args(argv)
    if args.make_demo is None and (args.bundle is None or args.pubkey is None):
        p.error("give --bundle DIR --pubkey PEM, or --make-demo WORKDIR")
    from edge_runtime.errors import EdgeError

    try:
        return run(args)
    except EdgeError as e:
        print(f"trt_selftest: FAIL — {e}")
        return EXIT_FAIL


if __name__ == "__main__":
    sys.exit(main())
