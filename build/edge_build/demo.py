"""`edge-build demo`: a small Qwen2-architecture model made entirely on this machine.

No model hub is reachable, so the project makes its own: a byte-level BPE tokenizer trained
on the standard library's sources (see corpus.py), a Qwen2 model from a config in code with a
fixed seed, trained briefly on the same text so that its outputs — and the quality metrics of
later stages — mean something. Then export → quantize → package, as for any real model.

Presets: `tiny` (seconds; the test suite's model) and `default` (a few minutes on two CPU
cores). What `edge-runtime serve` serves when given no bundle is the demo *recipe*'s bundle
(models/demo.toml: this training as its teacher, then distil → prune → AWQ → package; see
pipeline.py), built once and cached in ~/.cache/edge-runtime/demo-recipe.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from edge_build import export, package, quantize
from edge_build.corpus import stdlib_corpus
from edge_build.evaluate import eval_windows
from edge_build.local_lm import DemoConfig, train_model, train_tokenizer
from edge_build.stage import StageError, stage_output, write_stage
from edge_runtime import signing

PRESETS = {
    "tiny": DemoConfig(
        vocab_size=512,
        hidden_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=192,
        context_length=256,
        train_steps=40,
        batch_size=8,
        seq_len=64,
        corpus_chars=400_000,
    ),
    "default": DemoConfig(
        vocab_size=4096,
        hidden_size=256,
        num_layers=4,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=768,
        context_length=1024,
        train_steps=250,
        batch_size=8,
        seq_len=128,
    ),
}


def make_model(cfg: DemoConfig, out: Path, progress: bool = True) -> dict[str, Any]:
    """Stage `demo-model`: tokenizer + trained model in HF format at `out`."""
    started = time.time()
    corpus = stdlib_corpus(max_chars=cfg.corpus_chars)
    with stage_output(out) as tmp:
        train_tokenizer(corpus, cfg.vocab_size, tmp)
        metrics = train_model(cfg, corpus, tmp, progress=progress)
        record = write_stage(tmp, "demo-model", asdict(cfg), None, metrics, started)
    return record


def build_demo(
    out: Path,
    preset: str = "default",
    key_path: Path | None = None,
    work_dir: Path | None = None,
    progress: bool = True,
    name: str = "edge-demo",
) -> Path:
    """demo-model → export → quantize → package; returns the bundle path at `out`."""
    if preset not in PRESETS:
        raise StageError(f"unknown demo preset {preset!r} (known: {', '.join(PRESETS)})")
    cfg = PRESETS[preset]
    out = Path(out)
    work = Path(work_dir) if work_dir else out.with_name(out.name + ".work")
    if key_path is None:
        key_path = work / "signing.key"
        if not key_path.is_file():
            signing.generate_keypair(key_path, work / "signing.pub")
    model_dir, onnx_dir, q_dir = work / "model", work / "onnx", work / "int4"
    make_model(cfg, model_dir, progress=progress)
    corpus = stdlib_corpus(max_chars=cfg.corpus_chars)
    windows = eval_windows(
        model_dir / "tokenizer.json", corpus.heldout, count=8, length=min(128, cfg.context_length)
    )
    export.run(model_dir, onnx_dir, check_windows=windows[:2])
    quantize.run(onnx_dir, q_dir, eval_windows=windows, block_size=cfg.block_size)
    return package.run(
        q_dir,
        out,
        key_path,
        name=name,
        version=f"0.1.0+{preset}",
        context_length=cfg.context_length,
        overwrite=True,
    )


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(os.environ.get("EDGE_RUNTIME_CACHE", Path(base) / "edge-runtime"))


def demo_recipe() -> Path:
    """models/demo.toml: from the source tree, else the copy installed with the package."""
    here = Path(__file__).resolve()
    for candidate in (here.parents[2] / "models" / "demo.toml", here.parent / "demo.toml"):
        if candidate.is_file():
            return candidate
    raise StageError("the demo recipe models/demo.toml is missing from this install")


def _default_paths() -> tuple[Path, Path, Path, Path, dict[str, str]]:
    recipe_file = demo_recipe()
    root = cache_dir() / "demo-recipe"
    want = {"recipe": hashlib.sha256(recipe_file.read_bytes()).hexdigest()[:16]}
    return recipe_file, root, root / "bundle", root / "signing.pub", want


def cached_default_bundle() -> tuple[Path, Path] | None:
    """The default bundle and its public key if built from the current recipe, else None
    (no torch or pipeline needed to answer)."""
    _, root, bundle, pub, want = _default_paths()
    marker = root / "bundle.json"
    current = json.loads(marker.read_text()) if marker.is_file() else None
    if current != want or not (bundle / "manifest.json").is_file() or not pub.is_file():
        return None
    return bundle, pub


def default_bundle(progress: bool = True) -> tuple[Path, Path]:
    """The embedded default bundle — the demo recipe's — and its public key: built on first
    use (≤ 15 minutes on two cores) into $EDGE_RUNTIME_CACHE/demo-recipe (default
    ${XDG_CACHE_HOME:-~/.cache}/edge-runtime/demo-recipe), then cached. A marker records
    which recipe text built it, so a start-up needs neither torch nor the pipeline once the
    bundle exists."""
    cached = cached_default_bundle()
    if cached is not None:
        return cached
    recipe_file, root, bundle, pub, want = _default_paths()
    from edge_build.pipeline import run_recipe
    from edge_build.recipe import load_recipe

    run_recipe(load_recipe(recipe_file), root, progress=progress)
    (root / "bundle.json").write_text(json.dumps(want) + "\n")
    return bundle, pub
