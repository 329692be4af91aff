"""The contenders. Each runs in its own subprocess (see `run_child`) so peak RSS is its own.

Every contender gets the same prompt token ids (batch 1) and generates greedily, ignoring EOS,
for a fixed number of new tokens. Per run we record, by wall clock around the contender's
own call:

    ttft_s      call start -> first new token id known (prompt forward + argmax)
    prefill     prompt_len / ttft_s tokens/s
    decode      (new_tokens - 1) / (time from first to last new token) tokens/s

One warm-up run (same prompt, a few new tokens) precedes the measured runs; the report shows
the median of each metric over the measured runs. Peak RSS is the child's VmHWM at exit,
so it includes loading the model.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

WARMUP_NEW_TOKENS = 4


@dataclass(frozen=True)
class BenchConfig:
    contender: str
    workdir: str
    threads: int
    runs: int
    prompt_len: int
    new_tokens: int
    prompt_ids: list[int]


@dataclass
class RunTiming:
    ttft_s: float
    decode_s: float
    new_tokens: int
    token_ids: list[int] = field(default_factory=list)

    @property
    def decode_tps(self) -> float:
        steps = self.new_tokens - 1
        return steps / self.decode_s if steps > 0 and self.decode_s > 0 else 0.0


@dataclass
class ContenderResult:
    contender: str
    status: str  # "ok" | "skipped" | "failed"
    note: str = ""
    load_s: float = 0.0
    new_tokens: int = 0
    prompt_len: int = 0
    threads: int = 0
    decode_tps: float = 0.0
    prefill_tps: float = 0.0
    ttft_s: float = 0.0
    peak_rss_mb: float = 0.0
    runs: list[dict[str, Any]] = field(default_factory=list)
    first_token_ids: list[int] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


def vm_hwm_mb() -> float:
    """This process's peak resident set size (VmHWM), MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _log(cfg: BenchConfig, msg: str) -> None:
    print(f"[{cfg.contender}] {msg}", file=sys.stderr, flush=True)


Generate = Callable[[Sequence[int], int], RunTiming]


def _measure(
    cfg: BenchConfig, generate: Generate, load_s: float, note: str = ""
) -> ContenderResult:
    """Warm up once, then `cfg.runs` measured runs; medians into a ContenderResult."""
    generate(cfg.prompt_ids, WARMUP_NEW_TOKENS)
    runs: list[RunTiming] = []
    for i in range(cfg.runs):
        r = generate(cfg.prompt_ids, cfg.new_tokens)
        runs.append(r)
        _log(
            cfg,
            f"run {i + 1}/{cfg.runs}: decode {r.decode_tps:.2f} tok/s, "
            f"TTFT {r.ttft_s * 1000:.0f} ms, prefill {cfg.prompt_len / r.ttft_s:.1f} tok/s",
        )
    short = [r.new_tokens for r in runs if r.new_tokens != cfg.new_tokens]
    if short:
        note = (note + "; " if note else "") + f"stopped early at {short} tokens"
    return ContenderResult(
        contender=cfg.contender,
        status="ok",
        note=note,
        load_s=load_s,
        new_tokens=cfg.new_tokens,
        prompt_len=cfg.prompt_len,
        threads=cfg.threads,
        decode_tps=statistics.median(r.decode_tps for r in runs),
        prefill_tps=statistics.median(cfg.prompt_len / r.ttft_s for r in runs),
        ttft_s=statistics.median(r.ttft_s for r in runs),
        runs=[
            {
                "ttft_s": r.ttft_s,
                "decode_s": r.decode_s,
                "new_tokens": r.new_tokens,
                "decode_tps": r.decode_tps,
            }
            for r in runs
        ],
        first_token_ids=runs[0].token_ids[:16],
    )


# --- 1. ours ---------------------------------------------------------------------------------


