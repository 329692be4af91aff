"""code_hash: a stage's cache key covers this project's code that the stage runs — its
modules and everything of ours they import, inside functions too — and nothing else, so an
edit reruns exactly the stages that can see it. Runs without torch (ast only)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from edge_build import code_hash

SRC = Path(__file__).resolve().parents[2] / "build" / "edge_build"


def test_closure_follows_our_imports_including_function_level_ones() -> None:
    mods = set(code_hash.closure(("edge_build.quantize",)))
    assert {"edge_build.quantize", "edge_build.awq", "edge_build.int4", "edge_build.lower"} <= mods
    assert {"edge_build.stage", "edge_runtime.errors", "edge_runtime.atomic"} <= mods
    # Not imported by it: other stages, the pipeline, the packages' re-exporting __init__s.
    assert not mods & {"edge_build.distill", "edge_build.pipeline", "edge_build.fuse"}
    assert not mods & {"edge_build", "edge_runtime", "edge_runtime.model.generator"}
    # package.py imports the corpus inside _probe_texts() only.
    assert "edge_build.corpus" in code_hash.closure(("edge_build.package",))
    teacher = set(code_hash.closure(("edge_build.teacher",)))
    assert "edge_build.local_lm" in teacher and "edge_build.package" not in teacher


def test_not_a_module_of_ours_is_refused() -> None:
    with pytest.raises(ValueError, match="'numpy' is not a module of edge_build"):
        code_hash.closure(("numpy",))


@pytest.fixture
def edited_tree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of edge_build that code_hash reads instead of the real one."""
    src = tmp_path / "edge_build"
    shutil.copytree(SRC, src)
    roots = {**code_hash._package_roots(), "edge_build": src}
    monkeypatch.setattr(code_hash, "_package_roots", lambda: roots)
    return src


def test_an_edit_changes_the_hash_of_exactly_the_stages_that_import_it(
    edited_tree: Path,
) -> None:
    stages = {
        name: [f"edge_build.{name}"] for name in ("teacher", "distill", "quantize", "fuse")
    }
    before = {s: code_hash.code_hash(m)["hash"] for s, m in stages.items()}
    assert before == {s: code_hash.code_hash(m)["hash"] for s, m in stages.items()}  # stable
    with open(edited_tree / "int4.py", "a") as f:  # quantize → awq → int4
        f.write("\n# an edit\n")
    after = {s: code_hash.code_hash(m)["hash"] for s, m in stages.items()}
    assert [s for s in stages if after[s] != before[s]] == ["quantize"]
    with open(edited_tree / "stage.py", "a") as f:  # every stage's record writer
        f.write("\n# an edit\n")
    again = {s: code_hash.code_hash(m)["hash"] for s, m in stages.items()}
    assert all(again[s] != after[s] for s in stages)


def test_wiring_functions_are_hashed_by_their_source() -> None:
    def wire_a(x: int) -> int:
        return x + 1

    def wire_b(x: int) -> int:
        return x + 2

    a = code_hash.code_hash(["edge_build.export"], [wire_a])
    b = code_hash.code_hash(["edge_build.export"], [wire_b])
    plain = code_hash.code_hash(["edge_build.export"])
    assert len({a["hash"], b["hash"], plain["hash"]}) == 3
    assert a["modules"] == plain["modules"]
