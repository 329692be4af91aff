"""`edge-build run --recipe`: a recipe's whole chain, each stage cached, measured and gated.

    teacher → distill → prune → [heal] → quantize → export → lower(matmulnbits, qdq)
        → [fuse] → [fp16] → package
                      └─ [draft] → draft-quantize → draft-export → draft-lower-matmulnbits
                                 → [draft-fuse] → [draft-fp16] ─▶ package (the bundle's
                                                                  `draft` graph)

One method per stage: it reads the recipe's table for the stage, calls the stage's module
(teacher.py, distill.py, prune.py, quantize.py, export.py, fuse.py, package.py) and hands
it to the runner (stage_runner.py), which caches, measures, records and gates it. The bundle
serves the MatMulNBits graph (the fp32 export without [quantize]), fused unless
`fuse.enabled = false`, in float16 for a GPU with `fuse.activations = "float16"` (fp16.py).
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from edge_build.distill_config import KDTraining
from edge_build.prune_target import mlp_ratio_for_target
from edge_build.recipe import Recipe
from edge_build.stage import StageError, artifact_hash, require_dir
from edge_build.stage_runner import (
    RUN_RECORD,
    RunResult,
    StageResult,
    StageRunner,
    fingerprint,
)
from edge_runtime.atomic import atomic_write_json

FP16_MIN_TOP1 = 0.9
"""Top-1 agreement of the float16 graph with its float32 input, on its greedy check and on
the held-out windows, below which stage fp16 fails (thresholds.fp16.vs_input.min_top1
overrides): float16 rounding flips near ties, not clear choices."""


class Pipeline(StageRunner):
    def __init__(
        self, recipe: Recipe, out: Path, key: Path | None = None, progress: bool = True
    ) -> None:
        super().__init__(recipe, out, progress)
        self.key = key or recipe.package.key

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
        served_model = cur  # the served model in HF form: what a draft imitates
        quant_dir = None
        if r.quantize.enabled:
            cur = quant_dir = self.quantize(cur)
        cur = onnx_dir = self.export(cur)
        lowered = {fmt: self.lower(onnx_dir, quant_dir, fmt) for fmt in r.lower.formats}
        # What ships: MatMulNBits (recipe.py requires it with [quantize]), else fp32.
        served = lowered.get("matmulnbits", cur)
        if r.fuse.enabled:
            served = self.fuse(served)
            if r.fuse.activations == "float16":
                served = self.fp16(served)
        trt = lowered.get("qdq") if r.package.tensorrt_graph else None
        draft = self.draft_chain(served_model) if r.draft.enabled else None
        bundle, pub = self.package(served, trt, draft)
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
        code = self.code(["edge_build.teacher"], [self.make_teacher])
        return self.stage("teacher", None, asdict(cfg), produce, code)

    def _distill_config(self, steps: int, layers: Any, table: Any = None) -> Any:
        from edge_build import distill

        d, data = table or self.recipe.distill, self.recipe.data
        training = {f.name: getattr(d, f.name) for f in dataclasses.fields(KDTraining)}
        return distill.DistillConfig(
            **{
                **training,
                "layers": layers,
                "steps": steps,
                "warmup_steps": min(d.warmup_steps, max(1, steps // 2)),
                "hidden_weight": d.hidden_weight if layers is not None else 0.0,
            },
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

        code = self.code(["edge_build.distill"], [self.distill, self._distill_config])
        return self.stage("distill", teacher_dir, asdict(cfg), produce, code)

    def draft_chain(self, served: Path) -> Path:
        """The draft model through the served model's own stages: its served graph."""
        r = self.recipe
        cur = quant_dir = self.draft(served)
        if r.quantize.enabled:
            cur = quant_dir = self.quantize(cur, prefix="draft-")
        cur = onnx_dir = self.export(cur, prefix="draft-")
        if r.quantize.enabled:
            cur = self.lower(onnx_dir, quant_dir, "matmulnbits", prefix="draft-")
        if r.fuse.enabled:
            cur = self.fuse(cur, prefix="draft-")
            if r.fuse.activations == "float16":
                cur = self.fp16(cur, prefix="draft-")
        return cur

    def draft(self, served: Path) -> Path:
        from edge_build import draft as draft_stage

        d = self.recipe.draft
        cfg = draft_stage.resolve_layers(self._distill_config(d.steps, d.layers, d), served)

        def produce(out: Path) -> None:
            draft_stage.run(served, out, cfg, data=self.data_files, progress=self.progress)

        code = self.code(["edge_build.draft", "edge_build.distill"],
                         [self.draft, self._distill_config])
        return self.stage("draft", served, asdict(cfg), produce, code)

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

        code = self.code(["edge_build.prune", "edge_build.prune_target"], [self.prune])
        return self.stage("prune", input_dir, params, produce, code)

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

        code = self.code(["edge_build.distill"], [self.heal, self._distill_config])
        return self.stage("heal", input_dir, asdict(cfg), produce, code, fix)

    def quantize(self, input_dir: Path, prefix: str = "") -> Path:
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

        code = self.code(["edge_build.quantize"], [self.quantize])
        return self.stage(f"{prefix}quantize", input_dir, asdict(q), produce, code)

    def export(self, input_dir: Path, prefix: str = "") -> Path:
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

        code = self.code(["edge_build.export"], [self.export])
        return self.stage(f"{prefix}export", input_dir, asdict(e), produce, code)

    def lower(self, onnx_dir: Path, quant_dir: Path | None, fmt: str, prefix: str = "") -> Path:
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

        params = {"fmt": fmt, "accuracy_level": level, "quant": fingerprint(quant_dir)}
        code = self.code(["edge_build.quantize"], [self.lower])
        return self.stage(f"{prefix}lower-{fmt}", onnx_dir, params, produce, code)

    def fuse(self, input_dir: Path, prefix: str = "") -> Path:
        from edge_build import fuse

        f = self.recipe.fuse
        # Rotary tables for the positions the bundle will serve, not the model's 128k.
        positions = f.max_positions or self.recipe.package.context_length
        prompt = self.windows("heldout")[0][:32]

        def produce(out: Path) -> None:
            fuse.run(input_dir, out, check_prompt=prompt, atol=f.atol, max_positions=positions)

        # Exact by construction: gated on |Δlogit| against the input at fp32 activations,
        # whatever else the recipe's thresholds.fuse say.
        g = self.recipe.gates(f"{prefix}fuse")
        limit = min(f.atol, g.vs_input.max_abs_logit_diff or f.atol)
        gates = dataclasses.replace(
            g, vs_input=dataclasses.replace(g.vs_input, max_abs_logit_diff=limit)
        )
        params = {"max_positions": positions, "atol": f.atol, "check_prompt": prompt}
        code = self.code(["edge_build.fuse"], [self.fuse])
        return self.stage(
            f"{prefix}fuse", input_dir, params, produce, code, gates=gates, exact_vs_input=True
        )

    def fp16(self, input_dir: Path, prefix: str = "") -> Path:
        """The fused graph in float16 for a GPU (fp16.py); its top-1 agreement with the
        float32 graph gated at FP16_MIN_TOP1 unless the recipe's thresholds.fp16 say
        otherwise."""
        from edge_build import fp16

        prompt = self.windows("heldout")[0][:32]
        g = self.recipe.gates(f"{prefix}fp16")
        floor = g.vs_input.min_top1 if g.vs_input.min_top1 is not None else FP16_MIN_TOP1
        gates = dataclasses.replace(
            g, vs_input=dataclasses.replace(g.vs_input, min_top1=floor)
        )

        def produce(out: Path) -> None:
            fp16.run(input_dir, out, check_prompt=prompt, min_top1=floor)

        params = {"check_prompt": prompt, "min_top1": floor}
        code = self.code(["edge_build.fp16"], [self.fp16])
        return self.stage(f"{prefix}fp16", input_dir, params, produce, code, gates=gates)

    def package(
        self, artifact: Path, trt: Path | None = None, draft: Path | None = None
    ) -> tuple[Path, Path | None]:
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
        params = {**asdict(p), "key": key_id(key),
                  "trt_input": artifact_hash(trt) if trt is not None else None,
                  "draft_input": artifact_hash(draft) if draft is not None else None}

        def produce() -> None:
            package.run(
                artifact,
                bundle,
                key,
                name=p.name,
                version=p.version,
                context_length=p.context_length,
                max_new_tokens=p.max_new_tokens,
                overwrite=True,
                trt_dir=trt,
                draft_dir=draft,
            )

        code = self.code(["edge_build.package"], [self.package])
        self.bundle_stage(artifact, bundle, params, produce, code)
        return bundle, pub


def key_id(key: Path) -> str:
    from edge_runtime import signing
    return str(signing.key_id(signing.load_private_key(key).public_key()))


def run_recipe(
    recipe: Recipe, out: Path, key: Path | None = None, progress: bool = True
) -> RunResult:
    """Run `recipe` into `out`; see the module docstring."""
    return Pipeline(recipe, out, key, progress).run()


__all__ = ["Pipeline", "RunResult", "StageResult", "run_recipe"]
