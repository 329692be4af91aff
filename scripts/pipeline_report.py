#!/usr/bin/env python3
"""docs/PIPELINE.md from a run of the demo recipe: the chain, each stage's held-out metrics,
the distillation baselines, AWQ vs RTN, ORT-vs-PyTorch logits, timings, machine, command.

    pip install -e '.[build,report]'          # matplotlib draws docs/pipeline_perplexity.png
    python scripts/pipeline_report.py [--out ~/.cache/edge-runtime/demo-recipe] [--set k=v]

The build goes to `--out` (default: the cache `edge-runtime serve` uses, so one build serves
both) and is reused when its stages are cached. Then, beside it in `OUT/report/`, cached too:

- distillation baselines on the same held-out windows: the student initialised from the
  teacher's layers without distillation and a random-init student (both measured by the
  distill stage before it trains), and a random-init student given the same distillation
  budget (`--no-trained-baseline` skips this one: it costs another distillation);
- fp32 vs RTN vs AWQ at the recipe's group size, on the quantize stage's input;
- the wall time of an unchanged rerun (`edge-build run` in a subprocess).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "build"), str(ROOT / "scripts")]

from bench.report import environment  # noqa: E402

from edge_build.demo import cache_dir  # noqa: E402
from edge_build.pipeline import Pipeline, RunResult  # noqa: E402
from edge_build.recipe import Recipe, load_recipe  # noqa: E402
from edge_build.stage import artifact_hash, params_hash, read_stage  # noqa: E402


def _cached_json(path: Path, key: str, compute: Any) -> dict[str, Any]:
    if path.is_file():
        old = json.loads(path.read_text())
        if old.get("key") == key:
            return dict(old["value"])
    value = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"key": key, "value": value}, indent=2) + "\n")
    return dict(value)


def trained_random_baseline(p: Pipeline, report: Path) -> dict[str, Any]:
    """A random-init student of the distilled student's shape, given the same KD budget."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from edge_build import distill, lm_eval

    student_dir = p.out / "distill"
    cfg = p._distill_config(p.recipe.distill.steps, None)
    key = params_hash({"student": artifact_hash(student_dir), "cfg": asdict(cfg)})

    def compute() -> dict[str, Any]:
        import torch

        init = report / "random-init"
        torch.manual_seed(cfg.seed)
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(student_dir))
        lm_eval.save_model(model, student_dir, init)
        assert p.teacher is not None
        rec = distill.run(
            p.teacher,
            report / "random-kd",
            cfg,
            data=p.data_files,
            init_from=init,
            progress=p.progress,
        )
        assert rec is not None
        return {k: v for k, v in rec["metrics"].items() if k.startswith("student_")}

    return _cached_json(report / "random-kd.json", key, compute)


def awq_vs_rtn(p: Pipeline, report: Path) -> dict[str, Any]:
    from edge_build import quantize

    src = Path(read_stage(p.out / "quantize")["input"]["path"])
    g = p.recipe.quantize.group_size
    key = params_hash({"input": artifact_hash(src), "g": g, "data": p.data_key})
    return _cached_json(
        report / "awq-vs-rtn.json",
        key,
        lambda: quantize.compare_methods(
            src,
            p.windows("calib"),
            p.windows("heldout"),
            group_size=g,
            symmetric=p.recipe.quantize.symmetric,
            progress=p.progress,
        ),
    )


def rerun_seconds(recipe_path: Path, out: Path, sets: list[str]) -> tuple[float, str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "build")])}
    cmd = [
        sys.executable,
        "-m",
        "edge_build.cli",
        "run",
        "--recipe",
        str(recipe_path),
        "--out",
        str(out),
        "--no-progress",
        *[f"--set={s}" for s in sets],
    ]
    t0 = time.time()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
    ran = [line for line in done.stdout.splitlines() if line.startswith("ran:")]
    return time.time() - t0, ran[0] if ran else done.stdout.strip()


def _f(v: Any, spec: str = ".3f") -> str:
    return "–" if v is None else format(v, spec)


def stage_table(result: RunResult) -> str:
    rows = [
        "| stage | perplexity | vs teacher: Δppl | top-1 | KL | vs input: Δppl | top-1 | KL "
        "| parameters | MiB | built in | CPU time |",
        "|" + "---|" * 12,
    ]
    for s in result.stages:
        q, t, i = s.quality, s.quality.get("vs_teacher") or {}, s.quality.get("vs_input") or {}
        mib = q.get("int4_bytes", q["bytes"]) / 2**20
        rows.append(
            f"| {s.name} | {_f(q.get('perplexity'), '.2f')} | {_f(t.get('ppl_increase'), '+.1%')}"
            f" | {_f(t.get('top1_agreement'))} | {_f(t.get('mean_kl'), '.4f')}"
            f" | {_f(i.get('ppl_increase'), '+.1%')} | {_f(i.get('top1_agreement'))}"
            f" | {_f(i.get('mean_kl'), '.4f')} | {_f(q.get('parameters'), ',')}"
            f" | {mib:.2f} | {s.build_seconds:.0f} s | {s.cpu_seconds:.0f} s |"
        )
    return "\n".join(rows)


