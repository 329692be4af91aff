"""Stage `export`: a local Hugging Face causal-LM directory → ONNX decoder with a KV cache.

Optimum's exporter does the tracing. Post-processing stays off: with tied embeddings it
rewrites the LM head as `Transpose(embed)`, which the 4-bit quantizer then silently skips.
The stage ends by checking the ONNX graph against the PyTorch model on fixed token windows
and fails with `ExportMismatchError` quoting the numbers when they differ.

Output: model.onnx (+ external data when large), config.json, generation_config.json and the
tokenizer files, carried forward so later stages need no other input.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from edge_build.evaluate import compare_logits, onnx_logits
from edge_build.stage import QualityGateError, StageError, require_dir, stage_output, write_stage
from edge_runtime.bundle.manifest import KVCacheSpec

SUPPORTED = ("qwen2", "llama")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
CARRIED_FILES = ("config.json", "generation_config.json", *TOKENIZER_FILES)


class ExportMismatchError(QualityGateError):
    """The exported graph's logits differ from the PyTorch model's beyond tolerance."""


def kv_spec(config: dict[str, Any], dtype: str = "float32") -> KVCacheSpec:
    """The KV cache layout of an HF decoder config (the names Optimum's exporter uses)."""
    heads = int(config["num_attention_heads"])
    head_dim = int(config.get("head_dim") or config["hidden_size"] // heads)
    return KVCacheSpec(
        num_layers=int(config["num_hidden_layers"]),
        num_kv_heads=int(config.get("num_key_value_heads") or heads),
        head_dim=head_dim,
        dtype=dtype,
    )


def read_config(model_dir: Path) -> dict[str, Any]:
    p = Path(model_dir) / "config.json"
    if not p.is_file():
        raise StageError(f"{model_dir} has no config.json: not a Hugging Face model directory")
    cfg = dict(json.loads(p.read_text()))
    if cfg.get("model_type") not in SUPPORTED:
        raise StageError(
            f"model_type {cfg.get('model_type')!r} in {p} is not supported (supported: "
            f"{', '.join(SUPPORTED)})"
        )
    return cfg


def _torch_logits(model_dir: Path, windows: list[list[int]]) -> list[np.ndarray]:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    out = []
    with torch.inference_mode():
        for w in windows:
            out.append(model(torch.tensor([w])).logits[0].float().numpy())
    return out


def run(
    model_dir: Path,
    out: Path,
    opset: int | None = None,
    check_windows: list[list[int]] | None = None,
    atol: float = 1e-3,
) -> dict[str, Any]:
    """Export `model_dir` to `out`; return the stage record."""
    from optimum.exporters.onnx import main_export

    started = time.time()
    model_dir = require_dir(model_dir, "model directory")
    config = read_config(model_dir)
    params = {
        "task": "text-generation-with-past",
        "opset": opset,
        "post_process": False,
        "atol": atol,
    }
    with stage_output(out) as tmp:
        main_export(
            str(model_dir),
            output=str(tmp),
            task="text-generation-with-past",
            opset=opset,
            no_post_process=True,
            do_validation=False,
            device="cpu",
        )
        for name in CARRIED_FILES:
            if (model_dir / name).is_file():
                shutil.copyfile(model_dir / name, tmp / name)
        if not (tmp / "tokenizer.json").is_file():
            raise StageError(f"{model_dir} has no tokenizer.json (a fast tokenizer is required)")
        if check_windows is None:
            vocab = int(config["vocab_size"])
            rng = np.random.default_rng(0)
            check_windows = [rng.integers(0, vocab, size=32).tolist() for _ in range(2)]
        ref = _torch_logits(model_dir, check_windows)
        got = onnx_logits(tmp / "model.onnx", kv_spec(config), check_windows)
        cmp = compare_logits(ref, got)
        if cmp["max_abs_logit_diff"] > atol:
            raise ExportMismatchError(
                f"ONNX logits differ from PyTorch by {cmp['max_abs_logit_diff']:.2e} "
                f"(> atol {atol:.0e}); top-1 agreement {cmp['top1_agreement']:.4f}"
            )
        metrics = {"check_" + k: v for k, v in cmp.items()}
        metrics["onnx_bytes"] = sum(p.stat().st_size for p in tmp.iterdir() if "onnx" in p.name)
        record = write_stage(tmp, "export", params, model_dir, metrics, started)
    return record
