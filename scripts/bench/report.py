"""Environment facts and the markdown/JSON report of `scripts/bench_decode.py`."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import re
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

SECTION = "bench_decode"
VERSIONED = ("onnxruntime", "torch", "transformers", "optimum", "optimum-onnx", "llama-cpp-python")


# The instruction sets that decide int4/int8 CPU kernel speed, by /proc/cpuinfo flag: two
# machines named alike ("Xeon Processor") can differ in exactly these, and so in the results.
ISA_FLAGS = (("avx2", "AVX2"), ("avx512f", "AVX-512"), ("avx_vnni", "AVX-VNNI"),
             ("avx512_vnni", "AVX-512 VNNI"), ("amx_int8", "AMX-INT8"), ("asimddp", "DOTPROD"),
             ("i8mm", "I8MM"))


def cpu_model() -> str:
    """The CPU's model name and the int8-relevant instruction sets it has."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or "unknown"
    m = re.search(r"^model name\s*:\s*(.+)$", text, re.MULTILINE)
    name = m.group(1).strip() if m else platform.processor() or "unknown"
    flags = re.search(r"^(?:flags|Features)\s*:\s*(.+)$", text, re.MULTILINE)
    have = set(flags.group(1).split()) if flags else set()
    isa = [label for flag, label in ISA_FLAGS if flag in have]
    return f"{name} ({', '.join(isa) or 'no AVX2'})"


def load_average() -> tuple[float, float, float]:
    return os.getloadavg()


def process_cpu_s(pid: int | None = None) -> float:
    """User + system CPU seconds of a process, all its threads: ours (None) or another one
    (/proc/PID/stat)."""
    if pid is None:
        return time.process_time()
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_busy_s() -> float:
    """CPU seconds spent busy by the whole machine since boot (all cores, from /proc/stat).

    The difference over a contender's run, minus the contender's own CPU time, is what
    everything else on the machine used meanwhile (processes in other containers included,
    which `ps` and the load average of this namespace may not show).
    """
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()
    except OSError:
        return 0.0
    # user nice system idle iowait irq softirq steal ...
    ticks = [int(x) for x in fields[1:9]]
    busy = sum(ticks) - ticks[3] - ticks[4]
    return busy / os.sysconf("SC_CLK_TCK")


def numpy_gflops(seconds: float = 1.0) -> float:
    """A quick CPU check: fp32 512x512 matmul throughput with numpy's BLAS, GFLOP/s."""
    import time

    import numpy as np

    a = np.random.default_rng(0).random((512, 512), dtype=np.float32)
    a @ a
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ a
        n += 1
    return n * 2 * 512**3 / (time.perf_counter() - t0) / 1e9


