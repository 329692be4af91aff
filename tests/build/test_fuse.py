"""Stage `fuse` on a tiny Qwen2: GQA/RMSNorm fusion decodes exactly like the exported graph."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")  # the offline pipeline's extra is not on the device leg

import onnx  # noqa: E402

from edge_build import fuse, quantize  # noqa: E402
from edge_build.stage import StageError, read_stage  # noqa: E402


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from optimum.exporters.onnx import main_export
    from transformers import Qwen2Config, Qwen2ForCausalLM

    root = tmp_path_factory.mktemp("fuse")
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    Qwen2ForCausalLM(cfg).eval().save_pretrained(root / "hf")
    # Optimum directly (as the export stage does): the stage also wants a tokenizer.
    main_export(str(root / "hf"), output=str(root / "onnx"), task="text-generation-with-past",
                no_post_process=True, do_validation=False, device="cpu")
    return root / "onnx"


@pytest.mark.parametrize("int4", [False, True], ids=["fp32", "int4"])
def test_fused_graph_decodes_like_the_export(tiny_export: Path, tmp_path: Path, int4: bool):
    src = tiny_export
    if int4:
        src = tmp_path / "int4"
        # fp32 activations (accuracy level 0): the fusion must be the same computation. At
        # level 4 activations are rounded to int8, and the fused norms' last-bit differences
        # (~1e-6) flip a rounding now and then: 1e-3 in the logits, seen once in CI.
        quantize.run(tiny_export, src, eval_windows=[list(range(5, 37))], block_size=32,
                     accuracy_level=0)
    rec = fuse.run(src, tmp_path / "fused")
    assert read_stage(tmp_path / "fused")["stage"] == "fuse"
    assert rec["metrics"]["GroupQueryAttention"] == 2
    assert rec["metrics"]["SkipSimplifiedLayerNormalization"] == 4  # 2 per layer, final norm
    ref = onnx.load(str(src / "model.onnx"), load_external_data=False)
    got = onnx.load(str(tmp_path / "fused" / "model.onnx"), load_external_data=False)
    # Same I/O contract: the generator runs the fused graph unchanged.
    for a, b in ((ref.graph.input, got.graph.input), (ref.graph.output, got.graph.output)):
        assert [(v.name, v.type) for v in a] == [(v.name, v.type) for v in b]
    assert sum(n.op_type == "Softmax" for n in got.graph.node) == 0
    if int4:  # every projection and the LM head stay quantized
        def count(m: onnx.ModelProto) -> int:
            return sum(n.op_type == "MatMulNBits" for n in m.graph.node)

        assert count(got) == count(ref) == 2 * 7 + 1
    for prompt in (list(range(3, 35)), [7, 300, 11, 42, 99, 5, 250, 17]):
        want, want_logits = fuse.greedy(src / "model.onnx", prompt, 32, layers=2)
        have, have_logits = fuse.greedy(tmp_path / "fused" / "model.onnx", prompt, 32, layers=2)
        assert have == want
        diff = max(float(np.abs(a - b).max()) for a, b in zip(want_logits, have_logits,
                                                               strict=True))
        assert diff < 1e-4, diff


def test_unexpected_graph_is_a_named_error(tiny_export: Path):
    model = onnx.load(str(tiny_export / "model.onnx"))
    config = {"num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2}
    # A graph whose present.0.key is not Concat(past, new) is not what the stage rewrites.
    for node in model.graph.node:
        if "present.0.key" in node.output:
            node.op_type = "Add"
    with pytest.raises(fuse.FusePatternError, match=r"present\.0\.key.*Concat"):
        fuse.fuse_decoder(model, config)
    assert issubclass(fuse.FusePatternError, StageError)
    with pytest.raises(fuse.FusePatternError, match=r"no input 'past_key_values\.2\.key'"):
        fuse.fuse_decoder(model, {**config, "num_hidden_layers": 3})
    # ORT's GroupQueryAttention takes head sizes in multiples of 16 only: refused up front.
    past = next(i for i in model.graph.input if i.name == "past_key_values.0.key")
    past.type.tensor_type.shape.dim[3].dim_value = 8
    with pytest.raises(fuse.FusePatternError, match=r"head_dim 8 is not a multiple of 16"):
        fuse.fuse_decoder(model, config)


def test_fused_bundle_declares_right_padded_batches(tiny_bundle, tiny_fused_bundle):
    """package marks a GQA graph as batching right-padded sequences and the decomposed graph
    as left-padded; test_batching runs the batch decoder on both."""
    from edge_runtime.bundle.manifest import verify_bundle
    from edge_runtime.signing import load_public_key

    keys = [load_public_key(tiny_bundle.pubkey)]
    fused = verify_bundle(tiny_fused_bundle, keys).graph()
    plain = verify_bundle(tiny_bundle.path, keys).graph()
    assert (fused.left_padded_batch, fused.right_padded_batch) == (False, True)
    assert (plain.left_padded_batch, plain.right_padded_batch) == (True, False)


def test_fusion_runs_on_an_onnx_runtime_that_reads_ir_13(tiny_export: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch):
    """The fuse stage evaluates a helper graph of its own (the rotary tables) in ONNX Runtime.
    onnx 1.23 stamps a new model with IR 14, which ONNX Runtime 1.30 (the GPU machine's, and
    JetPack wheels of that age) refuses: 'Unsupported model IR version: 14, max supported IR
    version: 13' stopped the fused build there. The session here refuses the same way."""
    import onnxruntime

    real = onnxruntime.InferenceSession

    def ort_1_30(model, *args, **kwargs):  # type: ignore[no-untyped-def]
        proto = onnx.load_from_string(model) if isinstance(model, bytes) else onnx.load(
            str(model), load_external_data=False)
        if proto.ir_version > 13:
            raise RuntimeError(f"Unsupported model IR version: {proto.ir_version}, max "
                               "supported IR version: 13")
        return real(model, *args, **kwargs)

    monkeypatch.setattr(onnxruntime, "InferenceSession", ort_1_30)
    rec = fuse.run(tiny_export, tmp_path / "fused")
    assert rec["metrics"]["GroupQueryAttention"] == 2