def bench_ours(cfg: BenchConfig, bundle_dir: str | None = None) -> ContenderResult:
    """Our generator (edge_runtime) on the signed int4 bundle, exactly as the daemon loads it:
    verify signature and hashes, open the decoder with ONNX Runtime, generate greedily."""
    from bench import artifacts

    _ensure_repo_importable()
    from edge_runtime.bundle.manifest import verify_bundle
    from edge_runtime.model.generator import Generator
    from edge_runtime.model.sampling import SamplingParams
    from edge_runtime.signing import load_public_key

    workdir = Path(cfg.workdir)
    t0 = time.perf_counter()
    bundle = verify_bundle(workdir / (bundle_dir or artifacts.BUNDLE_DIR),
                           [load_public_key(workdir / "keys" / "bench.pub")])
    gen = Generator.from_bundle(bundle, backend="onnxruntime", threads=cfg.threads)
    load_s = time.perf_counter() - t0
    # The benchmark generates a fixed number of tokens: random weights must not stop at EOS.
    gen._eos = frozenset()

    def generate(prompt: Sequence[int], n: int) -> RunTiming:
        done = gen.generate(list(prompt), SamplingParams(max_tokens=n, temperature=0.0))
        st = done.stats
        return RunTiming(st.ttft_s, st.decode_s, st.completion_tokens, list(done.token_ids))

    return _measure(cfg, generate, load_s)


def bench_ours_fused(cfg: BenchConfig) -> ContenderResult:
    """The same, on the bundle whose graph went through `edge_build.fuse` (batch 1 here)."""
    from bench import artifacts

    return bench_ours(cfg, artifacts.FUSED_BUNDLE_DIR)


def _ensure_repo_importable() -> None:
    """Benchmark this checkout's packages even when the project is not pip-installed."""
    repo = Path(__file__).resolve().parents[2]
    for path in (repo, repo / "build"):
        if str(path) not in sys.path:
            sys.path.append(str(path))


# --- 2. ort-bare -----------------------------------------------------------------------------


def bench_ort_bare(cfg: BenchConfig) -> ContenderResult:
    """A careful bare ONNX Runtime loop on the int4 graph.

    IOBinding throughout: the prompt/mask/positions are bound from numpy views (no copy),
    logits are written by ORT straight into a numpy buffer we own, and each step's `present.*`
    OrtValues are bound as the next step's `past_key_values.*` (never converted to numpy).
    """
    import onnxruntime as ort

    from bench import artifacts

    path = Path(cfg.workdir) / artifacts.BUNDLE_DIR / "model" / "decoder.onnx"
    t0 = time.perf_counter()
    so = ort.SessionOptions()
    so.intra_op_num_threads = cfg.threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    load_s = time.perf_counter() - t0

    in_names = [i.name for i in sess.get_inputs()]
    past_names = [n for n in in_names if n.startswith("past_key_values.")]
    present_names = [n.replace("past_key_values.", "present.") for n in past_names]
    out_names = {o.name for o in sess.get_outputs()}
    missing = [n for n in present_names if n not in out_names]
    if missing:
        raise RuntimeError(f"graph outputs lack {missing[:2]}...")
    kv_shape = sess.get_inputs()[in_names.index(past_names[0])].shape  # [b, kvh, past, hd]
    kv_heads, head_dim = int(kv_shape[1]), int(kv_shape[3])
    vocab = int(sess.get_outputs()[0].shape[-1])
    last_only = sess.get_outputs()[0].shape[1] == 1
    has_mask = "attention_mask" in in_names
    has_pos = "position_ids" in in_names

    ctx = cfg.prompt_len + cfg.new_tokens + 8
    ones = np.ones((1, ctx), dtype=np.int64)
    positions = np.arange(ctx, dtype=np.int64)[None, :]
    step_logits = np.empty((1, 1, vocab), dtype=np.float32)
    empty_kv = ort.OrtValue.ortvalue_from_numpy(np.zeros((1, kv_heads, 0, head_dim), np.float32))
    io = sess.io_binding()

    def step(ids: np.ndarray, start: int, past: list[Any], logits: np.ndarray) -> list[Any]:
        end = start + ids.shape[1]
        io.clear_binding_inputs()
        io.clear_binding_outputs()
        io.bind_cpu_input("input_ids", ids)
        if has_mask:
            io.bind_cpu_input("attention_mask", ones[:, :end])
        if has_pos:
            io.bind_cpu_input("position_ids", positions[:, start:end])
        for name, value in zip(past_names, past, strict=True):
            io.bind_ortvalue_input(name, value)
        io.bind_output("logits", "cpu", 0, np.float32, list(logits.shape), logits.ctypes.data)
        for name in present_names:
            io.bind_output(name, "cpu")
        sess.run_with_iobinding(io)
        return io.get_outputs()[1:]  # presents, in bind order; logits already in `logits`

    def generate(prompt: Sequence[int], n: int) -> RunTiming:
        ids = np.asarray([prompt], dtype=np.int64)
        # The bundle's graph computes logits for the last position only.
        rows = 1 if last_only else ids.shape[1]
        prefill_logits = np.empty((1, rows, vocab), dtype=np.float32)
        tok_buf = np.empty((1, 1), dtype=np.int64)
        t0 = time.perf_counter()
        past = step(ids, 0, [empty_kv] * len(past_names), prefill_logits)
        token = int(prefill_logits[0, -1].argmax())
        t_first = time.perf_counter()
        out = [token]
        pos = ids.shape[1]
        while len(out) < n:
            tok_buf[0, 0] = token
            past = step(tok_buf, pos, past, step_logits)
            token = int(step_logits[0, -1].argmax())
            out.append(token)
            pos += 1
        t_end = time.perf_counter()
        return RunTiming(t_first - t0, t_end - t_first, len(out), out)

    res = _measure(cfg, generate, load_s)
    res.extra["onnx"] = str(path)
    res.extra["providers"] = sess.get_providers()
    return res


