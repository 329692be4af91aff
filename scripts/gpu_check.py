#!/usr/bin/env python3
"""The GPU path, checked: ONNX Runtime's CUDA provider, the KV cache on the GPU, cuda_mem.

    python scripts/gpu_check.py --demo BUNDLE --demo-pubkey PEM \\
        [--qwen-workdir DIR/qwen2-0.5b] [--out DIR]

Prints one `PASS` / `FAIL` / `INFO` line per check, with its numbers, then a summary. Exit
status: 0 all checks passed, 1 some failed, 3 no GPU here (no CUDA provider in this ONNX
Runtime, or it does not start): on a CPU machine it says so and exits 3.

Checks, on each bundle (the demo bundle built by `edge-build demo`; the Qwen2-0.5B-shape int4
bundles of scripts/bench/artifacts.py, exported graph, fused graph and the fused graph with
fp16 activations, when `--qwen-workdir` holds them):

- **greedy vs CPU**: the same prompts through `Generator` on the CUDA provider and on the CPU
  provider, both as shipped (MatMulNBits accuracy level 4: the CPU rounds activations to int8,
  the CUDA kernel does not) and with fp32 activations on the CPU (accuracy level 0, the same
  arithmetic as CUDA up to summation order and TF32). Teacher-forced: every step of the CPU's
  greedy sequence is run on the GPU too; top-1 agreement and the logits' relative error.
  Free-running: where the two greedy sequences first differ, and the CPU's top-2 margin there.
- **batch of 4 vs single stream**: 4 prompts of different lengths through one `BatchDecoder`
  on the GPU against each alone through `Generator.generate`.
- **chunked prefill**: a long prompt prefilled 16 tokens a step while another stream decodes;
  both streams' tokens against single-stream greedy.
- **KV cache on the device**: CUDA memcpy activity (torch.profiler / CUPTI, which sees ONNX
  Runtime's copies in this process) over decode steps of a `BatchDecoder`, at batch 1 and 4:
  host↔device bytes per step against the size of the KV cache; and ONNX Runtime's own
  profile: nodes per provider and Memcpy nodes per run.
- **TensorRT absent**: what ONNX Runtime does when asked for TensorRT without its library, and
  what `OrtEngine` does (leaves it out and logs why).
- **cuda_mem** (engines/cuda_mem.py, under the TensorRT backend) on the real GPU through
  cuda-python: allocation, pooling, pinned host copies, error paths.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np

REPO = Path(__file__).resolve().parent.parent
for _p in (REPO, REPO / "build"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

# edge_runtime imports, grouped (the layout of issue #10).
from edge_runtime.bundle.manifest import Bundle, verify_bundle  # noqa: E402
from edge_runtime.engines import cuda_mem  # noqa: E402
from edge_runtime.engines.load import GPU_EPS, cpu_attention_warning  # noqa: E402
from edge_runtime.engines.ort import OrtEngine, choose_providers  # noqa: E402
from edge_runtime.errors import EngineError  # noqa: E402
from edge_runtime.model.batching import BatchDecoder  # noqa: E402
from edge_runtime.model.generator import Generator, engine_defaults  # noqa: E402
from edge_runtime.model.sampling import SamplingParams  # noqa: E402
from edge_runtime.model.tokenizer import TextTokenizer  # noqa: E402
from edge_runtime.signing import load_public_key  # noqa: E402

NO_GPU = 3
CUDA = ["CUDAExecutionProvider", "CPUExecutionProvider"]
CPU = ["CPUExecutionProvider"]
PROMPTS = ["def fibonacci(n):", "import os\nimport sys\n", "class Config:\n    def __init__(",
           "for i in range(10):"]
TOKENS = 32
# The provider under test. `--self-test-on-cpu` puts the CPU provider in its place, to run
# this script's own logic on a machine without a GPU (the numbers then mean nothing).
DEVICE: dict[str, Any] = {"providers": None, "expect": "CUDAExecutionProvider"}


class Report:
    def __init__(self) -> None:
        self.lines: list[str] = []
        self.failed = 0
        self.passed = 0

    def add(self, status: str, name: str, detail: str) -> None:
        if status == "FAIL":
            self.failed += 1
        elif status == "PASS":
            self.passed += 1
        line = f"{status:4} {name}: {detail}"
        self.lines.append(line)
        print(line, flush=True)

    def check(self, ok: bool, name: str, detail: str) -> None:
        self.add("PASS" if ok else "FAIL", name, detail)


# --- environment ---------------------------------------------------------------------------


def load_cuda_libraries() -> str:
    """Load the CUDA libraries ONNX Runtime's CUDA provider links (cuBLAS, cuDNN…) the way
    the issue says: torch's, else onnxruntime.preload_dlls()."""
    try:
        import torch

        ok = torch.cuda.is_available()
        return f"torch {torch.__version__} (cuda available: {ok})"
    except ImportError:
        import onnxruntime as ort

        if hasattr(ort, "preload_dlls"):
            ort.preload_dlls()
            return "onnxruntime.preload_dlls()"
        return "nothing preloaded"


