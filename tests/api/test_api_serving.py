"""The API and the serving layer over real HTTP, with a scripted generator (no model needed):
readiness, the SSE format, queueing and 429, cancellation, errors mid-stream, auth, the body
limit, the access log and /metrics."""

from __future__ import annotations

import io
import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest
from live_server import FakeGenerator, serve_in_thread, sse_events, wait_until
from prometheus_client.parser import text_string_to_metric_families

from edge_runtime.api.accesslog import AccessLog
from edge_runtime.api.app import create_app
from edge_runtime.config import Config, SchedulerConfig, ServerConfig
from edge_runtime.serving.engine_loop import LocalWorker
from edge_runtime.serving.request import ModelInfo

MODEL = ModelInfo(name="fake-model", version="1", created=1_700_000_000)
CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]}


@contextmanager
def serve(
    gen: FakeGenerator | None = None,
    config: Config | None = None,
    access_log: AccessLog | None = None,
    load: Any = None,
) -> Iterator[tuple[str, FakeGenerator]]:
    gen = gen or FakeGenerator()
    cfg = config or Config()
    worker = LocalWorker(load or (lambda: gen), cfg.scheduler, measure_rates=False)
    app = create_app(worker, MODEL, cfg, access_log)
    with serve_in_thread(app) as url:
        WORKERS[url] = worker
        wait_until(lambda: worker.ready or worker.error is not None)
        yield url, gen


WORKERS: dict[str, LocalWorker] = {}


def _worker(url: str) -> LocalWorker:
    return WORKERS[url]


def metric(url: str, name: str, **labels: str) -> float:
    text = httpx.get(f"{url}/metrics").text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    raise KeyError(f"{name}{labels} not in /metrics")


def test_readyz_is_503_until_warmup_is_done() -> None:
    warmup_gate = threading.Event()
    gen = FakeGenerator(warmup_gate=warmup_gate)
    worker = LocalWorker(lambda: gen, measure_rates=False)
    with serve_in_thread(create_app(worker, MODEL)) as url:
        assert httpx.get(f"{url}/healthz").json() == {"status": "ok"}
        r = httpx.get(f"{url}/readyz")
        assert r.status_code == 503 and r.json() == {"status": "loading"}
        r = httpx.post(f"{url}/v1/chat/completions", json=CHAT)
        assert r.status_code == 503
        assert r.json()["error"]["code"] == "model_not_ready" and r.headers["retry-after"]
        warmup_gate.set()
        wait_until(lambda: worker.ready)
        r = httpx.get(f"{url}/readyz")
        assert r.status_code == 200 and r.json() == {"status": "ready", "model": "fake-model",
                                                    "version": "1"}


def test_readyz_reports_a_failed_load() -> None:
    def load() -> FakeGenerator:
        raise RuntimeError("no such engine")

    with serve(load=load) as (url, _):
        r = httpx.get(f"{url}/readyz")
        assert r.status_code == 503
        assert r.json() == {"status": "failed", "error": "no such engine"}
        assert httpx.get(f"{url}/healthz").status_code == 200


def test_chat_json_response() -> None:
    with serve() as (url, gen):
        r = httpx.post(f"{url}/v1/chat/completions", json={**CHAT, "max_tokens": 5, "seed": 3})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["object"] == "chat.completion" and body["model"] == "fake-model"
        assert body["id"] == f"chatcmpl-{r.headers['x-request-id']}"
        assert body["choices"][0]["message"] == {"role": "assistant", "content": "Hello"}
        assert body["choices"][0]["finish_reason"] == "length"
        prompt_tokens = len("user: hi\n")
        assert body["usage"] == {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": 5,
            "total_tokens": prompt_tokens + 5,
        }
        assert r.headers["x-served-by"] == "local"
        assert gen.last_params is not None and gen.last_params.seed == 3


def test_chat_sse_stream_is_what_openai_clients_parse() -> None:
    with serve() as (url, gen):
        req = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=req) as r:
            assert r.status_code == 200
            assert r.headers["content-type"].startswith("text/event-stream")
            assert r.headers["x-served-by"] == "local" and r.headers["x-request-id"]
            raw = r.read().decode()
    assert raw.endswith("data: [DONE]\n\n") and "\n\n\n" not in raw
    events = sse_events(iter(raw.splitlines()))
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    finish, usage = chunks[-2], chunks[-1]
    assert finish["choices"][0] == {
        "index": 0,
        "delta": {},
        "logprobs": None,
        "finish_reason": "stop",
    }
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == len(gen.reply)
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[1:-2])
    assert text == gen.reply