def plot(bars: dict[str, float], path: Path) -> bool:
    """Held-out perplexity of the chain's models and of the distillation baselines, on a
    linear axis from 0 (a truncated axis would make a 1% change look like a cliff)."""
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.8))
    names, values = list(bars), list(bars.values())
    colors = ["#c44e52" if "baseline" in n else "#4c72b0" for n in names]
    ax.barh(names[::-1], values[::-1], color=colors[::-1])
    for y, v in enumerate(values[::-1]):
        ax.text(v, y, f" {v:.1f}", va="center", fontsize=8)
    ax.set_xlabel("held-out perplexity (lower is better)")
    ax.set_xlim(0, max(values) * 1.15)
    ax.set_title("Demo recipe, held-out perplexity (red: distillation baselines)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", type=Path, default=ROOT / "models" / "demo.toml")
    ap.add_argument("--out", type=Path, default=cache_dir() / "demo-recipe")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--doc", type=Path, default=ROOT / "docs" / "PIPELINE.md")
    ap.add_argument("--no-trained-baseline", action="store_true")
    ap.add_argument("--no-progress", action="store_true")
    a = ap.parse_args()

    recipe: Recipe = load_recipe(a.recipe, a.set)
    p = Pipeline(recipe, a.out, progress=not a.no_progress)
    result = p.run()
    report = a.out / "report"
    by = {s.name: s for s in result.stages}
    dm = read_stage(a.out / "distill")["metrics"]
    trained = None if a.no_trained_baseline else trained_random_baseline(p, report)
    methods = awq_vs_rtn(p, report)
    rerun_s, rerun_line = rerun_seconds(a.recipe, a.out, a.set)
    env = environment()

    teacher_ppl = dm["teacher_perplexity"]
    lines = [
        "# Offline pipeline: the demo recipe, measured",
        "",
        f"Produced by `scripts/pipeline_report.py` on {env['date']}. Do not edit by hand.",
        "",
        "```sh",
        "python scripts/pipeline_report.py "
        + ("" if a.out == cache_dir() / "demo-recipe" else f"--out {a.out} ")
        + " ".join(f"--set {s}" for s in a.set)
        + ("--no-trained-baseline" if a.no_trained_baseline else ""),
        f"# the build alone: edge-build run --recipe {a.recipe.relative_to(ROOT)}",
        "```",
        "",
        f"Machine: {env['cpu_model']}, {env['usable_cores']} usable cores, Python "
        f"{env['python']}, "
        + ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v != "not installed")
        + ".",
        "",
        "## The chain",
        "",
        " → ".join(s.name for s in result.stages),
        "",
        "Every stage is measured on the same "
        f"{by['distill'].quality['windows']} held-out windows of "
        f"{by['distill'].quality['window_tokens']} tokens (stdlib files held out by a hash of "
        "their path; the teacher never trained on them), against the teacher and against the "
        "stage's own input. Δppl is the relative perplexity change; KL is the mean per-token "
        "KL(reference ‖ stage). MiB: weight files (int4 codes only, for quantize).",
        "",
        stage_table(result),
        "",
        f"Build time of the whole chain: {sum(s.build_seconds for s in result.stages):.0f} s "
        f"wall, {sum(s.cpu_seconds for s in result.stages):.0f} s of CPU time (all threads; "
        "on a quiet 2-core machine the wall time lies between CPU/2 and CPU). "
        f"An unchanged rerun: {rerun_s:.1f} s wall "
        f"(`{rerun_line}`).",
        "",
        "## Distillation works",
        "",
        "The student keeps layers " + str(dm["student_layers"]) + " of the teacher's "
        f"{read_stage(a.out / 'teacher')['params']['num_layers']}. Same held-out windows:",
        "",
        "| model | perplexity | top-1 vs teacher | KL vs teacher |",
        "|---|---|---|---|",
        f"| teacher | {teacher_ppl:.2f} | – | – |",
        f"| student, distilled ({dm['step']} steps) | {dm['student_perplexity']:.2f} | "
        f"{dm['student_top1_agreement']:.3f} | {dm['student_mean_kl']:.4f} |",
        f"| same student from the teacher's layers, not distilled | "
        f"{dm['init_student_perplexity']:.2f} | {dm['init_student_top1_agreement']:.3f} | "
        f"{dm['init_student_mean_kl']:.4f} |",
        f"| same shape, random init, not trained | {dm['random_init_perplexity']:.2f} | "
        f"{dm['random_init_top1_agreement']:.3f} | {dm['random_init_mean_kl']:.4f} |",
    ]
    if trained:
        lines.append(
            f"| same shape, random init, same distillation budget | "
            f"{trained['student_perplexity']:.2f} | {trained['student_top1_agreement']:.3f} | "
            f"{trained['student_mean_kl']:.4f} |"
        )
    g = methods["group_size"]
    lines += [
        "",
        f"## AWQ vs RTN (group size {g}, symmetric, same calibration and held-out windows)",
        "",
        "Both quantize the quantize stage's input model; Δppl is against its fp32 perplexity "
        f"({methods['fp32']['perplexity']:.3f}).",
        "",
        "| method | perplexity | Δppl vs fp32 | top-1 vs fp32 | KL vs fp32 |",
        "|---|---|---|---|---|",
    ]
    for m in ("rtn", "awq"):
        r = methods[m]
        lines.append(
            f"| {m.upper()} | {r['perplexity']:.3f} | {r['perplexity_increase']:+.2%} | "
            f"{r['top1_agreement']:.3f} | {r['mean_kl']:.5f} |"
        )
    lines += [
        "",
        "## ONNX Runtime vs PyTorch logits",
        "",
        "| graph | reference | max abs logit diff | top-1 | mean KL |",
        "|---|---|---|---|---|",
    ]
    em = read_stage(a.out / "export")
    lines.append(
        f"| fp32 export (ORT) | fake-quant PyTorch model | "
        f"{em['metrics']['check_max_abs_logit_diff']:.2e} (atol "
        f"{em['params']['atol']:.0e}) | {em['metrics']['check_top1_agreement']:.4f} | "
        f"{em['metrics']['check_mean_kl']:.2e} |"
    )
    for s in result.stages:
        if not s.name.startswith("lower-"):
            continue
        lm = read_stage(s.path)["metrics"]
        v = s.quality["vs_input"]
        lines.append(
            f"| {s.name[6:]} int4 (ORT, fp32 activations) | fp32 export | "
            f"{lm['check_max_abs_logit_diff']:.2e} | {lm['check_top1_agreement']:.4f} "
            f"| {lm['check_mean_kl']:.2e} |"
        )
        lines.append(
            f"| {s.name[6:]} int4 (ORT as served) | fp32 export | "
            f"{v['max_abs_logit_diff']:.2e} | {v['top1_agreement']:.4f} | "
            f"{v['mean_kl']:.2e} |"
        )
    if "fuse" in by:
        v = by["fuse"].quality["vs_input"]
        lines.append(
            f"| fused: GroupQueryAttention + SkipSimplifiedLayerNorm (ORT, fp32 activations) "
            f"| lower-matmulnbits | {v['max_abs_logit_diff']:.2e} | {v['top1_agreement']:.4f} "
            f"| {v['mean_kl']:.2e} |"
        )
    lines += [
        "",
        "The fp32 export equals the quantized PyTorch model (fake-quant weights) within the "
        "export stage's atol; each int4 graph is built from the same integer codes and scales, "
        "so with fp32 activations it reproduces the fp32 export up to float rounding. As "
        "served, MatMulNBits runs accuracy level 4 (int8 activations), the held-out numbers "
        "above. The fuse stage rewrites the attention and norms of the MatMulNBits graph, not "
        "its weights: compared with its input at fp32 activations it must be exact (gated), "
        "and it is what the bundle serves.",
    ]
    a.doc.parent.mkdir(parents=True, exist_ok=True)
    png = a.doc.with_name("pipeline_perplexity.png")
    bars = {
        "teacher": teacher_ppl,
        "distilled student": dm["student_perplexity"],
        "baseline: undistilled student": dm["init_student_perplexity"],
    }
    if trained:
        bars["baseline: random init + same KD"] = trained["student_perplexity"]
    bars.update(
        {
            f"after {s.name}": s.quality["perplexity"]
            for s in result.stages
            if s.name in ("prune", "heal", "lower-matmulnbits")
        }
    )
    if plot(bars, png):
        lines += ["", f"![held-out perplexity per stage]({png.name})"]
    lines += [
        "",
        f"Bundle: `{result.bundle}` (`edge-runtime serve` with no `--bundle` serves "
        "this recipe's bundle).",
    ]
    a.doc.write_text("\n".join(lines) + "\n")
    print(f"wrote {a.doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