@contextlib.contextmanager
def captured_fds() -> Iterator[io.StringIO]:
    """Capture what C++ code writes to fds 1 and 2 (ONNX Runtime's logger) and Python's."""
    buf = io.StringIO()
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        sys.stdout.flush()
        sys.stderr.flush()
        saved = os.dup(1), os.dup(2)
        os.dup2(tmp.fileno(), 1)
        os.dup2(tmp.fileno(), 2)
        try:
            yield buf
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
            tmp.seek(0)
            buf.write(tmp.read().decode(errors="replace"))


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


# --- generators ----------------------------------------------------------------------------


def generator(bundle: Bundle, providers: Sequence[str] | None, graph_file: Path | None = None,
              profile: str | None = None) -> Generator:
    """Generator.from_bundle with the providers (None: OrtEngine's own choice) and graph
    file chosen here."""
    m = bundle.manifest
    graph = bundle.graph("decoder")
    path = graph_file or bundle.path(graph.file)
    engine = OrtEngine(str(path), providers=providers, profile_prefix=profile)
    tok_cfg = bundle.path(m.tokenizer.config_file) if m.tokenizer.config_file else None
    tokenizer = TextTokenizer.from_files(bundle.path(m.tokenizer.file), tok_cfg)
    gen = Generator(engine, graph, tokenizer, engine_defaults(engine, m.generation))
    gen._eos = frozenset()  # fixed lengths: random weights must not stop early
    return gen


def greedy(gen: Generator, prompt: list[int], n: int = TOKENS) -> list[int]:
    return list(gen.generate(prompt, SamplingParams(max_tokens=n, temperature=0.0)).token_ids)


def stepwise_logits(gen: Generator, prompt: list[int], tokens: Sequence[int]) -> np.ndarray:
    """Teacher-forced: the logits that chose each of `tokens` after `prompt`, [len, V]."""
    ids = np.asarray([prompt], dtype=np.int64)
    n = ids.shape[1]
    logits, cache = gen.forward(ids, gen.ones[:, :n], gen.positions[:, :n], gen.empty_cache(1))
    rows = [np.asarray(logits[0, -1], dtype=np.float64)]
    for t in tokens[:-1]:
        logits, cache = gen.forward(np.asarray([[t]], dtype=np.int64), gen.ones[:, : n + 1],
                                    gen.positions[:, n : n + 1], cache)
        rows.append(np.asarray(logits[0, -1], dtype=np.float64))
        n += 1
    return np.stack(rows)