def test_completions_json_and_stream() -> None:
    with serve() as (url, _):
        req = {"model": "fake-model", "prompt": ["Say hi"], "max_tokens": 4}
        body = httpx.post(f"{url}/v1/completions", json=req).json()
        assert body["object"] == "text_completion"
        assert body["choices"][0]["text"] == "Hell" and body["usage"]["prompt_tokens"] == 6
        with httpx.stream("POST", f"{url}/v1/completions", json={**req, "stream": True}) as r:
            events = sse_events(r.iter_lines())
        assert events[-1] == "[DONE]"
        assert all(e["object"] == "text_completion" for e in events[:-1])
        assert "".join(e["choices"][0]["text"] for e in events[:-1]) == "Hell"
        assert events[-2]["choices"][0]["finish_reason"] == "length"


def test_models_endpoints() -> None:
    with serve() as (url, _):
        body = httpx.get(f"{url}/v1/models").json()
        assert body == {
            "object": "list",
            "data": [
                {
                    "id": "fake-model",
                    "object": "model",
                    "created": 1_700_000_000,
                    "owned_by": "edge-runtime",
                    "version": "1",
                }
            ],
        }
        assert httpx.get(f"{url}/v1/models/fake-model").json()["id"] == "fake-model"
        r = httpx.get(f"{url}/v1/models/other")
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_full_queue_answers_429_with_retry_after() -> None:
    gate = threading.Event()
    cfg = Config(scheduler=SchedulerConfig(max_batch=1, max_queue=1))
    with serve(FakeGenerator(gate=gate), cfg) as (url, gen):
        results: list[httpx.Response] = []
        threads = [
            threading.Thread(
                target=lambda: results.append(httpx.post(f"{url}/v1/chat/completions", json=CHAT))
            )
            for _ in range(2)
        ]
        threads[0].start()
        wait_until(gen.started.is_set)  # the first is generating (blocked on the gate)
        threads[1].start()
        wait_until(lambda: metric(url, "edge_runtime_queue_depth") == 2)
        r = httpx.post(f"{url}/v1/chat/completions", json=CHAT)
        assert r.status_code == 429  # no cloud path configured: overloaded, retry later
        assert int(r.headers["retry-after"]) >= 1
        assert r.json()["error"]["code"] == "overloaded"
        assert "queue is full" in r.json()["error"]["message"]
        gate.set()
        for t in threads:
            t.join(10)
        assert [x.status_code for x in results] == [200, 200]


def test_deadline_the_device_cannot_meet_is_refused_at_arrival() -> None:
    gate = threading.Event()
    with serve(FakeGenerator(gate=gate)) as (url, gen):
        first = threading.Thread(
            target=httpx.post, args=(f"{url}/v1/chat/completions",), kwargs={"json": CHAT}
        )
        first.start()
        wait_until(gen.started.is_set)
        # The running request has 32 tokens to go at the seeded 50 ms a step: 200 ms is short.
        r = httpx.post(
            f"{url}/v1/chat/completions", json=CHAT, headers={"x-request-deadline-ms": "200"}
        )
        assert r.status_code == 429
        assert "exceeds the deadline" in r.json()["error"]["message"]
        bad = httpx.post(
            f"{url}/v1/chat/completions", json=CHAT, headers={"x-request-deadline-ms": "soon"}
        )
        assert bad.status_code == 400
        assert bad.json()["error"]["param"] == "x-request-deadline-ms"
        assert bad.json()["error"]["code"] == "invalid_deadline"
        long = httpx.post(f"{url}/v1/chat/completions", json=CHAT,
                          headers={"x-request-deadline-ms": "9" * 4000})
        assert long.status_code == 400 and "(4000 characters)" in long.json()["error"]["message"]
        assert len(long.json()["error"]["message"]) < 200  # the value is not echoed whole
        gate.set()
        first.join(10)


