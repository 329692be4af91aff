"""Stage `fp16`: the fused graph's activations, KV cache and logits in float16, for a GPU.

ONNX Runtime's CUDA GroupQueryAttention takes float16 or bfloat16 only. A fused graph with
float32 activations (what `fuse` makes, and what the CPU wants) therefore runs every
attention node on the CPU under the CUDA provider: on an H100, all 24 of a Qwen2-0.5B-shape
graph's, with 97 Memcpy nodes added and the KV cache crossing PCIe each step (73.8 tok/s at
batch 1 against the unfused graph's 77.3, 300 against 903 at batch 16). This stage converts
the graph with onnxruntime's float16 converter (`keep_io_types=False`: the past/present
inputs and outputs, the logits and every activation become float16; MatMulNBits scales too;
the int4 weights are untouched), so on the GPU the whole graph runs on the CUDA provider.
`package` then records a float16 KV cache in the manifest (it reads the graph's past input),
and the runtime feeds float16 caches.

The rewrite is checked here, on ONNX Runtime's CPU provider, which runs float16
GroupQueryAttention and MatMulNBits (slowly: it is a check, not a serving path):

- the graph's I/O dtypes: every past/present tensor and the logits float16 (a session would
  not even load if an attention node's query stayed float32 while its past is float16: GQA
  binds both to one type);
- greedy decoding from `check_prompt`, fed the float32 graph's own tokens (teacher-forced,
  so one flipped near tie does not make every later step differ): top-1 agreement with the
  float32 graph and the largest |Δlogit|; below `min_top1` is an Fp16MismatchError. The
  pipeline also measures the held-out windows against the input (quality.py), gated by
  `thresholds.fp16` like any stage.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto

from edge_build.export import CARRIED_FILES, read_config
from edge_build.fuse import greedy
from edge_build.stage import QualityGateError, StageError, require_dir, stage_output, write_stage

_TWO_GB = 2**31 - 1


class Fp16MismatchError(QualityGateError):
    """The float16 graph chooses other tokens than its float32 input too often."""


def convert(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` with float16 activations, KV cache and logits (inputs and outputs included)."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    # disable_shape_infer: ONNX's shape inference does not know the com.microsoft operators
    # (and would load >2 GB models whole); the converter then follows the graph's edges.
    out: onnx.ModelProto = convert_float_to_float16(model, keep_io_types=False,
                                                     disable_shape_infer=True)
    return out


def float_io(model: onnx.ModelProto) -> dict[str, str]:
    """Element type of each floating-point graph input and output ("float16", …): the KV
    cache's past/present and the logits."""
    out: dict[str, str] = {}
    for v in [*model.graph.input, *model.graph.output]:
        elem = v.type.tensor_type.elem_type
        if elem in (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16):
            out[v.name] = onnx.helper.tensor_dtype_to_np_dtype(elem).name \
                if elem != TensorProto.BFLOAT16 else "bfloat16"
    return out


def run(input_dir: Path, out: Path, check_prompt: Sequence[int] = tuple(range(3, 35)),
        check_tokens: int = 16, min_top1: float = 0.9) -> dict[str, Any]:
    """Convert `input_dir`'s model.onnx into `out`; check it against the input; return the
    stage record."""
    started = time.time()
    input_dir = require_dir(input_dir, "decoder artifact")
    src = input_dir / "model.onnx"
    if not src.is_file():
        raise StageError(f"{input_dir} has no model.onnx")
    if not 0 <= min_top1 <= 1:
        raise StageError(f"min_top1 must be in [0, 1], got {min_top1}")
    layers = int(read_config(input_dir)["num_hidden_layers"])
    params = {"check_tokens": check_tokens, "min_top1": min_top1}
    with stage_output(out) as tmp:
        model = onnx.load(str(src))
        half = convert(model)
        big = half.ByteSize() > _TWO_GB
        onnx.save(half, str(tmp / "model.onnx"), save_as_external_data=big)
        for name in CARRIED_FILES:
            if (input_dir / name).is_file():
                shutil.copyfile(input_dir / name, tmp / name)
        io = float_io(half)
        left = sorted(n for n, t in io.items() if t != "float16")
        if left:
            raise StageError(f"float16 conversion left {left} as {[io[n] for n in left]}")
        ref_tok, ref_log = greedy(src, check_prompt, check_tokens, layers)
        _, got_log = greedy(tmp / "model.onnx", check_prompt, check_tokens, layers,
                            force=ref_tok)
        agree = sum(int(g.argmax()) == t for g, t in zip(got_log, ref_tok, strict=True))
        top1 = agree / len(ref_tok)
        diff = max(float(np.abs(a - b.astype(np.float32)).max())
                   for a, b in zip(ref_log, got_log, strict=True))
        if top1 < min_top1:
            raise Fp16MismatchError(
                f"float16 graph agrees with the float32 one on {agree} of {len(ref_tok)} "
                f"greedy tokens (min_top1 {min_top1}); max |Δlogit| {diff:.3g}")
        gqa = sum(n.op_type == "GroupQueryAttention" for n in half.graph.node)
        metrics = {"check_top1": top1, "check_max_abs_logit_diff": diff,
                   "kv_dtype": io.get("past_key_values.0.key", "float16"),
                   "logits_dtype": io.get("logits", "float16"), "GroupQueryAttention": gqa,
                   "bytes": (tmp / "model.onnx").stat().st_size}
        record = write_stage(tmp, "fp16", params, input_dir, metrics, started)
    return record
