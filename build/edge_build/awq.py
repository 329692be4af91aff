"""Activation-aware 4-bit weight quantization (AWQ, Lin et al., MLSys 2024) of HF Qwen2 /
Llama models, in model space, with round-to-nearest as the baseline.

AWQ's observation: a few input channels carry large activations, and the error of rounding
the weights that multiply them dominates the output error. Scaling input channel c of a
weight by s_c > 1 before rounding (and dividing the activation by s_c) shrinks its relative
rounding error. The division is folded into the op before the linear, so the fp32 function
is unchanged and only the rounding changes:

    q/k/v       ← input_layernorm.weight / s        (RMSNorm: y = w · x̂)
    gate/up     ← post_attention_layernorm.weight / s
    o_proj      ← v_proj rows / s                   (GQA: s shared by the query heads of a KV
                                                     group, since they read the same V rows)
    down_proj   ← up_proj rows / s                  (act(gate) · up is linear in up)
    lm_head     ← model.norm.weight / s             (untied only: a tied head is the embedding)

s = mean|x|^α per input channel over the calibration tokens, α on a grid in [0, 1), keeping
the α whose quantized block reproduces the fp32 block's output best (MSE). α = 0 is plain
RTN, so on the calibration data AWQ is never worse than RTN at the block level. Then, as in
the paper's code, a clipping search shrinks each group's range where that lowers the error of
the group's partial dot products (not for q/k, whose errors pass through softmax).

Inputs are captured one decoder layer at a time (each layer run on the previous one's
output), so memory holds one layer's activations, not the model's. Folding leaves the fp32
function unchanged, so later layers see the same inputs whatever was folded before them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from edge_build.int4 import QuantizedWeights, check_group_size, fake_quantize, quantize_tensor
from edge_build.stage import StageError

METHODS = ("awq", "rtn")


@dataclass(frozen=True)
class QuantSpec:
    """How to quantize. Everything here changes the output weights (it is the stage's params)."""

    method: str = "awq"
    """"awq" (scale + clipping search) or "rtn" (round-to-nearest)."""
    group_size: int = 128
    """Inputs per scale, along K. Power of two >= 16 (MatMulNBits' rule)."""
    symmetric: bool = True
    """No zero points: TensorRT's INT4 accepts only these; asymmetric is a bit more accurate."""
    alpha_grid: int = 20
    """α ∈ {0, 1/n, …, (n-1)/n}."""
    duo_scaling: bool = False
    """Also try s = mean|x|^α / mean|w|^(1-α) (AutoAWQ's default), keeping whichever is best.
    Off by default: on the demo model it lowered block MSE but not held-out KL at group 128."""
    clip: bool = True
    """Search a per-group clipping ratio after scaling (AWQ's auto_clip)."""
    clip_grid: int = 10
    """Ratios 1, 1 - 0.5/n, …, down to 0.5 + 0.5/n."""
    clip_tokens: int = 512
    """Calibration tokens the clipping search and the LM-head search look at."""

    def check(self) -> None:
        if self.method not in METHODS:
            raise StageError(f"method {self.method!r} is not one of {', '.join(METHODS)}")
        check_group_size(self.group_size)


@dataclass
class _LayerInputs:
    attn: list[tuple[tuple, dict]]  # self_attn call (args, kwargs), per batch
    attn_x: Any  # [T, D]   input of q/k/v (input_layernorm output)
    o_x: Any  # [T, H·hd]   input of o_proj
    mlp_x: Any  # [T, D]   input of gate/up (post_attention_layernorm output)
    down_x: Any  # [T, I]   input of down_proj


def _layer_inputs(model: Any, calib: Any, batch_size: int) -> Iterator[_LayerInputs]:
    """Each decoder layer's captured inputs, in order. One forward pass records every
    layer's call arguments (masks, rotary tables) and layer 0's hidden states; then each
    layer is run on its own from the previous layer's output, so the cost is one forward
    pass in all and memory holds one layer's activations. The caller may fold scales into
    layer i before asking for layer i+1: folding does not change the fp32 function."""
    import torch

    layers = model.model.layers
    calls: list[list[tuple[tuple, dict]]] = [[] for _ in layers]  # [layer][batch]

    def record(i: int) -> Callable[..., None]:
        def hook(_m: Any, args: tuple, kwargs: dict) -> None:
            calls[i].append((args, dict(kwargs)))

        return hook

    hooks = [layer.register_forward_pre_hook(record(i), with_kwargs=True)
             for i, layer in enumerate(layers)]  # fmt: skip
    dev = next(model.parameters()).device
    try:
        with torch.inference_mode():
            for s in range(0, calib.shape[0], batch_size):
                model(input_ids=calib[s : s + batch_size].to(dev), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    hidden = [args[0] if args else kw["hidden_states"] for args, kw in calls[0]]
    for layer, layer_calls in zip(layers, calls, strict=True):
        inputs, hidden = _run_layer(layer, hidden, layer_calls)
        yield inputs


def _run_layer(
    layer: Any, hidden: list[Any], calls: list[tuple[tuple, dict]]
) -> tuple[_LayerInputs, list[Any]]:
    """Run one decoder layer on each batch's hidden states [B, S, D], capturing the inputs
    of its blocks; return them and the layer's outputs (the next layer's hidden states)."""
    import torch

    attn: list[tuple[tuple, dict]] = []
    xs: dict[str, list[Any]] = {"attn": [], "o": [], "mlp": [], "down": []}

    def keep(key: str) -> Callable[..., None]:
        def hook(_m: Any, args: tuple) -> None:
            xs[key].append(args[0].detach().reshape(-1, args[0].shape[-1]))

        return hook

    def on_attn(_m: Any, args: tuple, kwargs: dict) -> None:
        attn.append((args, dict(kwargs)))
        x = args[0] if args else kwargs["hidden_states"]
        xs["attn"].append(x.detach().reshape(-1, x.shape[-1]))

    hooks = [
        layer.self_attn.register_forward_pre_hook(on_attn, with_kwargs=True),
        layer.self_attn.o_proj.register_forward_pre_hook(keep("o")),
        layer.mlp.register_forward_pre_hook(keep("mlp")),
        layer.mlp.down_proj.register_forward_pre_hook(keep("down")),
    ]
    nxt = []
    try:
        with torch.inference_mode():
            for x, (args, kwargs) in zip(hidden, calls, strict=True):
                rest = {k: v for k, v in kwargs.items() if k != "hidden_states"}
                out = layer(x, *args[1:], **rest)
                nxt.append(out[0] if isinstance(out, tuple) else out)  # [B, S, D]
    finally:
        for h in hooks:
            h.remove()
    cat = {k: torch.cat(v) for k, v in xs.items()}
    return _LayerInputs(attn, cat["attn"], cat["o"], cat["mlp"], cat["down"]), nxt


def _search_scale(
    linears: list[Any],
    stat: Any,
    block: Callable[[], list[Any]],
    spec: QuantSpec,
    expand: Callable[[Any], Any] = lambda s: s,
) -> Any:
    """The s = stat^α (normalised) whose fake-quantized `linears` make `block()` closest to
    its fp32 output. `expand` maps s onto the linears' input channels (GQA sharing).
    With `spec.duo_scaling`, s = stat^α / w^(1-α) is tried too (w: each input channel's mean
    weight magnitude relative to its group's maximum), as AutoAWQ does."""
    import torch

    with torch.inference_mode():
        ref = block()
        orig = [lin.weight.data.clone() for lin in linears]
        candidates: list[tuple[float, Any]] = [
            (a / spec.alpha_grid, None) for a in range(spec.alpha_grid)
        ]
        if spec.duo_scaling and expand(stat).shape == stat.shape:
            wabs = torch.cat(orig).abs().float()  # [ΣN, K]
            g = wabs.reshape(wabs.shape[0], -1, spec.group_size)
            w_mean = (g / (g.amax(-1, keepdim=True) + 1e-6)).reshape(wabs.shape).mean(0)  # [K]
            candidates += [(a / spec.alpha_grid, w_mean) for a in range(spec.alpha_grid)]
        best, best_s = float("inf"), torch.ones_like(stat)
        try:
            for alpha, w_stat in candidates:
                s = stat.pow(alpha)
                if w_stat is not None:
                    s = s / (w_stat.pow(1 - alpha) + 1e-4)
                s = s.clamp(min=1e-4)
                s = s / (s.max() * s.min()).sqrt()  # centre the scales around 1
                sf = expand(s)[None, :]
                for lin, w in zip(linears, orig, strict=True):
                    lin.weight.data = fake_quantize(w * sf, spec.group_size, spec.symmetric) / sf
                err = sum(float((o - r).pow(2).sum()) for o, r in zip(block(), ref, strict=True))
                if err < best:
                    best, best_s = err, s
        finally:
            for lin, w in zip(linears, orig, strict=True):
                lin.weight.data = w
    return best_s


def _search_clip(w: Any, x: Any, spec: QuantSpec) -> Any:
    """Per-group clipping ratio [N, G] minimising the error of the partial dot products
    x_g · w_g over (a subsample of) the calibration tokens x [T, K]."""
    import torch

    n, k = w.shape
    gs = spec.group_size
    groups = k // gs
    if x.shape[0] > spec.clip_tokens:  # evenly spaced rows: deterministic
        x = x[torch.linspace(0, x.shape[0] - 1, spec.clip_tokens).long()]
    xg = x.float().reshape(-1, groups, gs)  # [T, G, gs]
    best = torch.ones(n, groups, device=w.device)
    rows = max(1, (1 << 24) // max(1, xg.shape[0] * groups))  # bound the [n, T, G] temporaries
    with torch.inference_mode():
        for r0 in range(0, n, rows):
            wc = w[r0 : r0 + rows].float()
            ref = torch.einsum("ngk,tgk->ntg", wc.reshape(-1, groups, gs), xg)
            best_err = torch.full((wc.shape[0], groups), float("inf"), device=w.device)
            for j in range(spec.clip_grid):
                ratio = 1.0 - 0.5 * j / spec.clip_grid
                clip = torch.full((wc.shape[0], groups), ratio, device=w.device)
                wq = fake_quantize(wc, gs, spec.symmetric, clip).reshape(-1, groups, gs)
                err = (torch.einsum("ngk,tgk->ntg", wq, xg) - ref).pow(2).mean(1)  # [n, G]
                better = err < best_err
                best_err = torch.where(better, err, best_err)
                best[r0 : r0 + rows] = torch.where(better, ratio, best[r0 : r0 + rows])
    return best


def _awq_layer(model: Any, i: int, inp: _LayerInputs, spec: QuantSpec) -> dict:
    """Search and fold layer i's scales; return its clipping ratios by module name."""
    import torch

    cfg = model.config
    layer = model.model.layers[i]
    att, mlp = layer.self_attn, layer.mlp
    heads = cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads

    def mean_abs(x: Any) -> Any:
        return x.abs().float().mean(0)  # [K]

    with torch.inference_mode():
        # q/k/v, judged on the attention block's output.
        qkv = [att.q_proj, att.k_proj, att.v_proj]
        s_qkv = _search_scale(qkv, mean_abs(inp.attn_x),
                              lambda: [att(*a, **kw)[0] for a, kw in inp.attn], spec)  # fmt: skip
        layer.input_layernorm.weight.div_(s_qkv)
        for lin in qkv:
            lin.weight.mul_(s_qkv[None, :])
        # o_proj, with s folded into v_proj's rows; one s per (KV head, dim), shared by the
        # query heads of that group. [H·hd] index = (g·r + q)·hd + d.
        r = heads // kv
        o_div = torch.ones(att.o_proj.weight.shape[1], device=att.o_proj.weight.device)
        if att.v_proj.weight.shape[0] == kv * hd and att.o_proj.weight.shape[1] == heads * hd:

            def expand(s_kv: Any) -> Any:  # [G·hd] → [H·hd]
                return s_kv.view(kv, 1, hd).expand(kv, r, hd).reshape(-1)

            stat = mean_abs(inp.o_x).view(kv, r, hd).mean(1).reshape(-1)
            s = _search_scale([att.o_proj], stat, lambda: [att.o_proj(inp.o_x)], spec, expand)
            att.v_proj.weight.div_(s[:, None])
            if att.v_proj.bias is not None:
                att.v_proj.bias.div_(s)
            o_div = expand(s)
            att.o_proj.weight.mul_(o_div[None, :])
        # gate/up, judged on the MLP's output.
        s_mlp = _search_scale([mlp.gate_proj, mlp.up_proj], mean_abs(inp.mlp_x),
                              lambda: [mlp(inp.mlp_x)], spec)  # fmt: skip
        layer.post_attention_layernorm.weight.div_(s_mlp)
        mlp.gate_proj.weight.mul_(s_mlp[None, :])
        mlp.up_proj.weight.mul_(s_mlp[None, :])
        # down_proj, with s folded into up_proj's rows.
        s_down = _search_scale([mlp.down_proj], mean_abs(inp.down_x),
                               lambda: [mlp.down_proj(inp.down_x)], spec)  # fmt: skip
        mlp.up_proj.weight.div_(s_down[:, None])
        if mlp.up_proj.bias is not None:
            mlp.up_proj.bias.div_(s_down)
        mlp.down_proj.weight.mul_(s_down[None, :])

        clips: dict[str, Any] = {}
        if spec.clip:  # inputs as the scaled weights now see them: x / s
            prefix = f"model.layers.{i}."
            for name, lin, x in (
                ("self_attn.v_proj", att.v_proj, inp.attn_x / s_qkv),
                ("self_attn.o_proj", att.o_proj, inp.o_x / o_div),
                ("mlp.gate_proj", mlp.gate_proj, inp.mlp_x / s_mlp),
                ("mlp.up_proj", mlp.up_proj, inp.mlp_x / s_mlp),
                ("mlp.down_proj", mlp.down_proj, inp.down_x / s_down),
            ):
                clips[prefix + name] = _search_clip(lin.weight, x, spec)
    return clips


def _awq_lm_head(model: Any, calib: Any, spec: QuantSpec, batch_size: int) -> None:
    """An untied LM head: scale folded into the final norm, judged on the logits."""
    import torch

    head, norm = model.get_output_embeddings(), model.model.norm
    xs: list[Any] = []
    hook = head.register_forward_pre_hook(
        lambda _m, args: xs.append(args[0].detach().reshape(-1, args[0].shape[-1]))
    )
    dev = next(model.parameters()).device
    try:
        with torch.inference_mode():
            for s in range(0, calib.shape[0], batch_size):
                model(input_ids=calib[s : s + batch_size].to(dev), use_cache=False)
    finally:
        hook.remove()
    x = torch.cat(xs)
    if x.shape[0] > spec.clip_tokens:  # [T, V] logits: keep T small for a large vocabulary
        x = x[torch.linspace(0, x.shape[0] - 1, spec.clip_tokens).long()]
    with torch.inference_mode():
        s = _search_scale([head], x.abs().float().mean(0), lambda: [head(x)], spec)
        norm.weight.div_(s)
        head.weight.mul_(s[None, :])


def quantize_lm(
    model: Any, calib: Any, spec: QuantSpec, progress: bool = True, batch_size: int = 4
) -> QuantizedWeights:
    """Quantize `model` in place: AWQ scales folded into its weights, and every linear of
    the decoder, the LM head and the embedding replaced by its dequantized 4-bit value.
    Returns the integer codes. `calib` [N, S] token ids."""
    import torch
    from rich.progress import Progress

    spec.check()
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = head.weight.data_ptr() == embed.weight.data_ptr()
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    for name, lin in linears.items():  # fail before spending time on calibration
        if lin.weight.shape[1] % spec.group_size:
            raise StageError(
                f"{name}: {lin.weight.shape[1]} inputs is not a multiple of group_size "
                f"{spec.group_size}"
            )
    clips: dict[str, Any] = {}
    model.eval()
    if spec.method == "awq":
        layers = len(model.model.layers)
        with Progress(disable=not progress, transient=True) as bar:
            task = bar.add_task("AWQ scale search", total=layers + (0 if tied else 1))
            for i, inputs in enumerate(_layer_inputs(model, calib, batch_size)):
                clips.update(_awq_layer(model, i, inputs, spec))
                bar.advance(task)
            if not tied:
                _awq_lm_head(model, calib, spec, batch_size)
                bar.advance(task)

    tensors, kinds, aliases = {}, {}, {}
    emb_name = next(n for n, m in model.named_modules() if m is embed)
    head_name = next(n for n, m in model.named_modules() if m is head)
    owners = [(emb_name, embed, "embedding")]
    owners += [(n, m, "linear") for n, m in linears.items() if not (tied and m is head)]
    with torch.no_grad():
        for name, mod, kind in owners:
            qt = quantize_tensor(mod.weight, spec.group_size, spec.symmetric, clips.get(name))
            mod.weight.data = torch.from_numpy(qt.dequantize()).to(mod.weight.device)
            tensors[name], kinds[name] = qt, kind
    if tied:  # one set of codes: the LM head reads the embedding's
        aliases[head_name], kinds[head_name] = emb_name, "linear"
    meta = {"method": spec.method, "bits": 4, "group_size": spec.group_size,
            "symmetric": spec.symmetric, "tied_lm_head": tied}  # fmt: skip
    return QuantizedWeights(tensors, kinds, aliases, meta)
