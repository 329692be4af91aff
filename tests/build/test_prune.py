"""Stage `prune` on tiny Qwen2 and Llama models: shapes, GQA consistency, importance, errors."""

from __future__ import annotations

import json
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from model_fixtures import tiny_config  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from edge_build import cli, lm_eval, prune  # noqa: E402
from edge_build.prune import Importance, PruneTargetError  # noqa: E402

ARCHS = ["qwen2", "llama"]


def _random_model(arch: str, heads: int = 8, kv: int = 4) -> Any:
    torch.manual_seed(0)
    cfg = tiny_config(arch)
    cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim = heads, kv, 16
    return AutoModelForCausalLM.from_config(cfg).eval()


@pytest.mark.parametrize("arch", ARCHS)
def test_prune_stage_makes_a_smaller_ordinary_model(arch, teacher_dirs, data_file, tmp_path):
    out = tmp_path / "pruned"
    rec = prune.run(
        teacher_dirs[arch], out, mlp_ratio=0.25, heads_ratio=0.5, drop_layers=1,
        data=[data_file], calib_windows=8, eval_windows_count=4, window_tokens=64,
    )  # fmt: skip
    m = rec["metrics"]
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["intermediate_size"], cfg["num_hidden_layers"]) == (96, 3)
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == (2, 1, 16)
    model = AutoModelForCausalLM.from_pretrained(out)
    layer = model.model.layers[0]
    assert layer.self_attn.q_proj.weight.shape == (2 * 16, 64)
    assert layer.self_attn.k_proj.weight.shape == (1 * 16, 64)
    assert layer.self_attn.o_proj.weight.shape == (64, 2 * 16)
    assert layer.mlp.gate_proj.weight.shape == (96, 64)
    assert layer.mlp.down_proj.weight.shape == (64, 96)
    assert model(input_ids=torch.tensor([[5, 6, 7]])).logits.shape == (1, 3, 384)
    # Depth: the layer whose output is most like its input is the one that went.
    sim = m["layer_similarity"]
    assert m["dropped_layers"] == [max(range(4), key=sim.__getitem__)]
    assert m["pruned_parameters"] == lm_eval.parameter_count(model) < m["input_parameters"]
    assert m["pruned_bytes"] < m["input_bytes"]
    assert 0.0 < m["pruned_top1_agreement"] <= 1.0 and m["pruned_mean_kl"] > 0.0
    assert (out / "tokenizer.json").is_file() and (out / "stage.json").is_file()


