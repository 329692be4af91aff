"""GPU decode benchmark: `bench_decode.py --device cuda` and `bench_batching.py --device cuda`.

One table for a CUDA GPU: decode tokens/s (aggregate over the batch) at batch 1, 4, 16 and
the time to first token at batch 1, for Qwen2-0.5B and Qwen2-1.5B shapes (random weights,
seed 0, built here: scripts/bench/artifacts.py), contenders in their own processes:

    ours          edge_runtime Generator (batch 1) / BatchDecoder (batch > 1) on the signed
                  int4 bundle (MatMulNBits, block 128, fp32 activations), OrtEngine with the
                  providers it picks itself (CUDA on a GPU machine)
    ours-fused    the same on the fused bundle (GroupQueryAttention, fused norms)
    ours-fused-fp16  the fused bundle with fp16 activations, cache and logits
    ort-fp16      a bare ONNX Runtime CUDA loop (IOBinding, KV cache kept on the GPU) on an
                  Optimum fp16 export (`dtype="fp16"`, exported on the GPU)
    torch-fp16    transformers `generate`, fp16, dynamic cache, eager
    torch-compile transformers `generate`, fp16, `cache_implementation="static"` (transformers
                  compiles the decode step with torch.compile itself)
    llama.cpp     llama.cpp built with CUDA, the same weights as GGUF Q4_0: `llama-bench`
                  (batch 1, pp128 / tg128) and `llama-batched-bench` (batch 4, 16)

Every row gets the bytes one decode step reads (weights once + the KV cache at the mean
context; formula in `step_bytes`), the bandwidth that implies, its fraction of the copy
bandwidth measured in the same run (device-to-device copy of 1 GiB, read + write), and a
projection for a Jetson AGX Orin 64 GB (204.8 GB/s): the same fraction of 204.8 GB/s over the
same bytes. The projection is arithmetic, not a measurement.

Layout: `--workdir`/<model>/ holds that model's artifacts (the layout of artifacts.py, plus
onnx-fp16/ and gguf/). `--llama-dir` is a llama.cpp source tree with `build/bin` built
(scripts/gpu/llama_build.sh). Results: JSON (`--json`) and, with `--render`, the markdown
section `bench_gpu` of docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import artifacts

REPO = Path(__file__).resolve().parents[2]
ORIN_BW = 204.8e9
MODELS: dict[str, dict[str, Any]] = {
    "qwen2-0.5b": artifacts.QWEN2_05B_SHAPES,
    "qwen2-1.5b": artifacts.QWEN2_15B_SHAPES,
}
LABELS = {"qwen2-0.5b": "Qwen2-0.5B shapes", "qwen2-1.5b": "Qwen2-1.5B shapes"}
CONTENDERS = ("ours", "ours-fused", "ours-fused-fp16", "ort-fp16", "torch-fp16",
              "torch-compile", "llama.cpp")
CONTENDER_LABELS = {
    "ours": "ours: ORT CUDA int4 (MatMulNBits), exported graph",
    "ours-fused": "ours: ORT CUDA int4, fused graph (GQA)",
    "ours-fused-fp16": "ours: ORT CUDA int4, fused graph, fp16 activations",
    "ort-fp16": "ORT CUDA fp16, bare loop",
    "torch-fp16": "PyTorch fp16 generate, eager",
    "torch-compile": "PyTorch fp16 generate, static cache + torch.compile",
    "llama.cpp": "llama.cpp CUDA Q4_0",
}
# Bytes per weight of each format (scales included); the KV cache's bytes per element.
# int4: block 128, one fp32 scale (int4h: an fp16 scale).
WEIGHT_BYTES = {"int4": 0.5 + 4 / 128, "int4h": 0.5 + 2 / 128, "fp16": 2.0}
# The int4 graph keeps fp32 activations and cache; int4h is its fp16-activation variant.
KV_BYTES = {"int4": 4, "int4h": 2, "fp16": 2, "q4_0": 2}
FORMAT = {"ours": "int4", "ours-fused": "int4", "ours-fused-fp16": "int4h", "ort-fp16": "fp16",
          "torch-fp16": "fp16",
          "torch-compile": "fp16", "llama.cpp": "q4_0"}
PROMPT_SEED = 0


def _log(msg: str) -> None:
    print(f"[gpu-bench] {msg}", file=sys.stderr, flush=True)


# --- bytes per step ------------------------------------------------------------------------


def weight_count(shapes: dict[str, Any]) -> tuple[int, int]:
    """(matrix weights of the layers, LM head weights): what a decode step reads."""
    h, n_layers = int(shapes["hidden_size"]), int(shapes["num_hidden_layers"])
    heads, kvh = int(shapes["num_attention_heads"]), int(shapes["num_key_value_heads"])
    inter, vocab = int(shapes["intermediate_size"]), int(shapes["vocab_size"])
    hd = h // heads
    per_layer = 2 * h * h + 2 * h * kvh * hd + 3 * h * inter
    return n_layers * per_layer, vocab * h


def kv_bytes_per_token(shapes: dict[str, Any], fmt: str) -> int:
    h, heads = int(shapes["hidden_size"]), int(shapes["num_attention_heads"])
    return (2 * int(shapes["num_hidden_layers"]) * int(shapes["num_key_value_heads"])
            * (h // heads) * KV_BYTES[fmt])


def step_bytes(shapes: dict[str, Any], fmt: str, batch: int, context: float,
               gguf_bytes: int | None = None) -> float:
    """Bytes one decode step must read: every weight once (the embedding table only for the
    rows looked up, i.e. nothing; a tied LM head is the embedding matrix, read once), plus
    every row's KV cache at `context` positions. llama.cpp: the GGUF's tensor bytes (its
    tied token_embd is the output matrix, read once per step)."""
    linear, head = weight_count(shapes)
    if fmt == "q4_0":
        weights = (linear + head) * 18 / 32 if gguf_bytes is None else float(gguf_bytes)
    else:
        weights = (linear + head) * WEIGHT_BYTES[fmt]
    return weights + batch * context * kv_bytes_per_token(shapes, fmt)


# --- artifacts -----------------------------------------------------------------------------


def model_dir(workdir: Path, model: str) -> Path:
    return workdir / model


def prepare(workdir: Path, model: str, what: str, llama_dir: Path | None) -> Path:
    """Build (or find) one artifact of `model`: hf, int4, int4-fused, int4-fused-fp16, fp16,
    gguf."""
    wd = model_dir(workdir, model)
    hf = artifacts.build_hf_model(wd, MODELS[model])
    if what == "hf":
        return hf
    if what == "int4":
        return artifacts.build_bundle(wd, hf, name=f"{model}-shapes")
    if what == "int4-fused":
        return artifacts.build_fused_bundle(wd, hf, name=f"{model}-shapes")
    if what == "int4-fused-fp16":
        return artifacts.build_fused_fp16_bundle(wd, hf, name=f"{model}-shapes")
    if what == "fp16":
        return build_fp16_onnx(wd, hf)
    if what == "gguf":
        if llama_dir is None:
            raise SystemExit("--llama-dir is needed for the GGUF")
        return build_gguf(wd, hf, llama_dir)
    raise SystemExit(f"unknown artifact {what!r}")


def build_fp16_onnx(wd: Path, hf: Path) -> Path:
    """Optimum's fp16 export (on the GPU, as Optimum requires for fp16), no post-processing."""
    final = wd / "onnx-fp16"
    if (final / "model.onnx").is_file():
        return final
    from optimum.exporters.onnx import main_export

    tmp = Path(tempfile.mkdtemp(prefix=".onnx-fp16.", dir=wd))
    _log(f"exporting {hf} to ONNX fp16 on cuda")
    main_export(str(hf), output=str(tmp), task="text-generation-with-past", dtype="fp16",
                device="cuda", no_post_process=True, do_validation=False)
    tmp.rename(final)
    return final


