"""Stage `package`: an export or quantize artifact → a signed model bundle.

Serving never needs logits for any position but the last, so the decoder is rewritten to
slice the final hidden state to one position before the LM head: a 500-token prefill then
computes 1 × vocab logits instead of 500 × vocab (on Qwen2 shapes, 0.3 GB of float32 saved
per prefill). The stage checks the rewritten graph against the original on a window.

With `trt_dir` it also ships a second graph for TensorRT, `decoder_trt`: the opset-21 QDQ
graph lower.py builds from the same integer codes (TensorRT's ONNX parser reads neither
MatMulNBits nor the fused GroupQueryAttention), sliced and checked the same way, with the same
tensors as `decoder` (edge_runtime/engines/trt_cache.py picks it by its weights format).

It also writes the bundle's quality probe (`probe/reference.json`, edge_runtime/model/probe.py):
reference prompts cut from held-out text with the serving graph's greedy outputs, and its
perplexity on held-out windows. Listed in the manifest, the file is hashed and signed with
the rest, so a device can hold a deployed bundle to the numbers of its own build.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from edge_build.evaluate import onnx_logits
from edge_build.export import kv_spec, read_config
from edge_build.stage import StageError, lineage, require_dir
from edge_runtime import signing
from edge_runtime.bundle.manifest import SCHEMA_VERSION, Manifest, verify_bundle, write_bundle
from edge_runtime.engines.ort import OrtEngine
from edge_runtime.errors import BundleError
from edge_runtime.model import probe

DECODER = "model/decoder.onnx"
DECODER_TRT = "model/decoder_trt.onnx"
DRAFT = "model/draft.onnx"
"""The draft model speculative decoding proposes with (edge_runtime/model/speculative.py)."""
LOGITS_WINDOW = "logits_start"
"""The decoder's logits-window input (bundle.GraphSpec) when the bundle has a draft (the
verify pass) or the graph is fused (prompts of different lengths prefilled together in one
right-padded run: each row's last token sits at its own column)."""
ROTARY_TABLE = "gqa/cos_cache"
"""fuse.py's rotary table [positions, head_dim / 2]."""
_TWO_GB = 2**31 - 1


class PackageCheckError(StageError):
    """The serving graph does not reproduce the source graph's last-position logits."""


def slice_last_position(model: Any, window: str | None = None) -> None:
    """Rewrite `logits = LMHead(h)` as `logits = LMHead(h[:, -1:, :])`, in place.

    `window`: take the slice's start from an int64 [1] input of that name instead (-1: the
    last position; -n: the last n, speculative decoding's verify pass). A required input:
    ONNX Runtime's IOBinding cannot bind an initializer that is also an input (seen with
    1.23: "Failed to find NodeArg"), so the generator feeds it on every run.
    """
    from onnx import TensorProto, helper

    graph = model.graph
    heads = [n for n in graph.node if "logits" in n.output]
    if len(heads) != 1:
        raise StageError(f"expected one node producing 'logits', found {len(heads)}")
    head = heads[0]
    hidden = head.input[0]
    consts = {
        window or "edge_last_starts": -1,
        "edge_last_ends": np.iinfo(np.int64).max,
        "edge_last_axes": 1,
    }
    for name, value in consts.items():
        if name != window:
            graph.initializer.append(helper.make_tensor(name, TensorProto.INT64, [1], [value]))
    sliced = hidden + "_last"
    node = helper.make_node("Slice", [hidden, *consts], [sliced], name="edge_last_position")
    head.input[0] = sliced
    # Insert before the head so the node list stays topologically sorted.
    idx = list(graph.node).index(head)
    graph.node.insert(idx, node)
    if window:
        graph.input.append(helper.make_tensor_value_info(window, TensorProto.INT64, [1]))
    for out in graph.output:
        if out.name == "logits":
            dim = out.type.tensor_type.shape.dim[1]
            dim.Clear()
            if window:
                dim.dim_param = "logits_positions"
            else:
                dim.dim_value = 1


@dataclass(frozen=True)
class ProbeSpec:
    """How much reference the bundle carries: a device re-runs all of it on each deploy."""

    prompts: int = 4
    prompt_tokens: int = 24
    max_tokens: int = 16
    """Greedy tokens recorded per prompt."""
    windows: int = 2
    window_tokens: int = 64
    """Perplexity windows: (windows x window_tokens) single-token steps on the device."""


def _probe_texts() -> list[str]:
    """The stdlib corpus's held-out side: text no demo model was trained on."""
    from edge_build.corpus import stdlib_corpus

    return stdlib_corpus(max_chars=200_000).heldout


def write_reference(
    graph_file: Path, fields: dict[str, Any], tokenizer: Any, texts: Sequence[str],
    spec: ProbeSpec, out: Path,
) -> dict[str, Any]:
    """Run the probe's reference on the serving graph (CPU, ONNX Runtime); write it at out."""
    from edge_runtime.model.generator import Generator

    manifest = Manifest.from_dict({**fields, "files": {}, "schema_version": SCHEMA_VERSION})
    engine = OrtEngine(graph_file, providers=["CPUExecutionProvider"])
    try:
        gen = Generator(engine, manifest.graphs["decoder"], tokenizer, manifest.generation)
        try:
            prompts, windows = probe.reference_inputs(
                tokenizer.encode, texts, spec.prompts, spec.prompt_tokens, spec.windows,
                spec.window_tokens,
            )
            ref = probe.make_reference(gen, prompts, windows, spec.max_tokens)
        except BundleError as e:
            raise StageError(f"quality probe: {e}") from e
    finally:
        engine.close()
    out.write_text(json.dumps(ref, indent=1) + "\n")
    return ref


def weight_format(model: Any, stages: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """How the graph stores its weights, read from the graph itself: "int4" for MatMulNBits
    (ONNX Runtime) or blocked INT4/UINT4 DequantizeLinear (format "qdq": the form TensorRT
    consumes, and the name the runtime's TensorRT graph selection looks for), with block
    size, accuracy level and symmetry; else "float32". The quantize stage's record in the
    lineage adds the method (awq / rtn), which no graph attribute holds."""
    from onnx import TensorProto

    def attrs(node: Any) -> dict[str, int]:
        return {a.name: int(a.i) for a in node.attribute if a.type == a.INT}

    quant: dict[str, Any] = next(
        (s.get("params", {}) for s in reversed(stages) if s["stage"] == "quantize"), {}
    )
    extra: dict[str, Any] = {k: quant[k] for k in ("method", "symmetric") if k in quant}
    nbits = [attrs(n) for n in model.graph.node if n.op_type == "MatMulNBits"]
    if nbits:
        blocks = sorted({a["block_size"] for a in nbits})
        levels = sorted({a.get("accuracy_level", 0) for a in nbits})
        return {"dtype": f"int{nbits[0]['bits']}", "format": "MatMulNBits",
                "block_size": blocks[0] if len(blocks) == 1 else blocks,
                "accuracy_level": levels[0] if len(levels) == 1 else levels, **extra}
    int4 = {t.name for t in model.graph.initializer
            if t.data_type in (TensorProto.INT4, TensorProto.UINT4)}
    dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in int4]
    if dq:
        blocks = sorted({attrs(n).get("block_size", 0) for n in dq})
        return {"dtype": "int4", "format": "qdq",
                "block_size": blocks[0] if len(blocks) == 1 else blocks,
                # lower.py stores signed codes without zero points for symmetric weights.
                "symmetric": all(len(n.input) < 3 or not n.input[2] for n in dq),
                **{k: v for k, v in extra.items() if k != "symmetric"}}  # fmt: skip
    return {"dtype": "float32"}


def _eos_ids(artifact: Path, config: dict[str, Any], tokenizer_eos: int | None) -> list[int]:
    ids: list[int] = []
    for src in (artifact / "generation_config.json", artifact / "config.json"):
        if src.is_file():
            v = json.loads(src.read_text()).get("eos_token_id")
            ids.extend(v if isinstance(v, list) else [] if v is None else [v])
    if tokenizer_eos is not None:
        ids.append(tokenizer_eos)
    return sorted(set(int(i) for i in ids))


def _stage_graph(
    model: Any, source: Path, rel: str, kv: Any, work: Path, window: str | None = None
) -> tuple[dict[str, Path], list[Any], list[Any]]:
    """Slice `model` (loaded from `source`) to last-position logits, stage it in `work` as
    bundle file `rel`, check it against `source`: (files to ship, its inputs, its outputs)."""
    import onnx

    name = Path(rel).name
    staged = work / name
    slice_last_position(model, window)
    large = model.ByteSize() > _TWO_GB
    data = f"{name}.data"
    onnx.save(model, str(staged), save_as_external_data=large,
              location=data if large else None)
    # Self-check: the rewritten graph's only logits row equals the source's last row.
    sample = [list(range(1, 17))]
    full = onnx_logits(source, kv, sample)[0][-1]
    last = onnx_logits(staged, kv, sample)[0][-1]
    diff = float(np.abs(full - last).max())
    if diff > 1e-4:
        raise PackageCheckError(f"last-position {rel} differs from {source} by {diff:.2e}")
    if window:
        _check_window(staged, source, kv, window)
    engine = OrtEngine(staged, providers=["CPUExecutionProvider"])
    inputs, outputs = list(engine.inputs), list(engine.outputs)
    engine.close()
    files = {rel: staged}
    if large:
        files[f"{Path(rel).parent.as_posix()}/{data}"] = work / data
    return files, inputs, outputs


def _check_window(staged: Path, source: Path, kv: Any, window: str) -> None:
    """The logits window works: asking for the last 4 positions gives the source's rows."""
    import onnxruntime as ort

    ids = np.arange(1, 17, dtype=np.int64)[None, :]
    want = onnx_logits(source, kv, ids.tolist())[0][-4:]
    sess = ort.InferenceSession(str(staged), providers=["CPUExecutionProvider"])
    names = {i.name for i in sess.get_inputs()}
    feeds: dict[str, Any] = {"input_ids": ids, window: np.array([-4], dtype=np.int64)}
    if "attention_mask" in names:
        feeds["attention_mask"] = np.ones_like(ids)
    if "position_ids" in names:
        feeds["position_ids"] = np.arange(16, dtype=np.int64)[None, :]
    for i in range(kv.num_layers):
        for t in (kv.past_key, kv.past_value):
            feeds[t.format(layer=i)] = np.zeros((1, kv.num_kv_heads, 0, kv.head_dim),
                                                dtype=kv.dtype)
    got = sess.run(["logits"], feeds)[0][0]
    diff = float(np.abs(got - want).max()) if got.shape == want.shape else float("inf")
    if diff > 1e-4:
        raise PackageCheckError(f"{staged.name}: logits window {window} gives rows of shape "
                                f"{got.shape} differing by {diff:.2e} from the source's last 4")


def _draft_graph(
    draft_dir: Path, tokenizer_file: Path, work: Path, files: dict[str, Path]
) -> dict[str, Any]:
    """Stage `draft_dir`'s graph as `draft` (into `files`); its manifest entry. It must
    share the decoder's tokenizer byte for byte: its token ids are the decoder's."""
    import onnx

    for f in ("model.onnx", "tokenizer.json"):
        if not (draft_dir / f).is_file():
            raise StageError(f"draft {draft_dir} has no {f}")
    if (draft_dir / "tokenizer.json").read_bytes() != tokenizer_file.read_bytes():
        raise StageError(f"draft {draft_dir}: its tokenizer.json differs from the decoder's "
                         "(a draft must use the served model's tokenizer)")
    model = onnx.load(str(draft_dir / "model.onnx"))
    kv = graph_kv_dtype(model, kv_spec(read_config(draft_dir)))  # float16 for a GPU's draft
    weights = weight_format(model, lineage(draft_dir))
    fused = any(n.op_type == "GroupQueryAttention" for n in model.graph.node)
    d_files, d_in, d_out = _stage_graph(model, draft_dir / "model.onnx", DRAFT, kv, work)
    del model
    files.update(d_files)
    return _graph_entry(DRAFT, d_in, d_out, kv, fused, weights)


def _trt_graph(
    trt_dir: Path, kv: Any, work: Path, files: dict[str, Path], inputs: list[Any],
    outputs: list[Any],
) -> dict[str, Any]:
    """Stage `trt_dir`'s QDQ graph as `decoder_trt` (into `files`); its manifest entry."""
    import onnx

    model = onnx.load(str(trt_dir / "model.onnx"))
    weights = weight_format(model, lineage(trt_dir))
    if weights.get("format") != "qdq":
        raise StageError(f"{trt_dir}: the TensorRT graph must be the QDQ lowering (edge-build "
                         f"lower --format qdq), its weights are {weights}")
    if any(n.op_type == "GroupQueryAttention" for n in model.graph.node):
        raise StageError(f"{trt_dir}: a fused GroupQueryAttention graph is ONNX Runtime-only")
    trt_files, trt_in, trt_out = _stage_graph(model, trt_dir / "model.onnx", DECODER_TRT, kv,
                                              work)
    del model
    # The decoder's logits window (a bundle with a draft) is ONNX Runtime's alone: TensorRT
    # runs the last-position graph and the generator does not speculate on it.
    inputs = [s for s in inputs if s.name != LOGITS_WINDOW]
    if _signature(trt_in) != _signature(inputs) or _signature(trt_out) != _signature(outputs):
        raise PackageCheckError(
            f"{trt_dir}: the TensorRT graph's tensors differ from the decoder's "
            f"(inputs {sorted(_signature(trt_in) ^ _signature(inputs))}, outputs "
            f"{sorted(_signature(trt_out) ^ _signature(outputs))})")
    files.update(trt_files)
    # Decomposed attention: present = past ++ new, so batches are left-padded.
    return _graph_entry(DECODER_TRT, trt_in, trt_out, kv, fused=False, weights=weights)


def _graph_entry(
    rel: str, inputs: Sequence[Any], outputs: Sequence[Any], kv: Any, fused: bool,
    weights: dict[str, Any], window: str | None = None,
) -> dict[str, Any]:
    """A last-position graph's manifest entry (bundle.GraphSpec). A fused GQA graph batches
    right-padded sequences, a decomposed one left-padded."""
    return {
        "file": rel,
        "format": "onnx",
        "inputs": [vars(s) for s in inputs],
        "outputs": [vars(s) for s in outputs],
        "kv_cache": vars(kv),
        "last_token_logits": True,
        "left_padded_batch": not fused,
        "right_padded_batch": fused,
        "weights": weights,
        "logits_window": window,
    }


def graph_kv_dtype(model: Any, kv: Any) -> Any:
    """`kv` with the dtype the graph's first past-key input declares: an fp16 graph (the
    activations a GPU's fused attention needs) carries an fp16 cache, and a manifest saying
    float32 makes every first step feed float32 empty caches to float16 inputs."""
    from onnx import helper

    first = kv.past_key.format(layer=0)
    for i in model.graph.input:
        if i.name == first:
            dtype = np.dtype(helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type))
            return replace(kv, dtype=dtype.name)
    return kv


