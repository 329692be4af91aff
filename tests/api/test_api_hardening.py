"""The local API against what a web page, a stranger on the network or a broken client can
send it — each over real HTTP to a real uvicorn: foreign Host headers (DNS rebinding),
cross-origin calls and CORS preflight, bodies that are not application/json, text Python
cannot encode, docs and readiness details with an API key set. Every refusal is a JSON 4xx
that says why, and the server goes on serving."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest
from live_server import FakeGenerator, serve_in_thread, wait_until

from edge_runtime.api.app import create_app
from edge_runtime.config import Config, ServerConfig
from edge_runtime.serving.engine_loop import LocalWorker
from edge_runtime.serving.request import ModelInfo

MODEL = ModelInfo(name="fake-model", version="1", created=0)
KEY = "s3cret-key"


@contextmanager
def serve(load: Any = FakeGenerator, **server: Any) -> Iterator[str]:
    worker = LocalWorker(load, measure_rates=False)
    app = create_app(worker, MODEL, Config(server=ServerConfig(**server)))
    with serve_in_thread(app) as url:
        wait_until(lambda: worker.ready or worker.error is not None, 30)
        yield url


def chat(model: str = "fake-model", content: Any = "hi", **fields: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": content}],
            "max_tokens": 3, **fields}


def assert_refused(r: httpx.Response, status: int, code: str | None, needle: str) -> None:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["code"] == code and needle in error["message"], error
    assert r.headers["x-request-id"]


def still_serving(url: str) -> None:
    r = httpx.post(f"{url}/v1/chat/completions", json=chat(), timeout=30)
    assert r.status_code == 200, r.text


# -- Host: DNS rebinding --------------------------------------------------------------------


def test_a_foreign_host_is_refused_on_loopback() -> None:
    with serve() as url:
        port = url.rsplit(":", 1)[1]
        for host in ("attacker.example", f"attacker.example:{port}", "127.0.0.1.nip.io",
                     f"localhost:{port}/x", ""):
            r = httpx.post(f"{url}/v1/chat/completions", json=chat(), headers={"Host": host})
            assert_refused(r, 400, "host_not_allowed", "DNS rebinding")
        r = httpx.get(f"{url}/healthz", headers={"Host": "attacker.example"})
        assert_refused(r, 400, "host_not_allowed", "127.0.0.1, [::1], localhost")
        for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}", "LOCALHOST",
                     "localhost."):
            r = httpx.post(f"{url}/v1/chat/completions", json=chat(), headers={"Host": host})
            assert r.status_code == 200, (host, r.text)
        still_serving(url)


def test_configured_host_names_on_a_wildcard_bind() -> None:
    with serve(host="0.0.0.0", allowed_hosts=("jetson-7.lan", "10.0.0.7")) as url:
        for host in ("jetson-7.lan:8000", "10.0.0.7", "localhost:8000"):
            assert httpx.get(f"{url}/healthz", headers={"Host": host}).status_code == 200
        r = httpx.get(f"{url}/healthz", headers={"Host": "evil.lan"})
        assert_refused(r, 400, "host_not_allowed", "server.allowed_hosts")
    with serve(host="0.0.0.0", allowed_hosts=("*",)) as url:
        assert httpx.get(f"{url}/healthz", headers={"Host": "anything"}).status_code == 200


# -- Origin, CORS, Content-Type: cross-site requests ----------------------------------------


def test_a_cross_site_text_plain_post_is_refused() -> None:
    """The classic attack on a keyless loopback daemon: a page's simple POST (no preflight),
    JSON in a text/plain body. Refused for its Origin, and without one for its type."""
    body = json.dumps(chat())
    with serve() as url:
        for ctype in ("text/plain", "application/json", "application/x-www-form-urlencoded"):
            r = httpx.post(f"{url}/v1/chat/completions", content=body,
                           headers={"Origin": "https://evil.example", "Content-Type": ctype})
            assert_refused(r, 403, "origin_not_allowed", "'https://evil.example' refused")
            assert "access-control-allow-origin" not in r.headers
        r = httpx.get(f"{url}/v1/models", headers={"Origin": "null"})
        assert_refused(r, 403, "origin_not_allowed", "server.cors_origins (none)")
        for ctype in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data"):
            r = httpx.post(f"{url}/v1/chat/completions", content=body,
                           headers={"Content-Type": ctype})
            assert_refused(r, 415, "unsupported_media_type", "Content-Type: application/json")
        r = httpx.post(f"{url}/v1/chat/completions", content=body)  # no Content-Type at all
        assert_refused(r, 415, "unsupported_media_type", "none was sent")
        r = httpx.post(f"{url}/v1/chat/completions", content=body,
                       headers={"Content-Type": "application/json; charset=latin-1"})
        assert_refused(r, 415, "unsupported_media_type", "UTF-8")
        r = httpx.post(f"{url}/v1/chat/completions", content=body,
                       headers={"Content-Type": "Application/JSON; charset=utf-8"})
        assert r.status_code == 200, r.text
        still_serving(url)


def test_cors_for_configured_origins_with_preflight() -> None:
    app_origin = "https://app.example"
    with serve(cors_origins=(app_origin,)) as url:
        pre = httpx.options(f"{url}/v1/chat/completions", headers={
            "Origin": app_origin, "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type, authorization"})
        assert pre.status_code == 204, pre.text
        assert pre.headers["access-control-allow-origin"] == app_origin
        assert "POST" in pre.headers["access-control-allow-methods"]
        assert "content-type" in pre.headers["access-control-allow-headers"]
        assert pre.headers["vary"] == "Origin"
        r = httpx.post(f"{url}/v1/chat/completions", json=chat(), headers={"Origin": app_origin})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == app_origin
        assert "x-request-id" in r.headers["access-control-expose-headers"]
        # An allowed origin still cannot send a simple (unpreflighted) POST.
        r = httpx.post(f"{url}/v1/chat/completions", content=json.dumps(chat()),
                       headers={"Origin": app_origin, "Content-Type": "text/plain"})
        assert_refused(r, 415, "unsupported_media_type", "application/json")
        for headers, needle in (
            ({"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"},
             "'https://evil.example' refused"),
            ({"Origin": app_origin, "Access-Control-Request-Method": "DELETE"}, "'DELETE'"),
            ({"Origin": app_origin, "Access-Control-Request-Method": "POST",
              "Access-Control-Request-Headers": "content-type, x-evil"}, "x-evil"),
        ):
            r = httpx.options(f"{url}/v1/chat/completions", headers=headers)
            assert_refused(r, 403, "origin_not_allowed", needle)
            assert "access-control-allow-origin" not in r.headers
        still_serving(url)


# -- text Python cannot carry, and other malformed bodies: 400, never 500 -------------------

MALFORMED: list[tuple[str, str, str, str, str | None]] = [
    # (id, path, raw JSON with MODEL for the model name, message needle, param). "\\ud800"
    # is JSON for a lone high surrogate: json.loads makes it a str that cannot be encoded.
    ("surrogate-content", "/v1/chat/completions",
     '{"model": "MODEL", "messages": [{"role": "user", "content": "\\ud800"}]}',
     "lone UTF-16 surrogate", "messages[0].content"),
    ("surrogate-in-a-pair-of-halves", "/v1/completions",
     '{"model": "MODEL", "prompt": "ok \\udc00\\ud800"}', "lone UTF-16 surrogate", "prompt"),
    ("surrogate-part", "/v1/chat/completions",
     '{"model": "MODEL", "messages": [{"role": "user", "content": [{"type": "text", '
     '"text": "\\ud800"}]}]}', "lone UTF-16 surrogate", "messages[0].content[0].text"),
    ("surrogate-model", "/v1/chat/completions",
     '{"model": "\\ud800", "messages": [{"role": "user", "content": "x"}]}',
     "lone UTF-16 surrogate", "model"),
    ("surrogate-stop", "/v1/completions",
     '{"model": "MODEL", "prompt": "x", "stop": ["\\ud800"]}', "lone", "stop[0]"),
    ("surrogate-key", "/v1/completions",
     '{"model": "MODEL", "prompt": "x", "\\ud800": 1}', "a key of the request body", None),
    ("deep-array", "/v1/chat/completions", "[" * 100_000 + "]" * 100_000, "nested deeper", None),
    ("deep-unknown-field", "/v1/completions",
     '{"model": "MODEL", "prompt": "x", "x": ' + "[" * 70 + "]" * 70 + "}", "nested deeper",
     None),
    ("huge-integer", "/v1/completions",
     '{"model": "MODEL", "prompt": "x", "max_tokens": 1' + "0" * 5000 + "}", "digits", None),
    ("nan", "/v1/completions", '{"model": "MODEL", "prompt": "x", "temperature": NaN}',
     "NaN is not a JSON number", None),
    ("infinity", "/v1/completions", '{"model": "MODEL", "prompt": "x", "top_p": -Infinity}',
     "-Infinity", None),
    ("float-overflow", "/v1/completions", '{"model": "MODEL", "prompt": "x", "top_p": 1e999}',
     "finite", "top_p"),
    ("long-model-name", "/v1/completions", '{"model": "%s", "prompt": "x"}' % ("m" * 100_000),
     "at most 256", "model"),
    ("empty-messages", "/v1/chat/completions", '{"model": "MODEL", "messages": []}',
     "at least 1", "messages"),
    ("message-not-object", "/v1/chat/completions", '{"model": "MODEL", "messages": ["hi"]}',
     "dictionary", "messages[0]"),
    ("content-null", "/v1/chat/completions",
     '{"model": "MODEL", "messages": [{"role": "user", "content": null}]}', "",
     "messages[0].content"),
    ("trailing-garbage", "/v1/completions", '{"model": "MODEL", "prompt": "x"} x',
     "not valid JSON", None),
]



@pytest.mark.parametrize(("path", "raw", "needle", "param"), [c[1:] for c in MALFORMED],
                         ids=[c[0] for c in MALFORMED])
def test_malformed_text_and_json_are_400(
    server: tuple[str, str], path: str, raw: str, needle: str, param: str | None
) -> None:
    url, model = server
    r = httpx.post(url + path, content=raw.replace("MODEL", model).encode("utf-8"),
                   headers={"Content-Type": "application/json"}, timeout=30)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert needle in error["message"] and error["param"] == param, error
    assert error["type"] == "invalid_request_error"
    ok = httpx.post(f"{url}/v1/completions", timeout=30,
                    json={"model": model, "prompt": "x", "max_tokens": 2})
    assert ok.status_code == 200, ok.text


def test_a_valid_surrogate_pair_is_text(server: tuple[str, str]) -> None:
    url, model = server
    raw = '{"model": "MODEL", "prompt": "\\ud83d\\ude00 ok", "max_tokens": 2}'.replace(
        "MODEL", model)
    r = httpx.post(f"{url}/v1/completions", content=raw,
                   headers={"Content-Type": "application/json"}, timeout=30)
    assert r.status_code == 200, r.text


# -- docs and readiness details --------------------------------------------------------------


def test_docs_are_off_unless_enabled_and_behind_the_key() -> None:
    with serve(api_key=KEY) as url:
        for path in ("/docs", "/redoc", "/openapi.json"):
            assert httpx.get(f"{url}{path}").status_code == 404
    with serve(api_key=KEY, docs=True) as url:
        for path in ("/docs", "/openapi.json"):
            assert_refused(httpx.get(f"{url}{path}"), 401, "invalid_api_key", "Bearer")
        r = httpx.get(f"{url}/openapi.json", headers={"Authorization": f"Bearer {KEY}"})
        assert r.status_code == 200 and "/v1/chat/completions" in r.json()["paths"]
    with serve(docs=True) as url:  # no key: open, like the API itself
        assert httpx.get(f"{url}/openapi.json").status_code == 200
        # The docs page's own "try it out" calls: same origin, served without CORS config.
        r = httpx.post(f"{url}/v1/chat/completions", json=chat(), headers={"Origin": url})
        assert r.status_code == 200, r.text


def test_same_origin_counts_only_while_host_is_checked() -> None:
    """With the Host check off, a rebinding page's Origin equals the Host it sends: it must
    not pass as the daemon's own origin."""
    with serve(host="0.0.0.0", allowed_hosts=("*",)) as url:
        r = httpx.post(f"{url}/v1/chat/completions", json=chat(), headers={
            "Host": "attacker.example:8000", "Origin": "http://attacker.example:8000"})
        assert_refused(r, 403, "origin_not_allowed", "attacker.example")


