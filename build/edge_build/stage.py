"""Stage conventions: artifact directory in, artifact directory out, `stage.json` beside.

`stage.json` records what made the directory — stage name, parameters and their hash, the
hash of the input artifact, tool versions, metrics — so that no metadata lives in file names
and a later stage (or the bundle's build record) can tell exactly how an artifact came to be.

Errors of the pipeline:

    EdgeError
    └── StageError             a stage cannot run on this input (bad path, wrong model type)
        └── QualityGateError   a stage ran but its output is outside the tolerance
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from edge_runtime.atomic import atomic_write_json, fsync_dir
from edge_runtime.errors import EdgeError

STAGE_FILE = "stage.json"


class StageError(EdgeError):
    """A stage cannot run on the given input or parameters."""


class QualityGateError(StageError):
    """A stage's output is outside its tolerance; the message quotes the numbers."""


def params_hash(params: Mapping[str, Any]) -> str:
    blob = json.dumps(params, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def artifact_hash(root: Path) -> str:
    """Content hash of a stage directory: its stage.json when it has one (which already
    pins its inputs), else every file's path and bytes."""
    stage = root / STAGE_FILE
    h = hashlib.sha256()
    if stage.is_file():
        h.update(stage.read_bytes())
        return h.hexdigest()[:16]
    for p in sorted(q for q in root.rglob("*") if q.is_file()):
        h.update(p.relative_to(root).as_posix().encode())
        with open(p, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
    return h.hexdigest()[:16]


def tool_versions() -> dict[str, str]:
    out = {}
    for dist in (
        "edge-runtime",
        "torch",
        "transformers",
        "optimum",
        "optimum-onnx",
        "onnx",
        "onnxruntime",
    ):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def read_stage(root: Path) -> dict[str, Any]:
    p = Path(root) / STAGE_FILE
    if not p.is_file():
        raise StageError(f"{root} is not a stage artifact (no {STAGE_FILE})")
    return dict(json.loads(p.read_text()))


def require_dir(path: Path, what: str) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise StageError(f"{what} {path} does not exist or is not a directory")
    return path


@contextmanager
def stage_output(out: Path, overwrite: bool = True) -> Iterator[Path]:
    """A temporary sibling directory that becomes `out` only if the stage succeeds."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise StageError(f"{out} exists")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        yield tmp
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
        fsync_dir(out.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_stage(
    root: Path,
    stage: str,
    params: Mapping[str, Any],
    input_dir: Path | None,
    metrics: Mapping[str, Any],
    started: float,
) -> dict[str, Any]:
    record = {
        "stage": stage,
        "params": dict(params),
        "params_hash": params_hash(params),
        "input": None
        if input_dir is None
        else {
            "path": str(input_dir),
            "hash": artifact_hash(input_dir),
            "stage": read_stage(input_dir)["stage"] if (input_dir / STAGE_FILE).is_file() else None,
        },
        "tool_versions": tool_versions(),
        "metrics": dict(metrics),
        "seconds": round(time.time() - started, 2),
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    atomic_write_json(root / STAGE_FILE, record)
    return record


def lineage(root: Path) -> list[dict[str, Any]]:
    """The stage records from the first stage to this one, following input paths."""
    chain: list[dict[str, Any]] = []
    cur: Path | None = Path(root)
    while cur is not None and (cur / STAGE_FILE).is_file():
        rec = read_stage(cur)
        chain.append(rec)
        nxt = rec.get("input")
        cur = Path(nxt["path"]) if nxt else None
        if len(chain) > 32:  # a cycle would be a bug in a stage, not user input
            break
    return list(reversed(chain))
