"""The daemon's cloud path end to end: uvicorn + scheduler + MQTT 5 (real Mosquitto) + a cloud
worker running the same bundle, called through the official openai client."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from live_server import serve_in_thread, wait_until
from mqtt_fixtures import Broker

from edge_runtime.api.app import create_app
from edge_runtime.bundle.manifest import verify_bundle
from edge_runtime.cloud.worker import CloudWorker
from edge_runtime.model.generator import Generator
from edge_runtime.model.sampling import SamplingParams
from edge_runtime.offload.breaker import BreakerConfig, CircuitBreaker
from edge_runtime.offload.client import OffloadClient
from edge_runtime.serving.cloud_view import cloud_state
from edge_runtime.serving.engine_loop import LocalWorker
from edge_runtime.serving.request import ModelInfo
from edge_runtime.serving.scheduler import Pressure, SchedulerConfig
from edge_runtime.signing import load_public_key

openai = pytest.importorskip("openai")
MESSAGES = [{"role": "user", "content": "def parse(text):"}]


class Switch:
    """Device pressure a test turns on and off (what telemetry reports on a Jetson)."""

    def __init__(self) -> None:
        self.memory = False

    def __call__(self) -> Pressure:
        return Pressure(memory=self.memory)


@pytest.fixture
def daemon(broker: Broker, tiny_bundle: Any) -> Iterator[tuple[str, Switch, OffloadClient]]:
    bundle = verify_bundle(tiny_bundle.path, [load_public_key(tiny_bundle.pubkey)])
    cloud = CloudWorker(broker.url, lambda: Generator.from_bundle(bundle, threads=1),
                        reconnect_min_s=0.1, reconnect_max_s=0.5)
    assert cloud.start(wait_s=10)
    client = OffloadClient(broker.url, "dev1", reconnect_min_s=0.1, reconnect_max_s=0.5,
                           breaker=CircuitBreaker(BreakerConfig(min_requests=1, open_s=0.5)))
    assert client.start(wait_s=10)
    cfg = SchedulerConfig(max_batch=2)
    switch = Switch()
    worker = LocalWorker(lambda: Generator.from_bundle(bundle, threads=1), cfg,
                         cloud=cloud_state(client, cfg), pressure=switch)
    app = create_app(worker, ModelInfo.from_bundle(bundle), offload=client)
    try:
        with serve_in_thread(app) as url:
            wait_until(lambda: worker.ready, timeout=60)
            yield url, switch, client
    finally:
        client.stop()
        cloud.stop()


def test_pressure_offloads_and_the_answer_matches_local(daemon, tiny_bundle) -> None:
    url, switch, _ = daemon
    body = {"model": "edge-demo", "messages": MESSAGES, "max_tokens": 20, "temperature": 0}
    local = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=30)
    assert local.status_code == 200 and local.headers["x-served-by"] == "local"
    switch.memory = True
    cloud = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=30)
    assert cloud.status_code == 200, cloud.text
    assert cloud.headers["x-served-by"] == "cloud"
    assert cloud.json()["choices"][0]["message"] == local.json()["choices"][0]["message"]
    assert cloud.json()["usage"] == local.json()["usage"]
    # The same through the openai client, streamed: the SSE relay of the cloud's chunks.
    oc = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
    parts = [c.choices[0].delta.content or "" for c in oc.chat.completions.create(
        model="edge-demo", messages=MESSAGES, max_tokens=20, temperature=0, stream=True)
        if c.choices]
    assert "".join(parts) == local.json()["choices"][0]["message"]["content"]
    # The worker coalesces tokens (8 a message by default): the relay turns each multi-token
    # chunk into one SSE delta, and the client reads an ordinary stream.
    assert len([p for p in parts if p]) < local.json()["usage"]["completion_tokens"]
    text = httpx.get(f"{url}/metrics").text
    assert 'edge_runtime_requests_total{endpoint="/v1/chat/completions",served_by="cloud"' \
        in text.replace(',status="200"', "")


def test_cloud_down_and_device_overloaded_is_an_explicit_503(daemon, broker) -> None:
    url, switch, client = daemon
    assert "edge_runtime_offload_available 1.0" in httpx.get(f"{url}/metrics").text
    switch.memory = True
    broker.kill()
    wait_until(lambda: not client.available(), timeout=2)
    assert "edge_runtime_offload_available 0.0" in httpx.get(f"{url}/metrics").text
    r = httpx.post(f"{url}/v1/chat/completions", timeout=10, json={
        "model": "edge-demo", "messages": MESSAGES, "max_tokens": 5})
    assert r.status_code == 503
    assert "cloud path is down" in r.json()["error"]["message"]
    assert int(r.headers["retry-after"]) >= 1
    # Pressure gone: local serving carries on while the broker is still dead.
    switch.memory = False
    r = httpx.post(f"{url}/v1/chat/completions", timeout=30, json={
        "model": "edge-demo", "messages": MESSAGES, "max_tokens": 5})
    assert r.status_code == 200 and r.headers["x-served-by"] == "local"


def test_concurrent_local_streams_are_batched(daemon, tiny_bundle) -> None:
    """Two streams at once decode in one batch and each gets its own greedy answer."""
    url, _, _ = daemon
    prompts = ["import os\n", "class Foo:\n    def "]
    bundle = verify_bundle(tiny_bundle.path, [load_public_key(tiny_bundle.pubkey)])
    ref_gen = Generator.from_bundle(bundle, threads=1)
    expected = [ref_gen.generate(ref_gen.text_prompt(p), SamplingParams(max_tokens=30,
                                 temperature=0.0)).text for p in prompts]
    results: dict[int, str] = {}

    def call(i: int) -> None:
        r = httpx.post(f"{url}/v1/completions", timeout=30, json={
            "model": "edge-demo", "prompt": prompts[i], "max_tokens": 30, "temperature": 0})
        results[i] = r.json()["choices"][0]["text"]

    threads = [threading.Thread(target=call, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert [results[0], results[1]] == expected
