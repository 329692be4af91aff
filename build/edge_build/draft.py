"""Stage `draft`: the served model → a shallower draft model for speculative decoding.

    served model (HF, after distill / prune / heal) ─▶ keep `layers` of it ─▶ distil on the
    served model's own logits (T²·KL at temperature T, distill.py) ─▶ draft (HF)

The draft is then quantized, exported, lowered and fused by the same stages as the served
model (pipeline.py names them draft-quantize, draft-export, …) and packaged as the bundle's
`draft` graph (package.py), with the served model's tokenizer: the two must agree on token
ids, and the draft only ever has to predict what the *served* model would say — not the
original teacher — which is why it is distilled from the served model's logits.

Speculative decoding pays when the draft agrees with the served model often (acceptance
rate α) and costs little per step: with a draft that costs c of a target step, k drafted
tokens yield (1 − α^(k+1)) / (1 − α) tokens for k·c + 1 target steps (edge_runtime/model/
speculative.py measures both and picks k).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from edge_build import distill
from edge_build.stage import artifact_hash, read_stage
from edge_runtime.atomic import atomic_write_json


def default_layers(num_layers: int) -> tuple[int, ...]:
    """About a quarter of the served model's layers, spread over its depth, at least one:
    the first (embedding-side features) and evenly spaced ones after it."""
    n = max(1, num_layers // 4)
    step = num_layers / n
    return tuple(sorted({int(i * step) for i in range(n)}))


def resolve_layers(cfg: distill.DistillConfig, served_dir: Path) -> distill.DistillConfig:
    """`cfg` with layers "auto" replaced by default_layers of the served model's depth."""
    if cfg.layers != "auto":
        return cfg
    import dataclasses
    import json

    n = int(json.loads((Path(served_dir) / "config.json").read_text())["num_hidden_layers"])
    return dataclasses.replace(cfg, layers=default_layers(n))


def run(
    served_dir: Path,
    out: Path,
    cfg: distill.DistillConfig,
    data: Sequence[Path] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Distil the draft of `served_dir` (layers `cfg.layers`, "auto" = default_layers) into
    `out`; return its stage record (stage "draft", input: the served model)."""
    cfg = resolve_layers(cfg, served_dir)
    record = distill.run(served_dir, out, cfg, data=data, progress=progress)
    assert record is not None  # no max_steps: the schedule always completes
    return mark_draft(out, served_dir)


def mark_draft(out: Path, served_dir: Path) -> dict[str, Any]:
    """Rename the distill record at `out` to stage "draft" (its input is the served model)."""
    rec = read_stage(out)
    rec.update(stage="draft", input={"path": str(served_dir),
                                     "hash": artifact_hash(Path(served_dir)),
                                     "stage": read_stage(Path(served_dir))["stage"]
                                     if (Path(served_dir) / "stage.json").is_file() else None})
    atomic_write_json(Path(out) / "stage.json", rec)
    return rec
