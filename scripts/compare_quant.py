"""fp32 vs RTN vs AWQ on one HF model directory, side by side (edge_build.quantize.compare_methods).

Calibration windows come from the training split of the text, evaluation windows from the
held-out split (default: the stdlib corpus, as the demo model was trained on). The model
directory is only read.

    python scripts/compare_quant.py ~/.cache/edge-runtime/demo/bundle.work/model \\
        --group-size 128 64 --calib-windows 32 --eval-windows 64 [--asymmetric] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def measure(a: argparse.Namespace) -> list[dict]:
    from edge_build.evaluate import eval_windows
    from edge_build.quantize import compare_methods
    from edge_build.textdata import train_heldout

    model = Path(a.model_dir).expanduser()
    train, held = train_heldout([Path(p) for p in a.data] if a.data else None)
    tok = model / "tokenizer.json"
    calib = eval_windows(tok, train, a.calib_windows, a.tokens)
    windows = eval_windows(tok, held, a.eval_windows, a.tokens)
    rows = []
    for gs in a.group_size:
        started = time.time()
        r = compare_methods(model, calib, windows, group_size=gs, symmetric=not a.asymmetric)
        r["seconds"] = round(time.time() - started, 1)
        rows.append(r)
    return rows


def table(rows: list[dict]) -> str:
    lines = [
        "| group | zero points | method | perplexity | Δ perplexity | top-1 agreement | mean KL |",
        "| ---: | --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        zp = "no (symmetric)" if r["symmetric"] else "yes"
        lines.append(f"| {r['group_size']} | {zp} | fp32 | {r['fp32']['perplexity']:.3f} "
                     "| | | |")  # fmt: skip
        for m in ("rtn", "awq"):
            x = r[m]
            lines.append(
                f"| {r['group_size']} | {zp} | {m.upper()} | {x['perplexity']:.3f} | "
                f"{100 * x['perplexity_increase']:+.3f}% | {x['top1_agreement']:.4f} | "
                f"{x['mean_kl']:.5f} |"
            )
    r0 = rows[0]
    lines.append(
        f"\n{r0['eval_windows']} held-out windows of {r0['eval_tokens']} tokens; AWQ calibrated "
        f"on {r0['calib_windows']} training windows."
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("model_dir")
    p.add_argument("--group-size", type=int, nargs="+", default=[128])
    p.add_argument("--asymmetric", action="store_true", help="with zero points")
    p.add_argument("--calib-windows", type=int, default=32)
    p.add_argument("--eval-windows", type=int, default=64)
    p.add_argument("--tokens", type=int, default=128, help="tokens per window")
    p.add_argument("--data", nargs="+", default=None, help=".txt/.jsonl (default: stdlib)")
    p.add_argument("--threads", type=int, default=None, help="torch threads")
    p.add_argument("--json", action="store_true", help="print the raw results as JSON")
    a = p.parse_args(argv)
    if a.threads:
        import torch

        torch.set_num_threads(a.threads)
    rows = measure(a)
    print(json.dumps(rows, indent=2) if a.json else table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
