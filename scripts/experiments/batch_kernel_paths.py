"""Does a decode step's result depend on the batch size? (MatMulNBits kernel paths.)

Runs one decode step of the int4 bench bundle with identical rows at batch 1, 2 and 4, at the
bundle's accuracy level 4 (int8 activations) and with the same weights at level 0 (fp32
activations), and prints the largest logit difference between batch sizes, against the
fp32-activation result, and the step time.

    python scripts/bench_decode.py --prepare-only      # builds ~/.cache/edge-bench bundles
    python scripts/experiments/batch_kernel_paths.py
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from edge_build.evaluate import save_accuracy_level

BUNDLE = Path.home() / ".cache/edge-bench/bundle-int4-b128-acc4/model/decoder.onnx"
PAST = 42


def step_logits(path: Path, batch: int) -> tuple[np.ndarray, float]:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    past = {i.name: rng.standard_normal((1, int(i.shape[1]), PAST, int(i.shape[3])))
            .astype(np.float32) for i in sess.get_inputs() if i.name.startswith("past")}
    feeds = {"input_ids": np.full((batch, 1), 123, np.int64),
             "attention_mask": np.ones((batch, PAST + 1), np.int64),
             "position_ids": np.full((batch, 1), PAST, np.int64),
             **{k: np.concatenate([v] * batch) for k, v in past.items()}}
    sess.run(["logits"], feeds)  # warm-up
    t = time.perf_counter()
    for _ in range(5):
        logits = sess.run(["logits"], feeds)[0][:, -1]
    return logits[0], (time.perf_counter() - t) / 5


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        fp32_act = save_accuracy_level(BUNDLE, Path(tmp) / "acc0.onnx", 0)
        ref, _ = step_logits(fp32_act, 1)
        for name, path in (("accuracy level 4", BUNDLE), ("accuracy level 0", fp32_act)):
            runs = {b: step_logits(path, b) for b in (1, 2, 4)}
            d12 = np.abs(runs[2][0] - runs[1][0]).max()
            d24 = np.abs(runs[4][0] - runs[2][0]).max()
            print(f"{name}: |b2-b1| {d12:.3g}  |b4-b2| {d24:.3g}  "
                  f"|b1-fp32act| {np.abs(runs[1][0] - ref).max():.3g}  "
                  f"|b2-fp32act| {np.abs(runs[2][0] - ref).max():.3g}  "
                  f"step b1 {runs[1][1] * 1e3:.1f} ms, b4 {runs[4][1] * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
