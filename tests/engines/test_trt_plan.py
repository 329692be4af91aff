"""TensorRT profiles, dtypes and I/O checks (engines/trt_plan.py): pure, no tensorrt needed.

The profile math is also held against the shapes the real decode loop produces: a recording
wrapper around the ONNX Runtime engine logs every run's input shapes while BatchDecoder
prefills, joins, decodes and drops sequences, and every logged shape must fall in a profile.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pytest

from edge_runtime.bundle.manifest import GraphSpec, KVCacheSpec, TensorSpec, verify_bundle
from edge_runtime.engines.trt_plan import (
    DECODE,
    PAD,
    PREFILL,
    EngineIO,
    ProfileLimits,
    check_io,
    choose_profile,
    eval_dim,
    graph_symbols,
    needs_pad,
    numpy_dtype,
    padded_mask,
    padded_shapes,
    profile_shapes,
    same_interface,
)
from edge_runtime.errors import ConfigError, EngineError
from edge_runtime.model.generator import Generator
from edge_runtime.model.sampling import SamplingParams
from edge_runtime.signing import load_public_key

PAST = "past_sequence_length"
TOTAL = "past_sequence_length + sequence_length"


def decoder_spec(layers: int = 2, heads: int = 2, dim: int = 48, vocab: int = 2048) -> GraphSpec:
    """The I/O spec `edge-build package` writes for an Optimum decoder export."""
    kv = [
        TensorSpec(f"past_key_values.{i}.{kind}", "float32", ["batch_size", heads, PAST, dim])
        for i in range(layers)
        for kind in ("key", "value")
    ]
    present = [
        TensorSpec(f"present.{i}.{kind}", "float32", ["batch_size", heads, TOTAL, dim])
        for i in range(layers)
        for kind in ("key", "value")
    ]
    return GraphSpec(
        file="model/decoder.onnx",
        format="onnx",
        inputs=[
            TensorSpec("input_ids", "int64", ["batch_size", "sequence_length"]),
            TensorSpec("attention_mask", "int64", ["batch_size", TOTAL]),
            TensorSpec("position_ids", "int64", ["batch_size", "sequence_length"]),
            *kv,
        ],
        outputs=[TensorSpec("logits", "float32", ["batch_size", 1, vocab]), *present],
        kv_cache=KVCacheSpec(num_layers=layers, num_kv_heads=heads, head_dim=dim, dtype="float32"),
        last_token_logits=True,
    )


def plan_io(graph: GraphSpec) -> list[EngineIO]:
    """The I/O a plan built from `graph` reports: dynamic dims as -1."""
    def dims(s: TensorSpec) -> tuple[int, ...]:
        return tuple(d if isinstance(d, int) else -1 for d in s.shape)

    return [EngineIO(s.name, True, s.dtype, dims(s)) for s in graph.inputs] + [
        EngineIO(s.name, False, s.dtype, dims(s)) for s in graph.outputs
    ]


# -- limits -----------------------------------------------------------------------------


def test_profile_limits_parse_overrides_defaults():
    lim = ProfileLimits.parse("max_batch=8, opt_context=256", max_batch=4, max_context=1024)
    assert (lim.max_batch, lim.max_context, lim.opt_batch, lim.tuned_context) == (8, 1024, 1, 256)
    assert ProfileLimits.parse("", 4, 1024).tuned_context == 512  # half the context


@pytest.mark.parametrize(
    ("text", "quoted"),
    [
        ("max_batch=0", "max_batch must be >= 1, got 0"),
        ("max_context=1", "max_context must be >= 2, got 1"),
        ("opt_batch=5", "opt_batch must be in 1..max_batch=4, got 5"),
        ("opt_context=4096", "opt_context must be in 0..max_context=1024, got 4096"),
        ("max_batch=four", "--profile max_batch='four' is not an integer"),
        ("batch=4", "--profile item 'batch=4' is not KEY=INT"),
        ("max_batch", "--profile item 'max_batch' is not KEY=INT"),
    ],
)
def test_profile_limits_refuse_bad_values_quoting_them(text, quoted):
    with pytest.raises(ConfigError) as e:
        ProfileLimits.parse(text, max_batch=4, max_context=1024)
    assert quoted in str(e.value)


# -- dims and profiles ------------------------------------------------------------------


def test_eval_dim_sums_symbols_and_integers():
    env = {"past_sequence_length": 7, "sequence_length": 3, "batch_size": 2}
    assert eval_dim(TOTAL, env) == 10
    assert eval_dim("past_sequence_length - 1", env) == 6
    assert eval_dim("sequence_length+2", env) == 5
    assert eval_dim(48, env) == 48


@pytest.mark.parametrize(
    ("dim", "quoted"),
    [
        ("past_len + sequence_length", "unknown symbol 'past_len'"),
        ("sequence_length sequence_length", "is not a sum of symbols and integers"),
        ("sequence_length * 2", "is not a sum of symbols and integers"),
        ("", "is empty"),
    ],
)
def test_eval_dim_refuses_what_it_cannot_compute(dim, quoted):
    with pytest.raises(EngineError) as e:
        eval_dim(dim, {"sequence_length": 1, "past_sequence_length": 0})
    assert quoted in str(e.value)


def test_profiles_for_prefill_and_decode():
    graph = decoder_spec()
    prefill, decode = profile_shapes(graph, ProfileLimits(max_batch=4, max_context=1024))
    # Prefill: one sequence, 1..1024 tokens, the empty cache as one masked column (no
    # zero-length dim anywhere); tuned at half the context.
    assert prefill["input_ids"] == ((1, 1), (1, 512), (1, 1024))
    assert prefill["attention_mask"] == ((1, 2), (1, 513), (1, 1025))
    assert prefill["past_key_values.0.key"] == ((1, 2, 1, 48),) * 3
    # Decode: 1..4 sequences, one token each, 1..1023 cached tokens.
    assert decode["input_ids"] == ((1, 1), (1, 1), (4, 1))
    assert decode["position_ids"] == ((1, 1), (1, 1), (4, 1))
    assert decode["attention_mask"] == ((1, 2), (1, 512), (4, 1024))
    assert decode["past_key_values.1.value"] == ((1, 2, 1, 48), (1, 2, 511, 48), (4, 2, 1023, 48))
    assert set(prefill) == set(decode) == {s.name for s in graph.inputs}


def test_choose_profile_by_regime_and_refuses_what_no_profile_holds():
    profiles = profile_shapes(decoder_spec(), ProfileLimits(max_batch=4, max_context=64))

    def shapes(b: int, s: int, p: int) -> dict[str, tuple[int, ...]]:
        return {"input_ids": (b, s), "attention_mask": (b, p + s),
                "past_key_values.0.key": (b, 2, p, 48)}  # fmt: skip

    assert choose_profile(profiles, shapes(1, 20, PAD)) == PREFILL
    assert choose_profile(profiles, shapes(1, 1, PAD)) == PREFILL  # a one-token prompt
    assert choose_profile(profiles, shapes(4, 1, 63)) == DECODE
    for bad in (shapes(5, 1, 10), shapes(1, 65, PAD), shapes(2, 3, 5), shapes(1, 4, 0)):
        with pytest.raises(EngineError, match="rebuild it with a larger --profile"):
            choose_profile(profiles, bad)
    with pytest.raises(EngineError):  # wrong rank
        choose_profile(profiles, {"input_ids": (1, 1, 1)})


def test_graph_symbols_need_dynamic_dims_and_a_kv_spec():
    assert graph_symbols(decoder_spec()).past == PAST
    fixed = decoder_spec()
    fixed.inputs[0] = TensorSpec("input_ids", "int64", [1, 16])
    with pytest.raises(EngineError, match=r"fixed batch/sequence/past dims \(1, 16, past"):
        graph_symbols(fixed)
    no_kv = GraphSpec(file="m.onnx", format="onnx", inputs=[], outputs=[])
    with pytest.raises(EngineError, match="no kv_cache spec"):
        graph_symbols(no_kv)


class RecordingEngine:
    """The real ONNX Runtime engine, logging the input shapes of every run."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.runs = inner, []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def run(self, feeds: Mapping[str, Any], host_outputs: Sequence[str],
            device_outputs: Sequence[str] = (), out: Any = None) -> Any:  # fmt: skip
        self.runs.append({n: tuple(np.shape(v) if isinstance(v, np.ndarray)
                                   else self.inner.to_host(v).shape)
                          for n, v in feeds.items()})  # fmt: skip
        return self.inner.run(feeds, host_outputs, device_outputs, out)