def test_readyz_details_only_for_an_authenticated_caller() -> None:
    with serve(api_key=KEY) as url:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic x"}):
            r = httpx.get(f"{url}/readyz", headers=headers)
            assert r.status_code == 200 and r.json() == {"status": "ready"}
        r = httpx.get(f"{url}/readyz", headers={"Authorization": f"Bearer {KEY}"})
        assert r.json() == {"status": "ready", "model": "fake-model", "version": "1"}

    def load() -> FakeGenerator:
        raise RuntimeError("cannot open /opt/models/secret-path/decoder.onnx")

    with serve(load=load, api_key=KEY) as url:
        r = httpx.get(f"{url}/readyz")
        assert r.status_code == 503 and r.json() == {"status": "failed"}
        r = httpx.get(f"{url}/readyz", headers={"Authorization": f"Bearer {KEY}"})
        assert "secret-path" in r.json()["error"]


def test_readyz_while_loading_says_only_loading() -> None:
    gate = threading.Event()
    worker = LocalWorker(lambda: FakeGenerator(warmup_gate=gate), measure_rates=False)
    app = create_app(worker, MODEL, Config(server=ServerConfig(api_key=KEY)))
    with serve_in_thread(app) as url:
        assert httpx.get(f"{url}/readyz").json() == {"status": "loading"}
        gate.set()
