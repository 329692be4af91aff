#!/usr/bin/env python3
"""The batching kernel ceiling, 4 x t(1 row) / t(4 rows), at every MatMulNBits accuracy level.

Same weights, only the nodes' `accuracy_level` attribute changed (0 = fp32 activations as
set by the quantizer, 1 fp32, 2 fp16, 3 bf16, 4 int8), one decode step of bare ONNX Runtime
with identical rows, as scripts/bench_batching.py measures it. Answers: is another accuracy
level a better base for continuous batching on this CPU?

    python scripts/bench_decode.py --prepare-only     # or bench_batching --qwen05: the bundle
    python scripts/experiments/accuracy_level_ceiling.py [--bundle DIR] [--levels 4,0,1,2,3]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from edge_build.evaluate import save_accuracy_level

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.report import cpu_model
from bench_batching import kernel_ceiling

BUNDLE = Path.home() / ".cache/edge-bench/bundle-int4-b128-acc4"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bundle", type=Path, default=BUNDLE)
    ap.add_argument("--levels", default="4,0,1,2,3")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--past", type=int, default=48, help="cached tokens per row (48)")
    args = ap.parse_args()
    src = args.bundle / "model" / "decoder.onnx"
    print(f"{cpu_model()}; {src}; {args.threads} threads, {args.past} cached tokens")
    for level in (int(x) for x in args.levels.split(",")):
        with tempfile.TemporaryDirectory() as tmp:
            path = save_accuracy_level(src, Path(tmp) / "decoder.onnx", level)
            t = kernel_ceiling(path, args.threads, args.past, repeats=3)
        print(f"level {level}: step 1 row {t[1] * 1e3:.2f} ms, 2 rows {t[2] * 1e3:.2f} ms, "
              f"4 rows {t[4] * 1e3:.2f} ms -> ceiling 4 x t1 / t4 = {4 * t[1] / t[4]:.2f}x, "
              f"{4 / t[4]:.0f} tok/s at 4 rows", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
