"""What a TensorRT plan must look like for a bundle's decoder: pure functions, no tensorrt.

    GraphSpec + ProfileLimits ─▶ profile_shapes() ─▶ (min, opt, max) per input, per profile
    input shapes of one run    ─▶ choose_profile() ─▶ which profile's context runs them
    the plan's I/O (EngineIO)  ─▶ check_io()       ─▶ refuse a plan that is not this graph's

A decoder runs in two regimes with very different shapes, so a plan carries two optimisation
profiles instead of one wide one (TensorRT tunes kernels at each profile's `opt` shape):

- prefill: one sequence (BatchDecoder prefills alone), 1..max_context new tokens, empty cache;
- decode: 1..max_batch sequences, one new token each, 1..max_context-1 cached tokens.

No profile has a zero-length dim: TensorRT's support for empty tensors in optimisation
profiles is not something to bet a release on (older versions refuse min = 0, and
Torch-TensorRT clamps it to 1). The empty cache of a prefill is instead one cache column
that the attention mask hides (`pad_empty_cache`) — left padding of one, exactly what a
left-padded batch already does to its shorter rows — and the engine drops that column from
the present outputs, so callers never see it.

Everything here is checked on machines without TensorRT (tests/test_trt_plan.py); trt.py and
trt_build.py only pass the library's answers through these functions.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from edge_runtime.bundle.manifest import GraphSpec, TensorSpec
from edge_runtime.errors import ConfigError, EngineError

PREFILL, DECODE = 0, 1
PAD = 1
"""Cache columns standing in for an empty cache (see the module docstring)."""
PROFILE_NAMES = ("prefill", "decode")

# TensorRT DataType names (`trt.DataType.X.name`) → numpy dtype names. Types with no numpy
# equivalent (FP8, INT4, FP4) never appear at a decoder's inputs or outputs.
TRT_DTYPES = {
    "FLOAT": "float32",
    "HALF": "float16",
    "BF16": "bfloat16",
    "INT64": "int64",
    "INT32": "int32",
    "INT8": "int8",
    "UINT8": "uint8",
    "BOOL": "bool",
}


def numpy_dtype(trt_name: str, tensor: str) -> str:
    """The numpy dtype of a TensorRT I/O tensor, or EngineError naming it."""
    try:
        return TRT_DTYPES[trt_name]
    except KeyError:
        raise EngineError(
            f"TensorRT tensor {tensor!r} has type {trt_name}, which has no numpy equivalent "
            f"(supported at the I/O: {', '.join(sorted(TRT_DTYPES))})"
        ) from None


@dataclass(frozen=True)
class ProfileLimits:
    """The shapes a plan must accept; part of the plan's cache key (trt_cache.py)."""

    max_batch: int
    """Sequences decoded together: at least the daemon's `scheduler.max_batch`."""
    max_context: int
    """Prompt + generated tokens of one sequence: the bundle's `generation.context_length`."""
    opt_batch: int = 1
    """The decode batch TensorRT tunes for (the common case on a device: one stream)."""
    opt_context: int = 0
    """The context length TensorRT tunes for; 0 = half of max_context."""

    def __post_init__(self) -> None:
        checks = (
            (self.max_batch >= 1, f"max_batch must be >= 1, got {self.max_batch}"),
            (self.max_context >= 2, f"max_context must be >= 2, got {self.max_context}"),
            (
                1 <= self.opt_batch <= self.max_batch,
                f"opt_batch must be in 1..max_batch={self.max_batch}, got {self.opt_batch}",
            ),
            (
                0 <= self.opt_context <= self.max_context,
                f"opt_context must be in 0..max_context={self.max_context}, "
                f"got {self.opt_context}",
            ),
        )
        for ok, message in checks:
            if not ok:
                raise ConfigError(f"TensorRT profile: {message}")

    @property
    def tuned_context(self) -> int:
        return self.opt_context or max(1, self.max_context // 2)

    def as_dict(self) -> dict[str, int]:
        return {
            "max_batch": self.max_batch,
            "max_context": self.max_context,
            "opt_batch": self.opt_batch,
            "opt_context": self.tuned_context,
        }

    @classmethod
    def parse(cls, text: str, max_batch: int, max_context: int) -> ProfileLimits:
        """`max_batch=4,max_context=2048[,opt_batch=..,opt_context=..]` over the defaults."""
        values = {"max_batch": max_batch, "max_context": max_context}
        for item in (p.strip() for p in text.split(",") if p.strip()):
            key, sep, raw = item.partition("=")
            key = key.strip()
            if not sep or key not in ("max_batch", "max_context", "opt_batch", "opt_context"):
                raise ConfigError(
                    f"--profile item {item!r} is not KEY=INT with KEY one of max_batch, "
                    "max_context, opt_batch, opt_context"
                )
            try:
                values[key] = int(raw)
            except ValueError:
                raise ConfigError(f"--profile {key}={raw!r} is not an integer") from None
        return cls(**values)


ShapeRange = tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]
"""(min, opt, max) of one input in one profile."""


