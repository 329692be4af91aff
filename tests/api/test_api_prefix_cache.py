"""The prefix cache seen from outside: a daemon serving the tiny bundle, two chat requests
that share a long system prompt, the official `openai` client, and /metrics scraped."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from live_server import serve_in_thread, wait_until
from prometheus_client.parser import text_string_to_metric_families

from edge_runtime.api.app import create_app
from edge_runtime.bundle.manifest import verify_bundle
from edge_runtime.model.generator import Generator
from edge_runtime.model.prefix_cache import MIN_TOKENS
from edge_runtime.model.sampling import SamplingParams
from edge_runtime.serving.engine_loop import LocalWorker
from edge_runtime.serving.request import ModelInfo
from edge_runtime.serving.scheduler import SchedulerConfig
from edge_runtime.signing import trusted_keys

openai = pytest.importorskip("openai")

SYSTEM = ("You answer questions about Python code in one line. The code base reads "
          "configuration files, validates them and starts a server on a loopback port.")
BUDGET = 8 * 2**20


def _scrape(url: str) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics").text
    return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples
            if s.name.startswith("edge_runtime_prefix_cache_")}


def test_hits_misses_and_bytes_in_metrics(tiny_bundle: Any) -> None:
    bundle = verify_bundle(tiny_bundle.path, trusted_keys([tiny_bundle.pubkey]))
    worker = LocalWorker(lambda: Generator.from_bundle(bundle, threads=1),
                         SchedulerConfig(prefix_cache_bytes=BUDGET))
    reference = Generator.from_bundle(bundle, threads=1)  # no prefix cache
    questions = ["What does main do?", "Which port does the server use?"]
    with serve_in_thread(create_app(worker, ModelInfo.from_bundle(bundle))) as url:
        wait_until(lambda: worker.ready, timeout=60)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
        before = _scrape(url)
        assert before["edge_runtime_prefix_cache_budget_bytes"] == BUDGET
        assert before["edge_runtime_prefix_cache_hits_total"] == 0
        for q in questions:
            messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}]
            ids = reference.chat_prompt(messages)
            assert len(ids) > MIN_TOKENS + 1
            answer = client.chat.completions.create(
                model=bundle.manifest.name, messages=messages, max_tokens=12, temperature=0)
            want = reference.generate(ids, SamplingParams(max_tokens=12, temperature=0.0))
            assert answer.choices[0].message.content == want.text
        after = _scrape(url)
    assert after["edge_runtime_prefix_cache_misses_total"] == 1
    assert after["edge_runtime_prefix_cache_hits_total"] == 1
    assert after["edge_runtime_prefix_cache_hit_tokens_total"] >= MIN_TOKENS
    assert after["edge_runtime_prefix_cache_entries"] == 2
    assert after["edge_runtime_prefix_cache_evictions_total"] == 0
    gen = worker.generator
    assert isinstance(gen, Generator) and gen.prefix_cache is not None
    assert 0 < after["edge_runtime_prefix_cache_bytes"] == gen.prefix_cache.bytes <= BUDGET
