"""Stage `fp16` (recipe `fuse.activations = "float16"`): the fused graph's activations, KV
cache and logits in float16 for ONNX Runtime's CUDA GroupQueryAttention (float16/bfloat16
only), checked on the CPU against the float32 graph it came from."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")  # the offline pipeline's extra is not on the device leg
onnx = pytest.importorskip("onnx")

from onnx import TensorProto  # noqa: E402

from edge_build import fp16, fuse  # noqa: E402
from edge_build.stage import StageError, read_stage  # noqa: E402


@pytest.fixture(scope="module")
def fused(tiny_bundle, tmp_path_factory: pytest.TempPathFactory) -> Path:  # type: ignore[no-untyped-def]
    out = tmp_path_factory.mktemp("fp16") / "fused"
    fuse.run(tiny_bundle.work / "int4", out)
    return out


def _elem(model: onnx.ModelProto, name: str) -> int:
    for v in [*model.graph.input, *model.graph.output]:
        if v.name == name:
            return int(v.type.tensor_type.elem_type)
    raise KeyError(name)


def test_fp16_stage_converts_the_cache_logits_and_attention(fused: Path, tmp_path: Path) -> None:
    before = onnx.load(str(fused / "model.onnx"))
    assert _elem(before, "past_key_values.0.key") == TensorProto.FLOAT  # what fuse makes
    record = fp16.run(fused, tmp_path / "half")
    m = record["metrics"]
    assert m["kv_dtype"] == m["logits_dtype"] == "float16"
    assert m["GroupQueryAttention"] == sum(n.op_type == "GroupQueryAttention"
                                           for n in before.graph.node) > 0
    assert 0.9 <= m["check_top1"] <= 1.0 and 0 < m["check_max_abs_logit_diff"] < 1.0
    assert read_stage(tmp_path / "half")["stage"] == "fp16"
    after = onnx.load(str(tmp_path / "half" / "model.onnx"))
    floats = fp16.float_io(after)
    assert floats and set(floats.values()) == {"float16"}
    assert {"past_key_values.0.key", "present.0.value", "logits"} <= set(floats)
    # The GQA nodes' operands are float16 (GQA binds query, past and present to one type T,
    # so the session would not load otherwise): it loads and decodes on the CPU provider.
    layers = sum(n.op_type == "GroupQueryAttention" for n in after.graph.node)
    toks, logits = fuse.greedy(tmp_path / "half" / "model.onnx", [5, 6, 7], 3, layers)
    assert len(toks) == 3 and logits[0].dtype == np.float16
    for f in ("config.json", "tokenizer.json"):
        assert (tmp_path / "half" / f).is_file() == (fused / f).is_file()


def test_a_conversion_that_changes_the_choices_fails_the_stage(
        fused: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The greedy check is real: a broken conversion (float16, then the logits negated, so
    the argmax lands elsewhere) is an Fp16MismatchError, and no stage directory is left."""
    real = fp16.convert

    def broken(model: onnx.ModelProto) -> onnx.ModelProto:
        half = real(model)
        prod = next(n for n in half.graph.node if "logits" in n.output)
        prod.output[list(prod.output).index("logits")] = "logits_raw"
        half.graph.node.append(onnx.helper.make_node("Neg", ["logits_raw"], ["logits"]))
        return half

    monkeypatch.setattr(fp16, "convert", broken)
    with pytest.raises(fp16.Fp16MismatchError, match=r"agrees with the float32 one on \d+ of"):
        fp16.run(fused, tmp_path / "bad")
    assert not (tmp_path / "bad").exists()
    monkeypatch.setattr(fp16, "convert", real)
    with pytest.raises(StageError, match=r"min_top1 must be in \[0, 1\]"):
        fp16.run(fused, tmp_path / "y", min_top1=1.5)
