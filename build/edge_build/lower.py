"""Stage `lower`: the fp32 ONNX export of a quantize artifact → a 4-bit ONNX graph, built
from the integer codes the quantize stage stored (never quantized a second time).

Two forms of the same codes and scales:

- "matmulnbits": ONNX Runtime's contrib ops. MatMul(A, W[K, N]) → MatMulNBits(A, B, scales
  [, zero_points]) with B uint8 [N, K/bs, bs/2] (codes along K, low nibble first), scales
  [N·K/bs], zero points packed two per byte per row (absent = 8: our symmetric codes);
  the embedding Gather → GatherBlockQuantized (int4 [V, D], blocks along D).
- "qdq": standard ONNX (opset 21). W → DequantizeLinear(int4 [K, N], scale [K/bs, N],
  axis=0, block_size=bs) → MatMul; the embedding → DequantizeLinear(axis=1) → Gather. This is
  the explicit-quantization form TensorRT consumes (symmetric only: TensorRT takes no zero
  points); plain ONNX Runtime runs it too.

Weights are found by content, not by name: the export of the fake-quant model holds each
linear's dequantized weight, transposed, bit for bit, so the match is exact equality of
bytes. A quantized linear with no match — the LM head above all — is `LinearNotFoundError`,
never a silent skip. The stage ends by running the new graph in ONNX Runtime against the fp32
graph (which computes the same fake-quant weights): at accuracy_level 0 (fp32 activations)
within `atol`, else `LoweringMismatchError`; level 4 (int8 activations) is reported.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from edge_build.evaluate import compare_logits, onnx_logits, prefill_feeds, set_accuracy_level
from edge_build.export import CARRIED_FILES, kv_spec, read_config
from edge_build.int4 import QTensor, QuantizedWeights, pack_nibbles
from edge_build.stage import (
    QualityGateError,
    StageError,
    artifact_hash,
    require_dir,
    stage_output,
    write_stage,
)

FORMATS = ("matmulnbits", "qdq")
_TWO_GB = 2**31 - 1


class LinearNotFoundError(StageError):
    """A quantized weight has no matching initializer in the ONNX graph."""


class LoweringMismatchError(QualityGateError):
    """The 4-bit graph's logits differ from the fp32 fake-quant graph's beyond tolerance."""


def _key(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a, dtype="<f4").tobytes()).hexdigest()


def _int4(name: str, values: np.ndarray, signed: bool) -> Any:
    """An INT4 / UINT4 initializer; `values` are the nibbles (signed or not), row-major."""
    from onnx import TensorProto, helper

    flat = (values.reshape(-1).astype(np.int16) & 0x0F).astype(np.uint8)  # two's complement
    if flat.size % 2:
        flat = np.append(flat, np.uint8(0))
    packed = pack_nibbles(flat)
    dtype = TensorProto.INT4 if signed else TensorProto.UINT4
    return helper.make_tensor(name, dtype, list(values.shape), packed.tobytes(), raw=True)


def _matmulnbits(node: Any, qt: QTensor, base: str, level: int) -> tuple[list[Any], list[Any]]:
    from onnx import helper, numpy_helper

    n, k = qt.shape
    groups = k // qt.group_size
    inits = [
        numpy_helper.from_array(
            pack_nibbles(qt.codes).reshape(n, groups, qt.group_size // 2), base + "_Q4"
        ),
        numpy_helper.from_array(qt.scales.reshape(-1), base + "_scales"),
    ]
    if qt.zero_points is not None:  # [N, ceil(G/2)]: each row's zero points padded to a byte
        zp = qt.zero_points if groups % 2 == 0 else np.pad(qt.zero_points, ((0, 0), (0, 1)))
        inits.append(numpy_helper.from_array(pack_nibbles(zp).reshape(-1), base + "_zp"))
    attrs: dict[str, Any] = {"K": k, "N": n, "bits": 4, "block_size": qt.group_size}
    if level:
        attrs["accuracy_level"] = level
    new = helper.make_node("MatMulNBits", [node.input[0], *(i.name for i in inits)],
                           list(node.output), name=node.name + "_Q4", domain="com.microsoft",
                           **attrs)  # fmt: skip
    return [new], inits


def _gather_block(node: Any, qt: QTensor, base: str) -> tuple[list[Any], list[Any]]:
    from onnx import helper, numpy_helper

    axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
    sym = qt.zero_points is None
    inits = [
        _int4(base + "_Q4", qt.codes.astype(np.int8) - 8 if sym else qt.codes, signed=sym),
        numpy_helper.from_array(qt.scales, base + "_scales"),
    ]
    if qt.zero_points is not None:
        inits.append(_int4(base + "_zp", qt.zero_points, signed=False))
    names = [inits[0].name, node.input[1], inits[1].name] + ([inits[2].name] if not sym else [])
    new = helper.make_node("GatherBlockQuantized", names, list(node.output),
                           name=node.name + "_Q4", domain="com.microsoft", gather_axis=axis,
                           quantize_axis=1, block_size=qt.group_size)  # fmt: skip
    return [new], inits


def _qdq(node: Any, qt: QTensor, base: str, gather: bool) -> tuple[list[Any], list[Any]]:
    """DequantizeLinear → the original op. MatMul reads W [K, N]: codes and scales transposed,
    blocks along axis 0; the embedding table [V, D] keeps its layout, blocks along axis 1."""
    from onnx import helper, numpy_helper

    sym = qt.zero_points is None
    codes = qt.codes if gather else qt.codes.T
    scales = qt.scales if gather else qt.scales.T
    inits = [
        _int4(base + "_Q4", codes.astype(np.int8) - 8 if sym else codes, signed=sym),
        numpy_helper.from_array(np.ascontiguousarray(scales), base + "_scales"),
    ]
    if qt.zero_points is not None:
        zp = qt.zero_points if gather else qt.zero_points.T
        inits.append(_int4(base + "_zp", zp, signed=False))
    w = base + "_dq"
    dq = helper.make_node("DequantizeLinear", [i.name for i in inits], [w], name=base + "_DQ",
                          axis=1 if gather else 0, block_size=qt.group_size)  # fmt: skip
    inputs = list(node.input)
    inputs[0 if gather else 1] = w
    op = helper.make_node(node.op_type, inputs, list(node.output), name=node.name)
    op.attribute.extend(node.attribute)
    return [dq, op], inits


def rewrite(model: Any, weights: QuantizedWeights, fmt: str, level: int) -> dict[str, int]:
    """Replace, in place, every weight MatMul / embedding Gather whose initializer equals a
    quantized module's dequantized weight. Returns node counts."""
    from onnx import helper, numpy_helper

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    keys: dict[str, str] = {}  # initializer name → content key (computed once each)
    by_key: dict[tuple[str, str], list[int]] = {}  # (op, key) → node indices
    for idx, node in enumerate(graph.node):
        slot = {"MatMul": 1, "Gather": 0}.get(node.op_type)
        if slot is None or node.input[slot] not in inits:
            continue
        name = node.input[slot]
        if name not in keys:
            arr = numpy_helper.to_array(inits[name])
            keys[name] = _key(arr) if arr.ndim == 2 and arr.dtype == np.float32 else ""
        by_key.setdefault((node.op_type, keys[name]), []).append(idx)

    replace: dict[int, tuple[list[Any], list[Any]]] = {}
    missing = []
    for module in weights.modules():
        qt = weights.get(module)
        gather = weights.kinds[module] == "embedding"
        deq = qt.dequantize()
        hits = by_key.get(("Gather", _key(deq))) if gather else by_key.get(("MatMul", _key(deq.T)))
        if not hits:
            missing.append(module)
            continue
        for idx in hits:
            node, base = graph.node[idx], f"{module}.weight" + (f"_{idx}" if len(hits) > 1 else "")
            if fmt == "qdq":
                replace[idx] = _qdq(node, qt, base, gather)
            elif gather:
                replace[idx] = _gather_block(node, qt, base)
            else:
                replace[idx] = _matmulnbits(node, qt, base, level)
    if missing:
        found = len(weights.modules()) - len(missing)
        raise LinearNotFoundError(
            f"{len(missing)} of {len(weights.modules())} quantized weights have no matching "
            f"initializer in the ONNX graph: {', '.join(missing[:8])}"
            + (" ..." if len(missing) > 8 else "")
            + (
                ""
                if found
                else " (none matched: was this ONNX exported from this quantize "
                "artifact, with post-processing off?)"
            )
        )
    nodes: list[Any] = []
    for idx, node in enumerate(graph.node):
        nodes += replace[idx][0] if idx in replace else [node]
    new_inits = [i for _, extra in replace.values() for i in extra]
    del graph.node[:]
    graph.node.extend(nodes)
    used = {i for n in graph.node for i in n.input}
    kept = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept + new_inits)
    if fmt == "matmulnbits":
        if not any(o.domain == "com.microsoft" for o in model.opset_import):
            model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    else:  # blocked DequantizeLinear is opset 21
        for o in model.opset_import:
            if o.domain in ("", "ai.onnx") and o.version < 21:
                o.version = 21
    counts: dict[str, int] = {}
    for n in graph.node:
        if n.op_type in ("MatMulNBits", "GatherBlockQuantized", "DequantizeLinear"):
            counts[n.op_type] = counts.get(n.op_type, 0) + 1
    counts["float_weight_matmuls"] = sum(
        1 for n in graph.node if n.op_type == "MatMul" and n.input[1] in {i.name for i in kept}
    )
    return counts


