"""Pruning to a parameter count: the MLP share to remove so a model lands near a target.

prune.py takes ratios; a recipe may instead say how many parameters the student should have
(`prune.target_parameters`). Removing a KV group or a layer has a fixed cost, so those are
taken first and the MLP width absorbs the rest — every layer keeps the same width, since the
HF config has one intermediate_size. Shapes are read from the safetensors headers: no model
is loaded.
"""

from __future__ import annotations

import json
from pathlib import Path

from edge_build.stage import StageError


def mlp_ratio_for_target(model_dir: Path, target: int, heads_ratio: float, drop: int) -> float:
    """The MLP share to remove so that, after removing `heads_ratio` of the KV groups and
    `drop` layers, the model has about `target` parameters (read from safetensors shapes)."""
    cfg = json.loads((model_dir / "config.json").read_text())
    layers, inter, hidden = cfg["num_hidden_layers"], cfg["intermediate_size"], cfg["hidden_size"]
    kv = cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    shapes = _shapes(model_dir)
    total = sum(_numel(s) for s in shapes.values())
    attn = sum(_numel(s) for k, s in shapes.items() if ".layers.0.self_attn." in k)
    rest = sum(
        _numel(s)
        for k, s in shapes.items()
        if ".layers.0." in k and ".self_attn." not in k and ".mlp." not in k
    )
    mlp = 3 * hidden * inter
    outside = total - layers * (attn + rest + mlp)  # embeddings, final norm, LM head
    keep_layers = layers - drop
    attn_kept = attn * (kv - round(kv * heads_ratio)) / kv
    per_channel = keep_layers * 3 * hidden
    channels = (target - outside - keep_layers * (attn_kept + rest)) / per_channel
    if not 1 <= channels <= inter:
        raise StageError(
            f"prune.target_parameters={target:,} cannot be met by MLP width alone: it needs "
            f"{channels:,.0f} of {inter} MLP channels per layer (model {model_dir} has "
            f"{total:,} parameters)"
        )
    return round(1.0 - round(channels) / inter, 6)


def _shapes(model_dir: Path) -> dict[str, list[int]]:
    from safetensors import safe_open

    out: dict[str, list[int]] = {}
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(f), framework="np") as st:
            for k in st.keys():  # noqa: SIM118 - safe_open is not a Mapping
                out[k] = list(st.get_slice(k).get_shape())
    return out


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