def test_queued_request_past_its_deadline_gets_an_explicit_429() -> None:
    cfg = Config(scheduler=SchedulerConfig(max_batch=1))
    gen = FakeGenerator(delay_s=0.05)  # 32 tokens: about 1.6 s
    with serve(gen, cfg) as (url, _):
        worker_rates = _worker(url).scheduler.rates
        worker_rates.alpha = 0.0  # frozen, optimistic rates: admission accepts...
        worker_rates.step_s = {1: 0.001}
        first = threading.Thread(
            target=httpx.post, args=(f"{url}/v1/chat/completions",), kwargs={"json": CHAT}
        )
        first.start()
        wait_until(gen.started.is_set)
        t0 = time.monotonic()
        r = httpx.post(
            f"{url}/v1/chat/completions",
            json=CHAT,
            timeout=10,
            headers={"x-request-deadline-ms": "500"},
        )
        waited = time.monotonic() - t0
        first.join(10)
    # ...and the review between decode steps refuses it once its deadline has passed,
    # long before the first request is done: an answer, not a hang and not a late reply.
    assert r.status_code == 429 and "waited" in r.json()["error"]["message"]
    assert 0.4 < waited < 1.4


def test_stream_client_disconnect_stops_generation_between_tokens() -> None:
    gen = FakeGenerator(reply="x" * 500, context_length=1024, delay_s=0.02)
    with serve(gen) as (url, _):
        req = {**CHAT, "stream": True, "max_tokens": 500}
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=req) as r:
            lines = r.iter_lines()
            next(line for line in lines if '"content":"x"' in line)
        # Leaving the block closed the connection mid-stream.
        assert gen.closed.wait(5), "the worker did not stop the generation"
        assert gen.produced < 100
        # The worker is free again: the next request is served at once.
        r2 = httpx.post(
            f"{url}/v1/completions", json={"model": "fake-model", "prompt": "a", "max_tokens": 2}
        )
        assert r2.json()["choices"][0]["text"] == "xx"


def test_non_stream_client_disconnect_cancels_generation() -> None:
    gen = FakeGenerator(reply="x" * 500, context_length=1024, delay_s=0.02)
    with serve(gen) as (url, _):
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{url}/v1/chat/completions", json={**CHAT, "max_tokens": 500}, timeout=0.3)
        assert gen.closed.wait(5)
        assert gen.produced < 100


def test_engine_failure_mid_stream_is_an_error_event_and_json_500_otherwise() -> None:
    with serve(FakeGenerator(fail_after=3)) as (url, _):
        with httpx.stream("POST", f"{url}/v1/chat/completions", json={**CHAT, "stream": True}) as r:
            events = sse_events(r.iter_lines())
        assert r.status_code == 200
        assert events[-2]["error"]["message"] == "the engine fell over"
        assert events[-2]["error"]["type"] == "server_error" and events[-1] == "[DONE]"
        r = httpx.post(f"{url}/v1/chat/completions", json=CHAT)
        assert r.status_code == 500 and r.json()["error"]["message"] == "the engine fell over"


def test_unexpected_exception_is_a_json_500() -> None:
    gen = FakeGenerator()

    def broken(messages: object) -> list[int]:
        raise ZeroDivisionError("a bug")

    gen.chat_prompt = broken  # type: ignore[method-assign]
    with serve(gen) as (url, _):
        r = httpx.post(f"{url}/v1/chat/completions", json=CHAT)
    assert r.status_code == 500
    assert r.json()["error"] == {
        "message": "internal server error (ZeroDivisionError)",
        "type": "server_error",
        "param": None,
        "code": None,
    }
    assert r.headers["x-request-id"] and r.headers["x-served-by"] == "local"


@pytest.mark.parametrize("key_in", ["flag", "file"])
def test_bearer_auth_when_a_key_is_set(key_in: str, tmp_path: Any) -> None:
    if key_in == "flag":
        server = ServerConfig(api_key="s3cret")
    else:
        (tmp_path / "key").write_text("s3cret\n")
        server = ServerConfig(api_key_file=tmp_path / "key")
    with serve(config=Config(server=server)) as (url, _):
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            r = httpx.post(f"{url}/v1/chat/completions", json=CHAT, headers=headers)
            assert r.status_code == 401
            assert r.json()["error"]["code"] == "invalid_api_key"
            assert r.headers["www-authenticate"] == "Bearer"
        assert httpx.get(f"{url}/metrics").status_code == 401
        assert httpx.get(f"{url}/v1/models").status_code == 401
        ok = {"Authorization": "Bearer s3cret"}
        assert httpx.post(f"{url}/v1/chat/completions", json=CHAT, headers=ok).status_code == 200
        assert httpx.get(f"{url}/metrics", headers=ok).status_code == 200
        assert httpx.get(f"{url}/healthz").status_code == 200  # probes need no key
        assert httpx.get(f"{url}/readyz").status_code == 200


