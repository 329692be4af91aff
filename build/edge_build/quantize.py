"""Stage `quantize`: fp32 ONNX decoder → 4-bit weight-only ONNX (`MatMulNBits`).

Round-to-nearest, group-wise along the input dimension (ONNX Runtime's `MatMulNBitsQuantizer`
with its default RTN algorithm), covering every `MatMul` with a constant weight — the LM head
included — and the embedding `Gather` (`GatherBlockQuantized`). `accuracy_level` 4 lets the CPU
kernel compute in int8 on quantized activations, the fastest path on ARM and x86.

The stage measures what quantization cost: top-1 agreement, mean KL and perplexity of the int4
graph against the fp32 graph on fixed held-out windows. Thresholds, when given, make it a
quality gate that fails with `QuantizationQualityError` quoting the numbers.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from edge_build.evaluate import compare_logits, onnx_logits, perplexity
from edge_build.export import CARRIED_FILES, kv_spec, read_config
from edge_build.stage import QualityGateError, StageError, require_dir, stage_output, write_stage

_TWO_GB = 2**31 - 1


class QuantizationQualityError(QualityGateError):
    """The 4-bit graph is further from the fp32 graph than the thresholds allow."""


def run(
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
