"""Stage `fuse`: Optimum's decomposed decoder graph → ONNX Runtime's fused LLM operators.

Optimum exports each attention layer as ~100 small nodes (rotary from `position_ids`, a causal
mask rebuilt from `attention_mask` every step, repeat-KV, scores, Softmax, KV Concat). On a
CPU decode step those cost about as much as a fifth of the int4 matmuls. This stage replaces,
per layer, everything between the q/k/v projections and o_proj with one `com.microsoft`
`GroupQueryAttention` (rotary inside, causal mask implied, present = past ++ new), and each
RMSNorm (with the residual Add before it) with `SkipSimplifiedLayerNormalization`.

The graph keeps its I/O contract: same inputs and outputs, names and shapes. GQA's two extra
operands are computed inside the graph from `attention_mask` [B, T]:
`seqlens_k = sum(mask, 1) - 1` (int32 [B]) and `total_sequence_length = T` (int32 scalar).
That is exact for what our generator feeds (batch 1, an all-ones mask); a left-padded batch
would need right-padded KV semantics, which GQA assumes.

The rotary tables are not recomputed from config.json: the exported graph's own cos/sin
subgraph is evaluated once for positions [0, max_positions), so every RoPE variant the
exporter baked in (plain, linear, llama3, attention scaling) is reproduced as exported.
Positions at or beyond `max_positions` are outside the tables: the packaged context length
must stay below it.

The projections are never touched, so the stage runs the same on fp32 or `MatMulNBits`
graphs; the pipeline order is quantize → fuse → package. It ends by decoding greedily with
both graphs and fails with `FuseMismatchError` if tokens or logits differ.
"""

from __future__ import annotations

import shutil
import time
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import NodeProto, TensorProto, helper, numpy_helper

from edge_build.evaluate import with_fp32_activations
from edge_build.export import CARRIED_FILES, read_config
from edge_build.stage import QualityGateError, StageError, require_dir, stage_output, write_stage

_MS = "com.microsoft"
_TWO_GB = 2**31 - 1
_BNSH = [0, 2, 1, 3]  # [B, S, N, H] <-> [B, N, S, H]


class FusePatternError(StageError):
    """The graph does not have the Optimum decoder structure this stage rewrites."""


class FuseMismatchError(QualityGateError):
    """The fused graph decodes differently from the graph it was made from."""