# convert_hf_to_gguf.py (llama.cpp of llama-cpp-python 0.3.16) imports mistral_common at the
# top; it is only used for Mistral-format checkpoints. Where the wheel or its own needs
# (pydantic, jsonschema…) are missing, stand-ins let the Qwen2 conversion run.
_MISTRAL_STUB = r"""
import importlib.machinery, sys, types
try:
    import mistral_common.tokens.tokenizers.base
    import mistral_common.tokens.tokenizers.multimodal
    import mistral_common.tokens.tokenizers.sentencepiece
    import mistral_common.tokens.tokenizers.tekken
except Exception as e:
    print(f"mistral_common unusable ({e!r}): stand-ins (Qwen2 does not use it)", file=sys.stderr)
    # Each with a spec: transformers asks importlib.util.find_spec("mistral_common"), which
    # raises ValueError on a module whose __spec__ is None (seen on the GPU machine).
    for mod in ("mistral_common", "mistral_common.tokens", "mistral_common.tokens.tokenizers"):
        sys.modules[mod] = types.ModuleType(mod)
        sys.modules[mod].__spec__ = importlib.machinery.ModuleSpec(mod, None)
    for sub, names in {"base": ["TokenizerVersion"], "multimodal": ["DATASET_MEAN",
                       "DATASET_STD"], "tekken": ["Tekkenizer"],
                       "sentencepiece": ["SentencePieceTokenizer"]}.items():
        m = types.ModuleType("mistral_common.tokens.tokenizers." + sub)
        m.__spec__ = importlib.machinery.ModuleSpec(m.__name__, None)
        for n in names:
            setattr(m, n, object)
        sys.modules[m.__name__] = m
"""


