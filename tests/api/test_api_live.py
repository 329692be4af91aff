"""The daemon serving the tiny demo bundle over real HTTP, called the way users call it: with
the official `openai` client, with raw JSON (what curl sends) and by scraping /metrics."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from live_server import serve_in_thread, sse_events, wait_until
from prometheus_client.parser import text_string_to_metric_families

from edge_runtime.api.app import create_app
from edge_runtime.bundle.manifest import verify_bundle
from edge_runtime.model.generator import Generator
from edge_runtime.serving.engine_loop import LocalWorker
from edge_runtime.serving.request import ModelInfo
from edge_runtime.signing import trusted_keys

openai = pytest.importorskip("openai")

MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": [{"type": "text", "text": "def main"}]},
]


@pytest.fixture(scope="module")
def live(tiny_bundle: Any) -> Iterator[tuple[str, str]]:
    """(base URL, model name) of the tiny bundle being served."""
    bundle = verify_bundle(tiny_bundle.path, trusted_keys([tiny_bundle.pubkey]))
    worker = LocalWorker(lambda: Generator.from_bundle(bundle, threads=1))
    with serve_in_thread(create_app(worker, ModelInfo.from_bundle(bundle))) as url:
        wait_until(lambda: worker.ready, timeout=60)
        yield url, bundle.manifest.name


@pytest.fixture(scope="module")
def client(live: tuple[str, str]) -> Any:
    return openai.OpenAI(base_url=f"{live[0]}/v1", api_key="x", max_retries=0)


def test_readyz_and_models(live: tuple[str, str], client: Any) -> None:
    url, model = live
    r = httpx.get(f"{url}/readyz")
    assert r.status_code == 200 and r.json()["model"] == model
    assert [m.id for m in client.models.list()] == [model]


def test_chat_greedy_stream_equals_non_stream(live: tuple[str, str], client: Any) -> None:
    _, model = live
    kwargs: dict[str, Any] = {
        "model": model,
        "messages": MESSAGES,
        "max_tokens": 24,
        "temperature": 0,
    }
    full = client.chat.completions.create(**kwargs)
    assert full.object == "chat.completion" and full.model == model
    assert full.id.startswith("chatcmpl-") and full.created > 0
    choice = full.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
    assert full.usage.prompt_tokens > 0
    assert 0 < full.usage.completion_tokens <= 24
    assert full.usage.total_tokens == full.usage.prompt_tokens + full.usage.completion_tokens

    chunks = list(
        client.chat.completions.create(
            **kwargs, stream=True, stream_options={"include_usage": True}
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == choice.message.content
    assert chunks[-2].choices[0].finish_reason == choice.finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == (
        full.usage.completion_tokens
    )


def test_completions_greedy_stream_equals_non_stream(live: tuple[str, str], client: Any) -> None:
    _, model = live
    kwargs: dict[str, Any] = {
        "model": model,
        "prompt": "import os\n",
        "max_tokens": 16,
        "temperature": 0,
    }
    full = client.completions.create(**kwargs)
    assert full.object == "text_completion"
    assert full.choices[0].finish_reason in ("stop", "length")
    streamed = "".join(c.choices[0].text for c in client.completions.create(**kwargs, stream=True))
    assert streamed == full.choices[0].text
    # max_tokens is exact when the model does not stop earlier.
    one = client.completions.create(**{**kwargs, "max_tokens": 1})
    assert one.usage.completion_tokens <= 1


def test_seeded_sampling_is_reproducible(live: tuple[str, str], client: Any) -> None:
    _, model = live
    kwargs: dict[str, Any] = {
        "model": model,
        "messages": MESSAGES,
        "max_tokens": 12,
        "temperature": 1.0,
        "top_p": 0.9,
        "seed": 1234,
        "extra_body": {"top_k": 50},
    }
    a = client.chat.completions.create(**kwargs).choices[0].message.content
    b = client.chat.completions.create(**kwargs).choices[0].message.content
    assert a == b


def test_stop_string_ends_generation(live: tuple[str, str], client: Any) -> None:
    _, model = live
    kwargs: dict[str, Any] = {
        "model": model,
        "prompt": "import os\n",
        "max_tokens": 24,
        "temperature": 0,
    }
    text = client.completions.create(**kwargs).choices[0].text
    if len(text) < 4:
        pytest.skip(f"the tiny model's greedy answer is too short to cut: {text!r}")
    stop = text[2:4]
    cut = client.completions.create(**kwargs, stop=[stop]).choices[0]
    assert cut.finish_reason == "stop" and cut.text == text[: text.index(stop)]


def test_raw_json_post_like_curl(live: tuple[str, str]) -> None:
    url, model = live
    raw = json.dumps(
        {
            "model": model,
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 4,
            "temperature": 0,
        }
    )
    r = httpx.post(
        f"{url}/v1/chat/completions", content=raw, headers={"Content-Type": "application/json"}
    )
    assert r.status_code == 200 and r.headers["x-served-by"] == "local"
    body = r.json()
    assert body["id"] == f"chatcmpl-{r.headers['x-request-id']}"
    assert set(body) >= {"id", "object", "created", "model", "choices", "usage"}
    with httpx.stream(
        "POST",
        f"{url}/v1/chat/completions",
        content=raw[:-1] + ', "stream": true}',
        headers={"Content-Type": "application/json"},
    ) as r:
        assert r.headers["x-served-by"] == "local"
        events = sse_events(r.iter_lines())
    assert events[-1] == "[DONE]"
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1])
    assert text == body["choices"][0]["message"]["content"]


def test_metrics_after_requests(live: tuple[str, str], client: Any) -> None:
    url, model = live

    def samples() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        text = httpx.get(f"{url}/metrics").text
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text)
            for s in f.samples
        }

    ok = (
        "edge_runtime_requests_total",
        (("endpoint", "/v1/completions"), ("served_by", "local"), ("status", "200")),
    )
    tokens = ("edge_runtime_generation_tokens_total", (("served_by", "local"),))
    before = samples()
    done = client.completions.create(model=model, prompt="x = ", max_tokens=5, temperature=0)
    after = samples()
    assert after[ok] - before.get(ok, 0) == 1
    assert after[tokens] - before.get(tokens, 0) == done.usage.completion_tokens
    assert after[("edge_runtime_queue_depth", ())] == 0
    ttft = ("edge_runtime_time_to_first_token_seconds_count", (("served_by", "local"),))
    assert after[ttft] >= 1


@pytest.mark.skipif(shutil.which("curl") is None, reason="needs the curl binary")
def test_curl_exactly_as_the_readme_shows(live: tuple[str, str]) -> None:
    """The README's curl line works; without its Content-Type (curl's -d labels the body
    form-urlencoded, as a web page's form POST would) the answer is 415 saying what to add."""
    url, model = live
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}],
                       "max_tokens": 4})
    out = subprocess.run(["curl", "-s", "-i", f"{url}/v1/chat/completions",
                          "-H", "Content-Type: application/json", "-d", body],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    head, _, payload = out.replace("\r\n", "\n").partition("\n\n")
    assert head.startswith("HTTP/1.1 200"), out
    assert json.loads(payload)["object"] == "chat.completion"
    out = subprocess.run(["curl", "-s", "-i", f"{url}/v1/chat/completions", "-d", body],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    assert out.startswith("HTTP/1.1 415") and "-H 'Content-Type: application/json'" in out
