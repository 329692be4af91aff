"""Node count (and op histogram) of a graph after ONNX Runtime's ENABLE_ALL optimisation on CPU."""

from __future__ import annotations

import collections
import sys
import tempfile
from pathlib import Path

import onnx
import onnxruntime as ort


def optimized_counts(path: str) -> tuple[int, collections.Counter[str]]:
    with tempfile.TemporaryDirectory() as tmp:
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.optimized_model_filepath = str(Path(tmp) / "opt.onnx")
        so.add_session_config_entry(
            "session.optimized_model_external_initializers_file_name", "opt.data")
        ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
        m = onnx.load(so.optimized_model_filepath, load_external_data=False)
    c = collections.Counter(n.op_type for n in m.graph.node)
    return len(m.graph.node), c


if __name__ == "__main__":
    for p in sys.argv[1:]:
        n, c = optimized_counts(p)
        print(p, "nodes after ENABLE_ALL:", n)
        print("  ", c.most_common())
