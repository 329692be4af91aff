"""The [draft] recipe table and the draft graph's packaging: the layers a draft starts from,
the recipe's refusals, and a bundle that refuses a draft with another tokenizer."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from edge_build.draft import default_layers
from edge_build.recipe import RecipeError, load_recipe
from edge_build.stage import StageError

MODELS = Path(__file__).resolve().parents[2] / "models"


def test_default_layers_are_a_quarter_spread_over_the_depth() -> None:
    assert default_layers(1) == (0,)
    assert default_layers(2) == (0,)
    assert default_layers(8) == (0, 4)
    assert default_layers(24) == (0, 4, 8, 12, 16, 20)


def test_shipped_recipes_build_a_draft() -> None:
    demo = load_recipe(MODELS / "demo.toml")
    assert demo.draft.enabled and demo.draft.layers == "auto" and demo.draft.steps > 0
    pair = load_recipe(MODELS / "speculative-pair.toml")
    assert pair.draft.enabled and pair.draft.layers == (0,)
    assert pair.source.teacher is not None and pair.source.teacher.num_layers == 8


@pytest.mark.parametrize(("sets", "match"), [
    (["draft.layers=\"half\""], r"'draft\.layers' must be \"auto\", \"every_other\" or a list"),
    (["draft.steps=0"], r"'draft\.steps' must be >= 1, got 0"),
    (["thresholds.draft-fuse.vs_input.min_top1=2"], r"min_top1' must be in \[0, 1\]"),
])
def test_bad_draft_settings_are_refused(sets: list[str], match: str) -> None:
    with pytest.raises(RecipeError, match=match):
        load_recipe(MODELS / "demo.toml", sets)


def test_a_draft_with_another_tokenizer_is_refused(tiny_bundle, tmp_path: Path) -> None:
    pytest.importorskip("torch")  # packaging is the pipeline's ([build]): not on the device leg
    from edge_build import package

    draft = tmp_path / "draft"
    shutil.copytree(tiny_bundle.work / "int4", draft)
    tok = draft / "tokenizer.json"
    tok.write_text(tok.read_text().replace('"<|endoftext|>"', '"<|end|>"', 1))
    assert tok.read_bytes() != (tiny_bundle.work / "int4" / "tokenizer.json").read_bytes()
    with pytest.raises(StageError, match=r"tokenizer\.json differs from the decoder's"):
        package.run(tiny_bundle.work / "int4", tmp_path / "bundle", tiny_bundle.key,
                    name="x", version="1", draft_dir=draft, probe_spec=None)
    assert not (tmp_path / "bundle").exists()
