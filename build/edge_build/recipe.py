"""Recipes: one TOML file per target model, loaded into frozen dataclasses, one per concern.

    [source]               the teacher: an HF checkpoint directory, or [source.teacher]
    [data]                 local .txt/.jsonl files (or the stdlib corpus) and the held-out split
    [distill]              student = a subset of the teacher's layers, trained by KD
    [prune]                structured width / depth pruning, optional healing distillation
    [quantize]             4-bit weight-only, AWQ or RTN, in the model space
    [export]               fp32 ONNX with a KV cache
    [lower]                int4 ONNX: MatMulNBits and/or QDQ (DequantizeLinear → MatMul)
    [fuse]                 the served graph's attention → GroupQueryAttention, RMSNorm fused;
                           activations = "float16" for a GPU (stage fp16)
    [draft]                a draft model for speculative decoding, distilled from the served one
    [package]              the signed bundle
    [thresholds.STAGE.vs_teacher], [thresholds.STAGE.vs_input]   quality gates

Every key is documented under its field below and in models/README.md. Unknown keys and
wrongly typed values are `RecipeError`s naming the key and the file. Relative paths are
relative to the recipe file (to the working directory when given by --set); "$VAR" in a path
is read from the environment. `--set a.b=v` overrides any key (v is read as a TOML value,
else as a string); nothing else changes a recipe.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_build.distill_config import KDTraining
from edge_build.stage import StageError
from edge_runtime.tomlconfig import CliValue, TableLoader, read_toml, tomllib

STAGES = (
    "teacher",
    "distill",
    "prune",
    "heal",
    "quantize",
    "export",
    "lower-matmulnbits",
    "lower-qdq",
    "fuse",
    "fp16",
    "draft",
    "draft-quantize",
    "draft-export",
    "draft-lower-matmulnbits",
    "draft-fuse",
    "draft-fp16",
)
"""Stage names, in chain order; `thresholds.STAGE` must name one of them."""
LOWER_FORMATS = ("matmulnbits", "qdq")
ACTIVATIONS = ("float32", "float16")


class RecipeError(StageError):
    """A recipe file or a --set override is invalid; the message names the key and file."""


@dataclass(frozen=True)
class TeacherConfig:
    """A Qwen2 teacher made locally (demo.py's training) when no checkpoint is given."""

    vocab_size: int = 4096
    """Byte-level BPE vocabulary trained on the data's train split."""
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 768
    context_length: int = 1024
    train_steps: int = 250
    """Optimizer steps of next-token training (bounded: this is the build's slowest part)."""
    batch_size: int = 8
    seq_len: int = 128
    learning_rate: float = 3e-3
    corpus_chars: int = 3_000_000
    """Characters of the stdlib corpus read for the tokenizer and training (data.files unset)."""
    seed: int = 0


@dataclass(frozen=True)
class SourceConfig:
    path: Path | None = None
    """A Hugging Face checkpoint directory (Qwen2 / Llama) used as the teacher."""
    teacher: TeacherConfig | None = None
    """Make the teacher locally instead ([source.teacher]); exactly one of path / teacher."""


@dataclass(frozen=True)
class DataConfig:
    files: tuple[Path, ...] = ()
    """.txt / .jsonl files (jsonl: a string or {"text": ...} per line); empty = the running
    Python's standard-library sources, read at run time."""
    heldout_share: float = 0.1
    """Share of documents held out (chosen by a hash, never trained on, measured on)."""
    eval_windows: int = 16
    """Held-out windows every stage is measured on (the same windows for every stage)."""
    eval_tokens: int = 128
    """Tokens per window."""
    calib_windows: int = 32
    """Training-split windows for pruning importance and AWQ calibration."""


@dataclass(frozen=True)
class DistillConfig(KDTraining):
    """[distill]: the training fields are distill_config.KDTraining's (shared with the
    stage: layers, steps, batch_size, seq_len, grad_accum, learning_rate, weight_decay,
    warmup_steps, min_lr_ratio, grad_clip, temperature, hidden_weight, checkpoint_every,
    seed); the held-out measurement comes from [data]."""

    enabled: bool = True


@dataclass(frozen=True)
class DraftConfig(KDTraining):
    """[draft]: a draft model for speculative decoding (edge_build/draft.py), distilled on the
    *served* model's logits (after distill / prune / heal, before quantize), then quantized,
    exported, lowered and fused like it (stages draft-quantize, draft-export, …) and packaged
    as the bundle's `draft` graph. Training fields as [distill]."""

    enabled: bool = False
    layers: str | tuple[int, ...] = "auto"
    """Served-model layers the draft starts from: "auto" (a quarter of them, at least one,
    spread over the depth), "every_other", or indices."""
    steps: int = 200


@dataclass(frozen=True)
class PruneConfig:
    enabled: bool = True
    mlp_ratio: float = 0.0
    """Share of MLP intermediate channels removed (0.25 = a quarter)."""
    heads_ratio: float = 0.0
    """Share of KV groups removed (with all their query heads)."""
    drop_layers: int = 0
    """Whole decoder layers removed, least input→output change first."""
    target_parameters: int | None = None
    """A parameter count to reach by MLP width (overrides mlp_ratio; after heads/layers)."""
    heal_steps: int = 0
    """Distillation steps from the teacher after pruning (0 = no healing); uses [distill]'s
    batch, learning rate and temperature."""


@dataclass(frozen=True)
class QuantizeConfig:
    enabled: bool = True
    method: str = "awq"
    """"awq" (activation-aware scale search) or "rtn" (round to nearest)."""
    group_size: int = 128
    """Weights per scale along the input dimension."""
    symmetric: bool = True


@dataclass(frozen=True)
class ExportConfig:
    opset: int | None = None
    """ONNX opset (default: Optimum's choice)."""
    atol: float = 1e-3
    """Largest |ONNX − PyTorch| logit difference accepted."""


@dataclass(frozen=True)
class LowerConfig:
    formats: tuple[str, ...] = ("matmulnbits",)
    """"matmulnbits" (ONNX Runtime; what the bundle serves) and/or "qdq" (opset-21 blocked
    DequantizeLinear → MatMul, what TensorRT's explicit quantization consumes)."""
    accuracy_level: int = 4
    """MatMulNBits compute type: 4 = int8 on quantized activations (fastest on CPU)."""


@dataclass(frozen=True)
class FuseConfig:
    enabled: bool = True
    """Rewrite the served graph (MatMulNBits, or the fp32 export without [quantize]) with ONNX
    Runtime's fused operators: one GroupQueryAttention per layer, SkipSimplifiedLayerNorm for
    the RMSNorms; ~1.3-2.5x faster per decode step, and batches right-padded. false = the
    bundle serves the unfused graph."""
    max_positions: int | None = None
    """Rows of the rotary tables baked into the graph (positions it can serve); default: the
    package's context_length, else the model's max_position_embeddings."""
    atol: float = 1e-4
    """Largest |Δlogit| against the input graph, both with fp32 activations, on the held-out
    windows and over a greedy decode: the rewrite is exact, so anything above is a bug."""
    activations: str = "float32"
    """"float16" for a bundle served on a GPU (ONNX Runtime's CUDA provider): the fused
    graph's activations, KV cache and logits become float16 (stage `fp16`, the draft's too),
    because ONNX Runtime's CUDA GroupQueryAttention takes float16/bfloat16 only; a float32
    fused graph runs its attention on the CPU there, copying the KV cache over PCIe every
    step (an H100: 74 tok/s at batch 1 instead of the unfused graph's 77, 300 instead of 903
    at batch 16). "float32" for CPUs (and Orin's CPU fallback): their int4 kernels take
    float32 activations, and ONNX Runtime's CPU float16 kernels are slow. Gated by its own
    greedy check (top-1 agreement with the float32 graph >= 0.9 over 16 teacher-forced
    tokens) and by `thresholds.fp16` (default vs_input.min_top1 = 0.9)."""


@dataclass(frozen=True)
class PackageConfig:
    name: str = "model"
    """The model name clients ask for."""
    version: str = "0.1.0"
    key: Path | None = None
    """ed25519 private key; unset = a key made once beside the build (`--key` overrides)."""
    context_length: int | None = None
    max_new_tokens: int = 256
    tensorrt_graph: bool = False
    """Also ship the QDQ lowering as `decoder_trt`, the graph TensorRT builds its plan from
    on the device (needs "qdq" in lower.formats); it doubles the bundle's weights."""


@dataclass(frozen=True)
class Gate:
    """Bounds on a stage's held-out metrics against one reference model."""

    max_ppl_increase: float | None = None
    """Largest relative perplexity increase: 0.1 = at most 10% above the reference's."""
    min_top1: float | None = None
    """Smallest top-1 agreement with the reference's next-token choice."""
    max_kl: float | None = None
    """Largest mean per-token KL(reference ‖ stage)."""
    max_abs_logit_diff: float | None = None
    """Largest |Δlogit| at any position of any window (for stages meant to be exact)."""


@dataclass(frozen=True)
class StageGates:
    vs_teacher: Gate = field(default_factory=Gate)
    vs_input: Gate = field(default_factory=Gate)
    """Against the stage's own input model (what this stage alone cost)."""


@dataclass(frozen=True)
class Recipe:
    source: SourceConfig = field(default_factory=SourceConfig)
    data: DataConfig = field(default_factory=DataConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    quantize: QuantizeConfig = field(default_factory=QuantizeConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    lower: LowerConfig = field(default_factory=LowerConfig)
    fuse: FuseConfig = field(default_factory=FuseConfig)
    draft: DraftConfig = field(default_factory=DraftConfig)
    package: PackageConfig = field(default_factory=PackageConfig)
    thresholds: Mapping[str, StageGates] = field(default_factory=dict)
    """Per stage name (see STAGES)."""
    path: Path | None = None
    """The file this recipe was read from (not a TOML key)."""

    def gates(self, stage: str) -> StageGates:
        return self.thresholds.get(stage, StageGates())


def load_recipe(path: str | Path, overrides: Sequence[str] = ()) -> Recipe:
    """Read, override (`a.b=v` strings) and validate a recipe file."""
    path = Path(path)
    data = read_toml(path, "recipe", RecipeError)
    cli_keys = {apply_override(data, item) for item in overrides}
    # A teacher named on the command line replaces the file's: a path replaces a
    # [source.teacher] table and the other way round, instead of clashing with it.
    src = data.get("source")
    if isinstance(src, dict) and "path" in src and "teacher" in src:
        by_path = "source.path" in cli_keys
        by_table = any(k.startswith("source.teacher") for k in cli_keys)
        if by_path != by_table:
            del src["teacher" if by_path else "path"]
    return recipe_from_dict(
        data,
        base_dir=path.resolve().parent,
        source=str(path),
        path=path,
        cli_keys=frozenset(cli_keys),
    )


def apply_override(data: dict[str, Any], item: str) -> str:
    """`a.b.c=value` into the nested dict; the value is TOML (`3`, `[0, 2]`, `"x"`) or a
    bare string (`/models/x`). Returns the key."""
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise RecipeError(f"--set {item!r}: expected KEY=VALUE, e.g. source.path=/models/x")
    try:
        value: Any = CliValue(tomllib.loads(f"v = {raw}")["v"], raw)
    except tomllib.TOMLDecodeError:
        value = raw
    parts = key.split(".")
    node = data
    for i, part in enumerate(parts[:-1]):
        nxt = node.setdefault(part, {})
        if not isinstance(nxt, dict):
            raise RecipeError(f"--set {item!r}: {'.'.join(parts[: i + 1])} is not a table")
        node = nxt
    node[parts[-1]] = value
    return key


class _RecipeLoader(TableLoader):
    """The shared TOML loader (edge_runtime/tomlconfig.py), with the recipe's paths: "$VAR" is
    read from the environment, and a path given with --set is relative to the working
    directory rather than to the recipe file."""

    def __init__(self, source: str, base_dir: Path, cli_keys: frozenset[str]) -> None:
        super().__init__(source, base_dir, RecipeError)
        self.cli_keys = cli_keys

    def path(self, value: str, key: str) -> Path:
        # "$VAR" / "${VAR}" name a path the user keeps out of the file (a checkpoint's place).
        expanded = os.path.expandvars(value)
        if "$" in expanded:
            var = expanded[expanded.index("$") :].split("/")[0]
            raise self.fail(
                f"'{key}' = {value!r} needs the environment variable "
                f"{var.strip('${}')} (or --set {key}=PATH)"
            )
        p = Path(expanded).expanduser()
        return p if p.is_absolute() else (Path.cwd() if key in self.cli_keys else self.base_dir) / p


def recipe_from_dict(
    data: Mapping[str, Any],
    base_dir: Path,
    source: str = "recipe",
    path: Path | None = None,
    cli_keys: frozenset[str] = frozenset(),
) -> Recipe:
    loader = _RecipeLoader(source, base_dir, cli_keys)
    table = dict(data)
    thresholds = table.pop("thresholds", {})
    if not isinstance(thresholds, Mapping):
        raise RecipeError(f"{source}: 'thresholds' must be a table")
    for name in thresholds:
        if name not in STAGES:
            raise RecipeError(
                f"{source}: unknown key 'thresholds.{name}' (stages: {', '.join(STAGES)})"
            )
    recipe: Recipe = loader.build(Recipe, table, "", skip=frozenset({"thresholds", "path"}))
    gates = {n: loader.build(StageGates, t, f"thresholds.{n}") for n, t in thresholds.items()}
    recipe = dataclasses.replace(recipe, thresholds=gates, path=path)
    _validate(recipe, source)
    return recipe


def _validate(r: Recipe, source: str) -> None:
    """Cross-field rules a dataclass alone cannot state."""

    def bad(msg: str) -> RecipeError:
        return RecipeError(f"{source}: {msg}")

    if (r.source.path is None) == (r.source.teacher is None):
        raise bad(
            "give exactly one of 'source.path' (a checkpoint directory) and "
            "[source.teacher] (make one locally); e.g. --set source.path=/models/x"
        )
    if not 0.0 < r.data.heldout_share < 1.0:
        raise bad(f"'data.heldout_share' must be in (0, 1), got {r.data.heldout_share}")
    for k in ("eval_windows", "eval_tokens", "calib_windows"):
        if getattr(r.data, k) < 1:
            raise bad(f"'data.{k}' must be >= 1, got {getattr(r.data, k)}")
    if isinstance(r.distill.layers, str) and r.distill.layers != "every_other":
        raise bad(
            f"'distill.layers' must be \"every_other\" or a list of layer indices, "
            f"got {r.distill.layers!r}"
        )
    if isinstance(r.draft.layers, str) and r.draft.layers not in ("auto", "every_other"):
        raise bad(
            f"'draft.layers' must be \"auto\", \"every_other\" or a list of layer indices, "
            f"got {r.draft.layers!r}"
        )
    if r.draft.enabled and r.draft.steps < 1:
        raise bad(f"'draft.steps' must be >= 1, got {r.draft.steps}")
    if r.quantize.method not in ("awq", "rtn"):
        raise bad(f'\'quantize.method\' must be "awq" or "rtn", got {r.quantize.method!r}')
    unknown = [f for f in r.lower.formats if f not in LOWER_FORMATS]
    if unknown:
        raise bad(f"'lower.formats' must list some of {LOWER_FORMATS}, got {list(r.lower.formats)}")
    if r.lower.formats and not r.quantize.enabled:
        raise bad("'lower.formats' needs [quantize] (set quantize.enabled = true or formats = [])")
    if r.quantize.enabled and "matmulnbits" not in r.lower.formats:
        raise bad("'lower.formats' must include \"matmulnbits\": the bundle serves it")
    if r.package.tensorrt_graph and "qdq" not in r.lower.formats:
        raise bad("'package.tensorrt_graph' needs \"qdq\" in 'lower.formats' (the graph it ships)")
    if r.fuse.max_positions is not None and r.fuse.max_positions < 1:
        raise bad(f"'fuse.max_positions' must be >= 1, got {r.fuse.max_positions}")
    if not r.fuse.atol > 0:
        raise bad(f"'fuse.atol' must be > 0, got {r.fuse.atol}")
    if r.fuse.activations not in ACTIVATIONS:
        raise bad(f"'fuse.activations' must be one of {ACTIVATIONS}, got {r.fuse.activations!r}")
    if r.fuse.activations != "float32" and r.package.tensorrt_graph:
        raise bad("'fuse.activations' = \"float16\" and 'package.tensorrt_graph' = true: the "
                  "TensorRT graph's float32 tensors must match the decoder's (TensorRT picks "
                  "its own precision from the QDQ graph); set one of them")
    if r.fuse.activations != "float32" and not r.fuse.enabled:
        raise bad("'fuse.activations' = \"float16\" needs fuse.enabled = true (the unfused "
                  "graph runs on a GPU's CUDA provider as it is)")
    if r.prune.heal_steps < 0:
        raise bad(f"'prune.heal_steps' must be >= 0, got {r.prune.heal_steps}")
    for stage, g in r.thresholds.items():
        for side in ("vs_teacher", "vs_input"):
            gate = getattr(g, side)
            if gate.min_top1 is not None and not 0.0 <= gate.min_top1 <= 1.0:
                raise bad(
                    f"'thresholds.{stage}.{side}.min_top1' must be in [0, 1], got {gate.min_top1}"
                )