def test_every_shape_of_a_continuous_batch_falls_in_a_profile(tiny_bundle):
    bundle = verify_bundle(tiny_bundle.path, [load_public_key(tiny_bundle.pubkey)])
    real = Generator.from_bundle(bundle, backend="onnxruntime")
    engine = RecordingEngine(real.engine)
    gen = Generator(engine, real.graph, real.tokenizer, real.defaults)  # type: ignore[arg-type]
    dec = gen.batch(3)
    prompts = [gen.text_prompt(t) for t in ("import os\n", "def f(x):\n    return", "class A:")]
    params = [SamplingParams(max_tokens=n, temperature=0.0) for n in (12, 5, 9)]
    dec.add(0, prompts[0], params[0])
    dec.step()
    dec.add(1, prompts[1], params[1])  # joins mid-flight: cache surgery, wider batch
    dec.step()
    dec.add(2, prompts[2], params[2])
    while dec.active:  # sequences finish at different steps and leave
        dec.step()
    ctx = gen.context_length
    past = [f"past_key_values.{i}.{k}" for i in range(2) for k in ("key", "value")]
    # What TrtEngine hands TensorRT: an empty cache becomes one masked column.
    runs = [padded_shapes(r, past, "attention_mask") if needs_pad(r, past) else r
            for r in engine.runs]  # fmt: skip
    assert sum(needs_pad(r, past) for r in engine.runs) == 3  # the three prefills
    profiles = profile_shapes(gen.graph, ProfileLimits(max_batch=3, max_context=ctx))
    used = [choose_profile(profiles, run) for run in runs]
    assert used.count(PREFILL) == 3 and used.count(DECODE) == len(runs) - 3
    assert max(r["input_ids"][0] for r in runs) == 3
    narrow = profile_shapes(gen.graph, ProfileLimits(max_batch=2, max_context=ctx))
    with pytest.raises(EngineError):
        for run in runs:
            choose_profile(narrow, run)