# --- 3. torch-fp32 ---------------------------------------------------------------------------


def bench_torch_fp32(cfg: BenchConfig) -> ContenderResult:
    """PyTorch eager fp32, manual greedy loop over the HF model with its KV cache.

    As `generate` does, prefill asks for last-position logits only (`logits_to_keep=1`).
    """
    import torch
    from transformers import Qwen2ForCausalLM

    from bench import artifacts

    torch.set_num_threads(cfg.threads)
    t0 = time.perf_counter()
    model = Qwen2ForCausalLM.from_pretrained(
        Path(cfg.workdir) / artifacts.HF_DIR, dtype=torch.float32
    ).eval()
    load_s = time.perf_counter() - t0

    @torch.inference_mode()
    def generate(prompt: Sequence[int], n: int) -> RunTiming:
        ids = torch.tensor([list(prompt)], dtype=torch.long)
        t0 = time.perf_counter()
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
        token = int(out.logits[0, -1].argmax())
        t_first = time.perf_counter()
        toks = [token]
        past = out.past_key_values
        step = torch.empty((1, 1), dtype=torch.long)
        while len(toks) < n:
            step[0, 0] = token
            out = model(input_ids=step, past_key_values=past, use_cache=True)
            past = out.past_key_values
            token = int(out.logits[0, -1].argmax())
            toks.append(token)
        t_end = time.perf_counter()
        return RunTiming(t_first - t0, t_end - t_first, len(toks), toks)

    res = _measure(cfg, generate, load_s)
    res.extra["torch_threads"] = torch.get_num_threads()
    res.extra["attn_implementation"] = model.config._attn_implementation
    return res


# --- 4. llama.cpp Q4_0 -----------------------------------------------------------------------