def build_gguf(wd: Path, hf: Path, llama_dir: Path) -> Path:
    """convert_hf_to_gguf.py (f16, with artifacts' pre-tokenizer shim) → llama-quantize Q4_0."""
    out = wd / "gguf" / "model-q4_0.gguf"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    f16 = wd / "gguf" / "model-f16.gguf"
    if not f16.exists():
        _log("converting to GGUF f16")
        tmp = f16.with_suffix(".tmp.gguf")
        env = {**os.environ, "NO_LOCAL_GGUF": "1"}
        with (wd / "gguf" / "convert.log").open("w") as log:
            subprocess.run([sys.executable, "-c", _MISTRAL_STUB + artifacts._CONVERTER_SHIM,
                            str(llama_dir),
                            str(hf), "--outfile", str(tmp), "--outtype", "f16"],
                           check=True, env=env, stdout=log, stderr=subprocess.STDOUT)
        tmp.rename(f16)
    _log("quantizing GGUF to Q4_0 (llama-quantize)")
    tmp = out.with_suffix(".tmp.gguf")
    with (wd / "gguf" / "quantize.log").open("w") as log:
        subprocess.run([str(llama_dir / "build" / "bin" / "llama-quantize"), str(f16), str(tmp),
                        "Q4_0"], check=True, stdout=log, stderr=subprocess.STDOUT)
    tmp.rename(out)
    return out


def gguf_tensor_bytes(path: Path, llama_dir: Path | None) -> tuple[int, dict[str, int]]:
    """Total tensor bytes of a GGUF and the bytes per tensor type (gguf-py's reader)."""
    if llama_dir is not None:
        sys.path.insert(0, str(llama_dir / "gguf-py"))
    import gguf

    reader = gguf.GGUFReader(str(path))
    by_type: dict[str, int] = {}
    for t in reader.tensors:
        name = t.tensor_type.name
        by_type[name] = by_type.get(name, 0) + int(t.n_bytes)
    return sum(by_type.values()), by_type


# --- measuring -----------------------------------------------------------------------------


def copy_bandwidth() -> dict[str, Any]:
    """Device-to-device copy of 1 GiB with torch, bytes read + written over the median time."""
    import torch

    n = 1 << 30
    a = torch.empty(n, dtype=torch.uint8, device="cuda")
    a.random_(0, 255)
    b = torch.empty_like(a)
    times = []
    for i in range(23):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        b.copy_(a)
        end.record()
        end.synchronize()
        if i >= 3:
            times.append(start.elapsed_time(end) / 1000)
    t = statistics.median(times)
    del a, b
    torch.cuda.empty_cache()
    props = torch.cuda.get_device_properties(0)
    return {"copy_gbs": 2 * n / t / 1e9, "copy_ms": t * 1000, "gpu": props.name,
            "gpu_mem_gib": props.total_memory / 2**30, "sms": props.multi_processor_count}


