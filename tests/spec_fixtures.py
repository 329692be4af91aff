"""A bundle with a draft graph, built from the tiny test model: the draft is its first layer,
distilled for a few steps on its logits (draft.py), exported and quantized like the model.

The draft's quality only changes how many tokens are accepted, never which tokens come out,
so a short distillation is enough to test on; both cache layouts (decomposed attention,
left-padded; fused GroupQueryAttention, right-padded) get a bundle.
"""

from __future__ import annotations

from pathlib import Path

from bundle_fixtures import BuiltBundle


def build_spec_bundles(tiny: BuiltBundle, root: Path) -> dict[str, Path]:
    from edge_build import draft, export, fuse, package, quantize
    from edge_build.corpus import stdlib_corpus
    from edge_build.distill import DistillConfig
    from edge_build.evaluate import eval_windows

    model = tiny.work / "model"
    cfg = DistillConfig(layers=(0,), steps=30, batch_size=4, seq_len=64, learning_rate=2e-3,
                        warmup_steps=5, eval_windows=2, eval_tokens=32)
    draft.run(model, root / "draft", cfg, progress=False)
    windows = eval_windows(model / "tokenizer.json", stdlib_corpus(max_chars=400_000).heldout,
                           count=4, length=64)
    export.run(root / "draft", root / "draft-onnx", check_windows=windows[:1])
    quantize.run(root / "draft-onnx", root / "draft-int4", eval_windows=windows, block_size=32)
    fuse.run(root / "draft-int4", root / "draft-fused")
    fuse.run(tiny.work / "int4", root / "fused")
    out = {}
    for layout, target, dr in (("decomposed", tiny.work / "int4", root / "draft-int4"),
                               ("fused", root / "fused", root / "draft-fused")):
        out[layout] = package.run(target, root / f"bundle-{layout}", tiny.key,
                                  name="edge-tiny-spec", version="1", draft_dir=dr)
    return out