def test_padding_an_empty_cache_with_a_masked_column_changes_nothing(tiny_bundle):
    """The stand-in for an empty cache, run on the real graph (ONNX Runtime, the same
    decomposed-attention export TensorRT builds from): same logits, and the present cache
    minus its first column is the present of the unpadded run."""
    bundle = verify_bundle(tiny_bundle.path, [load_public_key(tiny_bundle.pubkey)])
    gen = Generator.from_bundle(bundle, backend="onnxruntime")
    kv = gen.graph.kv_cache
    assert kv is not None
    past = [f"past_key_values.{i}.{k}" for i in range(kv.num_layers) for k in ("key", "value")]
    present = [p.replace("past_key_values", "present") for p in past]
    ids = np.asarray([gen.text_prompt("def main(argv):\n    return")], dtype=np.int64)
    n = ids.shape[1]
    feeds = {"input_ids": ids, "attention_mask": np.ones((1, n), np.int64),
             "position_ids": np.arange(n, dtype=np.int64)[None]}  # fmt: skip
    empty = {p: np.zeros((1, kv.num_kv_heads, 0, kv.head_dim), np.float32) for p in past}
    # Any values in the stand-in column: the mask hides them.
    stand_in = {p: np.full((1, kv.num_kv_heads, PAD, kv.head_dim), 7.0, np.float32)
                for p in past}  # fmt: skip
    assert needs_pad({k: v.shape for k, v in empty.items()}, past)
    ref, _ = gen.engine.run({**feeds, **empty}, ["logits", *present])
    padded = {**feeds, **stand_in, "attention_mask": padded_mask(feeds["attention_mask"])}
    got, _ = gen.engine.run(padded, ["logits", *present])
    np.testing.assert_allclose(got["logits"], ref["logits"], rtol=0, atol=1e-5)
    for name in present:
        assert got[name].shape[2] == n + PAD
        np.testing.assert_allclose(got[name][:, :, PAD:], ref[name], rtol=0, atol=1e-6)
    shapes = padded_shapes({k: v.shape for k, v in {**feeds, **empty}.items()}, past,
                           "attention_mask")  # fmt: skip
    assert shapes["attention_mask"] == (1, n + PAD) and shapes[past[0]][2] == PAD


# -- plan I/O ---------------------------------------------------------------------------


def test_check_io_accepts_the_graphs_own_plan():
    graph = decoder_spec()
    check_io(plan_io(graph), graph)


def test_check_io_names_every_difference():
    graph = decoder_spec()
    io = plan_io(graph)
    io = [t for t in io if t.name != "present.1.value"]  # an output missing
    io = [EngineIO(t.name, t.is_input, "float16", t.shape) if t.name == "past_key_values.0.key"
          else t for t in io]  # fmt: skip
    io = [EngineIO(t.name, t.is_input, t.dtype, (-1, 1, 4096)) if t.name == "logits"
          else t for t in io]  # fmt: skip
    io.append(EngineIO("token_type_ids", True, "int64", (-1, -1)))
    with pytest.raises(EngineError) as e:
        check_io(io, graph)
    msg = str(e.value)
    assert "output 'present.1.value' missing from the plan" in msg
    assert "plan has input 'token_type_ids' the graph does not declare" in msg
    assert "input 'past_key_values.0.key' is float16 in the plan, float32 in the graph" in msg
    assert "output 'logits' dim 2 is 4096 in the plan, 2048 in graph" in msg


def test_check_io_refuses_a_rank_mismatch():
    graph = decoder_spec()
    io = [EngineIO(t.name, t.is_input, t.dtype, (-1, -1, -1)) if t.name == "input_ids" else t
          for t in plan_io(graph)]  # fmt: skip
    with pytest.raises(EngineError, match="input 'input_ids' has rank 3 in the plan, 2"):
        check_io(io, graph)


def test_numpy_dtype_maps_trt_names_and_refuses_others():
    assert numpy_dtype("FLOAT", "logits") == "float32"
    assert numpy_dtype("HALF", "x") == "float16"
    assert numpy_dtype("INT64", "input_ids") == "int64"
    with pytest.raises(EngineError, match="'w' has type FP8, which has no numpy equivalent"):
        numpy_dtype("FP8", "w")


def test_same_interface():
    a, b = decoder_spec(), decoder_spec()
    assert same_interface(a, b)
    assert not same_interface(a, decoder_spec(layers=3))
    assert not same_interface(a, decoder_spec(heads=4))