def _signature(specs: Sequence[Any]) -> set[tuple[str, str, int]]:
    return {(s.name, s.dtype, len(s.shape)) for s in specs}


def run(
    input_dir: Path,
    out: Path,
    key_path: Path,
    name: str,
    version: str,
    context_length: int | None = None,
    max_new_tokens: int = 256,
    overwrite: bool = False,
    probe_texts: Sequence[str] | None = None,
    probe_spec: ProbeSpec | None = ProbeSpec(),
    trt_dir: Path | None = None,
    draft_dir: Path | None = None,
) -> Path:
    """Write a signed bundle for `input_dir` at `out`; return its path.

    `trt_dir`: a QDQ artifact (edge-build lower --format qdq) of the same model, shipped as
    the `decoder_trt` graph for TensorRT.

    `draft_dir`: a smaller model's artifact with the same tokenizer (edge_build/draft.py),
    shipped as the `draft` graph; the decoder then also takes the logits-window input that
    speculative decoding verifies with.

    `probe_texts`: held-out documents for the quality probe (default: the stdlib corpus's
    held-out side); `probe_spec=None` writes no probe.
    """
    import onnx

    from edge_runtime.model.tokenizer import TextTokenizer

    started = time.time()
    input_dir = require_dir(input_dir, "artifact")
    for f in ("model.onnx", "tokenizer.json"):
        if not (input_dir / f).is_file():
            raise StageError(f"{input_dir} has no {f}")
    key = signing.load_private_key(key_path)
    config = read_config(input_dir)
    kv = kv_spec(config)
    max_ctx = int(config.get("max_position_embeddings", 2048))
    ctx = context_length or max_ctx
    if ctx > max_ctx:
        raise StageError(f"context_length {ctx} exceeds the model's {max_ctx} positions")
    tok_cfg_path = input_dir / "tokenizer_config.json"
    tokenizer = TextTokenizer.from_files(input_dir / "tokenizer.json", tok_cfg_path)
    eos_tok = tokenizer.token_id(tokenizer.eos_token) if tokenizer.eos_token else None
    eos = _eos_ids(input_dir, config, eos_tok)
    if not eos:
        raise StageError(f"{input_dir}: no eos_token_id in the configs or tokenizer")

    with tempfile.TemporaryDirectory(
        dir=Path(out).parent if Path(out).parent.exists() else None
    ) as work:
        model = onnx.load(str(input_dir / "model.onnx"))
        weights = weight_format(model, lineage(input_dir))
        kv = graph_kv_dtype(model, kv)
        # A fused GQA graph batches right-padded sequences, the decomposed one left-padded
        # ones (see bundle.GraphSpec): present = past ++ new appends at the same column for
        # every row, GQA appends at each row's own length.
        fused = any(n.op_type == "GroupQueryAttention" for n in model.graph.node)
        tables = [t for t in model.graph.initializer if t.name == ROTARY_TABLE]
        if fused and tables:  # fuse.py baked rotary tables for this many positions only
            rows = int(tables[0].dims[0])
            if context_length is None:
                ctx = min(ctx, rows)
            elif ctx > rows:
                raise StageError(
                    f"context_length {ctx} exceeds the {rows} positions the fused graph's "
                    f"rotary tables hold (edge-build fuse --max-positions)"
                )
        window = LOGITS_WINDOW if draft_dir is not None or fused else None
        files, inputs, outputs = _stage_graph(
            model, input_dir / "model.onnx", DECODER, kv, Path(work), window
        )
        del model
        staged = Path(work) / Path(DECODER).name
        files["tokenizer/tokenizer.json"] = input_dir / "tokenizer.json"
        if tok_cfg_path.is_file():
            files["tokenizer/tokenizer_config.json"] = tok_cfg_path
        stages = lineage(input_dir)
        fields: dict[str, Any] = {
            "name": name,
            "version": version,
            "task": "text-generation",
            "tokenizer": {
                "file": "tokenizer/tokenizer.json",
                "config_file": "tokenizer/tokenizer_config.json"
                if tok_cfg_path.is_file()
                else None,
                "chat_template": tokenizer.chat_template,
                "bos_token": tokenizer.bos_token,
                "eos_token": tokenizer.eos_token,
            },
            "generation": {
                "eos_token_ids": eos,
                "context_length": ctx,
                "max_new_tokens": min(max_new_tokens, ctx),
                "pad_token_id": config.get("pad_token_id"),
            },
            "graphs": {
                "decoder": _graph_entry(DECODER, inputs, outputs, kv, fused, weights, window),
            },
            "build": {
                "stages": stages,
                "package": {
                    "seconds": round(time.time() - started, 2),
                    "architecture": config.get("model_type"),
                    "parameters": {
                        k: config.get(k)
                        for k in (
                            "hidden_size",
                            "num_hidden_layers",
                            "num_attention_heads",
                            "num_key_value_heads",
                            "intermediate_size",
                            "vocab_size",
                        )
                    },
                },
            },
            "engines": [],
        }
        if trt_dir is not None:
            fields["graphs"]["decoder_trt"] = _trt_graph(
                require_dir(trt_dir, "TensorRT artifact"), kv, Path(work), files, inputs, outputs
            )
        if draft_dir is not None:
            fields["graphs"]["draft"] = _draft_graph(
                require_dir(draft_dir, "draft artifact"), input_dir / "tokenizer.json",
                Path(work), files)
            fields["build"]["draft"] = {"stages": lineage(draft_dir)}
        if probe_spec is not None:
            ref_file = Path(work) / "reference.json"
            texts = probe_texts if probe_texts is not None else _probe_texts()
            ref = write_reference(staged, fields, tokenizer, texts, probe_spec, ref_file)
            files[probe.REFERENCE_FILE] = ref_file
            fields["build"]["package"]["probe"] = {
                "file": probe.REFERENCE_FILE, "perplexity": ref["perplexity"],
                "prompts": len(ref["prompts"]), "windows": len(ref["windows"]),
            }
        path = write_bundle(out, files, fields, key, overwrite=overwrite)
    verify_bundle(path, [key.public_key()])
    return path