def package_versions() -> dict[str, str]:
    out: dict[str, str] = {}
    for name in VERSIONED:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def environment() -> dict[str, Any]:
    return {
        "cpu_model": cpu_model(),
        "logical_cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": package_versions(),
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def _fmt(v: float, spec: str) -> str:
    return format(v, spec) if v else "-"


def table(results: list[dict[str, Any]], labels: dict[str, str]) -> str:
    base = next(
        (r["decode_tps"] for r in results if r["contender"] == "ort-bare" and r["status"] == "ok"),
        0.0,
    )
    rows = [
        "| Contender | Decode tok/s | vs ORT bare | Prefill tok/s | TTFT ms | Peak RSS MiB "
        "| New tokens | Load s | Other CPU | Notes |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|---|",
    ]
    for r in results:
        label = labels.get(r["contender"], r["contender"])
        if r["status"] != "ok":
            note = f"**{r['status']}**: {r['note']}".replace("|", "\\|")
            rows.append(f"| {label} | - | - | - | - | - | - | - | - | {note} |")
            continue
        ratio = f"{r['decode_tps'] / base:.2f}x" if base else "-"
        rows.append(
            f"| {label} | {_fmt(r['decode_tps'], '.1f')} | {ratio} | "
            f"{_fmt(r['prefill_tps'], '.1f')} | {_fmt(r['ttft_s'] * 1000, '.0f')} | "
            f"{_fmt(r['peak_rss_mb'], '.0f')} | {r['new_tokens']} | {r['load_s']:.1f} | "
            f"{r['extra'].get('other_cpu_cores', 0.0):.2f} | {r['note'].replace('|', '/')} |"
        )
    return "\n".join(rows)


def markdown_section(
    results: list[dict[str, Any]],
    labels: dict[str, str],
    env: dict[str, Any],
    meta: dict[str, Any],
) -> str:
    v = env["versions"]
    la0, la1 = meta["load_before"], meta["load_after"]
    lines = [
        "## Decode benchmark: Qwen2-0.5B shapes, batch 1, CPU",
        "",
        "_Generated by `scripts/bench_decode.py`; do not edit between the markers._",
        "",
        f"- **Command:** `{meta['command']}`",
        f"- **Date:** {env['date']} (total wall time {meta['wall_s'] / 60:.1f} min)",
        f"- **CPU:** {env['cpu_model']}, {env['logical_cores']} logical cores "
        f"({env['usable_cores']} usable); **threads:** {meta['threads']} for every contender",
        f"- **Machine load:** load average (1/5/15 min) before {la0[0]:.2f} / {la0[1]:.2f} / "
        f"{la0[2]:.2f}, after {la1[0]:.2f} / {la1[1]:.2f} / {la1[2]:.2f}; numpy fp32 matmul "
        f"check {meta['numpy_gflops_before']:.0f} GFLOP/s before, "
        f"{meta['numpy_gflops_after']:.0f} after. **Other CPU** in the table = cores' worth of "
        "CPU the rest of the machine used while that contender ran (from /proc/stat); "
        "anything well above 0 means the numbers are depressed by contention.",
        f"- **Versions:** onnxruntime {v['onnxruntime']}, torch {v['torch']}, "
        f"transformers {v['transformers']}, optimum {v['optimum']}, "
        f"optimum-onnx {v['optimum-onnx']}, llama-cpp-python {v['llama-cpp-python']}, "
        f"Python {env['python']}",
        "- **Model:** Qwen2-0.5B shapes (hidden 896, 24 layers, 14 heads / 2 KV heads, "
        "intermediate 4864, vocab 151936, tied embeddings), random weights, "
        "`torch.manual_seed(0)`",
        f"- **Workload:** batch 1, prompt {meta['prompt_len']} tokens (fixed ids), greedy, "
        f"EOS ignored; median of {meta['runs']} runs x {meta['rounds']} round(s) "
        "(contenders interleaved per round), one warm-up run per process; each contender "
        "in its own process",
        "",
        table(results, labels),
        "",
        "How to read it:",
        "",
        "- **TTFT**: call start to the first new token id (prompt forward + argmax); "
        "**prefill** = prompt tokens / TTFT; **decode** = (new tokens - 1) / time from the "
        "first to the last new token. All wall clock, Python sampling included.",
        "- **Peak RSS**: the contender process's VmHWM, so it includes loading the model "
        "(for llama.cpp it counts the mmapped GGUF pages it touched).",
        "- **int4 ONNX**: the bundle our pipeline builds (`edge_build` export → quantize → "
        "package): Optimum export (`text-generation-with-past`, no post-processing), "
        "`MatMulNBitsQuantizer` on every MatMul (LM head included) and the embedding "
        "Gather: block 128, symmetric, accuracy level 4 (int8 activations); the packaged "
        "graph computes logits for the last position only. \"ours\" and the ORT bare loop "
        "run the same graph file, so their ratio is the generator's overhead.",
        "- **fused graph**: the same int4 graph after `edge_build.fuse`: each layer's "
        "attention becomes one `GroupQueryAttention` (rotary inside) and the RMSNorms "
        "`SkipSimplifiedLayerNormalization` — 297 nodes instead of 2,535 after ORT's "
        "optimisations. Exact with fp32 activations (max |Δlogit| 8e-6); at accuracy level 4 "
        "int8 rounding of activations lets near-tied greedy tokens differ from the unfused "
        "graph. GQA assumes right-padded KV: continuous batching pads these bundles' cache on "
        "the right (the demo recipe serves this graph; batched figures in the "
        "continuous-batching section).",
        "- **llama.cpp Q4_0**: `convert_hf_to_gguf.py` (f16) then `llama_model_quantize` "
        "with `LLAMA_FTYPE_MOSTLY_Q4_0` (default params). Its recipe gives the tied "
        "embedding/output matrix Q6_K, which needs rows divisible by 256; 896 is not, so it "
        "falls back to Q8_0 (138 MiB of the 330 MiB file): llama.cpp reads a bigger LM head "
        "per token than the int4 ONNX does.",
        "- **PyTorch fp32**: eager, SDPA attention, manual greedy loop with the HF KV "
        "cache; it generates fewer tokens (see the column) to keep the run short.",
    ]
    return "\n".join(lines)


def update_section(md_path: Path, name: str, body: str) -> None:
    """Replace the text between `<!-- name:begin -->` and `<!-- name:end -->` in `md_path`
    (appending the section, or creating the file, when absent); other sections are kept.
    Every benchmark script writes its own section of docs/BENCHMARKS.md through this."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    block = f"{begin}\n{body.strip()}\n{end}"
    if md_path.exists():
        text = md_path.read_text()
        if begin in text and end in text:
            head, rest = text.split(begin, 1)
            text = head + block + rest.split(end, 1)[1]
        else:
            text = text.rstrip("\n") + "\n\n" + block + "\n"
    else:
        text = "# Benchmarks\n\n" + block + "\n"
    md_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = md_path.with_name(md_path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(md_path)


def write_json(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    tmp.replace(path)
