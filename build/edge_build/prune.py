"""Stage `prune`: an HF model directory → a structurally smaller but ordinary HF model.

Three cuts, each ranked by what the model does on calibration text (Minitron-style
activation importance, one forward pass over the calibration windows, no gradients):

- MLP width: intermediate channel c is scored by mean |act(gate)·up| entering down_proj;
  a dropped channel takes its gate/up rows and its down_proj column with it.
- Attention width: query head h is scored by mean |attention output| entering o_proj.
  Grouped-query attention shares one K/V head among `group` query heads, and the HF config
  needs the same ratio in every layer, so whole KV groups go: the K/V rows of the group, the
  Q rows and o_proj columns of all its query heads. A group scores the sum of its heads.
- Depth: layer i is scored by the cosine similarity of its input and output hidden states;
  a layer that barely turns the residual stream is the cheapest to remove (Gromov et al.,
  "The Unreasonable Ineffectiveness of the Deeper Layers"; Men et al., ShortGPT).

Every layer keeps the same *number* of channels / groups (the config has one
intermediate_size and one head count) but its own *choice* of them. head_dim is written to
the config explicitly, since HF derives it as hidden_size // num_attention_heads otherwise.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_build import lm_eval
from edge_build.evaluate import eval_windows
from edge_build.stage import QualityGateError, StageError, require_dir, stage_output, write_stage
from edge_build.textdata import train_heldout


class PruneTargetError(StageError):
    """The pruning targets cannot be met (e.g. they would remove every head or layer)."""


class PruneQualityError(QualityGateError):
    """The pruned model is outside the requested agreement / KL / perplexity bounds."""


@dataclass(frozen=True)
class Importance:
    """Scores from calibration; higher = more important, except `layer_similarity`."""

    mlp: Any
    """[L, I] mean |activation| of each intermediate channel."""
    heads: Any
    """[L, H] mean |activation| of each query head's output."""
    layer_similarity: Any
    """[L] mean cosine(input, output) of each decoder layer: high = changes little."""

    def groups(self, num_kv_heads: int) -> Any:
        layers, heads = self.heads.shape
        return self.heads.view(layers, num_kv_heads, heads // num_kv_heads).sum(-1)  # [L, G]

    @classmethod
    def random(cls, config: Any, seed: int = 0) -> Importance:
        """Random scores: the baseline that activation importance has to beat."""
        import torch

        g = torch.Generator().manual_seed(seed)
        n, i, h = config.num_hidden_layers, config.intermediate_size, config.num_attention_heads
        return cls(torch.rand(n, i, generator=g), torch.rand(n, h, generator=g),
                   torch.rand(n, generator=g))  # fmt: skip


@dataclass(frozen=True)
class PrunePlan:
    """What survives: original indices, sorted, per kept layer."""

    layers: list[int]
    mlp_channels: dict[int, list[int]]
    kv_groups: dict[int, list[int]]
    group_size: int
    head_dim: int


def collect_importance(model: Any, windows: Any, batch_size: int = 4) -> Importance:
    """One forward pass over `windows` [N, S] with hooks on every decoder layer."""
    import torch
    import torch.nn.functional as F

    cfg = model.config
    n_layers, heads = cfg.num_hidden_layers, cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    mlp = torch.zeros(n_layers, cfg.intermediate_size)
    head = torch.zeros(n_layers, heads)
    sim = torch.zeros(n_layers)
    layer_in: dict[int, Any] = {}
    hooks = []

    def on_down(i: int) -> Any:
        def hook(_m: Any, args: tuple) -> None:  # args[0]: [B, S, I]
            mlp[i] += args[0].detach().abs().float().sum((0, 1)).cpu()

        return hook

    def on_o(i: int) -> Any:
        def hook(_m: Any, args: tuple) -> None:  # args[0]: [B, S, H·hd]
            x = args[0].detach().float()
            head[i] += x.view(*x.shape[:2], heads, head_dim).abs().mean(-1).sum((0, 1)).cpu()

        return hook

    def on_layer_in(i: int) -> Any:
        def hook(_m: Any, args: tuple, kwargs: dict) -> None:
            layer_in[i] = args[0] if args else kwargs["hidden_states"]  # [B, S, D]

        return hook

    def on_layer_out(i: int) -> Any:
        def hook(_m: Any, _args: tuple, output: Any) -> None:
            out = output[0] if isinstance(output, tuple) else output  # [B, S, D]
            sim[i] += F.cosine_similarity(layer_in.pop(i).float(), out.float(), dim=-1).sum().cpu()

        return hook

    for i, layer in enumerate(model.model.layers):
        hooks += [
            layer.mlp.down_proj.register_forward_pre_hook(on_down(i)),
            layer.self_attn.o_proj.register_forward_pre_hook(on_o(i)),
            layer.register_forward_pre_hook(on_layer_in(i), with_kwargs=True),
            layer.register_forward_hook(on_layer_out(i)),
        ]
    dev = next(model.parameters()).device
    model.eval()
    try:
        with torch.inference_mode():
            for s in range(0, windows.shape[0], batch_size):
                model(input_ids=windows[s : s + batch_size].to(dev))
    finally:
        for h in hooks:
            h.remove()
    tokens = windows.numel()
    return Importance(mlp / tokens, head / tokens, sim / tokens)


def _top(scores: Any, keep: int) -> list[int]:
    return sorted(scores.topk(keep).indices.tolist())


def check_targets(
    config: Any, mlp_ratio: float, heads_ratio: float, drop_layers: int
) -> tuple[int, int]:
    """(MLP channels, KV groups) each layer keeps; raises PruneTargetError when impossible.
    Cheap, so `run` calls it before spending time on calibration."""
    inter, heads = config.intermediate_size, config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    for name, r in (("mlp_ratio", mlp_ratio), ("heads_ratio", heads_ratio)):
        if not 0.0 <= r < 1.0:
            raise PruneTargetError(f"{name}={r} must be in [0, 1): it is the share removed")
    keep_ch = inter - round(inter * mlp_ratio)
    keep_groups = kv - round(kv * heads_ratio)
    if keep_ch < 1:
        raise PruneTargetError(f"mlp_ratio={mlp_ratio} leaves 0 of {inter} MLP channels")
    if keep_groups < 1:
        raise PruneTargetError(
            f"heads_ratio={heads_ratio} would remove all {kv} KV groups ({heads} heads); "
            "at least one group must stay"
        )
    if not 0 <= drop_layers < config.num_hidden_layers:
        raise PruneTargetError(
            f"drop_layers={drop_layers} must be in [0, {config.num_hidden_layers})"
        )
    return keep_ch, keep_groups


def plan_pruning(
    config: Any, imp: Importance, mlp_ratio: float = 0.0, heads_ratio: float = 0.0,
    drop_layers: int = 0,
) -> PrunePlan:  # fmt: skip
    """Which channels, KV groups and layers survive the targets (ratios = share removed)."""
    keep_ch, keep_groups = check_targets(config, mlp_ratio, heads_ratio, drop_layers)
    n_layers, heads = config.num_hidden_layers, config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    keep_layers = _top(-imp.layer_similarity, n_layers - drop_layers)  # least similar stay
    groups = imp.groups(kv)
    return PrunePlan(
        layers=keep_layers,
        mlp_channels={i: _top(imp.mlp[i], keep_ch) for i in keep_layers},
        kv_groups={i: _top(groups[i], keep_groups) for i in keep_layers},
        group_size=heads // kv,
        head_dim=head_dim,
    )


def _rows(plan: PrunePlan, old: int, part: str) -> list[int]:
    """Indices along the pruned dimension of `part` in original layer `old`."""
    hd, r = plan.head_dim, plan.group_size
    if part == "mlp":
        return plan.mlp_channels[old]
    groups = plan.kv_groups[old]
    if part == "kv":  # K/V rows: [G·hd]
        return [g * hd + d for g in groups for d in range(hd)]
    # Q rows / o_proj columns: [H·hd], query head h belongs to KV group h // r
    return [(g * r + q) * hd + d for g in groups for q in range(r) for d in range(hd)]


# parameter suffix → (which index set, dimension it applies to)
_SLICES = {
    "mlp.gate_proj.weight": ("mlp", 0), "mlp.gate_proj.bias": ("mlp", 0),
    "mlp.up_proj.weight": ("mlp", 0), "mlp.up_proj.bias": ("mlp", 0),
    "mlp.down_proj.weight": ("mlp", 1),
    "self_attn.q_proj.weight": ("q", 0), "self_attn.q_proj.bias": ("q", 0),
    "self_attn.k_proj.weight": ("kv", 0), "self_attn.k_proj.bias": ("kv", 0),
    "self_attn.v_proj.weight": ("kv", 0), "self_attn.v_proj.bias": ("kv", 0),
    "self_attn.o_proj.weight": ("q", 1),
}  # fmt: skip


def apply_plan(model: Any, plan: PrunePlan) -> Any:
    """A new, smaller model of the same class holding the surviving weights."""
    import torch
    from transformers import AutoModelForCausalLM

    cfg = copy.deepcopy(model.config)
    first = plan.layers[0]
    cfg.num_hidden_layers = len(plan.layers)
    cfg.intermediate_size = len(plan.mlp_channels[first])
    cfg.num_key_value_heads = len(plan.kv_groups[first])
    cfg.num_attention_heads = cfg.num_key_value_heads * plan.group_size
    cfg.head_dim = plan.head_dim
    if getattr(cfg, "layer_types", None):
        cfg.layer_types = [cfg.layer_types[i] for i in plan.layers]
    if hasattr(cfg, "max_window_layers"):  # Qwen2: layers below it use full attention
        cfg.max_window_layers = sum(1 for i in plan.layers if i < cfg.max_window_layers)
    small = AutoModelForCausalLM.from_config(cfg).to(next(model.parameters()).device)
    src = model.state_dict()
    sd = {}
    for key in small.state_dict():
        parts = key.split(".")
        if parts[:2] != ["model", "layers"]:
            sd[key] = src[key].clone()
            continue
        old = plan.layers[int(parts[2])]
        parts[2] = str(old)
        w = src[".".join(parts)]
        rule = _SLICES.get(".".join(parts[3:]))
        if rule is not None:
            idx = torch.tensor(_rows(plan, old, rule[0]), device=w.device)
            w = w.index_select(rule[1], idx)
        sd[key] = w.clone()
    small.load_state_dict(sd)
    return small.eval()


def run(
    input_dir: Path,
    out: Path,
    mlp_ratio: float = 0.0,
    heads_ratio: float = 0.0,
    drop_layers: int = 0,
    data: Sequence[Path] | None = None,
    teacher_dir: Path | None = None,
    calib_windows: int = 32,
    eval_windows_count: int = 16,
    window_tokens: int = 128,
    heldout_share: float = 0.1,
    device: str | None = None,
    min_top1: float | None = None,
    max_kl: float | None = None,
) -> dict[str, Any]:
    """Prune the model at `input_dir` into `out`; calibrate on the training split of the data
    (default: the stdlib corpus) and measure on its held-out split."""
    started = time.time()
    input_dir, out = require_dir(Path(input_dir), "input model"), Path(out)
    dev = lm_eval.pick_device(device)
    model = lm_eval.load_causal_lm(input_dir, dev)
    check_targets(model.config, mlp_ratio, heads_ratio, drop_layers)
    train_texts, held_texts = train_heldout(data, heldout_share)
    tok = input_dir / "tokenizer.json"
    calib = lm_eval.windows_tensor(eval_windows(tok, train_texts, calib_windows, window_tokens))
    windows = lm_eval.windows_tensor(
        eval_windows(tok, held_texts, eval_windows_count, window_tokens)
    )

    imp = collect_importance(model, calib)
    plan = plan_pruning(model.config, imp, mlp_ratio, heads_ratio, drop_layers)
    pruned = apply_plan(model, plan)
    compared = lm_eval.compare_models(model, {"pruned": pruned}, windows)
    metrics: dict[str, Any] = {
        **lm_eval.flat_metrics(compared, {"reference": "input"}),
        "input_parameters": lm_eval.parameter_count(model),
        "pruned_parameters": lm_eval.parameter_count(pruned),
        "input_bytes": lm_eval.bytes_on_disk(input_dir),
        "kept_layers": plan.layers,
        "dropped_layers": sorted(set(range(model.config.num_hidden_layers)) - set(plan.layers)),
        "layer_similarity": [round(float(s), 4) for s in imp.layer_similarity],
        "intermediate_size": pruned.config.intermediate_size,
        "num_attention_heads": pruned.config.num_attention_heads,
        "num_key_value_heads": pruned.config.num_key_value_heads,
        "eval_windows": int(windows.shape[0]),
        "eval_tokens": int(windows.shape[1]),
    }
    if teacher_dir is not None:  # the pipeline's reference, when pruning follows distillation
        teacher = lm_eval.load_causal_lm(require_dir(Path(teacher_dir), "teacher"), dev)
        vs_teacher = lm_eval.compare_models(teacher, {"pruned": pruned}, windows)["pruned"]
        metrics.update({f"pruned_vs_teacher_{k}": round(v, 6) for k, v in vs_teacher.items()})
    lm_eval.check_gates(metrics, "pruned", PruneQualityError, min_top1, max_kl)
    params = {
        "mlp_ratio": mlp_ratio, "heads_ratio": heads_ratio, "drop_layers": drop_layers,
        "data": [str(p) for p in data or []] or "stdlib", "calib_windows": calib_windows,
        "eval_windows": eval_windows_count, "window_tokens": window_tokens,
        "heldout_share": heldout_share,
    }  # fmt: skip
    with stage_output(out) as tmp:
        lm_eval.save_model(pruned, input_dir, tmp)
        metrics["pruned_bytes"] = lm_eval.bytes_on_disk(tmp)
        record = write_stage(tmp, "prune", params, input_dir, metrics, started)
    return record
