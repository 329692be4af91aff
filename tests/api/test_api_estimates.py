"""Through a real uvicorn server: a refusal reaches the official openai client at once when
retrying cannot help, says when capacity returns, a stream its client abandons is logged as
such, and /metrics shows the rates the scheduler decides with."""

from __future__ import annotations

import io
import json
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlsplit

import httpx
import pytest
from live_server import FakeGenerator, serve_in_thread, wait_until
from prometheus_client.parser import text_string_to_metric_families

from edge_runtime.api.accesslog import AccessLog
from edge_runtime.api.app import create_app
from edge_runtime.config import Config, SchedulerConfig
from edge_runtime.serving.engine_loop import LocalWorker
from edge_runtime.serving.request import ModelInfo

MODEL = ModelInfo(name="fake-model", version="1", created=1_700_000_000)
CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]}


@contextmanager
def serve(gen: FakeGenerator, log: io.StringIO, max_batch: int = 1) -> Iterator[str]:
    cfg = Config(scheduler=SchedulerConfig(max_batch=max_batch))
    worker = LocalWorker(lambda: gen, cfg.scheduler, measure_rates=False)
    with serve_in_thread(create_app(worker, MODEL, cfg, AccessLog(log))) as url:
        wait_until(lambda: worker.ready)
        yield url


def records(log: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in log.getvalue().splitlines()]


def test_a_pointless_retry_is_not_made_and_retry_after_says_when() -> None:
    openai = pytest.importorskip("openai")
    gen = FakeGenerator(reply="x" * 200, context_length=512, delay_s=0.01)
    log = io.StringIO()
    with serve(gen, log) as url:
        for _ in range(3):  # the rates are learned from served requests, not set by hand
            httpx.post(f"{url}/v1/chat/completions", json={**CHAT, "max_tokens": 10})
        # One long stream (~2 s) holds the only batch slot.
        long = threading.Thread(target=httpx.post, args=(f"{url}/v1/chat/completions",),
                                kwargs={"json": {**CHAT, "max_tokens": 200}, "timeout": 30})
        before = gen.produced
        long.start()
        wait_until(lambda: gen.produced > before + 20)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="x")  # max_retries: 2
        t0 = time.monotonic()
        with pytest.raises(openai.RateLimitError) as info:
            client.chat.completions.create(
                model="fake-model", messages=[{"role": "user", "content": "hi"}], max_tokens=10,
                extra_headers={"x-request-deadline-ms": "300"},
            )
        took = time.monotonic() - t0
        headers = info.value.response.headers
        long.join(30)
    assert took < 0.5, f"the refusal took {took:.2f}s to reach the caller (retried?)"
    assert headers["x-should-retry"] == "false"
    # Capacity returns when the long stream ends: ~1.7 s from now, from the measured rates
    # (not a constant second).
    assert 0.8 < int(headers["retry-after-ms"]) / 1000 < 4.0, headers
    assert headers["retry-after"] == str(-(-int(headers["retry-after-ms"]) // 1000))
    refused = [r for r in records(log) if r["status"] == 429]
    assert len(refused) == 1, "the client retried a refusal it was told not to"


def _raw_stream_then_close(url: str, events: int) -> None:
    """POST a streamed chat over a raw socket, read `events` SSE events, hang up."""
    host, port = urlsplit(url).hostname, urlsplit(url).port
    assert port is not None
    body = json.dumps({**CHAT, "stream": True, "max_tokens": 300}).encode()
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: application/json\r\nContent-Length: "
            + str(len(body)).encode() + b"\r\n\r\n" + body
        )
        seen = b""
        while seen.count(b"data: ") < events:
            data = sock.recv(4096)
            assert data, "the server closed first"
            seen += data
        assert seen.startswith(b"HTTP/1.1 200")


def test_a_client_that_hangs_up_mid_stream_is_logged_as_gone() -> None:
    gen = FakeGenerator(reply="x" * 300, context_length=512, delay_s=0.01)
    log = io.StringIO()
    with serve(gen, log) as url:
        _raw_stream_then_close(url, events=6)
        wait_until(lambda: len(records(log)) == 1)
        httpx.post(f"{url}/v1/chat/completions", json={**CHAT, "max_tokens": 3})
        wait_until(lambda: len(records(log)) == 2)
    gone, ok = records(log)
    assert gone["status"] == 499 and gone["error"] == "client_disconnected", gone
    # The tokens it was sent before it left (role event + >= 5 content events), not 300.
    assert isinstance(gone["completion_tokens"], int)
    assert 5 <= gone["completion_tokens"] < 300, gone
    assert ok["status"] == 200 and ok["completion_tokens"] == 3 and ok["error"] is None


def test_metrics_show_the_estimates(server: tuple[str, str]) -> None:
    url, model = server
    for _ in range(3):
        r = httpx.post(f"{url}/v1/completions",
                       json={"model": model, "prompt": "hello", "max_tokens": 8}, timeout=30)
        assert r.status_code == 200
    values: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics").text):
        for s in family.samples:
            values[(s.name, s.labels.get("batch", ""))] = s.value
    assert values[("edge_runtime_estimate_requests_observed", "")] >= 3
    assert values[("edge_runtime_estimate_per_token_seconds", "")] >= 0
    assert values[("edge_runtime_estimate_per_request_seconds", "")] >= 0
    assert values[("edge_runtime_estimate_prefill_tokens_per_second", "")] > 0
    end_to_end = values[("edge_runtime_estimate_step_seconds", "1")]
    assert end_to_end >= values[("edge_runtime_estimate_engine_step_seconds", "1")] > 0


def test_a_client_that_hangs_up_before_a_whole_answer_is_logged_with_its_tokens() -> None:
    """A request that does not stream gets its chunks only with the last one (the engine
    loop holds them back: one event-loop wake-up per request, not per step), so the tokens
    a 499 logs come from the engine loop's own count."""
    gen = FakeGenerator(reply="x" * 300, context_length=512, delay_s=0.01)
    log = io.StringIO()
    with serve(gen, log) as url:
        parts = urlsplit(url)
        assert parts.port is not None
        body = json.dumps({**CHAT, "max_tokens": 300}).encode()
        with socket.create_connection((parts.hostname, parts.port), timeout=10) as sock:
            sock.sendall(
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                b"Content-Type: application/json\r\nContent-Length: "
                + str(len(body)).encode() + b"\r\n\r\n" + body
            )
            wait_until(lambda: gen.produced >= 10)
        wait_until(lambda: len(records(log)) == 1)
    (gone,) = records(log)
    assert gone["status"] == 499 and gone["error"] == "client_disconnected", gone
    tokens = gone["completion_tokens"]
    assert isinstance(tokens, int) and 10 <= tokens < 300, gone
