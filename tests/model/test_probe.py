"""The probe on the real tiny model: a bundle reproduces its own reference; wrong references,
slow decoding and a missing reference fail with the numbers quoted."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from edge_runtime import signing
from edge_runtime.bundle.manifest import MANIFEST, verify_bundle, write_bundle
from edge_runtime.errors import BundleError, HealthCheckError
from edge_runtime.model import probe
from edge_runtime.model.generator import Generator

TEXT = [Path(asyncio.__file__).with_name("events.py").read_text()]


@pytest.fixture(scope="module")
def gen(tiny_bundle: Any) -> Generator:
    bundle = verify_bundle(tiny_bundle.path, [signing.load_public_key(tiny_bundle.pubkey)])
    g = Generator.from_bundle(bundle, threads=1)
    g.warmup()
    return g


@pytest.fixture(scope="module")
def reference(gen: Generator) -> dict[str, Any]:
    prompts, windows = probe.reference_inputs(gen.tokenizer.encode, TEXT, prompts=2,
                                              prompt_tokens=16, windows=1, window_tokens=32)
    return probe.make_reference(gen, prompts, windows, max_tokens=8)


LOOSE = probe.ProbeThresholds(max_ttft_ms=60_000, min_tokens_per_s=0.1)


def test_a_model_reproduces_its_reference(gen: Generator, reference: dict[str, Any]) -> None:
    r = probe.check(probe.measure(gen, reference), LOOSE)
    assert r.greedy_match == 1.0 and r.quality_drop is not None and r.quality_drop < 1e-6
    assert r.perplexity == pytest.approx(reference["perplexity"], rel=1e-6)
    assert r.ttft_ms > 0 and r.tokens_per_s > 0
    assert set(r.to_dict()) >= {"quality_drop", "ttft_ms", "tokens_per_s"}


def test_wrong_references_fail_with_the_numbers(gen: Generator,
                                                reference: dict[str, Any]) -> None:
    half = [{**p, "token_ids": p["token_ids"][:1] + [(t + 1) % 64 for t in p["token_ids"][1:]]}
            for p in reference["prompts"]]
    claimed = {**reference, "prompts": half, "perplexity": reference["perplexity"] * 0.8}
    r = probe.measure(gen, claimed)
    expected = len(half) / sum(len(p["token_ids"]) for p in half)
    assert r.greedy_match == pytest.approx(expected)
    assert r.quality_drop == pytest.approx(max(1 - expected, 0.25), rel=1e-4)
    with pytest.raises(HealthCheckError, match=r"greedy match 0\.\d+ < 0\.75; perplexity "):
        probe.check(r, LOOSE)


def test_latency_thresholds(gen: Generator, reference: dict[str, Any]) -> None:
    r = probe.measure(gen, reference)
    strict = probe.ProbeThresholds(max_ttft_ms=1e-6, min_tokens_per_s=1e9)
    with pytest.raises(HealthCheckError) as e:
        probe.check(r, strict)
    assert f"TTFT {r.ttft_ms:.1f} ms > 1e-06 ms" in str(e.value)
    assert f"decode {r.tokens_per_s:.1f} tokens/s < 1000000000.0" in str(e.value)


def test_no_reference(gen: Generator) -> None:
    r = probe.measure(gen, None)
    assert r.quality_drop is None and r.tokens_per_s > 0
    with pytest.raises(HealthCheckError, match=r"has no probe/reference\.json"):
        probe.check(r, LOOSE)
    relaxed = probe.ProbeThresholds(max_ttft_ms=60_000, min_tokens_per_s=0.1,
                                    require_reference=False)
    assert probe.check(r, relaxed) is r


def test_malformed_reference_and_short_text(tiny_bundle: Any, tmp_path: Path,
                                            gen: Generator) -> None:
    src = tiny_bundle.path
    fields = json.loads((src / MANIFEST).read_text())
    files = {rel: src / rel for rel in fields.pop("files")}
    del fields["schema_version"]
    bad = tmp_path / "ref.json"
    bad.write_text(json.dumps({"v": 1, "prompts": [{"prompt_ids": [1]}]}))
    files[probe.REFERENCE_FILE] = bad
    out = write_bundle(tmp_path / "b", files, fields, signing.load_private_key(tiny_bundle.key))
    bundle = verify_bundle(out, [signing.load_public_key(tiny_bundle.pubkey)])
    with pytest.raises(BundleError, match=r"probe/reference\.json is malformed"):
        probe.load_reference(bundle)
    with pytest.raises(BundleError, match=r"gives \d+ tokens; the probe needs 224"):
        probe.reference_inputs(gen.tokenizer.encode, ["x = 1"])
