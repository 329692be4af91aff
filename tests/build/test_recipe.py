"""Recipe files: the shipped recipes load, and every mistake is a RecipeError naming the key
and the file. No torch needed: this runs on the device leg too."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_build.recipe import Gate, RecipeError, load_recipe

MODELS = Path(__file__).resolve().parents[2] / "models"


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "r.toml"
    p.write_text(text)
    return p


def test_shipped_recipes_load(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    demo = load_recipe(MODELS / "demo.toml")
    assert demo.source.teacher is not None and demo.source.path is None
    assert demo.source.teacher.num_layers == 4 and demo.distill.layers == "every_other"
    assert demo.prune.mlp_ratio == 0.25 and demo.quantize.method == "awq"
    assert demo.data.files == ()  # the stdlib corpus
    assert demo.package.name == "edge-demo"
    assert demo.fuse.enabled and demo.fuse.atol <= 1e-4  # the served bundle is fused

    monkeypatch.setenv("EDGE_R1_1P5B", "/models/r1")
    monkeypatch.setenv("EDGE_R1_DATA", "/data/r1.jsonl")
    r1 = load_recipe(MODELS / "deepseek-r1-distill-qwen-1.5b.toml")
    assert r1.source.path == Path("/models/r1") and r1.data.files == (Path("/data/r1.jsonl"),)
    assert round(8960 * (1 - r1.prune.mlp_ratio)) == 6144  # the documented student width
    assert r1.quantize.group_size == 128 and r1.lower.formats == ("matmulnbits", "qdq")
    assert r1.gates("quantize").vs_input == Gate(max_ppl_increase=0.05, min_top1=0.90)
    assert r1.gates("teacher").vs_teacher == Gate()  # no table: no bounds
    assert r1.fuse.enabled and r1.fuse.max_positions is None  # → package.context_length
    assert r1.package.context_length == 4096


def test_overrides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    r = load_recipe(
        MODELS / "deepseek-r1-distill-qwen-1.5b.toml",
        [
            "source.path=ckpt",  # a bare string; relative to the working directory
            'data.files=["a.jsonl", "/abs/b.txt"]',
            "distill.layers=[0, 3, 5]",
            "distill.steps=7",
            "thresholds.prune.vs_teacher.min_top1=0.5",
            "lower.formats=['matmulnbits']",
            "package.tensorrt_graph=false",  # it needs the qdq lowering
            "package.version=1.0",  # TOML would read a float; the field is a string
        ],
    )
    assert r.package.version == "1.0"
    assert r.source.path == tmp_path / "ckpt"
    assert r.data.files == (tmp_path / "a.jsonl", Path("/abs/b.txt"))
    assert r.distill.layers == (0, 3, 5) and r.distill.steps == 7
    assert r.gates("prune").vs_teacher.min_top1 == 0.5
    assert r.lower.formats == ("matmulnbits",)


@pytest.mark.parametrize(
    ("text", "sets", "message"),
    [
        ("[distill]\nstepz = 3\n", [], r"r\.toml: unknown key 'distill\.stepz' \(known here: "),
        ("[source.teacher]\nlayerz = 2\n", [], r"unknown key 'source\.teacher\.layerz'"),
        ("[bogus]\n", [], r"unknown key 'bogus'"),
        ("", ["distill.stepz=1"], r"unknown key 'distill\.stepz'"),
        ("[thresholds.distil.vs_teacher]\n", [], r"unknown key 'thresholds\.distil' \(stages: "),
        ("[thresholds.prune.vs_teacher]\nmin_topone = 1\n", [], r"'thresholds\.prune\.vs_t"),
        ('[distill]\nsteps = "many"\n', [], r"'distill\.steps' must be int, got 'many'"),
        ("[quantize]\nmethod = 'gptq'\n", [], r"'quantize\.method' must be \"awq\" or \"rtn\""),
        ("[lower]\nformats = ['gguf']\n", [], r"'lower\.formats' must list some of"),
        ("[distill]\nlayers = 'odd'\n", [], r"'distill\.layers' must be \"every_other\" or"),
        ("[data]\nheldout_share = 1.5\n", [], r"'data\.heldout_share' must be in \(0, 1\)"),
        ("[thresholds.quantize.vs_input]\nmin_top1 = 2\n", [], r"min_top1' must be in \[0, 1\]"),
        ("[source]\npath = '$EDGE_NOT_SET_X'\n", [], r"environment variable EDGE_NOT_SET_X"),
        ("x = [\n", [], r"r\.toml is not valid TOML"),
        ("", ["novalue"], r"--set 'novalue': expected KEY=VALUE"),
        ("", ["source.path.x=1"], r"source\.path is not a table"),
        ("[fuse]\nmax_positions = 0\n", [], r"'fuse\.max_positions' must be >= 1, got 0"),
        ("", ["fuse.atol=0"], r"'fuse\.atol' must be > 0, got 0\.0"),
        ("", ["package.tensorrt_graph=true", 'lower.formats=["matmulnbits"]'],
         r"'package\.tensorrt_graph' needs \"qdq\""),
        ("", ["fuse.enabled=yes"], r"'fuse\.enabled' must be bool, got 'yes'"),
        ("[thresholds.fuse.vs_input]\nmax_abs_logit_diff = 'tiny'\n", [], r"max_abs_logit"),
        ("[fuse]\nactivations = 'fp16'\n", [], r"'fuse\.activations' must be one of \('float32"),
        ("", ["fuse.enabled=false", "fuse.activations=float16"],
         r"'fuse\.activations' = \"float16\" needs fuse\.enabled = true"),
        ("", ["fuse.activations=float16", "package.tensorrt_graph=true",
              'lower.formats=["matmulnbits", "qdq"]'],
         r"'fuse\.activations' = \"float16\" and 'package\.tensorrt_graph' = true"),
    ],
)
def test_mistakes_are_named_errors(tmp_path: Path, text: str, sets: list, message: str) -> None:
    body = text if "[source" in text else "[source]\npath = '/m'\n" + text
    with pytest.raises(RecipeError, match=message):
        load_recipe(_write(tmp_path, body), sets)


def test_source_needs_exactly_one_teacher(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match=r"exactly one of 'source\.path'"):
        load_recipe(_write(tmp_path, "[distill]\nsteps = 1\n"))
    both = "[source]\npath = '/m'\n[source.teacher]\nnum_layers = 2\n"
    with pytest.raises(RecipeError, match=r"exactly one of 'source\.path'"):
        load_recipe(_write(tmp_path, both))
    with pytest.raises(RecipeError, match=r"cannot read recipe .*nope\.toml"):
        load_recipe(tmp_path / "nope.toml")


def test_serve_default_is_the_demo_recipe() -> None:
    from edge_build.demo import demo_recipe

    assert demo_recipe() == MODELS / "demo.toml"