class _Index:
    """Producer/consumer maps and constant lookup over one graph (rebuilt after edits)."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        self.producer: dict[str, NodeProto] = {}
        self.consumers: dict[str, list[NodeProto]] = defaultdict(list)
        for node in graph.node:
            for o in node.output:
                self.producer[o] = node
            for i in node.input:
                self.consumers[i].append(node)
        self.inits = {t.name: t for t in graph.initializer}

    def node(self, tensor: str, op: str) -> NodeProto:
        node = self.producer.get(tensor)
        if node is None or node.op_type != op:
            got = "a graph input/initializer" if node is None else node.op_type
            raise FusePatternError(f"expected {tensor!r} to come from {op}, it comes from {got}")
        return node

    def const(self, tensor: str) -> np.ndarray | None:
        node = self.producer.get(tensor)
        # The exporter dedups equal weights into Identity(initializer): see through them.
        while node is not None and node.op_type == "Identity":
            tensor = node.input[0]
            node = self.producer.get(tensor)
        if tensor in self.inits:
            return numpy_helper.to_array(self.inits[tensor])
        if node is not None and node.op_type == "Constant":
            return numpy_helper.to_array(node.attribute[0].t)
        return None


def _perm(node: NodeProto) -> list[int]:
    return next(list(a.ints) for a in node.attribute if a.name == "perm")


def _from_heads(ix: _Index, bnsh: str) -> str:
    """[B, N, S, H] tensor made by Transpose(Reshape(x)) → x, the 3-D projection [B, S, N*H]."""
    t = ix.node(bnsh, "Transpose")
    if _perm(t) != _BNSH:
        raise FusePatternError(f"{t.name}: expected perm {_BNSH}, got {_perm(t)}")
    return ix.node(t.input[0], "Reshape").input[0]


def _unrotate(ix: _Index, rotated: str) -> tuple[str, str, str]:
    """RoPE output `x*cos + rotate_half(x)*sin` → (3-D projection of x, cos, sin [B, S, H])."""
    add = ix.node(rotated, "Add")
    muls = [ix.node(i, "Mul") for i in add.input]
    # In each Mul one operand is the broadcast table Unsqueeze(cos|sin); rotate_half(x) is a
    # Concat, so the Mul whose data operand is a Concat is the sin term.
    terms: dict[str, tuple[str, str]] = {}
    for mul in muls:
        table = [i for i in mul.input if getattr(ix.producer.get(i), "op_type", "") == "Unsqueeze"]
        data = [i for i in mul.input if i not in table]
        if len(table) != 1 or len(data) != 1:
            raise FusePatternError(f"{mul.name}: not a rotary term (x * Unsqueeze(table))")
        kind = "sin" if ix.producer[data[0]].op_type == "Concat" else "cos"
        terms[kind] = (data[0], ix.producer[table[0]].input[0])
    if set(terms) != {"cos", "sin"}:
        raise FusePatternError(f"{add.name}: rotary Add without one cos and one sin term")
    x, cos = terms["cos"]
    half, sin = terms["sin"]
    # rotate_half(x) = Concat(-x[..., H/2:], x[..., :H/2]); both halves must slice this same x.
    slices = {ix.producer[i].input[0] if ix.producer[i].op_type == "Neg" else i
              for i in ix.producer[half].input}
    if {ix.producer[s].input[0] for s in slices if s in ix.producer} != {x}:
        raise FusePatternError(f"{add.name}: rotate_half does not slice the rotated tensor")
    return _from_heads(ix, x), cos, sin


def _first_matmul(ix: _Index, start: str) -> tuple[NodeProto, str]:
    """The first MatMul reached forward from `start` through data ops (not Shape)."""
    seen, frontier = {start}, [start]
    while frontier:
        nxt = []
        for tensor in frontier:
            for node in ix.consumers.get(tensor, []):
                if node.op_type == "MatMul":
                    return node, tensor
                if node.op_type != "Shape":
                    nxt += [o for o in node.output if o not in seen]
                    seen.update(node.output)
        frontier = nxt
    raise FusePatternError(f"no attention MatMul downstream of {start!r}")


def _skip_const_muls(ix: _Index, tensor: str) -> str:
    """Walk up through Mul/Div by a constant (the exporter splits the 1/sqrt(H) scale)."""
    node = ix.producer.get(tensor)
    while node is not None and node.op_type in ("Mul", "Div"):
        data = [i for i in node.input if ix.const(i) is None]
        if len(data) != 1:
            break
        tensor, node = data[0], ix.producer.get(data[0])
    return tensor


@dataclass(frozen=True)
class _Attention:
    q: str  # [B, S, N*H] projections (bias added), before heads are split
    k: str
    v: str
    cos: str  # [B, S, H] rotary tables the exporter computes from position_ids
    sin: str
    out: str  # [B, S, N*H] attention output, the o_proj input
    anchor: NodeProto  # the node producing `out`: the fused node takes its place in order
    dead: tuple[NodeProto, ...]  # nodes writing present.* (removed explicitly: graph outputs)


def _match_attention(ix: _Index, layer: int) -> _Attention:
    past_k, past_v = f"past_key_values.{layer}.key", f"past_key_values.{layer}.value"
    cat_k = ix.node(f"present.{layer}.key", "Concat")
    cat_v = ix.node(f"present.{layer}.value", "Concat")
    if list(cat_k.input)[:1] != [past_k] or list(cat_v.input)[:1] != [past_v]:
        raise FusePatternError(f"layer {layer}: present.* is not Concat(past, new)")
    k, cos, sin = _unrotate(ix, cat_k.input[1])
    v = _from_heads(ix, cat_v.input[1])
    scores, k_side = _first_matmul(ix, cat_k.output[0])
    if scores.input[0] == k_side:
        raise FusePatternError(f"{scores.name}: keys on the left of the score MatMul")
    q, q_cos, q_sin = _unrotate(ix, _skip_const_muls(ix, scores.input[0]))
    if (q_cos, q_sin) != (cos, sin):
        raise FusePatternError(f"layer {layer}: q and k use different rotary tables")
    ctx, v_side = _first_matmul(ix, cat_v.output[0])
    if ctx.input[1] != v_side:
        raise FusePatternError(f"{ctx.name}: values not on the right of the context MatMul")
    (tr,) = ix.consumers[ctx.output[0]]
    if tr.op_type != "Transpose" or _perm(tr) != _BNSH:
        raise FusePatternError(f"{ctx.name}: context not transposed back to [B, S, N, H]")
    (rs,) = ix.consumers[tr.output[0]]
    if rs.op_type != "Reshape":
        raise FusePatternError(f"{tr.name}: context not reshaped to [B, S, N*H]")
    return _Attention(q, k, v, cos, sin, rs.output[0], rs, (cat_k, cat_v))


def _rotary_tables(graph: onnx.GraphProto, cos: str, sin: str, positions: int) -> np.ndarray:
    """Evaluate the graph's own cos/sin subgraph for positions [0, positions) → [2, P, H]."""
    import onnxruntime as ort

    ix = _Index(graph)
    nodes, need, inputs = [], [cos, sin], set()
    seen: set[str] = set()
    while need:
        t = need.pop()
        if t in seen or t in ix.inits or not t:
            continue
        seen.add(t)
        node = ix.producer.get(t)
        if node is None:
            inputs.add(t)
            continue
        if node not in nodes:
            nodes.append(node)
            need += list(node.input)
    if inputs != {"position_ids"}:
        raise FusePatternError(f"rotary tables depend on {sorted(inputs)}, not only position_ids")
    order = {n.output[0]: i for i, n in enumerate(graph.node)}
    nodes.sort(key=lambda n: order[n.output[0]])
    used = {i for n in nodes for i in n.input}
    sub = helper.make_graph(
        nodes, "rotary",
        [helper.make_tensor_value_info("position_ids", TensorProto.INT64, [1, None])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in (cos, sin)],
        [t for t in graph.initializer if t.name in used],
    )
    # IR 9 pinned: make_model writes the installed onnx's newest IR (14 with onnx 1.23), which
    # ONNX Runtime 1.30 refuses ("max supported IR version: 13", seen on the GPU machine).
    model = helper.make_model(sub, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    pos = np.arange(positions, dtype=np.int64)[None, :]
    c, s = sess.run(None, {"position_ids": pos})
    return np.stack([c[0], s[0]])


def _rms_norms(graph: onnx.GraphProto, ix: _Index) -> tuple[dict[str, NodeProto], set[str],
                                                             dict[str, str]]:
    """Find HF RMSNorm chains: Pow(x,2)→ReduceMean→Add(eps)→Sqrt→Div(1,·)→Mul(x,·)→[Cast]→
    Mul(w,·). Returns the replacement node per anchor, node ids to drop and tensor renames
    (identity fp32 Casts around the chain are dropped, their users rewired)."""
    repl: dict[str, NodeProto] = {}
    drop: set[str] = set()
    rename: dict[str, str] = {}

    def only(t: str, op: str) -> NodeProto | None:
        users = ix.consumers.get(t, [])
        return users[0] if len(users) == 1 and users[0].op_type == op else None

    for pow_ in [n for n in graph.node if n.op_type == "Pow"]:
        x = pow_.input[0]
        exponent = ix.const(pow_.input[1])
        if exponent is None or float(exponent) != 2.0:
            continue
        mean = only(pow_.output[0], "ReduceMean")
        add = mean and only(mean.output[0], "Add")
        sqrt = add and only(add.output[0], "Sqrt")
        div = sqrt and only(sqrt.output[0], "Div")
        mul = div and only(div.output[0], "Mul")
        if not (mean and add and sqrt and div and mul) or x not in mul.input:
            continue
        eps = next((ix.const(i) for i in add.input if ix.const(i) is not None), None)
        chain = [pow_, mean, add, sqrt, div, mul]
        y = mul.output[0]
        cast = only(y, "Cast")
        if cast is not None:
            chain.append(cast)
            y = cast.output[0]
        scale = only(y, "Mul")
        weight = scale and next((i for i in scale.input if ix.const(i) is not None), None)
        if eps is None or scale is None or weight is None:
            continue
        src = x
        pre = ix.producer.get(x)
        if pre is not None and pre.op_type == "Cast":
            if pre.attribute[0].i != TensorProto.FLOAT:
                raise FusePatternError(f"{pre.name}: RMSNorm computes in a non-fp32 type")
            src = pre.input[0]
            rename[x] = src
            drop.add(pre.output[0])
        res = ix.producer.get(src)
        eps_attr = float(np.asarray(eps).reshape(-1)[0])
        if res is not None and res.op_type == "Add" and all(i not in ix.inits for i in res.input):
            # The residual Add moves into the norm; output 3 is the sum the next residual reads.
            node = helper.make_node(
                "SkipSimplifiedLayerNormalization", [res.input[0], res.input[1], weight],
                [scale.output[0], "", "", src], name=f"{scale.name}/SkipRMSNorm", domain=_MS,
                epsilon=eps_attr)
            drop.add(res.output[0])
        else:
            node = helper.make_node(
                "SimplifiedLayerNormalization", [src, weight], [scale.output[0]],
                name=f"{scale.name}/RMSNorm", axis=-1, epsilon=eps_attr, stash_type=1)
        drop.update(n.output[0] for n in chain)
        repl[scale.output[0]] = node
    return repl, drop, rename


def _rebuild(graph: onnx.GraphProto, head: Sequence[NodeProto], repl: Mapping[str, NodeProto],
             drop: set[str], rename: Mapping[str, str]) -> None:
    """New node list: `head` first, anchors replaced, `drop` removed, inputs renamed, then
    everything that no longer reaches a graph output removed (with its initializers).

    Nodes are keyed by their first output name: protobuf hands out a new Python wrapper per
    access, so object identity does not name a node."""
    nodes: list[NodeProto] = list(head)
    for n in graph.node:
        if n.output[0] in repl:
            nodes.append(repl[n.output[0]])
        elif n.output[0] not in drop:
            nodes.append(n)
    for n in nodes:
        for j, i in enumerate(n.input):
            if i in rename:
                n.input[j] = rename[i]
    live = {o.name for o in graph.output}
    keep: list[NodeProto] = []
    for n in reversed(nodes):
        if any(o in live for o in n.output if o):
            keep.append(n)
            live.update(i for i in n.input if i)
    graph.ClearField("node")
    graph.node.extend(reversed(keep))
    inits = [t for t in graph.initializer if t.name in live]
    graph.ClearField("initializer")
    graph.initializer.extend(inits)
    infos = [v for v in graph.value_info if v.name in live]
    graph.ClearField("value_info")
    graph.value_info.extend(infos)


def fuse_decoder(model: onnx.ModelProto, config: Mapping[str, Any],
                 max_positions: int | None = None) -> onnx.ModelProto:
    """Return a fused copy of an Optimum `text-generation-with-past` decoder (Qwen2/Llama)."""
    heads = int(config["num_attention_heads"])
    kv_heads = int(config.get("num_key_value_heads") or heads)
    layers = int(config["num_hidden_layers"])
    positions = int(max_positions or config.get("max_position_embeddings") or 4096)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    names = {i.name for i in g.input}
    for need in ("attention_mask", "position_ids", *(f"past_key_values.{i}.key"
                                                      for i in range(layers))):
        if need not in names:
            raise FusePatternError(f"graph has no input {need!r}: not an Optimum decoder export")
    past = next(i for i in g.input if i.name == "past_key_values.0.key")
    head_dim = past.type.tensor_type.shape.dim[3].dim_value  # [B, kv_heads, S, head_dim]
    if head_dim % 16:  # ORT's CPU kernel refuses it at run time; say so before rewriting
        raise FusePatternError(
            f"head_dim {head_dim} is not a multiple of 16, which ONNX Runtime's "
            "GroupQueryAttention needs (a recipe can set fuse.enabled = false)"
        )
    ix = _Index(g)
    attn = [_match_attention(ix, i) for i in range(layers)]
    if len({(a.cos, a.sin) for a in attn}) != 1:
        raise FusePatternError("layers use different rotary tables")
    tables = _rotary_tables(g, attn[0].cos, attn[0].sin, positions)  # [2, P, H]
    half = tables.shape[-1] // 2
    # GQA takes [P, H/2]: HF's tables repeat the frequencies twice (non-interleaved RoPE).
    if not np.array_equal(tables[..., :half], tables[..., half:]):
        raise FusePatternError("rotary tables are not [f, f] halves: interleaved RoPE?")
    g.initializer.extend([numpy_helper.from_array(tables[0, :, :half].copy(), "gqa/cos_cache"),
                          numpy_helper.from_array(tables[1, :, :half].copy(), "gqa/sin_cache")])

    def const(name: str, value: Iterable[int] | int) -> NodeProto:
        arr = np.asarray(value, dtype=np.int64)
        return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(arr, name))

    head = [  # seqlens_k [B] = sum(mask) - 1, total_sequence_length = T, both int32
        const("gqa/axis1", [1]), const("gqa/one", 1),
        helper.make_node("ReduceSum", ["attention_mask", "gqa/axis1"], ["gqa/len"], keepdims=0),
        helper.make_node("Sub", ["gqa/len", "gqa/one"], ["gqa/len_m1"]),
        helper.make_node("Cast", ["gqa/len_m1"], ["gqa/seqlens_k"], to=TensorProto.INT32),
        helper.make_node("Shape", ["attention_mask"], ["gqa/mask_shape"]),
        helper.make_node("Gather", ["gqa/mask_shape", "gqa/one"], ["gqa/total64"], axis=0),
        helper.make_node("Cast", ["gqa/total64"], ["gqa/total_len"], to=TensorProto.INT32),
    ]
    repl: dict[str, NodeProto] = {}
    drop: set[str] = set()
    for i, a in enumerate(attn):
        repl[a.anchor.output[0]] = helper.make_node(
            "GroupQueryAttention",
            [a.q, a.k, a.v, f"past_key_values.{i}.key", f"past_key_values.{i}.value",
             "gqa/seqlens_k", "gqa/total_len", "gqa/cos_cache", "gqa/sin_cache", "position_ids"],
            [a.out, f"present.{i}.key", f"present.{i}.value"],
            name=f"/model/layers.{i}/self_attn/GroupQueryAttention", domain=_MS,
            num_heads=heads, kv_num_heads=kv_heads, do_rotary=1, rotary_interleaved=0)
        drop.update(n.output[0] for n in a.dead)
    _rebuild(g, head, repl, drop, {})
    ix = _Index(g)
    norm_repl, norm_drop, rename = _rms_norms(g, ix)
    if len(norm_repl) != 2 * layers + 1:
        raise FusePatternError(f"found {len(norm_repl)} RMSNorms, expected {2 * layers + 1}")
    _rebuild(g, [], norm_repl, norm_drop, rename)
    if not any(o.domain == _MS for o in out.opset_import):
        out.opset_import.append(helper.make_opsetid(_MS, 1))
    return out