def bench_llama_cpp(cfg: BenchConfig) -> ContenderResult:
    """llama-cpp-python on the same weights converted to GGUF and quantized to Q4_0.

    Low-level loop: `Llama.eval` (prompt in one batch, then one token per call) and argmax over
    the last logits row, timed by wall clock like the others. llama.cpp's own perf counters
    (`llama_perf_context`) for the last run go into `extra`.
    """
    import llama_cpp

    from bench import artifacts

    path = Path(cfg.workdir) / artifacts.GGUF_DIR / "model-q4_0.gguf"
    t0 = time.perf_counter()
    llm = llama_cpp.Llama(
        model_path=str(path),
        n_threads=cfg.threads,
        n_threads_batch=cfg.threads,
        n_ctx=cfg.prompt_len + cfg.new_tokens + 16,
        n_batch=max(512, cfg.prompt_len),
        n_ubatch=max(512, cfg.prompt_len),
        logits_all=False,
        verbose=False,
    )
    load_s = time.perf_counter() - t0
    ctx = llm._ctx.ctx
    n_vocab = llm.n_vocab()

    def last_logits() -> np.ndarray:
        # Not `llm.scores`: with logits_all=False, Llama.eval no longer copies logits there
        # (0.3.x samples inside llama.cpp). Read the last row in place, no copy.
        return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, -1), shape=(n_vocab,))

    def generate(prompt: Sequence[int], n: int) -> RunTiming:
        llm.reset()  # n_tokens = 0; eval() drops cache cells >= n_tokens
        llama_cpp.llama_perf_context_reset(ctx)
        t0 = time.perf_counter()
        llm.eval(list(prompt))
        token = int(last_logits().argmax())
        t_first = time.perf_counter()
        toks = [token]
        while len(toks) < n:
            llm.eval([token])
            token = int(last_logits().argmax())
            toks.append(token)
        t_end = time.perf_counter()
        return RunTiming(t_first - t0, t_end - t_first, len(toks), toks)

    res = _measure(cfg, generate, load_s)
    perf = llama_cpp.llama_perf_context(ctx)
    res.extra["llama_perf_last_run"] = {
        "t_p_eval_ms": perf.t_p_eval_ms,
        "n_p_eval": perf.n_p_eval,
        "t_eval_ms": perf.t_eval_ms,
        "n_eval": perf.n_eval,
        "prefill_tps": perf.n_p_eval / perf.t_p_eval_ms * 1000 if perf.t_p_eval_ms else 0.0,
        "decode_tps": perf.n_eval / perf.t_eval_ms * 1000 if perf.t_eval_ms else 0.0,
    }
    res.extra["gguf"] = str(path)
    res.extra["system_info"] = llama_cpp.llama_print_system_info().decode(errors="replace")
    return res


CONTENDERS: dict[str, Callable[[BenchConfig], ContenderResult]] = {
    "ours": bench_ours,
    "ours-fused": bench_ours_fused,
    "ort-bare": bench_ort_bare,
    "torch-fp32": bench_torch_fp32,
    "llama.cpp": bench_llama_cpp,
}
LABELS = {
    "ours": "ours (edge_runtime, int4 ONNX)",
    "ours-fused": "ours, fused graph (GQA)",
    "ort-bare": "ORT bare loop (int4 ONNX)",
    "torch-fp32": "PyTorch eager fp32",
    "llama.cpp": "llama.cpp Q4_0",
}
RESULT_PREFIX = "BENCH_RESULT "


def run_child(cfg: BenchConfig) -> None:
    """Entry point of a contender subprocess: print one JSON result line on stdout."""
    try:
        res = CONTENDERS[cfg.contender](cfg)
    except ImportError as e:
        res = ContenderResult(cfg.contender, "skipped", note=f"{type(e).__name__}: {e}")
    except Exception as e:  # reported in the table, the run goes on
        import traceback

        traceback.print_exc()
        res = ContenderResult(cfg.contender, "failed", note=f"{type(e).__name__}: {e}")
    res.peak_rss_mb = vm_hwm_mb()
    res.extra.setdefault("pid", os.getpid())
    print(RESULT_PREFIX + json.dumps(asdict(res)), flush=True)