@dataclass(frozen=True)
class Symbols:
    """The names a graph gives its dynamic dims, read off the inputs whose layout is fixed:
    input_ids [batch, seq] and the KV cache [batch, kv_heads, past, head_dim]."""

    batch: str
    seq: str
    past: str


def graph_symbols(graph: GraphSpec) -> Symbols:
    if graph.kv_cache is None:
        raise EngineError("decoder graph has no kv_cache spec: no TensorRT profile for it")
    by_name = {s.name: s for s in graph.inputs}
    ids = by_name.get("input_ids")
    past = by_name.get(graph.kv_cache.past_key.format(layer=0))
    if ids is None or past is None or len(ids.shape) != 2 or len(past.shape) != 4:
        raise EngineError(
            "decoder graph needs inputs input_ids [batch, seq] and "
            f"{graph.kv_cache.past_key.format(layer=0)} [batch, heads, past, head_dim]; "
            f"it has {sorted(by_name)}"
        )
    b, s, p = ids.shape[0], ids.shape[1], past.shape[2]
    if not all(isinstance(d, str) for d in (b, s, p)):
        raise EngineError(
            f"decoder graph has fixed batch/sequence/past dims ({b}, {s}, {p}); TensorRT "
            "profiles need them dynamic (re-export with dynamic axes)"
        )
    return Symbols(batch=str(b), seq=str(s), past=str(p))


_TERM = re.compile(r"\s*([+-]?)\s*([A-Za-z_][A-Za-z0-9_]*|\d+)\s*")


def eval_dim(dim: str | int, env: Mapping[str, int]) -> int:
    """A shape dim as a number: an int, a symbol, or a sum/difference of them
    (`past_sequence_length + sequence_length`, the attention mask's width)."""
    if isinstance(dim, int):
        return dim
    total, pos = 0, 0
    text = dim.strip()
    while pos < len(text):
        m = _TERM.match(text, pos)
        if m is None or (pos > 0 and not m.group(1)):
            raise EngineError(f"shape dim {dim!r} is not a sum of symbols and integers")
        sign = -1 if m.group(1) == "-" else 1
        term = m.group(2)
        if term.isdigit():
            total += sign * int(term)
        elif term in env:
            total += sign * env[term]
        else:
            raise EngineError(f"shape dim {dim!r}: unknown symbol {term!r} (known: {sorted(env)})")
        pos = m.end()
    if pos == 0:
        raise EngineError(f"shape dim {dim!r} is empty")
    return total


def _shape(spec: TensorSpec, env: Mapping[str, int]) -> tuple[int, ...]:
    return tuple(eval_dim(d, env) for d in spec.shape)


def profile_shapes(graph: GraphSpec, limits: ProfileLimits) -> list[dict[str, ShapeRange]]:
    """Per profile (PREFILL, DECODE): input name → (min, opt, max) shape."""
    sym = graph_symbols(graph)
    ctx, opt_ctx = limits.max_context, limits.tuned_context
    # (batch, seq, past) at min / opt / max for each regime.
    regimes = (
        ((1, 1, PAD), (1, opt_ctx, PAD), (1, ctx, PAD)),  # the empty cache, padded
        (
            (1, 1, 1),
            (limits.opt_batch, 1, max(1, opt_ctx - 1)),
            (limits.max_batch, 1, ctx - 1),
        ),
    )
    profiles = []
    for regime in regimes:
        envs = [{sym.batch: b, sym.seq: s, sym.past: p} for b, s, p in regime]
        lo, opt, hi = envs
        profiles.append(
            {
                spec.name: (_shape(spec, lo), _shape(spec, opt), _shape(spec, hi))
                for spec in graph.inputs
            }
        )
    return profiles


def plan_limits(profiles: Sequence[Mapping[str, ShapeRange]], past_name: str) -> tuple[int, int]:
    """(widest batch, longest context) a plan's profiles admit.

    The batch is the decode profiles' (one new token per sequence). The context, prompt plus
    generated tokens, is bounded twice: by the longest prompt a prefill profile takes and by
    the longest cache a decode profile takes plus the token being decoded.
    """
    decode = [p for p in profiles if p["input_ids"][2][1] == 1]
    prefill = [p for p in profiles if p["input_ids"][2][1] > 1]
    if not decode or not prefill:
        raise EngineError(
            f"the plan has {len(prefill)} prefill and {len(decode)} decode profiles; it needs "
            "both: build it again with `edge-runtime build-engine`"
        )
    max_batch = max(p["input_ids"][2][0] for p in decode)
    max_prompt = max(p["input_ids"][2][1] for p in prefill)
    max_cache = max(p[past_name][2][2] for p in decode)
    return max_batch, min(max_prompt, max_cache + 1)


