"""max_batch chosen by measurement, seen from outside: a daemon serving the tiny bundle with
the default configuration answers concurrent requests from the official `openai` client, and
/metrics says what was chosen and why (serving/capacity.py)."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest
from live_server import serve_in_thread, wait_until
from prometheus_client.parser import text_string_to_metric_families

from edge_runtime.api.app import create_app
from edge_runtime.bundle.manifest import verify_bundle
from edge_runtime.model.generator import Generator
from edge_runtime.serving.engine_loop import LocalWorker
from edge_runtime.serving.request import ModelInfo
from edge_runtime.serving.scheduler import SchedulerConfig
from edge_runtime.signing import trusted_keys

openai = pytest.importorskip("openai")

CONCURRENT = 8


def _samples(url: str) -> list[tuple[str, dict[str, str], float]]:
    text = httpx.get(f"{url}/metrics").text
    return [(s.name, s.labels, s.value) for f in text_string_to_metric_families(text)
            for s in f.samples]


def test_measured_max_batch_in_metrics_and_concurrent_requests_answered(tiny_bundle: Any) -> None:
    bundle = verify_bundle(tiny_bundle.path, trusted_keys([tiny_bundle.pubkey]))
    worker = LocalWorker(lambda: Generator.from_bundle(bundle, threads=1), SchedulerConfig())
    with serve_in_thread(create_app(worker, ModelInfo.from_bundle(bundle))) as url:
        wait_until(lambda: worker.ready, timeout=60)
        cap = worker.capacity
        assert cap is not None and cap.bound != "config" and cap.max_batch >= CONCURRENT
        samples = _samples(url)
        [(labels, batch)] = [(lab, v) for n, lab, v in samples if n == "edge_runtime_max_batch"]
        assert batch == cap.max_batch and labels == {"bound": cap.bound}
        [queue] = [v for n, _, v in samples if n == "edge_runtime_max_queue"]
        assert queue == 16 * cap.max_batch
        steps = {lab["batch"]: v for n, lab, v in samples
                 if n == "edge_runtime_capacity_step_seconds"}
        assert steps == {str(b): pytest.approx(s) for b, s in cap.step_s.items()}
        [target] = [v for n, _, v in samples if n == "edge_runtime_capacity_step_target_seconds"]
        assert target == pytest.approx(0.1)  # the default step_latency_target_ms
        kv = dict((n, v) for n, _, v in samples if n.startswith("edge_runtime_kv_cache_"))
        assert kv["edge_runtime_kv_cache_bytes_per_sequence"] == cap.kv_bytes_per_seq > 0
        assert kv["edge_runtime_kv_cache_memory_bytes"] > 0

        async def ask_together() -> list[str]:
            client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
            answers = await asyncio.gather(*(
                client.chat.completions.create(
                    model=bundle.manifest.name, max_tokens=16, temperature=0,
                    messages=[{"role": "user", "content": f"Count to {i}."}])
                for i in range(CONCURRENT)))
            await client.close()
            return [a.choices[0].message.content or "" for a in answers]

        texts = asyncio.run(ask_together())
    assert len(texts) == CONCURRENT and all(texts)
