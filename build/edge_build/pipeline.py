"""`edge-build run --recipe`: a recipe's whole chain, each stage cached, measured and gated.

    teacher → distill → prune → [heal] → quantize → export → lower(matmulnbits, qdq) → package

Every stage writes `OUT/STAGE/` through its own module (teacher.py, distill.py, prune.py,
quantize.py, export.py, package.py) into a hidden `.STAGE.partial` sibling; the pipeline then
measures it on the recipe's held-out windows against the teacher and against the stage's
input (quality.py), adds that record and the stage's cache key to its `stage.json`, and only
then renames it into place. The cache key hashes the input artifact's hash, the stage's
parameters, the data and evaluation windows, and the tool versions: an unchanged rerun
finds every key equal and runs nothing; a changed parameter changes that stage's key, its
output's hash, and so every key downstream. Gates are checked from the stored numbers on
every run, cached or not, so tightening a threshold needs no recomputation to fail, and
loosening one after a failure reuses the measured artifact.
"""

from __future__ import annotations

import os
import shutil
import sys
import sysconfig
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edge_build import quality
from edge_build.prune_target import mlp_ratio_for_target
from edge_build.recipe import Recipe
from edge_build.stage import (
    STAGE_FILE,
    StageError,
    artifact_hash,
    params_hash,
    read_stage,
    require_dir,
    tool_versions,
)
from edge_runtime.atomic import atomic_write_json

BUNDLE_RECORD = "package.json"
RUN_RECORD = "pipeline.json"


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


def _fingerprint(path: Path) -> str:
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


