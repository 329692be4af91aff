"""Quality measures shared by the stages: logits of an ONNX decoder over fixed token windows,
and how two sets of logits compare (top-1 agreement, mean KL, perplexity).

Everything here runs on ONNX Runtime and numpy, so a stage measures the artifact it actually
wrote, not the framework model it came from.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from edge_runtime.bundle.manifest import KVCacheSpec
from edge_runtime.engines.ort import OrtEngine

if TYPE_CHECKING:
    import onnx

_TWO_GB = 2**31 - 1


def eval_windows(
    tokenizer_file: Path, texts: Sequence[str], count: int, length: int
) -> list[list[int]]:
    """`count` windows of `length` tokens, taken in order from `texts` (deterministic)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_file))
    windows: list[list[int]] = []
    for text in texts:
        ids = tok.encode(text, add_special_tokens=False).ids
        for start in range(0, len(ids) - length + 1, length):
            windows.append(list(ids[start : start + length]))
            if len(windows) == count:
                return windows
    return windows


def prefill_feeds(window: Sequence[int], input_names: set[str],
                  kv: KVCacheSpec) -> dict[str, np.ndarray]:
    """A decoder graph's inputs for one prefill of `window` from an empty KV cache."""
    n = len(window)
    feeds: dict[str, np.ndarray] = {"input_ids": np.asarray([window], dtype=np.int64)}
    if "attention_mask" in input_names:
        feeds["attention_mask"] = np.ones((1, n), dtype=np.int64)
    if "position_ids" in input_names:
        feeds["position_ids"] = np.arange(n, dtype=np.int64)[None, :]
    if "logits_start" in input_names:  # a decoder packaged with a draft: every position
        feeds["logits_start"] = np.array([-n], dtype=np.int64)
    empty = np.zeros((1, kv.num_kv_heads, 0, kv.head_dim), dtype=kv.dtype)
    for i in range(kv.num_layers):
        feeds[kv.past_key.format(layer=i)] = empty
        feeds[kv.past_value.format(layer=i)] = empty
    return feeds


def onnx_logits(
    model: Path, kv: KVCacheSpec, windows: Sequence[Sequence[int]], threads: int | None = None
) -> list[np.ndarray]:
    """Full-sequence logits [S, V] per window, from an empty cache (one prefill each)."""
    engine = OrtEngine(model, threads=threads, providers=["CPUExecutionProvider"])
    names = {s.name for s in engine.inputs}
    out = []
    for w in windows:
        host, _ = engine.run(prefill_feeds(w, names, kv), ("logits",))
        out.append(host["logits"][0].astype(np.float32))
    engine.close()
    return out


def with_fp32_activations(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` whose MatMulNBits compute on fp32 activations (accuracy_level 0).

    At level 4 the kernel rounds activations to int8 per block: two graphs that compute the
    same function up to a 1e-7 reassociation (a fused attention, say) then differ by a
    rounding step now and then, which hides whether a rewrite is exact. Comparing both at
    level 0 takes that rounding out."""
    import onnx

    out = onnx.ModelProto()
    out.CopyFrom(model)
    set_accuracy_level(out, 0)
    return out


def set_accuracy_level(model: onnx.ModelProto, level: int) -> None:
    """Set every MatMulNBits node's accuracy_level, in place: 0 (fp32 activations, ONNX
    Runtime's default, so the attribute is left out) up to 4 (int8 activations)."""
    from onnx import helper

    for n in model.graph.node:
        if n.op_type == "MatMulNBits":
            kept = [a for a in n.attribute if a.name != "accuracy_level"]
            del n.attribute[:]
            n.attribute.extend(kept + ([helper.make_attribute("accuracy_level", level)]
                                       if level else []))  # fmt: skip


def save_fp32_activations(src: Path, dst: Path) -> Path:
    """`src` (an ONNX file) rewritten by with_fp32_activations, saved at `dst`."""
    return save_accuracy_level(src, dst, 0)


def save_accuracy_level(src: Path, dst: Path, level: int) -> Path:
    """`src` (an ONNX file) with every MatMulNBits at accuracy `level`, saved at `dst`."""
    import onnx

    model = onnx.load(str(src))
    set_accuracy_level(model, level)
    large = model.ByteSize() > _TWO_GB
    onnx.save(model, str(dst), save_as_external_data=large,
              location=f"{dst.name}.data" if large else None)
    return dst


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def compare_logits(
    reference: Sequence[np.ndarray], candidate: Sequence[np.ndarray]
) -> dict[str, float]:
    """Top-1 agreement, mean KL(reference ‖ candidate) per token, and max |Δlogit|."""
    if not reference:
        raise ValueError("compare_logits needs at least one window")
    agree = total = 0
    kl_sum = 0.0
    max_abs = 0.0
    for ref, cand in zip(reference, candidate, strict=True):
        agree += int((ref.argmax(-1) == cand.argmax(-1)).sum())
        total += ref.shape[0]
        lp, lq = _log_softmax(ref), _log_softmax(cand)
        kl_sum += float((np.exp(lp) * (lp - lq)).sum())
        max_abs = max(max_abs, float(np.abs(ref - cand).max()))
    return {
        "top1_agreement": agree / total,
        "mean_kl": kl_sum / total,
        "max_abs_logit_diff": max_abs,
    }


def perplexity(logits: Sequence[np.ndarray], windows: Sequence[Sequence[int]]) -> float:
    """exp(mean next-token negative log-likelihood) over the windows."""
    nll = 0.0
    n = 0
    for lg, w in zip(logits, windows, strict=True):
        lp = _log_softmax(lg[:-1])
        targets = np.asarray(w[1:])
        nll -= float(lp[np.arange(len(targets)), targets].sum())
        n += len(targets)
    return float(np.exp(nll / n))
