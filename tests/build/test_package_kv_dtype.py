"""The manifest's KV cache dtype is the graph's (an fp16 graph for the GPU carries an fp16
cache). Before: always float32, so a Generator fed float32 empty caches to float16 inputs
and packaging an fp16 graph failed in its own probe ("Unexpected input data type")."""

from __future__ import annotations

import pytest

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
