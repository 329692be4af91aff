"""Experiment (a): ORT transformer optimizer on the Optimum fp32 export; which fusions fire."""

from __future__ import annotations

import collections
import sys

import onnx
from onnxruntime.transformers.fusion_options import FusionOptions
from onnxruntime.transformers.optimizer import optimize_model

src = "/root/.cache/edge-bench/onnx-fp32/model.onnx"
for model_type in sys.argv[1:] or ["gpt2", "bert"]:
    opts = FusionOptions(model_type)
    opts.enable_rotary_embeddings = True
    opts.enable_skip_layer_norm = True
    opts.enable_layer_norm = True
    m = optimize_model(
        src, model_type=model_type, num_heads=14, hidden_size=896, opt_level=0,
        optimization_options=opts, use_gpu=False, only_onnxruntime=False,
    )
    print(model_type, m.get_fused_operator_statistics())
    c = collections.Counter(n.op_type for n in m.model.graph.node)
    print(model_type, len(m.model.graph.node), c.most_common(40))
    del m
    _ = onnx
