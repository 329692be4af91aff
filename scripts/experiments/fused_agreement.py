"""Teacher-forced agreement: unfused int4, fused int4 and the fp32 export on the same windows.

Greedy equality over 128 tokens is a fragile yardstick on a random-weight model (its logits
are near-ties); this reports how often each int4 graph's argmax matches fp32's and the other
int4 graph's, plus the logit gap between them.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import onnxruntime as ort


def logits(path: str, window: list[int], layers: int = 24) -> np.ndarray:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    s = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    shp = next(i.shape for i in s.get_inputs() if i.name == "past_key_values.0.key")
    feeds = {f"past_key_values.{i}.{kv}": np.zeros((1, shp[1], 0, shp[3]), np.float32)
             for i in range(layers) for kv in ("key", "value")}
    n = len(window)
    feeds.update(input_ids=np.asarray([window], np.int64), attention_mask=np.ones((1, n), np.int64),
                 position_ids=np.arange(n, dtype=np.int64)[None, :])
    return s.run(["logits"], feeds)[0][0]


fp32, unfused, fused = sys.argv[1:4]
rng = np.random.default_rng(0)
windows = [rng.integers(100, 151836, 256).tolist() for _ in range(3)]
res = {}
for name, path in (("fp32", fp32), ("unfused", unfused), ("fused", fused)):
    res[name] = [logits(path, w) for w in windows]
def top1(a: str, b: str) -> float:
    pairs = zip(res[a], res[b], strict=True)
    return float(np.mean([np.mean(x.argmax(-1) == y.argmax(-1)) for x, y in pairs]))
def gap(a: str, b: str) -> float:
    return float(max(np.abs(x - y).max() for x, y in zip(res[a], res[b], strict=True)))
srt = np.sort(np.concatenate(res["fp32"]), axis=-1)
print(json.dumps({
    "top1_unfused_vs_fp32": top1("unfused", "fp32"), "top1_fused_vs_fp32": top1("fused", "fp32"),
    "top1_fused_vs_unfused": top1("fused", "unfused"),
    "max_abs_unfused_vs_fp32": gap("unfused", "fp32"),
    "max_abs_fused_vs_fp32": gap("fused", "fp32"),
    "max_abs_fused_vs_unfused": gap("fused", "unfused"),
    "fp32_median_top1_top2_margin": float(np.median(srt[:, -1] - srt[:, -2])),
}, indent=1))