@pytest.mark.parametrize("arch", ARCHS)
def test_kv_groups_go_with_their_query_heads(arch):
    # Pruning = zeroing the dropped heads' contribution. If query heads were kept with the
    # wrong K/V group, the pruned model's logits would differ from the masked original.
    model = _random_model(arch)  # 8 query heads in 4 KV groups of 2
    L, heads = 4, 8
    scores = torch.zeros(L, heads)
    scores[:, [2, 3, 6, 7]] = 1.0  # keep groups 1 and 3: not a prefix, not contiguous
    scores[1, :] = torch.tensor([1.0, 1, 0, 0, 0, 0, 1, 1])  # layer 1 keeps groups 0 and 3
    mlp = torch.rand(L, 128, generator=torch.Generator().manual_seed(1))
    imp = Importance(mlp, scores, torch.zeros(L))
    plan = prune.plan_pruning(model.config, imp, mlp_ratio=0.5, heads_ratio=0.5)
    assert plan.kv_groups[0] == [1, 3] and plan.kv_groups[1] == [0, 3]
    small = prune.apply_plan(model, plan)
    assert (small.config.num_attention_heads, small.config.num_key_value_heads) == (4, 2)

    masked = AutoModelForCausalLM.from_config(model.config).eval()
    masked.load_state_dict(model.state_dict())
    with torch.no_grad():
        for i, layer in enumerate(masked.model.layers):
            keep_heads = [g * 2 + q for g in plan.kv_groups[i] for q in range(2)]
            o = layer.self_attn.o_proj.weight.view(64, heads, 16)  # [D, H, hd]
            o[:, [h for h in range(heads) if h not in keep_heads]] = 0
            drop = [c for c in range(128) if c not in plan.mlp_channels[i]]
            layer.mlp.down_proj.weight[:, drop] = 0  # [D, I]
    ids = torch.randint(0, 384, (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(small(input_ids=ids).logits, masked(input_ids=ids).logits,
                                   atol=1e-5, rtol=1e-5)  # fmt: skip


@pytest.mark.parametrize("arch", ARCHS)
def test_importance_beats_random_channels(arch, teacher_dirs, corpus_texts):
    from edge_build.evaluate import eval_windows

    d = teacher_dirs[arch]
    model = lm_eval.load_causal_lm(d)
    calib = lm_eval.windows_tensor(eval_windows(d / "tokenizer.json", corpus_texts[0], 8, 64))
    held = lm_eval.windows_tensor(eval_windows(d / "tokenizer.json", corpus_texts[1], 8, 64))
    imp = prune.collect_importance(model, calib)

    def kl(importance: Importance) -> float:
        plan = prune.plan_pruning(model.config, importance, mlp_ratio=0.5, heads_ratio=0.5)
        small = prune.apply_plan(model, plan)
        return lm_eval.compare_models(model, {"p": small}, held)["p"]["mean_kl"]

    ours = kl(imp)
    randoms = sorted(kl(Importance.random(model.config, seed)) for seed in range(5))
    # Measured (seed 0): qwen2 0.020 vs random 0.024–0.047, llama 0.0066 vs 0.0070–0.017.
    # The best random draw comes close on these barely trained models, so the robust claim
    # is "better than a typical random choice": below the median, with a 1.5x margin here.
    assert ours < randoms[2], (ours, randoms)


def test_impossible_targets_are_named_errors(teacher_dirs, tmp_path, capsys):
    cfg = tiny_config("qwen2")  # 4 heads in 2 KV groups, 128 channels, 4 layers
    imp = Importance.random(cfg)
    with pytest.raises(PruneTargetError, match="would remove all 2 KV groups"):
        prune.plan_pruning(cfg, imp, heads_ratio=0.9)
    with pytest.raises(PruneTargetError, match=r"mlp_ratio=1.0 must be in \[0, 1\)"):
        prune.plan_pruning(cfg, imp, mlp_ratio=1.0)
    with pytest.raises(PruneTargetError, match="leaves 0 of 128 MLP channels"):
        prune.plan_pruning(cfg, imp, mlp_ratio=0.999)
    with pytest.raises(PruneTargetError, match=r"drop_layers=4 must be in \[0, 4\)"):
        prune.plan_pruning(cfg, imp, drop_layers=4)
    code = cli.main(["prune", str(teacher_dirs["qwen2"]), str(tmp_path / "p"),
                     "--heads-ratio", "0.99"])  # fmt: skip
    assert code == 1
    assert "would remove all 2 KV groups" in capsys.readouterr().err
    assert not (tmp_path / "p").exists()


def test_short_distillation_heals_a_pruned_model(teacher_dirs, data_file, tmp_path):
    from edge_build import distill
    from edge_build.distill import DistillConfig

    teacher = teacher_dirs["qwen2"]
    pruned = tmp_path / "pruned"
    prune.run(teacher, pruned, mlp_ratio=0.5, heads_ratio=0.5, data=[data_file],
              calib_windows=8, eval_windows_count=4, window_tokens=64)  # fmt: skip
    cfg = DistillConfig(steps=30, batch_size=8, seq_len=64, learning_rate=2e-3, warmup_steps=3,
                        eval_windows=8, eval_tokens=64)  # fmt: skip
    rec = distill.run(teacher, tmp_path / "healed", cfg, data=[data_file], init_from=pruned,
                      progress=False)  # fmt: skip
    assert rec is not None
    m = rec["metrics"]
    # "init_student" is the pruned model as it came in: healing must close part of its gap.
    assert m["student_mean_kl"] < 0.7 * m["init_student_mean_kl"], m
    healed = AutoModelForCausalLM.from_pretrained(tmp_path / "healed")
    assert healed.config.intermediate_size == 64 and healed.config.num_key_value_heads == 1
