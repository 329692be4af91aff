"""The recipe runner's generic half: run or reuse one stage, measure it, record it, gate it.

Every stage writes `OUT/STAGE/` through its own module into a hidden `.STAGE.partial`
sibling; the runner then measures it on the recipe's held-out windows against the teacher
and against the stage's input (quality.py), adds that record, the stage's cache key and its
code's hash to its `stage.json`, and only then renames it into place.

The cache key hashes the input artifact's hash, the stage's parameters, the data and
evaluation windows, the tool versions, and the project's own code the stage runs
(code_hash.py: its modules' import closure, the runner's, and the source of the chain's
method that wires it). An unchanged rerun finds every key equal and runs nothing; a changed
parameter or stage module changes that stage's key, its output's hash, and so every key
downstream. Gates are checked from the stored numbers on every run, cached or not, so
tightening a threshold needs no recomputation to fail, and loosening one after a failure
reuses the measured artifact. The chain itself is pipeline.py.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import sysconfig
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_build import quality
from edge_build.code_hash import code_hash
from edge_build.recipe import Recipe, StageGates
from edge_build.stage import (
    STAGE_FILE,
    StageError,
    artifact_hash,
    params_hash,
    read_stage,
    tool_versions,
)
from edge_runtime.atomic import atomic_write_json

BUNDLE_RECORD = "package.json"
RUN_RECORD = "pipeline.json"
RUNNER_MODULES = ("edge_build.stage_runner",)
"""Part of every stage's code: how it is measured, recorded and gated."""


@dataclass
class StageResult:
    name: str
    path: Path
    cached: bool
    seconds: float
    """This run's wall time for the stage (≈0 when cached)."""
    build_seconds: float
    """How long the stage took when it was built (wall clock, measurement included)."""
    quality: dict[str, Any]
    cpu_seconds: float = 0.0
    """CPU time (all threads) of the build: on a busy machine, the honest measure of cost."""


@dataclass
class RunResult:
    bundle: Path
    public_key: Path | None
    stages: list[StageResult] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def executed(self) -> list[str]:
        return [s.name for s in self.stages if not s.cached]