def needs_pad(shapes: Mapping[str, Sequence[int]], past_names: Sequence[str]) -> bool:
    """Whether a run's cache is empty (then every past input is: one cache for the batch)."""
    return any(len(shapes[n]) == 4 and shapes[n][2] == 0 for n in past_names if n in shapes)


def padded_mask(mask: np.ndarray) -> np.ndarray:
    """[B, P + S] → [B, PAD + P + S]: the stand-in cache columns come first, masked out."""
    return np.concatenate([np.zeros((mask.shape[0], PAD), dtype=mask.dtype), mask], axis=1)


def padded_shapes(
    shapes: Mapping[str, Sequence[int]], past_names: Sequence[str], mask_name: str
) -> dict[str, tuple[int, ...]]:
    """The input shapes TensorRT sees for a run whose cache is empty (`needs_pad`)."""
    out = {n: tuple(s) for n, s in shapes.items()}
    for n in past_names:
        if n in out:
            b, h, _, d = out[n]
            out[n] = (b, h, PAD, d)
    b, w = out[mask_name]
    out[mask_name] = (b, w + PAD)
    return out


def choose_profile(
    profiles: Sequence[Mapping[str, ShapeRange]], shapes: Mapping[str, Sequence[int]]
) -> int:
    """The first profile whose ranges hold every input shape, or EngineError quoting them."""
    def fits(shape: Sequence[int], r: ShapeRange) -> bool:
        lo, _, hi = r
        return len(shape) == len(lo) and all(
            a <= d <= b for d, a, b in zip(shape, lo, hi, strict=True)
        )

    for index, ranges in enumerate(profiles):
        if all(name in ranges and fits(shape, ranges[name]) for name, shape in shapes.items()):
            return index
    given = ", ".join(f"{n}={list(s)}" for n, s in sorted(shapes.items())[:3])
    spans = "; ".join(
        f"profile {i}: input_ids {list(r['input_ids'][0])}..{list(r['input_ids'][2])}"
        for i, r in enumerate(profiles)
        if "input_ids" in r
    )
    raise EngineError(
        f"no optimisation profile of this TensorRT plan holds the shapes {given} ({spans}); "
        "rebuild it with a larger --profile (max_batch, max_context)"
    )


@dataclass(frozen=True)
class EngineIO:
    """One I/O tensor as a deserialized plan reports it (-1 = dynamic dim)."""

    name: str
    is_input: bool
    dtype: str
    shape: tuple[int, ...]


def check_io(io: Sequence[EngineIO], graph: GraphSpec) -> None:
    """Refuse a plan whose inputs/outputs are not the graph's: names, dtypes, ranks, fixed dims.

    A plan found in the cache for another graph, an older export or a hand-copied file fails
    here with every difference named, instead of failing later inside a decode step.
    """
    problems: list[str] = []
    for is_input, specs in ((True, graph.inputs), (False, graph.outputs)):
        kind = "input" if is_input else "output"
        have = {t.name: t for t in io if t.is_input == is_input}
        want = {s.name: s for s in specs}
        for name in sorted(want.keys() - have.keys()):
            problems.append(f"{kind} {name!r} missing from the plan")
        for name in sorted(have.keys() - want.keys()):
            problems.append(f"plan has {kind} {name!r} the graph does not declare")
        for name in sorted(want.keys() & have.keys()):
            t, s = have[name], want[name]
            if t.dtype != s.dtype:
                problems.append(f"{kind} {name!r} is {t.dtype} in the plan, {s.dtype} in the graph")
            if len(t.shape) != len(s.shape):
                problems.append(
                    f"{kind} {name!r} has rank {len(t.shape)} in the plan, {len(s.shape)} "
                    "in the graph"
                )
                continue
            for axis, (d, e) in enumerate(zip(t.shape, s.shape, strict=True)):
                if isinstance(e, int) and d != e:
                    problems.append(f"{kind} {name!r} dim {axis} is {d} in the plan, {e} in graph")
    if problems:
        raise EngineError(
            "TensorRT plan does not match the bundle's decoder: " + "; ".join(problems)
        )


def same_interface(a: GraphSpec, b: GraphSpec) -> bool:
    """Whether two graphs of a bundle take and give the same tensors (one may stand in for
    the other in a Generator built for `a`)."""

    # A decoder packaged with a draft also takes its logits window (speculative decoding's
    # verify pass): optional for a stand-in, which then serves without speculating.
    window = {a.logits_window, b.logits_window} - {None}

    def sig(specs: Sequence[TensorSpec]) -> set[tuple[str, str, int]]:
        return {(s.name, s.dtype, len(s.shape)) for s in specs if s.name not in window}

    return (
        sig(a.inputs) == sig(b.inputs)
        and sig(a.outputs) == sig(b.outputs)
        and a.kv_cache == b.kv_cache
        and a.last_token_logits == b.last_token_logits
    )