def prompts(batch: int, length: int, vocab: int) -> list[list[int]]:
    rng = np.random.default_rng(PROMPT_SEED)
    return rng.integers(3, min(vocab, artifacts.TOKENIZER_VOCAB), size=(batch, length)).tolist()


def _median_row(runs: list[dict[str, float]]) -> dict[str, float]:
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def preload_cuda() -> None:
    """The CUDA libraries (cuBLAS, cuDNN…) ONNX Runtime's CUDA provider needs: torch's."""
    with contextlib.suppress(ImportError):
        import torch  # noqa: F401


def measure_ours(bundle: Path, pubkey: Path, batches: Sequence[int], prompt_len: int,
                 new_tokens: int, runs: int) -> list[dict[str, Any]]:
    """Generator.generate at batch 1 (TTFT + decode), BatchDecoder steps at batch > 1."""
    preload_cuda()
    sys.path[:0] = [str(REPO), str(REPO / "build")]
    from edge_runtime.bundle.manifest import verify_bundle
    from edge_runtime.model.generator import Generator
    from edge_runtime.model.sampling import SamplingParams
    from edge_runtime.signing import load_public_key

    b = verify_bundle(bundle, [load_public_key(pubkey)])
    gen = Generator.from_bundle(b, backend="onnxruntime")
    gen._eos = frozenset()  # random weights: never stop early
    engine = gen.engine.name
    rows: list[dict[str, Any]] = []
    for batch in batches:
        ps = prompts(batch, prompt_len, gen.vocab_size)
        results = []
        for i in range(runs + 1):  # the first is the warm-up
            if batch == 1:
                done = gen.generate(ps[0], SamplingParams(max_tokens=new_tokens, temperature=0))
                st = done.stats
                r = {"ttft_s": st.ttft_s, "tps": (st.completion_tokens - 1) / st.decode_s}
            else:
                dec = gen.batch(batch)
                for k in range(batch):  # one more token than stepped: nobody finishes
                    dec.add(k, ps[k], SamplingParams(max_tokens=new_tokens + 1, temperature=0))
                t0 = time.perf_counter()
                for _ in range(new_tokens - 1):
                    dec.step()
                dt_s = time.perf_counter() - t0
                r = {"tps": batch * (new_tokens - 1) / dt_s}
                del dec
            if i:
                results.append(r)
        row = _median_row(results)
        rows.append({"batch": batch, "decode_tps": row["tps"],
                     "ttft_ms": row["ttft_s"] * 1000 if "ttft_s" in row else None,
                     "note": engine})
        _log(f"ours {bundle.name} batch {batch}: {row}")
    gen.engine.close()
    return rows