def test_no_auth_by_default() -> None:
    with serve() as (url, _):
        assert httpx.post(f"{url}/v1/chat/completions", json=CHAT).status_code == 200


@pytest.mark.parametrize("chunked", [False, True])
def test_body_over_the_limit_is_413(chunked: bool) -> None:
    cfg = Config(server=ServerConfig(max_body_bytes=4096))
    big = json.dumps({**CHAT, "messages": [{"role": "user", "content": "y" * 8000}]}).encode()
    with serve(config=cfg) as (url, _):
        # A generator body goes out chunked, with no Content-Length to check up front.
        content: Any = iter([big[:3000], big[3000:]]) if chunked else big
        r = httpx.post(
            f"{url}/v1/chat/completions",
            content=content,
            headers={"Content-Type": "application/json"},
        )
        assert r.status_code == 413
        assert r.json()["error"]["code"] == "request_too_large"
        # Just under the limit is fine.
        small = json.dumps(CHAT).encode()
        assert (
            httpx.post(
                f"{url}/v1/chat/completions",
                content=small,
                headers={"Content-Type": "application/json"},
            ).status_code
            == 200
        )


def test_default_body_limit_is_one_mib() -> None:
    body = json.dumps({**CHAT, "messages": [{"role": "user", "content": "z" * (1 << 20)}]})
    with serve() as (url, _):
        r = httpx.post(
            f"{url}/v1/chat/completions", content=body, headers={"Content-Type": "application/json"}
        )
    assert r.status_code == 413


def test_access_log_records_each_request() -> None:
    out = io.StringIO()
    with serve(access_log=AccessLog(out)) as (url, _):
        httpx.post(
            f"{url}/v1/chat/completions",
            json={**CHAT, "max_tokens": 3},
            headers={"X-Request-Id": "trace-42"},
        )
        httpx.post(f"{url}/v1/chat/completions", json={**CHAT, "model": "nope"})
    records = [json.loads(line) for line in out.getvalue().splitlines()]
    ok = next(r for r in records if r["request_id"] == "trace-42")
    assert ok["event"] == "http" and ok["status"] == 200 and ok["served_by"] == "local"
    assert ok["model"] == "fake-model" and ok["path"] == "/v1/chat/completions"
    assert ok["prompt_tokens"] == len("user: hi\n") and ok["completion_tokens"] == 3
    assert ok["client"].startswith("127.0.0.1:") and ok["latency_ms"] > 0
    assert ok["ts"].endswith("Z") and ok["error"] is None
    bad = next(r for r in records if r["status"] == 404)
    assert bad["error"] == "model_not_found" and bad["completion_tokens"] is None


def test_metrics_count_requests_and_tokens() -> None:
    with serve() as (url, _):
        for _ in range(2):
            httpx.post(f"{url}/v1/chat/completions", json={**CHAT, "max_tokens": 4})
        httpx.post(f"{url}/v1/chat/completions", json={**CHAT, "n": 2})
        text = httpx.get(f"{url}/metrics").text
        assert "edge_runtime_decode_tokens_per_second_bucket" in text
        labels = {"endpoint": "/v1/chat/completions", "served_by": "local"}
        assert metric(url, "edge_runtime_requests_total", status="200", **labels) == 2
        assert metric(url, "edge_runtime_requests_total", status="400", **labels) == 1
        assert metric(url, "edge_runtime_generation_tokens_total", served_by="local") == 8
        assert metric(url, "edge_runtime_prompt_tokens_total", served_by="local") == 18
        assert metric(url, "edge_runtime_time_to_first_token_seconds_count", served_by="local") == 2
        assert metric(url, "edge_runtime_request_duration_seconds_count", **labels) == 3
        assert metric(url, "edge_runtime_queue_depth") == 0
        assert metric(url, "edge_runtime_prefilling") == 0  # the gauge is exported
        assert metric(url, "edge_runtime_model_ready") == 1
