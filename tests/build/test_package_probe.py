"""package.py writes the quality probe into the signed bundle, and a device reproduces it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("torch")

from edge_build import package
from edge_build.stage import StageError
from edge_runtime import signing
from edge_runtime.bundle.manifest import MANIFEST, verify_bundle
from edge_runtime.model import probe

TEXT = [Path(json.__file__).with_name("decoder.py").read_text()]


def test_probe_reference_is_signed_and_reproduced(tiny_bundle, tmp_path: Path) -> None:
    spec = package.ProbeSpec(prompts=2, prompt_tokens=16, max_tokens=8, windows=1,
                             window_tokens=32)
    out = package.run(tiny_bundle.work / "int4", tmp_path / "b", tiny_bundle.key, name="p",
                      version="1", probe_texts=TEXT, probe_spec=spec)
    bundle = verify_bundle(out, [signing.load_public_key(tiny_bundle.pubkey)])
    assert probe.REFERENCE_FILE in bundle.manifest.files  # hashed and signed with the rest
    ref = probe.load_reference(bundle)
    assert ref is not None and len(ref["prompts"]) == 2 and len(ref["windows"][0]) == 32
    assert all(len(p["token_ids"]) <= 8 for p in ref["prompts"])
    record = bundle.manifest.build["package"]["probe"]
    assert record["perplexity"] == ref["perplexity"] > 1
    result = probe.probe_bundle(bundle, probe.ProbeThresholds(max_ttft_ms=60_000))
    assert result.greedy_match == 1.0 and result.quality_drop is not None
    assert result.quality_drop < 1e-3 and result.tokens_per_s > 0


def test_probe_can_be_left_out_and_needs_enough_text(tiny_bundle, tmp_path: Path) -> None:
    out = package.run(tiny_bundle.work / "int4", tmp_path / "b", tiny_bundle.key, name="p",
                      version="1", probe_spec=None)
    assert probe.REFERENCE_FILE not in json.loads((out / MANIFEST).read_text())["files"]
    with pytest.raises(StageError, match=r"quality probe: held-out text gives \d+ tokens"):
        package.run(tiny_bundle.work / "int4", tmp_path / "c", tiny_bundle.key, name="p",
                    version="1", probe_texts=["def f(): pass"])
