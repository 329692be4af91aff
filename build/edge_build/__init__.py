"""The offline pipeline: Hugging Face causal LM → 4-bit ONNX → signed model bundle.

Each stage is one module with one entry point that reads an artifact directory and writes a
new one with a `stage.json` (see `stage.py`), so stages can be rerun, cached and tested alone:

    teacher ─▶ distill ─▶ prune ─▶ quantize ─▶ export ─▶ lower ─▶ fuse ─▶ package

(`edge-build run --recipe`: pipeline.py chains them, stage_runner.py caches and gates each.)
"""

from __future__ import annotations

__all__: list[str] = []
