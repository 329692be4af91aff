"""models/deepseek-r1-distill-qwen-1.5b.toml's exact stage chain and options, on a tiny model
of the same architecture: Qwen2 with an untied LM head, 12 query heads sharing 2 KV heads,
an MLP 5.83× the hidden size; 8 layers standing for 28. Only sizes are overridden (steps,
windows, group size for a 192-wide model) and the distillation gates, which assume the real
budget of 6000 steps; the quantization, export and lowering gates stay as shipped."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from model_fixtures import train_briefly  # noqa: E402
from transformers import AutoConfig, Qwen2Config, Qwen2ForCausalLM  # noqa: E402

from edge_build.pipeline import run_recipe  # noqa: E402
from edge_build.recipe import load_recipe  # noqa: E402
from edge_build.textdata import token_stream  # noqa: E402
from edge_runtime.bundle.manifest import verify_bundle  # noqa: E402
from edge_runtime.model.generator import Generator  # noqa: E402
from edge_runtime.model.sampling import SamplingParams  # noqa: E402
from edge_runtime.signing import generate_keypair, load_public_key  # noqa: E402

RECIPE = Path(__file__).resolve().parents[2] / "models" / "deepseek-r1-distill-qwen-1.5b.toml"


def r1_shaped(vocab_size: int) -> Qwen2Config:
    """DeepSeek-R1-Distill-Qwen-1.5B's config with every size divided down (1536 → 192).

    192 keeps head_dim = hidden / heads at 16, the smallest ONNX Runtime's CPU
    GroupQueryAttention takes (the fuse stage; the real model's is 128)."""
    return Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=192,
        intermediate_size=1120,  # 8960/1536 × 192
        num_hidden_layers=8,
        num_attention_heads=12,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rope_theta=10000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        use_sliding_window=False,
        max_window_layers=21,
        bos_token_id=None,
        eos_token_id=2,
        pad_token_id=0,
    )


@pytest.fixture(scope="module")
def r1_tiny(tmp_path_factory: Any, tokenizer_dir: Path, corpus_texts: Any) -> Path:
    d = tmp_path_factory.mktemp("r1-tiny")
    for f in tokenizer_dir.iterdir():
        shutil.copyfile(f, d / f.name)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(r1_shaped(384))
    model.save_pretrained(d)
    train_briefly(model, token_stream(d, corpus_texts[0]), steps=40)
    model.save_pretrained(d)
    return d


def test_r1_recipe_chain_on_a_same_architecture_model(
    r1_tiny: Path, data_file: Path, tmp_path: Path
) -> None:
    generate_keypair(tmp_path / "k.key", tmp_path / "k.pub")
    sets = [
        f"source.path={r1_tiny}",
        f'data.files=["{data_file}"]',
        "data.eval_windows=4",
        "data.eval_tokens=64",
        "data.calib_windows=8",
        "distill.steps=6",
        "distill.batch_size=2",
        "distill.seq_len=64",
        "distill.grad_accum=2",
        "distill.warmup_steps=2",
        "distill.checkpoint_every=3",
        "prune.heal_steps=2",
        "quantize.group_size=32",
        "package.context_length=256",
        "thresholds.distill.vs_teacher.min_top1=0",
        "thresholds.distill.vs_teacher.max_ppl_increase=inf",
        "thresholds.heal.vs_teacher.min_top1=0",
        "thresholds.heal.vs_teacher.max_ppl_increase=inf",
        "thresholds.prune.vs_input.max_ppl_increase=inf",
    ]
    recipe = load_recipe(RECIPE, sets)
    assert recipe.distill.hidden_weight > 0 and recipe.lower.formats == ("matmulnbits", "qdq")
    result = run_recipe(recipe, tmp_path / "build", key=tmp_path / "k.key", progress=False)
    assert result.executed == [
        "distill",
        "prune",
        "heal",
        "quantize",
        "export",
        "lower-matmulnbits",
        "lower-qdq",
        "fuse",
        "package",
    ]

    student = AutoConfig.from_pretrained(tmp_path / "build" / "heal")
    assert student.num_hidden_layers == 4  # every other layer: 8 → 4 (28 → 14)
    assert student.intermediate_size == 768  # 1120 × (1 − 0.3142857): 8960 → 6144 scaled
    assert (student.num_attention_heads, student.num_key_value_heads) == (12, 2)
    assert student.tie_word_embeddings is False
    by = {s.name: s.quality for s in result.stages}
    assert (
        by["prune"]["parameters"]
        < by["distill"]["parameters"]
        < 0.6 * sum(p.numel() for p in Qwen2ForCausalLM(r1_shaped(384)).parameters())
    )
    for fmt in ("matmulnbits", "qdq"):  # both int4 forms reproduce the fake-quant model
        assert by[f"lower-{fmt}"]["vs_input"]["top1_agreement"] >= 0.95

    # The served graph is fused (GQA 12/2, untied head), exactly: |Δlogit| at fp32 activations.
    assert by["fuse"]["vs_input"]["max_abs_logit_diff"] < 1e-4
    bundle = verify_bundle(result.bundle, [load_public_key(tmp_path / "k.pub")])
    assert bundle.manifest.name == "r1-distill-qwen-1.5b-s14"
    graph = bundle.manifest.graphs["decoder"]
    assert graph.right_padded_batch and graph.weights["format"] == "MatMulNBits"
    assert bundle.manifest.generation.context_length == 256  # = the rotary tables' rows
    gen = Generator.from_bundle(bundle)
    done = gen.generate([5, 6, 7, 8], SamplingParams(max_tokens=4, temperature=0.0))
    assert 1 <= len(done.token_ids) <= 4 and done.finish_reason in ("stop", "length")
