"""The manifest's KV cache dtype is the graph's (an fp16 graph for the GPU carries an fp16
cache). Before: always float32, so a Generator fed float32 empty caches to float16 inputs
and packaging an fp16 graph failed in its own probe ("Unexpected input data type")."""

from __future__ import annotations

import pytest

# The pipeline's extra ([build]: torch, onnx) is not on the torch-free device leg.
pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")

from onnx import TensorProto, helper  # noqa: E402

from edge_build.export import kv_spec  # noqa: E402
from edge_build.package import graph_kv_dtype  # noqa: E402

CONFIG = {"num_attention_heads": 4, "hidden_size": 64, "num_hidden_layers": 2,
          "num_key_value_heads": 2}


def _graph(elem: int) -> onnx.ModelProto:
    past = [helper.make_tensor_value_info(f"past_key_values.{i}.{kv}", elem,
                                          ["b", 2, "p", 16])
            for i in range(2) for kv in ("key", "value")]
    ids = helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", "s"])
    out = helper.make_tensor_value_info("present.0.key", elem, ["b", 2, "p", 16])
    node = helper.make_node("Identity", ["past_key_values.0.key"], ["present.0.key"])
    return helper.make_model(helper.make_graph([node], "g", [ids, *past], [out]))


@pytest.mark.parametrize(("elem", "dtype"), [(TensorProto.FLOAT16, "float16"),
                                             (TensorProto.FLOAT, "float32"),
                                             (TensorProto.BFLOAT16, "bfloat16")])
def test_kv_dtype_follows_the_graph(elem: int, dtype: str) -> None:
    kv = graph_kv_dtype(_graph(elem), kv_spec(CONFIG))
    assert kv.dtype == dtype
    assert (kv.num_layers, kv.num_kv_heads, kv.head_dim) == (2, 2, 16)


def test_a_graph_without_the_past_inputs_keeps_the_config_spec() -> None:
    model = _graph(TensorProto.FLOAT16)
    kv = kv_spec(CONFIG)
    renamed = kv.__class__(**{**vars(kv), "past_key": "cache.{layer}.k"})
    assert graph_kv_dtype(model, renamed) == renamed


def test_an_fp16_fused_graph_packages_and_decodes(tiny_bundle, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The GPU form of a fused graph (ONNX Runtime's CUDA GroupQueryAttention is fp16/bf16
    only): fp16 activations, cache and logits, packaged, served, batched."""
    pytest.importorskip("torch")
    from edge_build import fp16, fuse, package
    from edge_runtime.bundle.manifest import verify_bundle
    from edge_runtime.model.generator import Generator
    from edge_runtime.model.sampling import SamplingParams
    from edge_runtime.signing import load_public_key

    fused = tmp_path / "fused"
    fuse.run(tiny_bundle.work / "int4", fused)
    half = tmp_path / "fp16"
    record = fp16.run(fused, half)  # the pipeline's stage (fuse.activations = "float16")
    assert record["metrics"]["kv_dtype"] == record["metrics"]["logits_dtype"] == "float16"
    out = package.run(half, tmp_path / "bundle", tiny_bundle.key, name="fp16", version="1")
    bundle = verify_bundle(out, [load_public_key(tiny_bundle.pubkey)])
    graph = bundle.graph("decoder")
    assert graph.kv_cache is not None and graph.kv_cache.dtype == "float16"
    gen = Generator.from_bundle(bundle, backend="onnxruntime", threads=1)
    assert gen.logits_dtype == "float16"
    params = SamplingParams(max_tokens=6, temperature=0.0)
    single = [gen.generate(p, params).token_ids for p in ([5, 6, 7], [9, 10])]
    assert all(len(s) == 6 for s in single)
    dec = gen.batch(2)
    got: dict[int, list[int]] = {0: [], 1: []}
    for key, prompt in enumerate(([5, 6, 7], [9, 10])):
        for c in dec.add(key, prompt, params):
            got[key].extend(c.token_ids)
    while dec.active:
        for key, chunks in dec.step().items():
            for c in chunks:
                got[int(str(key))].extend(c.token_ids)
    assert [got[0], got[1]] == single
    # A fused graph carries the logits window even without a draft: prompts that arrive
    # together are prefilled in one right-padded run, each row sampled at its own last token.
    assert graph.logits_window == "logits_start" and gen.windowed and not gen.speculative
    dec = gen.batch(2)
    first = dec.add_many([(0, [5, 6, 7], params), (1, [9, 10], params)])
    assert dec.prefill_batched
    together = {k: [t for c in v for t in c.token_ids] for k, v in first.items()}  # type: ignore[union-attr]
    while dec.active:
        for key, chunks in dec.step().items():
            together[int(str(key))].extend(t for c in chunks for t in c.token_ids)
    assert [together[0], together[1]] == single
