"""`edge-build run --recipe`: the demo recipe's chain on a tiny teacher — every stage measured
and recorded, an unchanged rerun runs nothing, a changed parameter reruns only what follows
it, and a too-tight threshold fails with one clear line and exit status 1 (the real CLI in a
subprocess)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from edge_build.pipeline import run_recipe  # noqa: E402
from edge_build.prune_target import mlp_ratio_for_target  # noqa: E402
from edge_build.quality import StageQualityError  # noqa: E402
from edge_build.recipe import load_recipe  # noqa: E402
from edge_build.stage import read_stage  # noqa: E402
from edge_runtime.bundle.manifest import Bundle, GraphSpec, verify_bundle  # noqa: E402
from edge_runtime.signing import load_public_key  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "models" / "demo.toml"
CHAIN = [
    "distill",
    "prune",
    "heal",
    "quantize",
    "export",
    "lower-matmulnbits",
    "lower-qdq",
    "fuse",
    "package",
]
# The demo recipe's stages and options at test size. Its distillation and healing gates
# assume the real budget (300 steps), so they are opened here; the others stay as shipped.
SMALL = [
    "data.eval_windows=4",
    "data.eval_tokens=64",
    "data.calib_windows=8",
    "distill.steps=6",
    "distill.batch_size=4",
    "distill.seq_len=64",
    "distill.warmup_steps=2",
    "prune.heal_steps=2",
    "draft.enabled=false",  # built by its own test, on a copy of this build
    "thresholds.distill.vs_teacher.min_top1=0",
    "thresholds.distill.vs_teacher.max_ppl_increase=inf",
    "thresholds.heal.vs_teacher.max_ppl_increase=inf",
    "thresholds.prune.vs_input.max_ppl_increase=inf",
]


def _sets(teacher: Path, data: Path) -> list[str]:
    return [f"source.path={teacher}", f'data.files=["{data}"]', *SMALL]


def _cli(args: list[str]) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "build")])}
    return subprocess.run(
        [sys.executable, "-m", "edge_build.cli", "run", "--no-progress", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        check=False,
    )


@pytest.fixture(scope="module")
def built(teacher_dirs: dict[str, Path], data_file: Path, tmp_path_factory: Any) -> Any:
    out = tmp_path_factory.mktemp("recipe") / "build"
    sets = _sets(teacher_dirs["qwen2"], data_file)
    result = run_recipe(load_recipe(DEMO, sets), out, progress=False)
    return out, sets, result


def test_every_stage_is_measured_and_the_bundle_carries_the_lineage(built: Any) -> None:
    out, _, result = built
    assert result.executed == CHAIN  # the teacher is a checkpoint: nothing to make
    for s in result.stages[:-1]:
        q = s.quality
        for side in ("vs_teacher", "vs_input"):
            assert set(q[side]) >= {"perplexity", "ppl_increase", "top1_agreement", "mean_kl"}
        assert q["windows"] == 4 and q["window_tokens"] == 64 and q["bytes"] > 0
        assert q["parameters"] > 0
        assert read_stage(out / s.name)["quality"] == q  # in the stage manifest
    by = {s.name: s.quality for s in result.stages}
    # Distillation halves the layers, pruning removes a quarter of the MLP channels.
    assert by["prune"]["parameters"] < by["distill"]["parameters"]
    # The 4-bit graph is what ships: far fewer bytes than the fp32 export of the same model.
    assert by["lower-matmulnbits"]["bytes"] < 0.5 * by["export"]["bytes"]
    # fp32 export of the fake-quant model ≡ the PyTorch model; int4 ONNX close to it.
    assert by["export"]["vs_input"]["max_abs_logit_diff"] < 1e-3
    assert by["lower-matmulnbits"]["vs_input"]["top1_agreement"] > 0.9

    pub = load_public_key(out / "signing.pub")
    bundle = verify_bundle(result.bundle, [pub])
    stages = bundle.manifest.build["stages"]
    assert [s["stage"] for s in stages] == [
        "distill",
        "prune",
        "heal",
        "quantize",
        "export",
        "lower",
        "fuse",
    ]
    assert all("quality" in s and "cache_key" in s and "code" in s for s in stages)
    assert json.loads((out / "pipeline.json").read_text())["bundle"] == str(result.bundle)


def test_the_bundle_serves_the_fused_graph_and_passes_its_own_probe(built: Any) -> None:
    out, _, result = built
    by = {s.name: s.quality for s in result.stages}
    fused = by["fuse"]
    # Exact rewrite: against its input with fp32 activations on both sides...
    assert fused["vs_input"]["activations"] == "fp32"
    assert fused["vs_input"]["max_abs_logit_diff"] < 1e-4
    assert fused["vs_input"]["top1_agreement"] == 1.0
    # ...and as served (int8 activations) as close to the teacher as the graph it fused.
    lowered = by["lower-matmulnbits"]["vs_teacher"]
    assert abs(fused["vs_teacher"]["top1_agreement"] - lowered["top1_agreement"]) < 0.02
    assert abs(fused["perplexity"] / by["lower-matmulnbits"]["perplexity"] - 1) < 0.01
    layers = json.loads((out / "fuse" / "config.json").read_text())["num_hidden_layers"]
    metrics = read_stage(out / "fuse")["metrics"]
    assert metrics["GroupQueryAttention"] == layers

    bundle = verify_bundle(result.bundle, [load_public_key(out / "signing.pub")])
    graph = bundle.manifest.graphs["decoder"]
    assert graph.right_padded_batch and not graph.left_padded_batch
    assert graph.weights["dtype"] == "int4" and graph.weights["format"] == "MatMulNBits"
    assert graph.weights["method"] == "awq" and graph.weights["accuracy_level"] == 4
    # probe/reference.json was written from the fused graph: the bundle reproduces it.
    from edge_runtime.model import probe
    got = probe.probe_bundle(bundle, probe.ProbeThresholds(max_ttft_ms=60_000), threads=1)
    assert got.greedy_match == 1.0 and got.quality_drop is not None and got.quality_drop < 1e-3



def test_the_bundle_carries_the_qdq_graph_tensorrt_builds_from(
    built: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """package.tensorrt_graph (on in the demo recipe): the QDQ lowering ships as decoder_trt,
    with the decoder's tensors and its own padding side. TensorRT's graph choice picks it,
    and a Generator whose engine runs it (ONNX Runtime here, standing in for the engine that
    reads it; no TensorRT on this machine) batches it left-padded, tokens unchanged."""
    from edge_runtime.engines.ort import OrtEngine
    from edge_runtime.engines.trt_cache import select_graph
    from edge_runtime.engines.trt_plan import same_interface
    from edge_runtime.model import generator as generator_mod
    from edge_runtime.model.generator import Generator
    from edge_runtime.model.sampling import SamplingParams

    out, _, result = built
    bundle = verify_bundle(result.bundle, [load_public_key(out / "signing.pub")])
    graphs = bundle.manifest.graphs
    trt = graphs["decoder_trt"]
    assert trt.file == "model/decoder_trt.onnx" and trt.last_token_logits
    assert trt.weights["dtype"] == "int4" and trt.weights["format"] == "qdq"
    assert trt.left_padded_batch and not trt.right_padded_batch  # decomposed attention
    assert same_interface(graphs["decoder"], trt)
    assert select_graph(bundle.manifest) == ("decoder_trt", trt)

    engines: list[OrtEngine] = []

    def qdq_engine(bundle: Bundle, graph: str = "decoder", backend: str = "auto",
                   threads: int | None = None) -> tuple[OrtEngine, GraphSpec]:
        # What load_engine returns when a TensorRT plan of the QDQ graph exists.
        engine = OrtEngine(str(bundle.path(trt.file)), threads=1)
        engines.append(engine)
        return engine, trt

    monkeypatch.setattr(generator_mod, "load_engine", qdq_engine)
    gen = Generator.from_bundle(bundle)
    assert gen.graph is trt  # batches padded the way the graph it runs needs
    params = SamplingParams(max_tokens=12, temperature=0.0)
    prompts = [gen.text_prompt(t) for t in ("def main():", "import os", "class Foo(object):")]
    alone = [gen.generate(p, params).token_ids for p in prompts]
    dec = gen.batch(3)
    ids: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        ids[i] = [t for c in dec.add(i, p, params) for t in c.token_ids]
    while dec.active:
        for k, chunks in dec.step().items():
            ids[k] += [t for c in chunks for t in c.token_ids]
    assert [ids[i] for i in range(3)] == alone
    assert engines and all(alone)


def test_a_fusion_outside_its_tolerance_is_a_stage_quality_error(built: Any) -> None:
    out, sets, _ = built
    got = read_stage(out / "fuse")["quality"]["vs_input"]["max_abs_logit_diff"]
    assert got > 0  # float reassociation: close, and measured, but not bit-equal
    tight = [*sets, f"thresholds.fuse.vs_input.max_abs_logit_diff={got / 2}"]
    with pytest.raises(
        StageQualityError,
        match=r"stage fuse .* max \|Δlogit\| vs input \(fp32 activations\) [\d.e-]+ > "
        r"max_abs_logit_diff",
    ):
        run_recipe(load_recipe(DEMO, tight), out, progress=False)  # cached: gated as stored


def test_fuse_disabled_ships_todays_unfused_graph(built: Any, tmp_path: Path) -> None:
    import onnx

    out, sets, _ = built
    copy = tmp_path / "build"
    shutil.copytree(out, copy)
    plain = run_recipe(load_recipe(DEMO, [*sets, "fuse.enabled=false"]), copy, progress=False)
    assert plain.executed == ["package"]  # every stage before it is reused
    assert [s.name for s in plain.stages][-2:] == ["lower-qdq", "package"]
    bundle = verify_bundle(plain.bundle, [load_public_key(copy / "signing.pub")])
    graph = bundle.manifest.graphs["decoder"]
    assert graph.left_padded_batch and not graph.right_padded_batch
    ops = {n.op_type for n in onnx.load(str(plain.bundle / graph.file)).graph.node}
    assert "GroupQueryAttention" not in ops and "MatMulNBits" in ops
    assert [s["stage"] for s in bundle.manifest.build["stages"]][-1] == "lower"


def test_fp16_activations_ship_a_float16_fused_graph(built: Any, tmp_path: Path) -> None:
    """fuse.activations = "float16" (a GPU's bundle): only stage fp16 and package run; the
    bundle's graph takes and returns float16 (cache, logits), the manifest says so, the
    stage is measured against its float32 input and gated, and the bundle decodes."""
    from edge_runtime.model.generator import Generator
    from edge_runtime.model.sampling import SamplingParams

    out, sets, _ = built
    copy = tmp_path / "build"
    shutil.copytree(out, copy)
    # The QDQ graph TensorRT builds from keeps float32 tensors: not shipped beside it.
    half = ["fuse.activations=float16", "package.tensorrt_graph=false"]
    res = run_recipe(load_recipe(DEMO, [*sets, *half]), copy, progress=False)
    assert res.executed == ["fp16", "package"]
    by = {s.name: s for s in res.stages}
    assert by["fp16"].quality["vs_input"]["top1_agreement"] >= 0.9
    rec = read_stage(copy / "fp16")
    assert rec["input"]["stage"] == "fuse"
    assert rec["metrics"]["kv_dtype"] == rec["metrics"]["logits_dtype"] == "float16"
    assert rec["metrics"]["check_top1"] >= 0.9
    bundle = verify_bundle(res.bundle, [load_public_key(copy / "signing.pub")])
    graph = bundle.manifest.graphs["decoder"]
    assert graph.kv_cache is not None and graph.kv_cache.dtype == "float16"
    assert graph.right_padded_batch  # still the fused graph
    assert [s["stage"] for s in bundle.manifest.build["stages"]][-2:] == ["fuse", "fp16"]
    fp32 = verify_bundle(out / "bundle", [load_public_key(out / "signing.pub")])
    gen, ref = Generator.from_bundle(bundle), Generator.from_bundle(fp32)
    assert gen.logits_dtype == "float16"
    ids = gen.text_prompt("def main(argv):\n    ")
    params = SamplingParams(max_tokens=12, temperature=0.0)
    got, want = gen.generate(ids, params).token_ids, ref.generate(ids, params).token_ids
    assert len(got) == 12 and got[:4] == want[:4]  # float16 may flip a later near tie


def test_fp16_activations_apply_to_the_draft_graph_too(built: Any, tmp_path: Path) -> None:
    """The draft runs beside the decoder on the same GPU: it gets its own draft-fp16 stage,
    a float16 cache in the manifest, and speculation keeps greedy tokens identical."""
    from edge_runtime.model.generator import Generator
    from edge_runtime.model.sampling import SamplingParams

    out, sets, _ = built
    copy = tmp_path / "build"
    shutil.copytree(out, copy)
    small = ["draft.enabled=true", "draft.steps=4", "draft.batch_size=4", "draft.seq_len=64",
             "draft.warmup_steps=2", "fuse.activations=float16", "package.tensorrt_graph=false"]
    res = run_recipe(load_recipe(DEMO, [*sets, *small]), copy, progress=False)
    assert res.executed[-3:] == ["draft-fuse", "draft-fp16", "package"]
    assert "fp16" in res.executed
    bundle = verify_bundle(res.bundle, [load_public_key(copy / "signing.pub")])
    graphs = bundle.manifest.graphs
    for name in ("decoder", "draft"):
        kv = graphs[name].kv_cache
        assert kv is not None and kv.dtype == "float16"
    gen, plain = Generator.from_bundle(bundle), Generator.from_bundle(bundle, speculative=False)
    assert gen.speculative
    ids = gen.text_prompt("def main(argv):\n    ")
    params = SamplingParams(max_tokens=16, temperature=0.0)
    assert gen.generate(ids, params).token_ids == plain.generate(ids, params).token_ids


def test_draft_enabled_builds_the_draft_chain_and_ships_it(built: Any, tmp_path: Path) -> None:
    """[draft] (on in the demo recipe): the served model's stages are reused, the draft's run
    under draft- names, and the bundle's draft graph speculates with identical greedy tokens."""
    from edge_runtime.model.generator import Generator
    from edge_runtime.model.sampling import SamplingParams

    out, sets, _ = built
    copy = tmp_path / "build"
    shutil.copytree(out, copy)
    small = ["draft.enabled=true", "draft.steps=4", "draft.batch_size=4", "draft.seq_len=64",
             "draft.warmup_steps=2"]
    res = run_recipe(load_recipe(DEMO, [*sets, *small]), copy, progress=False)
    assert res.executed == ["draft", "draft-quantize", "draft-export",
                            "draft-lower-matmulnbits", "draft-fuse", "package"]
    by = {s.name: s for s in res.stages}
    # The draft starts from a quarter of the served model's layers; it is measured against
    # the served model (its input), which is what speculation's acceptance follows.
    served = json.loads((copy / "heal" / "config.json").read_text())["num_hidden_layers"]
    drafted = json.loads((copy / "draft" / "config.json").read_text())["num_hidden_layers"]
    assert drafted == max(1, served // 4) < served
    assert read_stage(copy / "draft")["input"]["stage"] == "heal"
    assert by["draft"].quality["vs_input"]["top1_agreement"] > 0
    bundle = verify_bundle(res.bundle, [load_public_key(copy / "signing.pub")])
    graphs = bundle.manifest.graphs
    assert graphs["draft"].kv_cache is not None
    assert graphs["draft"].kv_cache.num_layers == drafted
    assert graphs["decoder"].logits_window == "logits_start"
    assert graphs["decoder_trt"].logits_window is None  # TensorRT serves without a draft
    assert [s["stage"] for s in bundle.manifest.build["draft"]["stages"]][-6:] == [
        "heal", "draft", "quantize", "export", "lower", "fuse"]
    gen, plain = Generator.from_bundle(bundle), Generator.from_bundle(bundle, speculative=False)
    assert gen.speculative and not plain.speculative
    ids = gen.text_prompt("def main(argv):\n    ")
    params = SamplingParams(max_tokens=24, temperature=0.0)
    assert gen.generate(ids, params).token_ids == plain.generate(ids, params).token_ids


def test_a_changed_stage_module_reruns_that_stage_and_what_follows(
    built: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Same recipe, same inputs, one edited line in fuse.py: the cache must not hand back
    the artifact the old code made."""
    from edge_build import code_hash

    out, sets, _ = built
    copy = tmp_path / "build"
    shutil.copytree(out, copy)
    src = tmp_path / "src" / "edge_build"
    shutil.copytree(ROOT / "build" / "edge_build", src)
    with open(src / "fuse.py", "a") as f:
        f.write("\n# an edit\n")
    roots = {**code_hash._package_roots(), "edge_build": src}
    monkeypatch.setattr(code_hash, "_package_roots", lambda: roots)
    again = run_recipe(load_recipe(DEMO, sets), copy, progress=False)
    assert again.executed == ["fuse", "package"]
    assert read_stage(copy / "fuse")["code"]["hash"] != read_stage(out / "fuse")["code"]["hash"]


def test_rerun_is_cached_and_a_change_reruns_only_what_follows(built: Any) -> None:
    out, sets, _ = built
    started = time.time()
    done = _cli(["--recipe", str(DEMO), "--out", str(out), *[f"--set={s}" for s in sets]])
    elapsed = time.time() - started
    assert done.returncode == 0, done.stderr
    assert "ran: nothing (all cached)" in done.stdout
    assert elapsed < 30, elapsed  # seconds, not minutes, even on a loaded 2-core machine

    changed = run_recipe(load_recipe(DEMO, [*sets, "prune.mlp_ratio=0.5"]), out, progress=False)
    assert changed.executed == CHAIN[1:]  # distillation's output is reused
    assert (
        read_stage(out / "prune")["quality"]["parameters"]
        < read_stage(out / "distill")["quality"]["parameters"]
    )
    # A parameter of the last model-space stage reruns only the ONNX side.
    again = run_recipe(
        load_recipe(DEMO, [*sets, "prune.mlp_ratio=0.5", "lower.accuracy_level=0"]),
        out,
        progress=False,
    )
    assert again.executed == ["lower-matmulnbits", "lower-qdq", "fuse", "package"]


def test_too_tight_threshold_fails_with_one_clear_line(built: Any) -> None:
    out, sets, _ = built
    done = _cli(
        [
            "--recipe",
            str(DEMO),
            "--out",
            str(out),
            *[f"--set={s}" for s in sets],
            "--set",
            "thresholds.quantize.vs_input.max_kl=0",
        ]
    )
    assert done.returncode == 1
    line = done.stderr.strip().splitlines()[-1]
    assert line.startswith("edge-build run: error: stage quantize fails the recipe's thresholds")
    assert "mean KL vs input" in line and "> max_kl 0.0" in line and "held-out perplexity" in line
    assert "Traceback" not in done.stderr


def test_a_failed_gate_keeps_its_measurement_for_a_looser_rerun(built: Any) -> None:
    out, sets, _ = built
    tight = [*sets, "distill.temperature=1.5", "thresholds.distill.vs_teacher.max_kl=0"]
    with pytest.raises(StageQualityError, match=r"stage distill .* mean KL vs teacher [\d.]+ > "):
        run_recipe(load_recipe(DEMO, tight), out, progress=False)
    loose = run_recipe(load_recipe(DEMO, [*sets, "distill.temperature=1.5"]), out, progress=False)
    assert loose.executed == CHAIN[1:]  # distill was built and measured once, by the first run


def test_parameter_target_sets_the_mlp_width(teacher_dirs: dict[str, Path]) -> None:
    teacher = teacher_dirs["qwen2"]
    cfg = json.loads((teacher / "config.json").read_text())
    layers, hidden, inter = (
        cfg[k] for k in ("num_hidden_layers", "hidden_size", "intermediate_size")
    )
    from edge_build.quality import parameter_count

    now = parameter_count(teacher)
    assert now is not None
    target = now - layers * 3 * hidden * 32  # 32 channels fewer per layer
    assert round(inter * (1 - mlp_ratio_for_target(teacher, target, 0.0, 0))) == inter - 32
    from edge_build.stage import StageError

    with pytest.raises(StageError, match=r"target_parameters=1,000 cannot be met"):
        mlp_ratio_for_target(teacher, 1000, 0.0, 0)