def measure_ort_fp16(onnx_dir: Path, batches: Sequence[int], prompt_len: int, new_tokens: int,
                     runs: int) -> list[dict[str, Any]]:
    """A bare ONNX Runtime CUDA loop: identical-length rows, IOBinding, presents bound on the
    GPU and fed back as the next step's past (never copied to the host), logits to host."""
    preload_cuda()
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sess = ort.InferenceSession(str(onnx_dir / "model.onnx"), so,
                                providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    providers = sess.get_providers()
    ins = {i.name: i for i in sess.get_inputs()}
    past_names = [n for n in ins if n.startswith("past_key_values.")]
    present = [n.replace("past_key_values.", "present.") for n in past_names]
    kvh, hd = int(ins[past_names[0]].shape[1]), int(ins[past_names[0]].shape[3])
    vocab = int(sess.get_outputs()[0].shape[-1])

    def run(ids: np.ndarray, start: int, past: list[Any]) -> tuple[np.ndarray, list[Any]]:
        b, s = ids.shape
        io = sess.io_binding()
        io.bind_cpu_input("input_ids", ids)
        if "attention_mask" in ins:
            io.bind_cpu_input("attention_mask", np.ones((b, start + s), np.int64))
        if "position_ids" in ins:
            io.bind_cpu_input("position_ids",
                              np.broadcast_to(np.arange(start, start + s), (b, s)).copy())
        for n, v in zip(past_names, past, strict=True):
            io.bind_ortvalue_input(n, v)
        io.bind_output("logits", "cpu")
        for n in present:
            io.bind_output(n, "cuda")
        sess.run_with_iobinding(io)
        outs = io.get_outputs()
        return outs[0].numpy(), outs[1:]

    rows: list[dict[str, Any]] = []
    for batch in batches:
        ids0 = np.asarray(prompts(batch, prompt_len, vocab), dtype=np.int64)
        results = []
        for i in range(runs + 1):
            empty = [ort.OrtValue.ortvalue_from_shape_and_type([batch, kvh, 0, hd], np.float16,
                                                               "cuda", 0) for _ in past_names]
            t0 = time.perf_counter()
            logits, past = run(ids0, 0, empty)
            tok = logits[:, -1].argmax(-1).astype(np.int64)[:, None]
            t1 = time.perf_counter()
            pos = prompt_len
            for _ in range(new_tokens - 1):
                logits, past = run(tok, pos, past)
                tok = logits[:, -1].argmax(-1).astype(np.int64)[:, None]
                pos += 1
            t2 = time.perf_counter()
            if i:
                results.append({"ttft_s": t1 - t0, "tps": batch * (new_tokens - 1) / (t2 - t1)})
        row = _median_row(results)
        rows.append({"batch": batch, "decode_tps": row["tps"],
                     "ttft_ms": row["ttft_s"] * 1000 if batch == 1 else None,
                     "note": f"providers {providers[0]}; prefill returns every position's "
                             "logits (Optimum graph)"})
        _log(f"ort-fp16 batch {batch}: {row}")
    return rows


def measure_torch(hf: Path, batches: Sequence[int], prompt_len: int, new_tokens: int,
                  runs: int, compile_: bool) -> list[dict[str, Any]]:
    """transformers generate in fp16; a streamer stamps the first and the last token."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM
    from transformers.generation.streamers import BaseStreamer

    class Clock(BaseStreamer):
        def __init__(self) -> None:
            self.stamps: list[float] = []

        def put(self, value: Any) -> None:  # generate hands over tokens on the host
            self.stamps.append(time.perf_counter())

        def end(self) -> None:
            self.stamps.append(time.perf_counter())

    model: Any = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float16)
    model = model.cuda().eval()
    vocab = int(model.config.vocab_size)
    rows: list[dict[str, Any]] = []
    for batch in batches:
        ids = torch.tensor(prompts(batch, prompt_len, vocab), device="cuda")
        kw: dict[str, Any] = {
            "attention_mask": torch.ones_like(ids), "max_new_tokens": new_tokens,
            "min_new_tokens": new_tokens, "do_sample": False, "pad_token_id": 0,
        }
        if compile_:
            kw["cache_implementation"] = "static"
        else:
            kw["disable_compile"] = True
        results, note = [], f"transformers {transformers.__version__}"
        t_warm = time.perf_counter()
        try:
            for i in range(runs + 2):  # two warm-ups: compilation happens in the first
                clock = Clock()
                t0 = time.perf_counter()
                with torch.inference_mode():
                    model.generate(ids, streamer=clock, **kw)
                torch.cuda.synchronize()
                t_end = time.perf_counter()
                # stamps: [prompt, token 1, ..., token n, end]
                t_first = clock.stamps[1]
                if i == 1:
                    note += f"; warm-up (compile) {t_first - t_warm:.0f} s" if compile_ else ""
                if i >= 2:
                    results.append({"ttft_s": t_first - t0,
                                    "tps": batch * (new_tokens - 1) / (t_end - t_first)})
        except Exception as e:  # a compile failure is a result to report, not a crash
            rows.append({"batch": batch, "decode_tps": None, "ttft_ms": None,
                         "note": f"failed: {type(e).__name__}: {str(e)[:200]}"})
            _log(f"torch batch {batch} failed: {e}")
            continue
        row = _median_row(results)
        rows.append({"batch": batch, "decode_tps": row["tps"],
                     "ttft_ms": row["ttft_s"] * 1000 if batch == 1 else None, "note": note})
        _log(f"torch{'-compile' if compile_ else ''} batch {batch}: {row}")
    return rows


def measure_llama(gguf_path: Path, llama_dir: Path, batches: Sequence[int], prompt_len: int,
                  new_tokens: int, runs: int, logdir: Path) -> list[dict[str, Any]]:
    """llama-bench (batch 1: pp and tg) and llama-batched-bench (batch > 1: S_TG)."""
    bindir = llama_dir / "build" / "bin"
    rows: list[dict[str, Any]] = []
    out = subprocess.run([str(bindir / "llama-bench"), "-m", str(gguf_path), "-ngl", "99",
                          "-p", str(prompt_len), "-n", str(new_tokens), "-r", str(runs),
                          "-o", "json"], check=False, capture_output=True, text=True, timeout=600)
    (logdir / f"llama-bench-{gguf_path.parent.parent.name}.log").write_text(
        out.stdout + "\n" + out.stderr)
    if out.returncode != 0:
        raise RuntimeError(f"llama-bench failed: {out.stderr[-500:]}")
    data = json.loads(out.stdout)
    pp = next(d for d in data if d["n_prompt"] == prompt_len and d["n_gen"] == 0)
    tg = next(d for d in data if d["n_gen"] == new_tokens and d["n_prompt"] == 0)
    rows.append({"batch": 1, "decode_tps": float(tg["avg_ts"]),
                 "ttft_ms": prompt_len / float(pp["avg_ts"]) * 1000,
                 "note": f"llama-bench tg{new_tokens}; TTFT = pp{prompt_len} time "
                         f"(no sampling); build {data[0].get('build_commit', '?')}"})
    more = [b for b in batches if b > 1]
    if more:
        ctx = max(more) * (prompt_len + new_tokens) + 256
        out = subprocess.run([str(bindir / "llama-batched-bench"), "-m", str(gguf_path),
                              "-ngl", "99", "-c", str(ctx), "-b", "2048", "-ub", "512",
                              "-npp", str(prompt_len), "-ntg", str(new_tokens), "-npl",
                              ",".join(map(str, more))],
                             check=False, capture_output=True, text=True, timeout=600)
        (logdir / f"llama-batched-{gguf_path.parent.parent.name}.log").write_text(
            out.stdout + "\n" + out.stderr)
        if out.returncode != 0:
            raise RuntimeError(f"llama-batched-bench failed: {out.stderr[-500:]}")
        for b, s_tg in parse_batched_bench(out.stdout + out.stderr):
            rows.append({"batch": b, "decode_tps": s_tg, "ttft_ms": None,
                         "note": "llama-batched-bench S_TG (one run)"})
    return rows


def parse_batched_bench(text: str) -> list[tuple[int, float]]:
    """(B, S_TG t/s) from llama-batched-bench's markdown table."""
    header: list[str] | None = None
    found = []
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if "S_TG t/s" in cells:
            header = cells
            continue
        if header and len(cells) == len(header) and re.fullmatch(r"\d+", cells[0] or ""):
            found.append((int(cells[header.index("B")]), float(cells[header.index("S_TG t/s")])))
    return found


# --- orchestration -------------------------------------------------------------------------


def child(args: argparse.Namespace) -> None:
    """One contender on one model, in this process; result rows as JSON to `args.child_out`."""
    wd = model_dir(args.workdir, args.model)
    batches = [int(b) for b in args.batches.split(",")]
    c = args.contender
    if c in ("ours", "ours-fused", "ours-fused-fp16"):
        what = {"ours": "int4", "ours-fused": "int4-fused", "ours-fused-fp16": "int4-fused-fp16"}
        bundle = prepare(args.workdir, args.model, what[c], None)
        rows = measure_ours(bundle, wd / "keys" / "bench.pub", batches, args.prompt_len,
                            args.new_tokens, args.runs)
    elif c == "ort-fp16":
        rows = measure_ort_fp16(prepare(args.workdir, args.model, "fp16", None), batches,
                                args.prompt_len, args.new_tokens, args.runs)
    elif c in ("torch-fp16", "torch-compile"):
        rows = measure_torch(prepare(args.workdir, args.model, "hf", None), batches,
                             args.prompt_len, args.new_tokens, args.runs, c == "torch-compile")
    elif c == "llama.cpp":
        gguf_path = prepare(args.workdir, args.model, "gguf", args.llama_dir)
        rows = measure_llama(gguf_path, args.llama_dir, batches, args.prompt_len,
                             args.new_tokens, args.runs, args.workdir)
        total, by_type = gguf_tensor_bytes(gguf_path, args.llama_dir)
        for r in rows:
            r["gguf_bytes"] = total
            r["gguf_types"] = by_type
    else:
        raise SystemExit(f"unknown contender {c}")
    Path(args.child_out).write_text(json.dumps(rows))


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": sys.version.split()[0]}
    for name in ("onnxruntime-gpu", "onnxruntime", "torch", "transformers", "optimum",
                 "optimum-onnx", "numpy"):
        with contextlib.suppress(PackageNotFoundError):
            out[name] = version(name)
    return out


def run_all(args: argparse.Namespace) -> dict[str, Any]:
    started = time.time()
    bw = copy_bandwidth()
    _log(f"{bw['gpu']}: device-to-device copy {bw['copy_gbs']:.0f} GB/s")
    models = [m for m in args.models.split(",") if m]
    only = [c for c in args.only.split(",") if c]
    results: list[dict[str, Any]] = []
    run: dict[str, Any] = {
        "command": " ".join(["python", *sys.argv]),
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "wall_s": 0.0,
        "bandwidth": bw,
        "versions": versions(),
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        "runs": args.runs,
        "rows": results,
    }
    for model in models:
        for c in only:
            with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
                out = Path(f.name)
            cmd = [sys.executable, str(Path(__file__).resolve()), "--_child", "--contender", c,
                   "--model", model, "--workdir", str(args.workdir), "--batches", args.batches,
                   "--prompt-len", str(args.prompt_len), "--new-tokens", str(args.new_tokens),
                   "--runs", str(args.runs), "--child-out", str(out)]
            if args.llama_dir:
                cmd += ["--llama-dir", str(args.llama_dir)]
            t0 = time.perf_counter()
            try:
                status = str(subprocess.run(cmd, check=False,
                                            timeout=args.child_timeout).returncode)
            except subprocess.TimeoutExpired:  # the child is killed; the others still run
                status = f"timed out after {args.child_timeout} s"
            wall = time.perf_counter() - t0
            rows: list[dict[str, Any]] = []
            with contextlib.suppress(OSError, json.JSONDecodeError):
                rows = json.loads(out.read_text()) if out.stat().st_size else []
            out.unlink(missing_ok=True)
            if not rows:
                rows = [{"batch": None, "decode_tps": None, "ttft_ms": None,
                         "note": f"failed: child exited {status}"}]
            for r in rows:
                r.update(model=model, contender=c, wall_s=wall)
            results.extend(rows)
            run["wall_s"] = time.time() - started
            if args.json:  # after every contender: a run cut short still reports
                args.json.parent.mkdir(parents=True, exist_ok=True)
                args.json.write_text(json.dumps(run, indent=2))
    return run


# --- report --------------------------------------------------------------------------------


def enrich(run: dict[str, Any]) -> None:
    """Bytes per step, achieved GB/s, roofline fraction and the Orin projection per row."""
    ctx = run["prompt_len"] + run["new_tokens"] / 2
    bw = run["bandwidth"]["copy_gbs"] * 1e9
    for r in run["rows"]:
        if not r.get("decode_tps") or not r.get("batch"):
            continue
        shapes = MODELS[r["model"]]
        nbytes = step_bytes(shapes, FORMAT[r["contender"]], r["batch"], ctx, r.get("gguf_bytes"))
        steps = r["decode_tps"] / r["batch"]
        r["step_mb"] = nbytes / 1e6
        r["achieved_gbs"] = nbytes * steps / 1e9
        r["roofline"] = nbytes * steps / bw
        r["orin_tps"] = r["roofline"] * ORIN_BW / nbytes * r["batch"]


def _f(x: float | None, fmt: str) -> str:
    return "–" if x is None else format(x, fmt)


def render(runs: list[dict[str, Any]], command: str) -> str:
    rows: list[dict[str, Any]] = []
    for run in runs:
        enrich(run)
        rows.extend(run["rows"])
    models, order = list(MODELS), {c: i for i, c in enumerate(CONTENDERS)}
    rows.sort(key=lambda r: (models.index(r["model"]) if r["model"] in models else len(models),
                             order.get(r["contender"], len(order)), r.get("batch") or 0))
    first = runs[0]
    bw = first["bandwidth"]
    lines = [
        f"## GPU decode: {bw['gpu']} ({bw['gpu_mem_gib']:.0f} GiB, {bw['sms']} SMs), "
        "ONNX Runtime CUDA vs PyTorch and llama.cpp",
        "",
        "_Generated by `scripts/bench_decode.py --device cuda`; do not edit between the "
        "markers._",
        "",
        f"- **Commands:** `{command}`",
        "- **Runs:** " + "; ".join(
            f"{r['date']} ({r['wall_s'] / 60:.1f} min, copy bandwidth "
            f"{r['bandwidth']['copy_gbs']:.0f} GB/s)" for r in runs),
        "- **Versions:** " + ", ".join(f"{k} {v}" for k, v in first["versions"].items()),
        f"- **Workload:** prompt {first['prompt_len']} tokens (random ids, seed 0), "
        f"{first['new_tokens']} new tokens per row, greedy, EOS ignored; median of "
        f"{first['runs']} runs after one warm-up (two for PyTorch); each contender in its "
        "own process",
        "",
        "| Model | Contender | Batch | Decode tok/s | TTFT ms | MB read / step | GB/s | "
        "of copy BW | AGX Orin projection tok/s | Notes |",
        "|:--|:--|--:|--:|--:|--:|--:|--:|--:|:--|",
    ]
    for r in rows:
        frac = r["roofline"] * 100 if r.get("roofline") else None
        lines.append(
            f"| {LABELS.get(r['model'], r['model'])} | "
            f"{CONTENDER_LABELS.get(r['contender'], r['contender'])} | "
            f"{r['batch'] or '–'} | {_f(r.get('decode_tps'), '.1f')} | "
            f"{_f(r.get('ttft_ms'), '.1f')} | {_f(r.get('step_mb'), '.0f')} | "
            f"{_f(r.get('achieved_gbs'), '.0f')} | {_f(frac, '.0f')}{'%' if frac else ''} | "
            f"{_f(r.get('orin_tps'), '.1f')} | {r.get('note', '')} |")
    return "\n".join(lines) + "\n"


def wants_cuda(argv: Sequence[str] | None) -> list[str] | None:
    """The arguments for `main` when a CPU benchmark script was asked for `--device cuda`."""
    args = list(sys.argv[1:] if argv is None else argv)
    for i, a in enumerate(args):
        if a == "--device=cuda" or (a == "--device" and args[i + 1 : i + 2] == ["cuda"]):
            return args
    return None


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="GPU decode benchmark (ORT CUDA vs peers)")
    p.add_argument("--device", default="cuda", choices=["cuda"])
    p.add_argument("--models", default="qwen2-0.5b,qwen2-1.5b")
    p.add_argument("--only", default=",".join(CONTENDERS))
    p.add_argument("--batches", default="1,4,16")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--workdir", type=Path, default=Path("~/.cache/edge-bench-gpu").expanduser())
    p.add_argument("--llama-dir", type=Path, default=None,
                   help="llama.cpp source tree with build/bin (scripts/gpu/llama_build.sh)")
    p.add_argument("--child-timeout", type=int, default=900)
    p.add_argument("--json", type=Path, default=None, help="write this run's results here")
    p.add_argument("--render", type=Path, nargs="*", default=None,
                   help="render these result JSONs into docs/BENCHMARKS.md (no measuring)")
    p.add_argument("--md", type=Path, default=REPO / "docs" / "BENCHMARKS.md")
    p.add_argument("--prepare", default=None,
                   help="build artifacts only: comma list of hf,int4,int4-fused,fp16,gguf")
    p.add_argument("--_child", dest="is_child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--contender", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--child-out", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.is_child:
        child(args)
        return 0
    if args.prepare:
        for model in args.models.split(","):
            for what in args.prepare.split(","):
                _log(f"{model}: {what} -> {prepare(args.workdir, model, what, args.llama_dir)}")
        return 0
    if args.render is not None:
        runs = [json.loads(p.read_text()) for p in args.render]
        from bench.report import update_section

        cmds = "`; `".join(r["command"] for r in runs)
        text = render(runs, cmds)
        update_section(args.md, "bench_gpu", text)
        print(text)
        return 0
    run = run_all(args)
    print(render([run], run["command"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
