"""The daemon serving a bundle with a draft graph: requests at batch 1 are decoded
speculatively, answers equal plain greedy decoding, and /metrics counts drafted and
accepted tokens (the acceptance rate is their ratio)."""

from __future__ import annotations

import httpx
import pytest
from live_server import serve_in_thread, wait_until
from prometheus_client.parser import text_string_to_metric_families

from edge_runtime.api.app import create_app
from edge_runtime.bundle.manifest import verify_bundle
from edge_runtime.model.generator import Generator
from edge_runtime.model.sampling import SamplingParams
from edge_runtime.serving.engine_loop import LocalWorker
from edge_runtime.serving.request import ModelInfo
from edge_runtime.signing import trusted_keys

openai = pytest.importorskip("openai")


def _counters(url: str) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics").text
    return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples
            if s.name.startswith("edge_runtime_speculative_")}


def test_served_speculatively_with_identical_greedy_text(spec_bundles, tiny_bundle) -> None:
    bundle = verify_bundle(spec_bundles["fused"], trusted_keys([tiny_bundle.pubkey]))
    prompt = "import os\nimport sys\n\nclass Reader:\n    def __init__(self, path):\n"
    plain = Generator.from_bundle(bundle, threads=1, speculative=False)
    want = plain.generate(plain.text_prompt(prompt),
                          SamplingParams(max_tokens=40, temperature=0.0))
    worker = LocalWorker(lambda: Generator.from_bundle(bundle, threads=1))
    with serve_in_thread(create_app(worker, ModelInfo.from_bundle(bundle))) as url:
        wait_until(lambda: worker.ready, timeout=60)
        before = _counters(url)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
        got = client.completions.create(model=bundle.manifest.name, prompt=prompt,
                                        max_tokens=40, temperature=0)
        after = _counters(url)
    assert got.choices[0].text == want.text
    drafted = after["edge_runtime_speculative_draft_tokens_total"] - before.get(
        "edge_runtime_speculative_draft_tokens_total", 0.0)
    accepted = after["edge_runtime_speculative_accepted_tokens_total"] - before.get(
        "edge_runtime_speculative_accepted_tokens_total", 0.0)
    assert drafted > 0 and 0 <= accepted <= drafted
