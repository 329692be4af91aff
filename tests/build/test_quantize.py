"""Stage `quantize` (model space, AWQ / RTN) and `lower` (MatMulNBits / QDQ) on tiny Qwen2
(tied LM head) and Llama (untied) models: the fold is exact, the int4 graphs compute the
fake-quant model's numbers, every weight is covered, and the gates fail with their numbers."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from transformers import AutoModelForCausalLM  # noqa: E402

from edge_build import awq, cli, export, lm_eval, package, quantize  # noqa: E402
from edge_build.evaluate import eval_windows  # noqa: E402
from edge_build.int4 import QuantizedWeights, unpack_nibbles  # noqa: E402
from edge_build.lower import rewrite  # noqa: E402
from edge_build.quantize import LinearNotFoundError, QuantizationQualityError  # noqa: E402
from edge_build.stage import StageError, lineage  # noqa: E402

ARCHS = ["qwen2", "llama"]
GROUP = 32  # hidden 64, intermediate 128: two or four groups per row


@pytest.fixture(scope="module")
def windows(teacher_dirs: dict[str, Path], corpus_texts: Any) -> dict[str, list[list[int]]]:
    tok = teacher_dirs["qwen2"] / "tokenizer.json"  # both teachers share the tokenizer
    return {
        "calib": eval_windows(tok, corpus_texts[0], 8, 64),
        "eval": eval_windows(tok, corpus_texts[1], 8, 64),
    }


@pytest.fixture(scope="module")
def quantized(
    teacher_dirs: dict[str, Path], windows: Any, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, tuple[Path, Path]]:
    """Per arch: (quantize artifact, its fp32 ONNX export). Llama also tests zero points."""
    out = {}
    for arch in ARCHS:
        root = tmp_path_factory.mktemp(f"quant-{arch}")
        quantize.quantize_model(
            teacher_dirs[arch], root / "q", windows["calib"], windows["eval"], method="awq",
            group_size=GROUP, symmetric=arch == "qwen2", progress=False,
        )  # fmt: skip
        export.run(root / "q", root / "onnx")
        out[arch] = (root / "q", root / "onnx")
    return out


def _torch_logits(model_dir: Path, ids: list[list[int]]) -> list[np.ndarray]:
    model = lm_eval.load_causal_lm(model_dir)
    with torch.inference_mode():
        return [model(torch.tensor([w])).logits[0].numpy() for w in ids]


@pytest.mark.parametrize("arch", ARCHS)
def test_awq_scales_fold_without_changing_the_fp32_model(arch, teacher_dirs, windows):
    model = lm_eval.load_causal_lm(teacher_dirs[arch])
    folded = copy.deepcopy(model)
    calib = lm_eval.windows_tensor(windows["calib"][:4])
    spec = awq.QuantSpec(group_size=GROUP, clip=False)
    for i, inputs in enumerate(awq._layer_inputs(folded, calib, batch_size=2)):
        awq._awq_layer(folded, i, inputs, spec)
    if arch == "llama":  # untied: the LM head's scale goes into the final norm
        awq._awq_lm_head(folded, calib, spec, batch_size=4)
        assert not torch.equal(folded.model.norm.weight, model.model.norm.weight)
    # The search found non-trivial scales (so this test can fail) ...
    assert not torch.equal(folded.model.layers[0].input_layernorm.weight,
                           model.model.layers[0].input_layernorm.weight)  # fmt: skip
    assert not torch.equal(folded.model.layers[0].self_attn.v_proj.weight,
                           model.model.layers[0].self_attn.v_proj.weight)  # fmt: skip
    # ... and folding them changed no output: GQA-shared v→o scales included.
    ids = torch.tensor(windows["eval"][:2])
    with torch.inference_mode():
        diff = (folded(ids).logits - model(ids).logits).abs().max().item()
    assert diff < 1e-4


@pytest.mark.parametrize("arch", ARCHS)
def test_quantize_model_writes_fake_quant_weights_and_codes(arch, quantized, teacher_dirs):
    qdir, _ = quantized[arch]
    rec = json.loads((qdir / "stage.json").read_text())
    m, p = rec["metrics"], rec["params"]
    assert (p["method"], p["group_size"], p["symmetric"]) == ("awq", GROUP, arch == "qwen2")
    assert 0.5 < m["quantized_top1_agreement"] <= 1.0 and 0.0 < m["quantized_mean_kl"] < 0.5
    assert m["input_perplexity"] > 1 and m["quantized_perplexity"] > 1
    assert m["int4_bytes"] < m["input_bytes"] / 5  # 4 bits + scales vs 32 bits
    weights = QuantizedWeights.load(qdir)
    layers = 4
    # 7 linears per layer + embedding + LM head (the tied head is an alias of the embedding)
    assert len(weights.modules()) == 7 * layers + 2
    assert ("lm_head" in weights.aliases) == (arch == "qwen2")
    # The saved HF weights are exactly the dequantized codes.
    model = AutoModelForCausalLM.from_pretrained(qdir)
    for name in ("model.embed_tokens", "lm_head", "model.layers.1.mlp.down_proj"):
        w = model.get_submodule(name).weight.detach().numpy()
        assert np.array_equal(w, weights.get(name).dequantize()), name
    q = weights.get("model.layers.0.self_attn.q_proj")
    assert q.codes.max() <= 15 and (q.zero_points is None) == (arch == "qwen2")


@pytest.mark.parametrize("arch", ARCHS)
def test_lowered_graphs_match_the_quantized_pytorch_model(arch, quantized, windows, tmp_path):
    qdir, onnx_dir = quantized[arch]
    ids = windows["eval"][:2]
    ref = _torch_logits(qdir, ids)
    kv = export.kv_spec(export.read_config(onnx_dir))
    from edge_build.evaluate import onnx_logits
    from edge_build.lower import _unoptimized_logits

    rec = quantize.lower(onnx_dir, qdir, tmp_path / "nbits0", fmt="matmulnbits", accuracy_level=0)
    n = rec["metrics"]["nodes"]
    assert n["MatMulNBits"] == 7 * 4 + 1 and n["GatherBlockQuantized"] == 1  # + LM head
    assert n["float_weight_matmuls"] == 0
    got = onnx_logits(tmp_path / "nbits0" / "model.onnx", kv, ids)
    assert max(float(np.abs(a - b).max()) for a, b in zip(ref, got, strict=True)) < 1e-3

    rec = quantize.lower(onnx_dir, qdir, tmp_path / "qdq", fmt="qdq")
    n = rec["metrics"]["nodes"]
    assert n["DequantizeLinear"] == 7 * 4 + 2 and n["float_weight_matmuls"] == 0
    got = _unoptimized_logits(tmp_path / "qdq" / "model.onnx", kv, ids)  # standard ops only
    assert max(float(np.abs(a - b).max()) for a, b in zip(ref, got, strict=True)) < 1e-3
    import onnx

    g = onnx.load(str(tmp_path / "qdq" / "model.onnx"))
    assert {o.domain for o in g.opset_import if o.version >= 21} >= {""}
    assert not any(node.domain == "com.microsoft" for node in g.graph.node)

    # Both graphs hold the stored codes themselves, not a second quantization.
    from onnx import numpy_helper

    qt = QuantizedWeights.load(qdir).get("model.layers.1.mlp.up_proj")
    name = "model.layers.1.mlp.up_proj.weight_Q4"
    b = next(i for i in onnx.load(str(tmp_path / "nbits0" / "model.onnx")).graph.initializer
             if i.name == name)  # fmt: skip
    assert np.array_equal(unpack_nibbles(numpy_helper.to_array(b)).reshape(qt.shape), qt.codes)
    dq = next(i for i in g.graph.initializer if i.name == name)
    signed = numpy_helper.to_array(dq).astype(np.int16)  # [K, N]
    assert np.array_equal(signed.T + (8 if qt.zero_points is None else 0), qt.codes)

    rec = quantize.lower(onnx_dir, qdir, tmp_path / "nbits4", fmt="matmulnbits")
    m = rec["metrics"]
    assert m["check_max_abs_logit_diff"] < 1e-3  # the same graph with fp32 activations
    assert m["level4_top1_agreement"] > 0.9  # int8 activations: close, not exact
    assert [s["stage"] for s in lineage(tmp_path / "nbits4")][-3:] == ["quantize", "export",
                                                                       "lower"]  # fmt: skip


def test_lowered_graph_packages_into_a_bundle(quantized, tmp_path):
    from edge_runtime.signing import generate_keypair

    qdir, onnx_dir = quantized["qwen2"]
    quantize.lower(onnx_dir, qdir, tmp_path / "int4")
    generate_keypair(tmp_path / "k.key", tmp_path / "k.pub")
    path = package.run(tmp_path / "int4", tmp_path / "b", tmp_path / "k.key", name="t",
                       version="1")  # fmt: skip
    manifest = json.loads((path / "manifest.json").read_text())
    weights = manifest["graphs"]["decoder"]["weights"]
    assert weights["format"] == "MatMulNBits" and weights["method"] == "awq"
    assert weights["block_size"] == GROUP and weights["accuracy_level"] == 4


@pytest.mark.parametrize("arch", ARCHS)
def test_package_labels_each_graph_by_its_weights(quantized, tmp_path, arch):
    """int4 for blocked INT4/UINT4 DequantizeLinear (QDQ) as for MatMulNBits, read from the
    graph; float32 for the export."""
    import onnx

    qdir, onnx_dir = quantized[arch]
    quantize.lower(onnx_dir, qdir, tmp_path / "qdq", fmt="qdq")
    qdq = package.weight_format(onnx.load(str(tmp_path / "qdq" / "model.onnx")),
                                lineage(tmp_path / "qdq"))  # fmt: skip
    sym = arch == "qwen2"  # the fixture quantizes Llama with zero points
    assert qdq == {"dtype": "int4", "format": "qdq", "block_size": GROUP, "symmetric": sym,
                   "method": "awq"}  # fmt: skip
    fp32 = package.weight_format(onnx.load(str(onnx_dir / "model.onnx")), lineage(onnx_dir))
    assert fp32 == {"dtype": "float32"}


def test_a_missing_lm_head_is_a_named_error(quantized):
    import onnx
    from onnx import numpy_helper

    qdir, onnx_dir = quantized["qwen2"]
    model = onnx.load(str(onnx_dir / "model.onnx"))
    head = next(n for n in model.graph.node if n.name == "/lm_head/MatMul")
    init = next(i for i in model.graph.initializer if i.name == head.input[1])
    w = numpy_helper.to_array(init).copy()
    w[0, 0] += 1e-3  # not the weight that was quantized any more
    init.CopyFrom(numpy_helper.from_array(w, init.name))
    with pytest.raises(LinearNotFoundError, match=r"1 of 30 .*: lm_head$"):
        rewrite(model, QuantizedWeights.load(qdir), "matmulnbits", 4)


def test_awq_is_closer_to_fp32_than_rtn(teacher_dirs, windows):
    r = quantize.compare_methods(teacher_dirs["qwen2"], windows["calib"], windows["eval"],
                                 group_size=GROUP)  # fmt: skip
    assert r["awq"]["mean_kl"] < r["rtn"]["mean_kl"]
    assert r["awq"]["perplexity_increase"] <= r["rtn"]["perplexity_increase"]


def test_quality_gates_fail_with_the_numbers(teacher_dirs, windows, data_file, tmp_path, capsys):
    args = (teacher_dirs["llama"], tmp_path / "q", windows["calib"][:2], windows["eval"][:2])
    with pytest.raises(QuantizationQualityError, match=r"top-1 agreement [0-9.]+ < 1\.01"):
        quantize.quantize_model(*args, method="rtn", group_size=GROUP, min_top1=1.01)
    with pytest.raises(QuantizationQualityError, match=r"perplexity [0-9.]+ is -?[0-9.]+% above"):
        quantize.quantize_model(*args, method="rtn", group_size=GROUP, max_ppl_increase=-0.5)
    assert not list(tmp_path.iterdir())  # a failed stage leaves nothing behind
    code = cli.main(["quantize", str(teacher_dirs["llama"]), str(tmp_path / "q"), "--method",
                     "rtn", "--group-size", str(GROUP), "--data", str(data_file),
                     "--calib-windows", "2", "--eval-windows", "2", "--eval-tokens", "32",
                     "--no-progress", "--max-kl", "0"])  # fmt: skip
    assert code == 1
    assert "mean KL" in capsys.readouterr().err


def test_cli_quantize_then_lower(teacher_dirs, quantized, data_file, tmp_path, capsys):
    code = cli.main(["quantize", str(teacher_dirs["qwen2"]), str(tmp_path / "q"), "--group-size",
                     str(GROUP), "--data", str(data_file), "--calib-windows", "2",
                     "--eval-windows", "2", "--eval-tokens", "32", "--no-progress"])  # fmt: skip
    assert code == 0 and (tmp_path / "q" / "quant.safetensors").is_file()
    assert json.loads((tmp_path / "q" / "stage.json").read_text())["params"]["method"] == "awq"
    qdir, onnx_dir = quantized["qwen2"]
    assert cli.main(["lower", str(onnx_dir), str(qdir), str(tmp_path / "l"), "--format",
                     "qdq"]) == 0  # fmt: skip
    # The export of another quantization (other calibration windows) holds other codes; only
    # the embedding and its tied head (RTN either way) match. A named error, exit 1.
    assert cli.main(["lower", str(onnx_dir), str(tmp_path / "q"), str(tmp_path / "x")]) == 1
    assert "28 of 30 quantized weights have no matching initializer" in capsys.readouterr().err


def test_bad_inputs_are_named_errors(teacher_dirs, quantized, windows, tmp_path):
    args = (teacher_dirs["qwen2"], tmp_path / "q", windows["calib"][:1], windows["eval"][:1])
    with pytest.raises(StageError, match="group_size must be a power of two"):
        quantize.quantize_model(*args, group_size=48)
    with pytest.raises(StageError, match="method 'gptq' is not one of awq, rtn"):
        quantize.quantize_model(*args, method="gptq")
    with pytest.raises(StageError, match="64 inputs is not a multiple of group_size 128"):
        quantize.quantize_model(*args, group_size=128)
    with pytest.raises(StageError, match="at least one calibration window"):
        quantize.quantize_model(teacher_dirs["qwen2"], tmp_path / "q", [], windows["eval"])
    qdir, onnx_dir = quantized["qwen2"]
    with pytest.raises(StageError, match="format 'int3' is not one of"):
        quantize.lower(onnx_dir, qdir, tmp_path / "l", fmt="int3")
    with pytest.raises(StageError, match="not a quantize artifact"):
        quantize.lower(onnx_dir, teacher_dirs["qwen2"], tmp_path / "l")
    assert cli.main(["quantize", str(onnx_dir), str(tmp_path / "o"), "--method", "awq"]) == 1
