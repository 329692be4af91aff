"""Every bad input gets a 4xx with an OpenAI-style error naming the field — never a 500.

Each case runs twice: against a scripted generator (no torch needed) and against the tiny
demo bundle served for real, so the real tokenizer and context length are exercised too.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

LONG = "hello world " * 20_000  # far beyond any test model's context, well under 1 MiB



def chat(**fields: Any) -> dict[str, Any]:
    return {"model": "MODEL", "messages": [{"role": "user", "content": "hi"}], **fields}


def text(**fields: Any) -> dict[str, Any]:
    return {"model": "MODEL", "prompt": "Once upon", **fields}


def without(body: dict[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in body.items() if k != key}


C, T = "/v1/chat/completions", "/v1/completions"
# (id, endpoint, body, status, param, code)
CASES: list[tuple[str, str, Any, int, str | None, str | None]] = [
    ("missing-model", C, without(chat(), "model"), 400, "model", None),
    ("missing-messages", C, without(chat(), "messages"), 400, "messages", None),
    ("empty-messages", C, chat(messages=[]), 400, "messages", None),
    ("messages-not-list", C, chat(messages="hi"), 400, "messages", None),
    (
        "content-wrong-type",
        C,
        chat(messages=[{"role": "user", "content": 5}]),
        400,
        "messages[0].content",
        None,
    ),
    ("missing-content", C, chat(messages=[{"role": "user"}]), 400, "messages[0].content", None),
    (
        "bad-role",
        C,
        chat(messages=[{"role": "tool", "content": "x"}]),
        400,
        "messages[0].role",
        None,
    ),
    (
        "image-part",
        C,
        chat(
            messages=[
                {
                    "role": "user",
                    "content": [{"type": "image_url", "image_url": {"url": "http://x"}}],
                }
            ]
        ),
        400,
        "messages[0].content[0].type",
        None,
    ),
    ("max-tokens-zero", C, chat(max_tokens=0), 400, "max_tokens", None),
    ("max-tokens-negative", C, chat(max_tokens=-5), 400, "max_tokens", None),
    ("max-tokens-string", C, chat(max_tokens="10"), 400, "max_tokens", None),
    ("max-tokens-bool", C, chat(max_tokens=True), 400, "max_tokens", None),
    ("max-tokens-float", C, chat(max_tokens=1.5), 400, "max_tokens", None),
    (
        "max-tokens-beyond-context",
        C,
        chat(max_tokens=10**9),
        400,
        "max_tokens",
        "context_length_exceeded",
    ),
    (
        "max-completion-tokens-beyond-context",
        C,
        chat(max_completion_tokens=10**9),
        400,
        "max_completion_tokens",
        "context_length_exceeded",
    ),
    (
        "chat-prompt-too-long",
        C,
        chat(messages=[{"role": "user", "content": LONG}]),
        400,
        "messages",
        "context_length_exceeded",
    ),
    ("temperature-high", C, chat(temperature=2.5), 400, "temperature", None),
    ("temperature-negative", C, chat(temperature=-0.1), 400, "temperature", None),
    ("temperature-string", C, chat(temperature="hot"), 400, "temperature", None),
    ("top-p-zero", C, chat(top_p=0), 400, "top_p", None),
    ("top-p-high", C, chat(top_p=1.5), 400, "top_p", None),
    ("top-k-negative", C, chat(top_k=-1), 400, "top_k", None),
    ("seed-negative", C, chat(seed=-1), 400, "seed", None),
    ("stop-too-many", C, chat(stop=["a", "b", "c", "d", "e"]), 400, "stop", None),
    ("stop-empty", C, chat(stop=""), 400, "stop", None),
    ("stop-wrong-type", C, chat(stop=5), 400, "stop", None),
    ("n-two", C, chat(n=2), 400, "n", None),
    ("n-zero", C, chat(n=0), 400, "n", None),
    ("stream-not-bool", C, chat(stream="yes"), 400, "stream", None),
    ("stream-options-wrong", C, chat(stream=True, stream_options=3), 400, "stream_options", None),
    ("unknown-model", C, chat(model="gpt-4o"), 404, "model", "model_not_found"),
    ("text-missing-prompt", T, without(text(), "prompt"), 400, "prompt", None),
    ("text-empty-prompt", T, text(prompt=""), 400, "prompt", None),
    ("text-empty-list", T, text(prompt=[]), 400, "prompt", None),
    ("text-two-prompts", T, text(prompt=["a", "b"]), 400, "prompt", None),
    ("text-prompt-wrong-type", T, text(prompt=5), 400, "prompt", None),
    ("text-prompt-too-long", T, text(prompt=LONG), 400, "prompt", "context_length_exceeded"),
    (
        "text-max-tokens-beyond-context",
        T,
        text(max_tokens=10**9),
        400,
        "max_tokens",
        "context_length_exceeded",
    ),
    ("text-top-p-high", T, text(top_p=2), 400, "top_p", None),
    ("text-n-three", T, text(n=3), 400, "n", None),
    ("text-unknown-model", T, text(model="davinci"), 404, "model", "model_not_found"),
]


def _fill_model(body: Any, model: str) -> Any:
    return {**body, "model": model} if body.get("model") == "MODEL" else body


@pytest.mark.parametrize(
    ("endpoint", "body", "status", "param", "code"),
    [c[1:] for c in CASES],
    ids=[c[0] for c in CASES],
)
def test_bad_request_is_4xx_naming_the_field(
    server: tuple[str, str],
    endpoint: str,
    body: Any,
    status: int,
    param: str | None,
    code: str | None,
) -> None:
    url, model = server
    r = httpx.post(url + endpoint, json=_fill_model(body, model), timeout=30)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param and error["code"] == code
    assert error["type"] == "invalid_request_error" and error["message"]
    assert r.headers["x-served-by"] == "local" and r.headers["x-request-id"]


@pytest.mark.parametrize(
    ("raw", "content_type", "needle"),
    [
        (b'{"model": "m", "messages": [', "application/json", "not valid JSON"),
        (b"[1, 2]", "application/json", "request body"),
        (b'"just a string"', "application/json", "request body"),
        (b"", "application/json", "no body"),
        (b"\xff\xfe garbage", "application/json", "not UTF-8"),
    ],
    ids=["truncated", "array", "string", "empty", "binary"],
)
def test_malformed_body_is_400(
    server: tuple[str, str], raw: bytes, content_type: str, needle: str
) -> None:
    url, _ = server
    r = httpx.post(
        f"{url}/v1/chat/completions", content=raw, headers={"Content-Type": content_type}
    )
    assert r.status_code == 400, r.text
    assert needle in r.json()["error"]["message"]
    assert r.json()["error"]["type"] == "invalid_request_error"


def test_unknown_fields_are_ignored(server: tuple[str, str]) -> None:
    url, model = server
    body = chat(model=model, max_tokens=2, frequency_penalty=0, logprobs=False, foo={"x": 1})
    body["messages"][0]["name"] = "alice"
    r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == 200, r.text


def test_unknown_path_and_wrong_method_are_json(server: tuple[str, str]) -> None:
    url, _ = server
    r = httpx.get(f"{url}/v1/nope")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = httpx.get(f"{url}/v1/chat/completions")
    assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"


def test_error_body_is_valid_for_openai_client(server: tuple[str, str]) -> None:
    openai = pytest.importorskip("openai")
    url, model = server
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "x"}], temperature=3
        )
    assert info.value.param == "temperature" if hasattr(info.value, "param") else True
    assert "temperature" in json.dumps(info.value.body)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