class Pipeline:
    def __init__(
        self, recipe: Recipe, out: Path, key: Path | None = None, progress: bool = True
    ) -> None:
        from rich.console import Console

        self.recipe, self.out, self.progress = recipe, Path(out), progress
        self.key = key or recipe.package.key
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

    # -- data ---------------------------------------------------------------------------------

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

    # -- the generic stage --------------------------------------------------------------------

    def stage(
        self,
        name: str,
        input_dir: Path | None,
        params: dict[str, Any],
        produce: Callable[[Path], Any],
        fix_record: Callable[[dict[str, Any]], None] | None = None,
    ) -> Path:
        """Run (or reuse) one stage; measure, record and gate it; return its directory."""
        final = self.out / name
        key = params_hash(
            {
                "stage": name,
                "input": _fingerprint(input_dir) if input_dir else None,
                "params": params,
                "data": self.data_key,
                "tools": self.tools,
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
                partial, self.windows("heldout"), teacher, input_dir, parameters
            )
            rec["cache_key"] = key
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
        quality.check(name, q, self.recipe.gates(name), self.source)
        return final

    # -- the chain ----------------------------------------------------------------------------

    def run(self) -> RunResult:
        started = time.time()
        self.out.mkdir(parents=True, exist_ok=True)
        r = self.recipe
        self.teacher = cur = self.make_teacher()
        if r.distill.enabled:
            cur = self.distill(cur)
        if r.prune.enabled:
            cur = self.prune(cur)
            if r.prune.heal_steps > 0:
                cur = self.heal(cur)
        quant_dir = None
        if r.quantize.enabled:
            cur = quant_dir = self.quantize(cur)
        cur = onnx_dir = self.export(cur)
        lowered = [self.lower(onnx_dir, quant_dir, fmt) for fmt in r.lower.formats]
        bundle, pub = self.package(lowered[0] if lowered else cur)
        result = RunResult(bundle, pub, self.results, round(time.time() - started, 2))
        atomic_write_json(
            self.out / RUN_RECORD,
            {
                "recipe": self.source,
                "bundle": str(bundle),
                "seconds": result.seconds,
                "stages": [{**asdict(s), "path": str(s.path)} for s in self.results],
            },
        )
        return result

    def make_teacher(self) -> Path:
        src = self.recipe.source
        if src.path is not None:
            path = require_dir(src.path, "source.path (the teacher checkpoint)")
            if not (path / "config.json").is_file() or not (path / "tokenizer.json").is_file():
                raise StageError(
                    f"source.path {path}: not an HF checkpoint with a fast "
                    "tokenizer (config.json and tokenizer.json needed)"
                )
            self.teacher = path
            return path
        from edge_build import teacher

        assert src.teacher is not None
        cfg, data = src.teacher, self.recipe.data

        def produce(out: Path) -> None:
            teacher.run(cfg, data, out, progress=self.progress)

        # Measured against itself: its perplexity is every later stage's reference.
        self.teacher = self.out / "teacher"
        return self.stage("teacher", None, asdict(cfg), produce)

    def _distill_config(self, steps: int, layers: Any) -> Any:
        from edge_build import distill

        d, data = self.recipe.distill, self.recipe.data
        return distill.DistillConfig(
            layers=layers,
            steps=steps,
            batch_size=d.batch_size,
            seq_len=d.seq_len,
            grad_accum=d.grad_accum,
            learning_rate=d.learning_rate,
            warmup_steps=min(d.warmup_steps, max(1, steps // 2)),
            temperature=d.temperature,
            hidden_weight=d.hidden_weight if layers is not None else 0.0,
            checkpoint_every=d.checkpoint_every,
            seed=d.seed,
            heldout_share=data.heldout_share,
            eval_windows=data.eval_windows,
            eval_tokens=data.eval_tokens,
        )

    def distill(self, teacher_dir: Path) -> Path:
        from edge_build import distill

        d = self.recipe.distill
        cfg = self._distill_config(d.steps, d.layers)

        def produce(out: Path) -> None:
            distill.run(teacher_dir, out, cfg, data=self.data_files, progress=self.progress)

        return self.stage("distill", teacher_dir, asdict(cfg), produce)

    def prune(self, input_dir: Path) -> Path:
        from edge_build import prune

        p, data = self.recipe.prune, self.recipe.data
        mlp_ratio = p.mlp_ratio
        if p.target_parameters is not None:
            mlp_ratio = mlp_ratio_for_target(
                input_dir, p.target_parameters, p.heads_ratio, p.drop_layers
            )
        params = {**asdict(p), "mlp_ratio": mlp_ratio}

        def produce(out: Path) -> None:
            prune.run(
                input_dir,
                out,
                mlp_ratio=mlp_ratio,
                heads_ratio=p.heads_ratio,
                drop_layers=p.drop_layers,
                data=self.data_files,
                teacher_dir=self.teacher,
                calib_windows=data.calib_windows,
                eval_windows_count=data.eval_windows,
                window_tokens=data.eval_tokens,
                heldout_share=data.heldout_share,
            )

        return self.stage("prune", input_dir, params, produce)

    def heal(self, input_dir: Path) -> Path:
        from edge_build import distill

        cfg = self._distill_config(self.recipe.prune.heal_steps, None)
        teacher = self.teacher
        assert teacher is not None

        def produce(out: Path) -> None:
            distill.run(
                teacher, out, cfg, data=self.data_files, init_from=input_dir, progress=self.progress
            )

        def fix(rec: dict[str, Any]) -> None:
            # distill.run records the teacher as its input; the chain's input is the pruned
            # model, and the bundle's lineage must pass through it.
            rec.update(
                stage="heal",
                teacher=str(teacher),
                input={"path": str(input_dir), "hash": artifact_hash(input_dir), "stage": "prune"},
            )

        return self.stage("heal", input_dir, asdict(cfg), produce, fix)

    def quantize(self, input_dir: Path) -> Path:
        from edge_build import quantize

        q = self.recipe.quantize

        def produce(out: Path) -> None:
            quantize.quantize_model(
                input_dir,
                out,
                self.windows("calib"),
                self.windows("heldout"),
                method=q.method,
                group_size=q.group_size,
                symmetric=q.symmetric,
                progress=self.progress,
            )

        return self.stage("quantize", input_dir, asdict(q), produce)

    def export(self, input_dir: Path) -> Path:
        from edge_build import export

        e = self.recipe.export

        def produce(out: Path) -> None:
            export.run(
                input_dir,
                out,
                opset=e.opset,
                check_windows=self.windows("heldout")[:2],
                atol=e.atol,
            )

        return self.stage("export", input_dir, asdict(e), produce)

    def lower(self, onnx_dir: Path, quant_dir: Path | None, fmt: str) -> Path:
        from edge_build import quantize
        from edge_build.export import CARRIED_FILES

        assert quant_dir is not None
        level = self.recipe.lower.accuracy_level

        def produce(out: Path) -> None:
            quantize.lower(
                onnx_dir,
                quant_dir,
                out,
                fmt=fmt,
                accuracy_level=level,
                check_windows=self.windows("heldout")[:2],
            )
            for name in CARRIED_FILES:  # package needs the tokenizer beside the graph
                if (onnx_dir / name).is_file() and not (out / name).is_file():
                    shutil.copyfile(onnx_dir / name, out / name)

        params = {"fmt": fmt, "accuracy_level": level, "quant": _fingerprint(quant_dir)}
        return self.stage(f"lower-{fmt}", onnx_dir, params, produce)

    def package(self, artifact: Path) -> tuple[Path, Path | None]:
        from edge_build import package
        from edge_runtime import signing

        p = self.recipe.package
        key, pub = self.key, None
        if key is None:  # a key made once for this build directory
            key, pub = self.out / "signing.key", self.out / "signing.pub"
            if not key.is_file():
                signing.generate_keypair(key, pub)
        elif Path(key).with_suffix(".pub").is_file():
            pub = Path(key).with_suffix(".pub")
        key = Path(key)
        if not key.is_file():
            raise StageError(f"signing key {key} does not exist (edge-build keygen makes one)")
        bundle = self.out / "bundle"
        params = {**asdict(p), "key": key_id(key)}
        cache_key = params_hash(
            {"input": artifact_hash(artifact), "params": params, "tools": self.tools}
        )
        record = self.out / BUNDLE_RECORD
        import json

        old = json.loads(record.read_text()) if record.is_file() else {}
        started = time.time()
        cpu0 = time.process_time()
        cached = old.get("cache_key") == cache_key and (bundle / "manifest.json").is_file()
        if not cached:
            self.console.rule(f"[bold]{len(self.results) + 1}. package")
            package.run(
                artifact,
                bundle,
                key,
                name=p.name,
                version=p.version,
                context_length=p.context_length,
                max_new_tokens=p.max_new_tokens,
                overwrite=True,
            )
            old = {
                "cache_key": cache_key,
                "input": str(artifact),
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
        return bundle, pub


def _fingerprint_file(p: Path) -> tuple[str, int, int]:
    p = Path(p)
    if not p.is_file():
        raise StageError(f"data file {p} does not exist")
    st = p.stat()
    return str(p), st.st_size, st.st_mtime_ns


def key_id(key: Path) -> str:
    from edge_runtime import signing

    return str(signing.key_id(signing.load_private_key(key).public_key()))


def run_recipe(
    recipe: Recipe, out: Path, key: Path | None = None, progress: bool = True
) -> RunResult:
    """Run `recipe` into `out`; see the module docstring."""
    return Pipeline(recipe, out, key, progress).run()


__all__ = ["Pipeline", "RunResult", "StageResult", "run_recipe"]
