"""Pipeline stages on the tiny model: records, quality gates, named errors, CLI exit codes."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("torch")  # the offline pipeline's extra is not on the device leg

from edge_build import cli, package, quantize
from edge_build.export import ExportMismatchError, read_config
from edge_build.quantize import QuantizationQualityError
from edge_build.stage import StageError, lineage, read_stage


def test_stage_records_chain_back_to_the_model(tiny_bundle):
    chain = lineage(tiny_bundle.work / "int4")
    assert [r["stage"] for r in chain] == ["demo-model", "export", "quantize"]
    q = chain[-1]
    assert q["params"]["block_size"] == 32 and q["params"]["bits"] == 4
    assert q["input"]["stage"] == "export"
    m = q["metrics"]
    # Quantization changes logits a little, not a lot: these bounds fail on a broken quantizer.
    assert 0.8 <= m["top1_agreement"] <= 1.0
    assert 0.0 < m["mean_kl"] < 0.05
    assert m["bytes_int4"] < m["bytes_fp32"] / 2
    assert m["nodes"]["MatMulNBits"] == 2 * 7 + 1  # 7 per layer + the LM head
    assert chain[1]["metrics"]["check_max_abs_logit_diff"] < 1e-3


def test_quality_gate_fails_with_the_numbers(tiny_bundle, tmp_path):
    windows = [list(range(5, 69))]
    with pytest.raises(QuantizationQualityError, match=r"top-1 agreement [0-9.]+ < 1\.01"):
        quantize.run(tiny_bundle.work / "onnx", tmp_path / "q", eval_windows=windows,
                     block_size=32, min_top1=1.01)
    assert not (tmp_path / "q").exists()  # a failed stage leaves no artifact behind
    assert not list(tmp_path.iterdir())


def test_cli_quality_gate_exit_code(tiny_bundle, tmp_path, capsys):
    code = cli.main(["quantize", str(tiny_bundle.work / "onnx"), str(tmp_path / "q"),
                     "--block-size", "32", "--eval-windows", "2", "--eval-tokens", "32",
                     "--max-kl", "0"])
    assert code == 1
    assert "mean KL" in capsys.readouterr().err


def test_bad_inputs_are_named_errors(tiny_bundle, tmp_path):
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(StageError, match="model_type 'bert'"):
        read_config(tmp_path / "bert")
    with pytest.raises(StageError, match="does not exist"):
        quantize.run(tmp_path / "nope", tmp_path / "q", eval_windows=[[1, 2]])
    with pytest.raises(StageError, match="block_size must be a power of two"):
        quantize.run(tiny_bundle.work / "onnx", tmp_path / "q", eval_windows=[[1, 2]],
                     block_size=48)
    with pytest.raises(StageError, match="context_length 99999 exceeds"):
        package.run(tiny_bundle.work / "int4", tmp_path / "b", tiny_bundle.key, name="x",
                    version="1", context_length=99999)
    assert issubclass(ExportMismatchError, StageError)


def test_keygen_and_package_cli(tiny_bundle, tmp_path, capsys):
    assert cli.main(["keygen", "--out", str(tmp_path), "--name", "k"]) == 0
    assert cli.main(["keygen", "--out", str(tmp_path), "--name", "k"]) == 1  # no overwrite
    assert "exists" in capsys.readouterr().err
    out = tmp_path / "bundle"
    assert cli.main(["package", str(tiny_bundle.work / "int4"), str(out), "--key",
                     str(tmp_path / "k.key"), "--name", "mine", "--version", "2.0"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["name"] == "mine" and manifest["version"] == "2.0"
    assert [s["stage"] for s in manifest["build"]["stages"]] == ["demo-model", "export",
                                                                 "quantize"]
    assert read_stage(tiny_bundle.work / "int4")["stage"] == "quantize"