def fingerprint(path: Path) -> str:
    """A stage artifact's hash (its stage.json pins everything); for a checkpoint we did not
    make, file names, sizes and mtimes — rehashing gigabytes would make a rerun slow."""
    if (path / STAGE_FILE).is_file():
        return artifact_hash(path)
    stat = [
        (p.relative_to(path).as_posix(), p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(path.rglob("*"))
        if p.is_file()
    ]
    return params_hash({"files": stat})


def _fingerprint_file(p: Path) -> tuple[str, int, int]:
    p = Path(p)
    if not p.is_file():
        raise StageError(f"data file {p} does not exist")
    st = p.stat()
    return str(p), st.st_size, st.st_mtime_ns


class StageRunner:
    """Held-out windows, cache keys and the measured, gated run of one stage at a time."""

    def __init__(self, recipe: Recipe, out: Path, progress: bool = True) -> None:
        from rich.console import Console

        self.recipe, self.out, self.progress = recipe, Path(out), progress
        self.console = Console(stderr=True, quiet=not progress, highlight=False)
        self.source = str(recipe.path or "recipe")
        d = recipe.data
        self.data_files = [Path(p) for p in d.files] or None
        self.data_key = params_hash(
            {
                "files": [_fingerprint_file(p) for p in d.files]
                or f"stdlib:{sys.version_info[:3]}:{sysconfig.get_paths()['stdlib']}",
                "heldout_share": d.heldout_share,
                "eval_windows": d.eval_windows,
                "eval_tokens": d.eval_tokens,
                "calib_windows": d.calib_windows,
            }
        )
        self.tools = tool_versions()
        self.teacher: Path | None = None
        self._windows: dict[str, list[list[int]]] = {}
        self.results: list[StageResult] = []
        self._params: dict[str, int | None] = {}

    def windows(self, split: str) -> list[list[int]]:
        """Fixed token windows from the held-out ("heldout") or training ("calib") split,
        cut with the teacher's tokenizer; computed once, only when a stage needs them."""
        if split not in self._windows:
            from edge_build.evaluate import eval_windows
            from edge_build.textdata import train_heldout

            assert self.teacher is not None
            d = self.recipe.data
            train, held = train_heldout(self.data_files, d.heldout_share)
            count = d.eval_windows if split == "heldout" else d.calib_windows
            texts = held if split == "heldout" else train
            w = eval_windows(self.teacher / "tokenizer.json", texts, count, d.eval_tokens)
            if not w:
                raise StageError(f"no {d.eval_tokens}-token window in the {split} text")
            self._windows[split] = w
        return self._windows[split]

    def code(self, modules: Sequence[str], wiring: Sequence[Callable[..., Any]]) -> dict[str, Any]:
        """A stage's code record: its modules (+ the runner's, closed over imports) and the
        source of the chain's functions that wire it."""
        return code_hash([*modules, *RUNNER_MODULES], wiring)

    def stage(
        self,
        name: str,
        input_dir: Path | None,
        params: dict[str, Any],
        produce: Callable[[Path], Any],
        code: dict[str, Any],
        fix_record: Callable[[dict[str, Any]], None] | None = None,
        gates: StageGates | None = None,
        exact_vs_input: bool = False,
    ) -> Path:
        """Run (or reuse) one stage; measure, record and gate it; return its directory.

        `code`: self.code(...) of the stage; `gates`: instead of the recipe's for `name`;
        `exact_vs_input`: compare with the input at fp32 activations (quality.measure)."""
        final = self.out / name
        key = params_hash(
            {
                "stage": name,
                "input": fingerprint(input_dir) if input_dir else None,
                "params": params,
                "data": self.data_key,
                "tools": self.tools,
                "code": code["hash"],
            }
        )
        n = len(self.results) + 1
        started = time.time()
        rec = read_stage(final) if (final / STAGE_FILE).is_file() else None
        cached = bool(rec and rec.get("cache_key") == key and rec.get("quality"))
        if not cached:
            cpu0 = time.process_time()
            self.console.rule(f"[bold]{n}. {name}")
            partial = self.out / f".{name}.partial"
            produce(partial)
            if input_dir is None:  # the teacher: its windows come from its own tokenizer
                self.teacher = partial
            rec = read_stage(partial)
            if fix_record:
                fix_record(rec)
            parameters = self._params.get(str(input_dir)) if input_dir else None
            teacher = self.teacher if input_dir is not None else None
            rec["quality"] = quality.measure(
                partial, self.windows("heldout"), teacher, input_dir, parameters, exact_vs_input
            )
            rec["cache_key"] = key
            rec["code"] = code
            rec["pipeline_seconds"] = round(time.time() - started, 2)
            rec["cpu_seconds"] = round(time.process_time() - cpu0, 2)
            atomic_write_json(partial / STAGE_FILE, rec)
            if final.exists():
                shutil.rmtree(final)
            os.replace(partial, final)
            if input_dir is None:
                self.teacher = final
        assert rec is not None
        q = rec["quality"]
        self._params[str(final)] = q.get("parameters")
        built = float(rec.get("pipeline_seconds", rec.get("seconds", 0.0)))
        res = StageResult(
            name,
            final,
            cached,
            round(time.time() - started, 2),
            built,
            q,
            float(rec.get("cpu_seconds", 0.0)),
        )
        self.results.append(res)
        mark = "[green]cached[/]" if cached else f"[cyan]{res.seconds:.1f}s[/]"
        self.console.print(f"[bold]{n}. {name}[/] {mark}  {quality.summary(q)}")
        quality.check(name, q, gates or self.recipe.gates(name), self.source)
        return final

    def bundle_stage(
        self,
        artifact: Path,
        bundle: Path,
        params: dict[str, Any],
        produce: Callable[[], Any],
        code: dict[str, Any],
    ) -> bool:
        """Run (or reuse) the package stage: not measured here (the bundle carries its own
        probe), cached by its input, parameters, tools and code in OUT/package.json.
        Returns whether it was cached."""
        cache_key = params_hash(
            {
                "input": artifact_hash(artifact),
                "params": params,
                "tools": self.tools,
                "code": code["hash"],
            }
        )
        record = self.out / BUNDLE_RECORD
        old = json.loads(record.read_text()) if record.is_file() else {}
        started = time.time()
        cpu0 = time.process_time()
        cached = old.get("cache_key") == cache_key and (bundle / "manifest.json").is_file()
        if not cached:
            self.console.rule(f"[bold]{len(self.results) + 1}. package")
            produce()
            old = {
                "cache_key": cache_key,
                "input": str(artifact),
                "code": code,
                "seconds": round(time.time() - started, 2),
                "cpu_seconds": round(time.process_time() - cpu0, 2),
            }
            atomic_write_json(record, old)
        q = {"bytes": sum(f.stat().st_size for f in (bundle / "model").iterdir())}
        self.results.append(
            StageResult(
                "package",
                bundle,
                cached,
                round(time.time() - started, 2),
                float(old.get("seconds", 0.0)),
                q,
                float(old.get("cpu_seconds", 0.0)),
            )
        )
        mark = "[green]cached[/]" if cached else f"[cyan]{time.time() - started:.1f}s[/]"
        self.console.print(f"[bold]{len(self.results)}. package[/] {mark}  {bundle}")
        return cached


__all__ = ["RunResult", "StageResult", "StageRunner", "fingerprint"]