def first_diff(a: Sequence[int], b: Sequence[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def margin(row: np.ndarray) -> float:
    top2 = np.sort(row)[-2:]
    return float(top2[1] - top2[0])


# The bar against the same graph on the CPU at accuracy level 0 (top-1 agreement, max relative
# logit error). float32 activations: the two providers differ by summation order only. float16
# activations (the fused GPU graph): each provider rounds every activation to 11 bits at its
# own points (fused kernels round once, the CPU's Cast-wrapped ops several times), so logits
# differ by ~1e-3 relative and near-ties flip; 0.95 / 5e-2 still catches a wrong kernel (a
# broken graph agrees on ~1/vocab of its tokens).
STRICT_BAR = {"float32": (0.99, 1e-2), "float16": (0.95, 5e-2)}


def compare_greedy(rep: Report, name: str, gpu: Generator, ref: Generator, ref_name: str,
                   prompts: list[list[int]], strict: bool, dtype: str = "float32") -> None:
    """Teacher-forced agreement + free-running divergence of `gpu` against `ref`."""
    agree = total = 0
    errs: list[float] = []
    diverged: list[str] = []
    for p in prompts:
        ref_ids = greedy(ref, p)
        gpu_ids = greedy(gpu, p)
        lr = stepwise_logits(ref, p, ref_ids)
        lg = stepwise_logits(gpu, p, ref_ids)
        agree += int((lr.argmax(-1) == lg.argmax(-1)).sum())
        total += len(ref_ids)
        errs.append(float(np.linalg.norm(lg - lr) / np.linalg.norm(lr)))
        k = first_diff(ref_ids, gpu_ids)
        if k is not None:
            diverged.append(f"prompt {len(diverged)}: token {k}/{len(ref_ids)} "
                            f"(CPU top-2 margin there {margin(lr[k]):.2e})")
    rate = agree / total
    detail = (f"vs {ref_name}: teacher-forced top-1 {agree}/{total} ({rate:.1%}), "
              f"logits rel. error max {max(errs):.2e}; free-running greedy identical for "
              f"{len(prompts) - len(diverged)}/{len(prompts)} prompts")
    if diverged:
        detail += " — diverges at " + "; ".join(diverged)
    if strict:
        min_rate, max_err = STRICT_BAR.get(dtype, STRICT_BAR["float32"])
        detail += f" (bar for {dtype} activations: >= {min_rate:.0%}, < {max_err:.0e})"
        rep.check(rate >= min_rate and max(errs) < max_err, f"{name} greedy", detail)
    else:
        rep.add("INFO", f"{name} greedy", detail)


def batch_vs_single(rep: Report, name: str, gen: Generator, prompts: list[list[int]]) -> None:
    single = [greedy(gen, p) for p in prompts]
    dec = BatchDecoder(gen, max_batch=len(prompts))
    got: dict[int, list[int]] = {i: [] for i in range(len(prompts))}
    params = SamplingParams(max_tokens=TOKENS, temperature=0.0)
    for i, p in enumerate(prompts):
        for c in dec.add(i, p, params):
            got[i].extend(c.token_ids)
    while dec.active:
        for k, chunks in dec.step().items():
            for c in chunks:
                got[cast(int, k)].extend(c.token_ids)
    explain_mismatch(rep, f"{name} batch of {len(prompts)} vs single stream", gen, prompts,
                     single, [got[i] for i in range(len(prompts))],
                     f"prompt lengths {[len(p) for p in prompts]}, {TOKENS} tokens each")


def explain_mismatch(rep: Report, check: str, gen: Generator, prompts: list[list[int]],
                     want: list[list[int]], got: list[list[int]], what: str) -> None:
    """PASS when identical; else PASS only where every first difference follows a near-tie
    of the single-stream logits (top-2 margin < 1e-3 x the logits' spread)."""
    same = sum(w == g for w, g in zip(want, got, strict=True))
    if same == len(want):
        rep.check(True, check, f"{what}: {same}/{len(want)} streams token-identical")
        return
    notes, ties = [], 0
    for i, (w, g) in enumerate(zip(want, got, strict=True)):
        k = first_diff(w, g)
        if k is None:
            continue
        lw = stepwise_logits(gen, prompts[i], w)
        m, spread = margin(lw[k]), float(lw[k].std())
        tie = m < 1e-3 * spread
        ties += tie
        notes.append(f"stream {i} at token {k} (single-stream top-2 margin {m:.2e}, "
                     f"logits std {spread:.2f}{', a near-tie' if tie else ''})")
    ok = ties == len(notes)
    rep.check(ok, check, f"{what}: {same}/{len(want)} streams token-identical; first "
              "differences: " + "; ".join(notes))


def chunked_prefill(rep: Report, name: str, gen: Generator, short: list[int],
                    long: list[int]) -> None:
    want = [greedy(gen, short), greedy(gen, long)]
    dec = BatchDecoder(gen, max_batch=2, prefill_chunk=16)
    got: dict[int, list[int]] = {0: [], 1: []}
    params = SamplingParams(max_tokens=TOKENS, temperature=0.0)
    for c in dec.add(0, short, params):
        got[0].extend(c.token_ids)
    queued = dec.add(1, long, params)
    steps_prefilling = 0
    while dec.active:
        steps_prefilling += dec.prefilling > 0
        for k, chunks in dec.step().items():
            for c in chunks:
                got[cast(int, k)].extend(c.token_ids)
    explain_mismatch(rep, f"{name} chunked prefill", gen, [short, long], want,
                     [got[0], got[1]],
                     f"{len(long)}-token prompt in chunks of 16 ({steps_prefilling} steps "
                     f"with a chunk; add() returned {len(queued)} chunks) beside a decoding "
                     f"stream")


# --- KV cache residency --------------------------------------------------------------------


def memcpy_per_step(gen: Generator, prompts: list[list[int]], steps: int) -> dict[str, float]:
    """CUDA memcpy activity of `steps` BatchDecoder steps (after prefill), per step."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    dec = BatchDecoder(gen, max_batch=len(prompts))
    params = SamplingParams(max_tokens=steps + 8, temperature=0.0)
    for i, p in enumerate(prompts):
        dec.add(i, p, params)
    dec.step()  # one step outside the trace
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            dec.step()
        torch.cuda.synchronize()
    fd, trace = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    prof.export_chrome_trace(trace)
    events = json.loads(Path(trace).read_text()).get("traceEvents", [])
    os.unlink(trace)
    counts: dict[str, float] = {}
    for ev in events:  # kineto: cat gpu_memcpy, name "Memcpy HtoD (Pageable -> Device)"
        if ev.get("cat") not in ("gpu_memcpy", "gpu_memset"):
            continue
        name = str(ev.get("name", ""))
        kind = next((k for k in ("HtoD", "DtoH", "DtoD", "Memset") if k in name), "other")
        nbytes = float(ev.get("args", {}).get("bytes", float("nan")))
        counts[f"{kind} copies"] = counts.get(f"{kind} copies", 0) + 1 / steps
        counts[f"{kind} bytes"] = counts.get(f"{kind} bytes", 0) + nbytes / steps
    kv = gen._kv
    ctx = dec._width
    counts["kv bytes"] = (len(prompts) * 2 * kv.num_layers * kv.num_kv_heads * kv.head_dim
                          * ctx * np.dtype(kv.dtype).itemsize)
    counts["logits bytes"] = len(prompts) * gen.vocab_size * np.dtype(gen.logits_dtype).itemsize
    return counts


def ort_profile(path: str) -> dict[str, Any]:
    """Nodes per provider, Memcpy nodes and runs in an ONNX Runtime profile JSON."""
    events = json.loads(Path(path).read_text())
    runs = sum(1 for e in events if e.get("cat") == "Session" and e.get("name") == "model_run")
    per_provider: dict[str, int] = {}
    memcpy: dict[str, int] = {}
    cpu_ops: dict[str, int] = {}
    for e in events:
        if e.get("cat") != "Node" or not str(e.get("name", "")).endswith("_kernel_time"):
            continue
        args = e.get("args", {})
        prov = args.get("provider", "?")
        per_provider[prov] = per_provider.get(prov, 0) + 1
        op = args.get("op_name", "?")
        if op.startswith("Memcpy"):
            memcpy[op] = memcpy.get(op, 0) + 1
        if prov == "CPUExecutionProvider":
            cpu_ops[op] = cpu_ops.get(op, 0) + 1
    return {"runs": runs, "nodes": per_provider, "memcpy": memcpy, "cpu_ops": cpu_ops}


def kv_on_device(rep: Report, name: str, bundle: Bundle, prompts: list[list[int]],
                 outdir: Path) -> None:
    try:
        import torch

        if not torch.cuda.is_available():
            raise ImportError("no CUDA in torch")
    except ImportError:
        rep.add("INFO", f"{name} KV residency", "torch not importable: no CUPTI trace")
        torch_ok = False
    else:
        torch_ok = True
    prefix = str(outdir / f"ort-profile-{name.replace(' ', '-')}")
    gen = generator(bundle, DEVICE["providers"], profile=prefix)
    if torch_ok:
        for batch in (1, len(prompts)):
            try:
                c = memcpy_per_step(gen, prompts[:batch], 8)
            except EngineError as e:  # e.g. a graph that cannot batch
                rep.add("INFO", f"{name} KV residency batch {batch}", f"not run: {e}")
                continue
            h2d, d2h = c.get("HtoD bytes", 0.0), c.get("DtoH bytes", 0.0)
            detail = (f"per decode step: {c.get('HtoD copies', 0):.1f} HtoD copies "
                      f"({h2d:,.0f} B), {c.get('DtoH copies', 0):.1f} DtoH ({d2h:,.0f} B), "
                      f"{c.get('DtoD copies', 0):.1f} DtoD ({c.get('DtoD bytes', 0):,.0f} B), "
                      f"{c.get('Memset copies', 0):.1f} memsets; KV cache "
                      f"{c['kv bytes']:,.0f} B, logits {c['logits bytes']:,.0f} B")
            check = f"{name} KV cache stays on the GPU, batch {batch}"
            if c.get("DtoH copies", 0) < 1:  # the logits must come back every step
                rep.add("INFO", check, detail + " — CUPTI saw none of ONNX Runtime's copies; "
                        "see the placement line")
            elif np.isnan(h2d) or np.isnan(d2h):
                rep.add("INFO", check, detail + " (CUPTI gave no byte counts)")
            else:
                # The host sends ids, mask, positions and gets the logits back: anything near
                # the cache's size would be the cache making a round trip.
                ok = h2d < 0.1 * c["kv bytes"] and d2h < 0.1 * c["kv bytes"] + 1.5 * c[
                    "logits bytes"]
                rep.check(ok, check, detail)
    else:
        greedy(gen, prompts[0], 8)
    assert isinstance(gen.engine, OrtEngine)
    providers = gen.engine.providers
    prof = ort_profile(gen.engine.end_profiling())
    gen.engine.close()
    runs = max(prof["runs"], 1)
    nodes = ", ".join(f"{k} {v / runs:.0f}" for k, v in sorted(prof["nodes"].items()))
    memcpy = ", ".join(f"{k} {v / runs:.1f}" for k, v in sorted(prof["memcpy"].items())) or "0"
    cpu_ops = ", ".join(f"{k} x{v / runs:.0f}" for k, v in sorted(prof["cpu_ops"].items()))
    heavy = {"MatMulNBits", "MatMul", "GroupQueryAttention", "Attention",
             "SkipSimplifiedLayerNormalization", "SimplifiedLayerNormalization",
             "RotaryEmbedding", "Softmax", "GatherBlockQuantized"}
    on_cpu = sorted(set(prof["cpu_ops"]) & heavy)
    rep.check(not on_cpu, f"{name} ONNX Runtime placement",
              f"{prof['runs']} runs; nodes per run by provider: {nodes}; Memcpy nodes per run:"
              f" {memcpy}; on CPU per run: {cpu_ops or 'none'}"
              + (f" — compute ops on the CPU: {on_cpu}" if on_cpu else ""))
    # The runtime's load-time warning (engines.load) must say so exactly when it happens.
    warning = cpu_attention_warning(providers, bundle.graph("decoder"))
    gqa_on_cpu = "GroupQueryAttention" in prof["cpu_ops"]
    check = f"{name} runtime warns of CPU attention"
    if not any(p in GPU_EPS for p in providers):
        rep.add("INFO", check, f"not checked: the session runs on {providers}")
    else:
        rep.check((warning is not None) == gqa_on_cpu, check,
                  f"GroupQueryAttention on the CPU: {gqa_on_cpu}; load-time warning: "
                  f"{warning or 'none'}")


# --- TensorRT absent -----------------------------------------------------------------------


def tensorrt_absent(rep: Report, graph: str) -> None:
    import onnxruntime as ort

    avail = ort.get_available_providers()
    if "TensorrtExecutionProvider" not in avail:
        rep.add("INFO", "TensorRT provider", f"not in this ONNX Runtime build ({avail})")
    else:  # in a child process: a provider library that fails to load may take it down
        code = ("import sys, torch, onnxruntime as ort\n"
                "s = ort.InferenceSession(sys.argv[1], providers=['TensorrtExecutionProvider',"
                " 'CUDAExecutionProvider', 'CPUExecutionProvider'])\n"
                "print('ACTIVE', s.get_providers())\n")
        proc = subprocess.run([sys.executable, "-c", code, graph], capture_output=True,
                              text=True, timeout=300, check=False)
        said = " | ".join(ln.strip() for ln in (proc.stdout + proc.stderr).splitlines()
                          if ln.strip())
        rep.add("INFO", "ONNX Runtime asked for TensorRT without TensorRT",
                f"exit status {proc.returncode}; output: {said[:900] or '(nothing)'}")
    handler = Records()
    logging.getLogger("edge_runtime").addHandler(handler)
    try:
        with captured_fds() as out:
            engine = OrtEngine(graph)
    finally:
        logging.getLogger("edge_runtime").removeHandler(handler)
    logged = [r.getMessage() for r in handler.records if r.levelno >= logging.WARNING]
    chosen = choose_providers()
    ok = engine.name == "onnxruntime:CUDAExecutionProvider" and (
        "TensorrtExecutionProvider" not in avail or any("Tensorrt" in s for s in logged))
    rep.check(ok, "OrtEngine without TensorRT",
              f"runs on {engine.name}; providers asked for {chosen}; log: "
              f"{' | '.join(logged) or '(nothing)'}; ONNX Runtime printed "
              f"{len(out.getvalue().strip())} characters")
    engine.close()


# --- cuda_mem ------------------------------------------------------------------------------


def check_cuda_mem(rep: Report) -> None:
    try:
        rt = cuda_mem.import_cudart()
    except EngineError as e:
        rep.add("FAIL", "cuda_mem import", str(e))
        return
    n = cuda_mem.check(rt.cudaGetDeviceCount(), "cudaGetDeviceCount")
    frees: list[int] = []

    def malloc(size: int) -> int:
        return int(cuda_mem.check(rt.cudaMalloc(size), "cudaMalloc"))

    def free(ptr: int) -> None:
        frees.append(ptr)
        cuda_mem.check(rt.cudaFree(ptr), "cudaFree")

    pool = cuda_mem.BufferPool(malloc, free, max_idle_bytes=64 << 20)
    stream = cuda_mem.check(rt.cudaStreamCreate(), "cudaStreamCreate")
    pinned = cuda_mem.PinnedBuffer(rt)
    h2d = rt.cudaMemcpyKind.cudaMemcpyHostToDevice
    d2h = rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
    # 1. round trip through a CudaTensor and the pinned buffer, asynchronous on a stream
    data = np.random.default_rng(0).standard_normal((512, 1000)).astype(np.float32)
    t = cuda_mem.CudaTensor(pool, data.shape, "float32")
    src_ptr, src = pinned.view(data.nbytes)
    src[:] = data.view(np.uint8).reshape(-1)
    cuda_mem.check(rt.cudaMemcpyAsync(t.ptr, src_ptr, t.nbytes, h2d, stream), "H2D")
    back = np.empty_like(data)
    pinned2 = cuda_mem.PinnedBuffer(rt)
    dst_ptr, dst = pinned2.view(data.nbytes)
    dst[:] = 0
    cuda_mem.check(rt.cudaMemcpyAsync(dst_ptr, t.ptr, t.nbytes, d2h, stream), "D2H")
    cuda_mem.check(rt.cudaStreamSynchronize(stream), "cudaStreamSynchronize")
    back.view(np.uint8).reshape(-1)[:] = dst
    rep.check(bool(np.array_equal(back, data)), "cuda_mem round trip",
              f"{n} device(s); {data.nbytes:,} B host→device→host through pinned buffers on a "
              f"stream: identical; pool class {cuda_mem.size_class(data.nbytes):,} B")
    # 2. pooling: a released buffer of the same class comes back; no cudaMalloc
    ptr = t.ptr
    del t
    gc.collect()
    idle = pool.idle_bytes
    t2 = cuda_mem.CudaTensor(pool, (500, 1000), "float32")  # same power-of-two class
    rep.check(t2.ptr == ptr and pool.live == 1 and idle > 0, "cuda_mem pool reuse",
              f"released {idle:,} B idle; the next tensor of that class got the same pointer "
              f"({t2.ptr == ptr}); live {pool.live}")
    # 3. eviction: idle beyond max_idle_bytes is freed at once
    big = [cuda_mem.CudaTensor(pool, (40 << 20,), "uint8") for _ in range(2)]
    del big
    gc.collect()
    rep.check(len(frees) == 1 and pool.idle_bytes <= pool.max_idle_bytes,
              "cuda_mem idle limit", f"2 x 64 MiB released into a 64 MiB idle budget: "
              f"{len(frees)} freed with cudaFree, {pool.idle_bytes:,} B kept")
    # 4. error paths
    errors = []
    try:
        cuda_mem.CudaTensor(pool, (1 << 48,), "uint8")
        errors.append("a 256 TiB allocation did not fail")
    except EngineError as e:
        oom = str(e)
    try:
        cuda_mem.check(rt.cudaFree(12345), "cudaFree")
        errors.append("cudaFree(12345) did not fail")
    except EngineError as e:
        bad_free = str(e)
    pool.close()
    try:
        cuda_mem.CudaTensor(pool, (16,), "float32")
        errors.append("a closed pool handed out a buffer")
    except EngineError as e:
        closed = str(e)
    del t2
    gc.collect()
    grown = pinned.view(3 << 20)[1].nbytes
    pinned.close()
    pinned2.close()
    pinned.close()  # idempotent
    cuda_mem.check(rt.cudaStreamDestroy(stream), "cudaStreamDestroy")
    # After the sticky-error test, the device must still work.
    probe = malloc(1024)
    cuda_mem.check(rt.cudaFree(probe), "cudaFree")
    if errors:
        rep.check(False, "cuda_mem error paths", "; ".join(errors))
    else:
        rep.check(all(frees) and pool.live == 0, "cuda_mem error paths",
                  f"OOM → {oom!r}; bad free → {bad_free!r}; closed pool → {closed!r}; "
                  f"pinned buffer grew to {grown:,} B; after close: {len(frees)} cudaFree, "
                  f"live {pool.live}; the device still allocates")


# --- main ----------------------------------------------------------------------------------


def bundle_checks(rep: Report, name: str, bundle: Bundle, outdir: Path,
                  long_prompt_len: int = 100) -> None:
    from edge_build.evaluate import save_fp32_activations

    t0 = time.perf_counter()
    gpu = generator(bundle, DEVICE["providers"])
    if not gpu.engine.name.endswith(DEVICE["expect"]):
        rep.add("FAIL", f"{name} on CUDA", f"OrtEngine chose {gpu.engine.name}")
        return
    cpu = generator(bundle, CPU)
    prompts = [gpu.text_prompt(p) for p in PROMPTS]
    # demo-style prompts may be short: pad the set to distinct lengths
    compare_greedy(rep, f"{name} CUDA", gpu, cpu, "CPU as shipped (accuracy level 4)",
                   prompts, strict=False)
    with tempfile.TemporaryDirectory() as tmp:
        src = bundle.path(bundle.graph("decoder").file)
        fp32 = save_fp32_activations(src, Path(tmp) / "decoder.onnx")
        cpu32 = generator(bundle, CPU, graph_file=fp32)
        kv = bundle.graph("decoder").kv_cache
        compare_greedy(rep, f"{name} CUDA", gpu, cpu32,
                       "CPU at accuracy level 0 (no int8 rounding)",
                       prompts, strict=True, dtype=kv.dtype if kv else "float32")
        cpu32.engine.close()
    cpu.engine.close()
    graph = gpu.graph
    if graph.left_padded_batch or graph.right_padded_batch:
        batch_vs_single(rep, f"{name} CUDA", gpu, prompts)
        rng = np.random.default_rng(1)
        long = rng.integers(3, min(gpu.vocab_size, 2000), size=long_prompt_len).tolist()
        chunked_prefill(rep, f"{name} CUDA", gpu, prompts[1], long)
    else:
        rep.add("INFO", f"{name} batching", "this graph declares no padded-batch layout")
    gpu.engine.close()
    kv_on_device(rep, name, bundle, prompts, outdir)
    rep.add("INFO", f"{name} time", f"{time.perf_counter() - t0:.1f} s")


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--demo", type=Path, help="the demo bundle (edge-build demo)")
    ap.add_argument("--demo-pubkey", type=Path)
    ap.add_argument("--qwen-workdir", type=Path,
                    help="a model dir of scripts/bench/gpu.py's workdir (bundles + keys/)")
    ap.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "gpu_check")
    ap.add_argument("--skip-cuda-mem", action="store_true")
    ap.add_argument("--cuda-mem-only", action="store_true",
                    help="only the cuda_mem checks (cuda-python; no ONNX Runtime GPU needed)")
    ap.add_argument("--self-test-on-cpu", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    rep = Report()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    preload = load_cuda_libraries()
    if args.cuda_mem_only:
        rep.add("INFO", "environment", f"preloaded: {preload}")
        check_cuda_mem(rep)
        print(f"\nSUMMARY: {rep.passed} passed, {rep.failed} failed")
        return 1 if rep.failed else 0
    import onnxruntime as ort

    avail = ort.get_available_providers()
    rep.add("INFO", "environment", f"onnxruntime {ort.__version__} from "
            f"{Path(ort.__file__).parent}; providers {avail}; preloaded: {preload}")
    if args.self_test_on_cpu:
        DEVICE.update(providers=CPU, expect="CPUExecutionProvider")
        demo = verify_bundle(args.demo, [load_public_key(args.demo_pubkey)])
        bundle_checks(rep, "demo (self-test on CPU)", demo, args.out)
        return 1 if rep.failed else 0
    if "CUDAExecutionProvider" not in avail:
        rep.add("FAIL", "CUDA provider", "this ONNX Runtime has no CUDAExecutionProvider: "
                "no GPU check possible here (exit 3)")
        return NO_GPU
    if args.demo is None:
        ap.error("--demo is required on a GPU machine")
    demo = verify_bundle(args.demo, [load_public_key(args.demo_pubkey)])
    graph = str(demo.path(demo.graph("decoder").file))
    probe = OrtEngine(graph, providers=CUDA)
    if probe.name != "onnxruntime:CUDAExecutionProvider":
        rep.add("FAIL", "CUDA provider", f"listed, but the session runs on {probe.name}: "
                "no GPU here (exit 3)")
        return NO_GPU
    probe.close()
    try:
        import torch

        rep.add("INFO", "GPU", f"{torch.cuda.get_device_name(0)}")
    except (ImportError, RuntimeError) as e:
        rep.add("INFO", "GPU", f"torch gives no name ({e})")

    tensorrt_absent(rep, graph)
    if not args.skip_cuda_mem:
        check_cuda_mem(rep)
    bundle_checks(rep, "demo", demo, args.out)
    if args.qwen_workdir:
        from bench import artifacts  # scripts/bench

        pub = load_public_key(args.qwen_workdir / "keys" / "bench.pub")
        for label, sub in (("qwen2-0.5b int4", artifacts.BUNDLE_DIR),
                           ("qwen2-0.5b int4 fused", artifacts.FUSED_BUNDLE_DIR),
                           ("qwen2-0.5b int4 fused fp16", artifacts.FUSED_FP16_BUNDLE_DIR)):
            path = args.qwen_workdir / sub
            if not (path / "manifest.json").is_file():
                rep.add("FAIL", label, f"no bundle at {path}")
                continue
            bundle_checks(rep, label, verify_bundle(path, [pub]), args.out)
    print(f"\nSUMMARY: {rep.passed} passed, {rep.failed} failed "
          f"({sum(ln.startswith('INFO') for ln in rep.lines)} info lines)")
    (args.out / "gpu_check.txt").write_text("\n".join(rep.lines) + "\n")
    return 1 if rep.failed else 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO / "scripts"))
    raise SystemExit(main())
