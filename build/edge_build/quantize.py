"""Stage `quantize`: 4-bit, group-wise, weight-only — in model space, then lowered to ONNX.

Two paths:

- `quantize_model` (the pipeline's): an HF model dir → an HF model dir whose weights are the
  4-bit weights dequantized (fake-quant: `from_pretrained` + export give exactly the int4
  model's numbers in fp32), with AWQ's scales folded in (awq.py), plus the integer codes,
  scales and zero points per linear in `quant.safetensors` + `quant.json` (int4.py). Export
  that dir as usual, then `lower` (lower.py) swaps each weight MatMul and the embedding
  Gather for ONNX Runtime `MatMulNBits` / `GatherBlockQuantized`, or for standard opset-21
  `DequantizeLinear` (blocked INT4) → MatMul / Gather, both built from the same stored codes.
- `run` (kept for the demo and the benchmarks): an fp32 ONNX export → `MatMulNBits` by ONNX
  Runtime's own quantizer (RTN), measured against the fp32 graph.

Each measures what quantization cost on fixed held-out windows — perplexity, top-1
agreement, mean KL against its input — and fails with `QuantizationQualityError` quoting the
numbers when a recipe's threshold is not met.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from edge_build import lm_eval
from edge_build.awq import QuantSpec, quantize_lm
from edge_build.evaluate import compare_logits, onnx_logits, perplexity
from edge_build.export import CARRIED_FILES, kv_spec, read_config
from edge_build.int4 import QUANT_WEIGHTS
from edge_build.lower import LinearNotFoundError, LoweringMismatchError, lower
from edge_build.stage import QualityGateError, StageError, require_dir, stage_output, write_stage

__all__ = [
    "LinearNotFoundError",
    "LoweringMismatchError",
    "QuantizationQualityError",
    "compare_methods",
    "lower",
    "quantize_model",
    "run",
]

_TWO_GB = 2**31 - 1


class QuantizationQualityError(QualityGateError):
    """The 4-bit model is further from its input than the thresholds allow."""


def _windows(windows: Sequence[Sequence[int]], what: str) -> Any:
    if not windows:
        raise StageError(f"quantize needs at least one {what} window")
    return lm_eval.windows_tensor(windows)


def quantize_model(
    input_dir: Path,
    out: Path,
    calib_windows: Sequence[Sequence[int]],
    eval_windows: Sequence[Sequence[int]],
    method: str = "awq",
    group_size: int = 128,
    symmetric: bool = True,
    max_ppl_increase: float | None = None,
    min_top1: float | None = None,
    max_kl: float | None = None,
    progress: bool = True,
    device: str | None = None,
) -> dict[str, Any]:
    """Quantize the HF model at `input_dir` into `out`; return the stage record.

    `calib_windows` feed AWQ's searches (ignored by RTN); `eval_windows` (held-out) measure
    the result against the input model. `max_ppl_increase` is relative: 0.05 fails a model
    whose held-out perplexity is more than 5% above the input's.
    """
    started = time.time()
    input_dir, out = require_dir(Path(input_dir), "input model"), Path(out)
    spec = QuantSpec(method=method, group_size=group_size, symmetric=symmetric)
    spec.check()
    calib, held = _windows(calib_windows, "calibration"), _windows(eval_windows, "evaluation")
    dev = lm_eval.pick_device(device)
    reference = lm_eval.load_causal_lm(input_dir, dev)
    model = lm_eval.load_causal_lm(input_dir, dev)
    weights = quantize_lm(model, calib, spec, progress=progress)
    compared = lm_eval.compare_models(reference, {"quantized": model}, held)
    metrics: dict[str, Any] = lm_eval.flat_metrics(compared, {"reference": "input"})
    increase = metrics["quantized_perplexity"] / metrics["input_perplexity"] - 1.0
    metrics.update(
        perplexity_increase=round(increase, 6),
        parameters=lm_eval.parameter_count(model),
        input_bytes=lm_eval.bytes_on_disk(input_dir),
        quantized_modules=len(weights.modules()),
        eval_windows=int(held.shape[0]),
        eval_tokens=int(held.shape[1]),
    )
    lm_eval.check_gates(metrics, "quantized", QuantizationQualityError, min_top1, max_kl)
    if max_ppl_increase is not None and increase > max_ppl_increase:
        raise QuantizationQualityError(
            f"quantized held-out perplexity {metrics['quantized_perplexity']:.4f} is "
            f"{100 * increase:.2f}% above the input's {metrics['input_perplexity']:.4f} "
            f"(max_ppl_increase {max_ppl_increase})"
        )
    params = {
        **weights.meta,
        "calib_windows": int(calib.shape[0]),
        "calib_tokens": int(calib.shape[1]),
        "alpha_grid": spec.alpha_grid if method == "awq" else None,
        "clip": spec.clip if method == "awq" else None,
        "max_ppl_increase": max_ppl_increase,
        "min_top1": min_top1,
        "max_kl": max_kl,
    }
    with stage_output(out) as tmp:
        lm_eval.save_model(model, input_dir, tmp)
        if (input_dir / "chat_template.jinja").is_file():
            shutil.copyfile(input_dir / "chat_template.jinja", tmp / "chat_template.jinja")
        weights.save(tmp)
        metrics["int4_bytes"] = (tmp / QUANT_WEIGHTS).stat().st_size
        metrics["fake_quant_bytes"] = lm_eval.bytes_on_disk(tmp) - metrics["int4_bytes"]
        record = write_stage(tmp, "quantize", params, input_dir, metrics, started)
    return record


def compare_methods(
    model_dir: Path,
    calib_windows: Sequence[Sequence[int]],
    eval_windows: Sequence[Sequence[int]],
    group_size: int = 128,
    symmetric: bool = True,
    progress: bool = False,
    device: str | None = None,
) -> dict[str, Any]:
    """fp32 vs RTN vs AWQ at one group size, on the same held-out windows:
    {"fp32": {perplexity}, "rtn": {perplexity, perplexity_increase, top1_agreement, mean_kl},
    "awq": {...}, "group_size": ..., "symmetric": ..., "eval_windows": ..., "eval_tokens": ...}.
    """
    model_dir = require_dir(Path(model_dir), "model directory")
    calib, held = _windows(calib_windows, "calibration"), _windows(eval_windows, "evaluation")
    dev = lm_eval.pick_device(device)
    reference = lm_eval.load_causal_lm(model_dir, dev)
    quantized = {}
    for method in ("rtn", "awq"):
        model = lm_eval.load_causal_lm(model_dir, dev)
        spec = QuantSpec(method=method, group_size=group_size, symmetric=symmetric)
        quantize_lm(model, calib, spec, progress=progress)
        quantized[method] = model
    compared = lm_eval.compare_models(reference, quantized, held)
    fp32 = compared.pop("reference")
    out: dict[str, Any] = {"fp32": fp32}
    for method, m in compared.items():
        out[method] = {**m, "perplexity_increase": m["perplexity"] / fp32["perplexity"] - 1.0}
    out.update(group_size=group_size, symmetric=symmetric, eval_windows=int(held.shape[0]),
               eval_tokens=int(held.shape[1]), calib_windows=int(calib.shape[0]))  # fmt: skip
    return out


def run(  # the ONNX-side RTN path (demo, benchmarks); the pipeline uses quantize_model + lower
    input_dir: Path,
    out: Path,
    eval_windows: Sequence[Sequence[int]],
    block_size: int = 128,
    accuracy_level: int = 4,
    symmetric: bool = True,
    min_top1: float | None = None,
    max_kl: float | None = None,
) -> dict[str, Any]:
    """Quantize `input_dir`'s model.onnx into `out`; return the stage record."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    started = time.time()
    input_dir = require_dir(input_dir, "export artifact")
    src = input_dir / "model.onnx"
    if not src.is_file():
        raise StageError(f"{input_dir} has no model.onnx (run `edge-build export` first)")
    if block_size < 16 or block_size & (block_size - 1):
        raise StageError(f"block_size must be a power of two >= 16, got {block_size}")
    if accuracy_level not in (0, 1, 2, 3, 4):
        raise StageError(f"accuracy_level must be 0..4, got {accuracy_level}")
    if not eval_windows:
        raise StageError("quantize needs at least one evaluation window")
    config = read_config(input_dir)
    params = {
        "method": "rtn",
        "bits": 4,
        "block_size": block_size,
        "accuracy_level": accuracy_level,
        "symmetric": symmetric,
        "ops": ["MatMul", "Gather"],
        "eval_windows": len(eval_windows),
        "eval_window_tokens": len(eval_windows[0]),
        "min_top1": min_top1,
        "max_kl": max_kl,
    }
    # The quantizer logs a line per node at INFO; keep the console readable.
    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)
    with stage_output(out) as tmp:
        algo = DefaultWeightOnlyQuantConfig(
            block_size=block_size,
            is_symmetric=symmetric,
            accuracy_level=accuracy_level,
            op_types_to_quantize=("MatMul", "Gather"),
            quant_axes=(("MatMul", 0), ("Gather", 1)),
        )
        quantizer = MatMulNBitsQuantizer(onnx.load(str(src)), algo_config=algo)
        quantizer.process()
        model = quantizer.model.model
        large = model.ByteSize() > _TWO_GB
        quantizer.model.save_model_to_file(str(tmp / "model.onnx"), use_external_data_format=large)
        for name in CARRIED_FILES:
            if (input_dir / name).is_file():
                shutil.copyfile(input_dir / name, tmp / name)
        counts = {"MatMulNBits": 0, "GatherBlockQuantized": 0, "MatMul": 0}
        for node in model.graph.node:
            if node.op_type in counts:
                counts[node.op_type] += 1
        if counts["MatMulNBits"] == 0:
            raise StageError("quantizer produced no MatMulNBits node: nothing was quantized")

        kv = kv_spec(config)
        ref = onnx_logits(src, kv, eval_windows)
        got = onnx_logits(tmp / "model.onnx", kv, eval_windows)
        cmp = compare_logits(ref, got)
        metrics: dict[str, Any] = {
            **cmp,
            "perplexity_fp32": perplexity(ref, eval_windows),
            "perplexity_int4": perplexity(got, eval_windows),
            "nodes": counts,
            "bytes_fp32": sum(p.stat().st_size for p in input_dir.iterdir() if "onnx" in p.name),
            "bytes_int4": sum(p.stat().st_size for p in tmp.iterdir() if "onnx" in p.name),
        }
        failures = []
        if min_top1 is not None and cmp["top1_agreement"] < min_top1:
            failures.append(f"top-1 agreement {cmp['top1_agreement']:.4f} < {min_top1}")
        if max_kl is not None and cmp["mean_kl"] > max_kl:
            failures.append(f"mean KL {cmp['mean_kl']:.4f} > {max_kl}")
        if failures:
            raise QuantizationQualityError(
                "int4 model fails its quality gate: " + "; ".join(failures)
            )
        record = write_stage(tmp, "quantize", params, input_dir, metrics, started)
    return record