def _save(model: Any, path: Path) -> None:
    import onnx

    large = model.ByteSize() > _TWO_GB
    onnx.save(model, str(path), save_as_external_data=large,
              location=path.name + ".data" if large else None)  # fmt: skip


def _unoptimized_logits(path: Path, kv: Any, windows: list[list[int]]) -> list[np.ndarray]:
    """Logits with every ORT graph optimisation off: the QDQ graph's standard ops as
    written. (With optimisations on, ORT's CPU provider fuses DequantizeLinear → MatMul into
    MatMulNBits with int8 activations, which measures ORT's fusion, not the graph.)"""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    names = {i.name for i in sess.get_inputs()}
    out = []
    for w in windows:
        out.append(sess.run(["logits"], prefill_feeds(w, names, kv))[0][0].astype(np.float32))
    return out


def lower(
    onnx_dir: Path,
    quant_dir: Path,
    out: Path,
    fmt: str = "matmulnbits",
    accuracy_level: int = 4,
    atol: float = 1e-3,
    check_windows: list[list[int]] | None = None,
) -> dict[str, Any]:
    """Lower `onnx_dir`'s model.onnx (the export of `quant_dir`) to `fmt` into `out`;
    return the stage record."""
    import onnx

    started = time.time()
    onnx_dir = require_dir(Path(onnx_dir), "ONNX export")
    quant_dir = require_dir(Path(quant_dir), "quantize artifact")
    if fmt not in FORMATS:
        raise StageError(f"format {fmt!r} is not one of {', '.join(FORMATS)}")
    if accuracy_level not in (0, 1, 2, 3, 4):
        raise StageError(f"accuracy_level must be 0..4, got {accuracy_level}")
    src = onnx_dir / "model.onnx"
    if not src.is_file():
        raise StageError(f"{onnx_dir} has no model.onnx (run `edge-build export` first)")
    weights = QuantizedWeights.load(quant_dir)
    config = read_config(onnx_dir)
    kv = kv_spec(config)
    model = onnx.load(str(src))
    counts = rewrite(model, weights, fmt, accuracy_level)
    if check_windows is None:
        rng = np.random.default_rng(0)
        vocab = int(config["vocab_size"])
        check_windows = [rng.integers(0, vocab, size=32).tolist() for _ in range(2)]
    ref = onnx_logits(src, kv, check_windows)
    metrics: dict[str, Any] = {"nodes": counts, "modules": len(weights.modules())}
    exact: dict[str, float] | None = None
    with stage_output(Path(out)) as tmp:
        if fmt == "matmulnbits" and accuracy_level != 0:
            with tempfile.TemporaryDirectory(dir=tmp.parent) as work:
                set_accuracy_level(model, 0)  # fp32 activations: only the weight format differs
                _save(model, Path(work) / "model.onnx")
                exact = compare_logits(ref, onnx_logits(Path(work) / "model.onnx", kv,
                                                        check_windows))  # fmt: skip
            set_accuracy_level(model, accuracy_level)
        _save(model, tmp / "model.onnx")
        got = compare_logits(ref, onnx_logits(tmp / "model.onnx", kv, check_windows))
        if fmt == "qdq":
            exact = compare_logits(ref, _unoptimized_logits(tmp / "model.onnx", kv, check_windows))
        exact = exact or got  # level 0 asked for: the saved graph is the fp32-activation check
        metrics.update({f"check_{k}": v for k, v in exact.items()})  # fp32 activations
        if exact is not got:  # the saved graph as ORT runs it by default (int8 activations)
            label = "ort_default" if fmt == "qdq" else f"level{accuracy_level}"
            metrics.update({f"{label}_{k}": v for k, v in got.items()})
        if exact["max_abs_logit_diff"] > atol:
            raise LoweringMismatchError(
                f"{fmt} graph (fp32 activations) differs from the fake-quant fp32 graph by "
                f"{exact['max_abs_logit_diff']:.2e} in logits (> atol {atol:.0e}); top-1 "
                f"agreement {exact['top1_agreement']:.4f}"
            )
        for name in CARRIED_FILES:
            if (onnx_dir / name).is_file():
                shutil.copyfile(onnx_dir / name, tmp / name)
        metrics["onnx_bytes"] = sum(p.stat().st_size for p in tmp.iterdir() if "onnx" in p.name)
        params = {
            **weights.meta,
            "format": fmt,
            "block_size": weights.meta["group_size"],
            "accuracy_level": accuracy_level if fmt == "matmulnbits" else None,
            "atol": atol,
            "quant_artifact": artifact_hash(quant_dir),
        }
        record = write_stage(tmp, "lower", params, onnx_dir, metrics, started)
    return record