def greedy(model: Path | bytes, prompt: Sequence[int], new_tokens: int, layers: int,
           threads: int = 2, force: Sequence[int] | None = None
           ) -> tuple[list[int], list[np.ndarray]]:
    """Greedy decode with ONNX Runtime (prefill, then one token per step); tokens and the
    last-position logits of every step. `force`: feed these tokens instead of the graph's
    own choices (teacher forcing: two graphs compared step by step on one path). The cache
    is fed in the graph's own float type (float16 for a GPU's graph)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    sess = ort.InferenceSession(model if isinstance(model, bytes) else str(model), so,
                                providers=["CPUExecutionProvider"])
    first = next(i for i in sess.get_inputs() if i.name == "past_key_values.0.key")
    shape = first.shape
    dtype = np.float16 if first.type == "tensor(float16)" else np.float32
    past = {f"past_key_values.{i}.{kv}": np.zeros((1, shape[1], 0, shape[3]), dtype)
            for i in range(layers) for kv in ("key", "value")}
    ids, pos = list(prompt), 0
    tokens: list[int] = []
    logits: list[np.ndarray] = []
    out_names = ["logits", *(n.replace("past_key_values", "present") for n in past)]
    while len(tokens) < new_tokens:
        end = pos + len(ids)
        res = sess.run(out_names, {
            "input_ids": np.asarray([ids], np.int64),
            "attention_mask": np.ones((1, end), np.int64),
            "position_ids": np.arange(pos, end, dtype=np.int64)[None, :], **past})
        logits.append(res[0][0, -1])
        tokens.append(int(res[0][0, -1].argmax()))
        past = dict(zip(past, res[1:], strict=True))
        nxt = force[len(tokens) - 1] if force is not None else tokens[-1]
        ids, pos = [nxt], end
    return tokens, logits


def _fp32_activations(model: onnx.ModelProto) -> bytes:
    """`model` with fp32 activations, serialized (see evaluate.with_fp32_activations: on a
    model with near-tied logits, random weights, int8 rounding flips greedy tokens although
    neither graph is closer to fp32). The rewrite itself is checked with the rounding out."""
    return with_fp32_activations(model).SerializeToString()


def run(input_dir: Path, out: Path, check_prompt: Sequence[int] = tuple(range(3, 35)),
        check_tokens: int = 16, atol: float = 1e-3,
        max_positions: int | None = None) -> dict[str, Any]:
    """Fuse `input_dir`'s model.onnx into `out`; check greedy decoding; return the record."""
    started = time.time()
    input_dir = require_dir(input_dir, "decoder artifact")
    src = input_dir / "model.onnx"
    if not src.is_file():
        raise StageError(f"{input_dir} has no model.onnx")
    config = read_config(input_dir)
    layers = int(config["num_hidden_layers"])
    params = {"max_positions": max_positions or config.get("max_position_embeddings"),
              "check_tokens": check_tokens, "atol": atol}
    with stage_output(out) as tmp:
        model = onnx.load(str(src))
        fused = fuse_decoder(model, config, max_positions)
        onnx.save(fused, str(tmp / "model.onnx"), save_as_external_data=fused.ByteSize() > _TWO_GB)
        for name in CARRIED_FILES:
            if (input_dir / name).is_file():
                shutil.copyfile(input_dir / name, tmp / name)
        big = fused.ByteSize() > _TWO_GB  # too big to hand ORT as bytes: check as saved
        ref_tok, ref_log = greedy(src if big else _fp32_activations(model), check_prompt,
                                  check_tokens, layers)
        got_tok, got_log = greedy(tmp / "model.onnx" if big else _fp32_activations(fused),
                                  check_prompt, check_tokens, layers)
        diff = max(float(np.abs(a - b).max()) for a, b in zip(ref_log, got_log, strict=True))
        if got_tok != ref_tok or diff > atol:
            raise FuseMismatchError(
                f"fused graph decodes differently: max |Δlogit| {diff:.3g} (atol {atol}), "
                f"tokens {'equal' if got_tok == ref_tok else f'{got_tok} vs {ref_tok}'}")
        counts: dict[str, int] = defaultdict(int)
        for n in fused.graph.node:
            counts[n.op_type] += 1
        metrics = {"check_max_abs_logit_diff": diff, "nodes": len(fused.graph.node),
                   "GroupQueryAttention": counts["GroupQueryAttention"],
                   "SkipSimplifiedLayerNormalization": counts["SkipSimplifiedLayerNormalization"]}
        record = write_stage(tmp, "fuse", params, input_dir, metrics, started)
    return record
