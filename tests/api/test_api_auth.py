"""Credentials: API keys from a file or the environment (never argv), JWT bearer tokens made
here with PyJWT and checked by a real server, and HTTPS from `edge-runtime serve` with a
certificate generated in the test."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from live_server import FakeGenerator, serve_in_thread, wait_until
from mqtt_fixtures import Pki

from edge_runtime.api.app import create_app
from edge_runtime.config import API_KEY_ENV, Config, ServerConfig, load_config
from edge_runtime.errors import ConfigError
from edge_runtime.serving.engine_loop import LocalWorker
from edge_runtime.serving.request import ModelInfo

MODEL = ModelInfo(name="fake-model", version="1", created=0)
CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


@contextmanager
def serve(**server: Any) -> Iterator[str]:
    worker = LocalWorker(FakeGenerator, measure_rates=False)
    app = create_app(worker, MODEL, Config(server=ServerConfig(**server)))
    with serve_in_thread(app) as url:
        wait_until(lambda: worker.ready, 30)
        yield url


def call(url: str, token: str | None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    return httpx.post(f"{url}/v1/chat/completions", json=CHAT, headers=headers, timeout=30)


def pem_public(key: Any) -> bytes:
    return key.public_key().public_bytes(  # type: ignore[no-any-return]
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def claims(**extra: Any) -> dict[str, Any]:
    return {"sub": "app-1", "exp": int(time.time()) + 300, **extra}


KEYS = {
    "EdDSA": ed25519.Ed25519PrivateKey.generate,
    "ES256": lambda: ec.generate_private_key(ec.SECP256R1()),
    "RS256": lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048),
}


@pytest.mark.parametrize("alg", sorted(KEYS))
def test_jwt_bearer_tokens(alg: str, tmp_path: Path) -> None:
    key = KEYS[alg]()
    (tmp_path / "jwt.pub").write_bytes(pem_public(key))
    other = KEYS[alg]()
    with serve(jwt_public_key_file=tmp_path / "jwt.pub", jwt_audience="edge",
               jwt_issuer="https://idp.example") as url:
        good = claims(aud="edge", iss="https://idp.example")
        r = call(url, jwt.encode(good, key, algorithm=alg))
        assert r.status_code == 200, r.text
        ready = httpx.get(f"{url}/readyz", headers={
            "Authorization": f"Bearer {jwt.encode(good, key, algorithm=alg)}"})
        assert ready.json()["model"] == "fake-model"
        refused = {
            "expired": (jwt.encode({**good, "exp": int(time.time()) - 120}, key, algorithm=alg),
                        "expired"),
            "no exp": (jwt.encode({k: v for k, v in good.items() if k != "exp"}, key,
                                  algorithm=alg), '"exp"'),
            "other key": (jwt.encode(good, other, algorithm=alg), "Signature verification"),
            "audience": (jwt.encode({**good, "aud": "other"}, key, algorithm=alg), "Audience"),
            "issuer": (jwt.encode({**good, "iss": "https://evil"}, key, algorithm=alg), "ssuer"),
            # Algorithm confusion: the public key as an HMAC secret, and `none`.
            "hs256": (_hs256_with(pem_public(key), good), "alg value is not allowed"),
            "none": (jwt.encode(good, None, algorithm="none"), "alg value is not allowed"),
            "garbage": ("a.b.c", "invalid JWT"),
        }
        for name, (token, needle) in refused.items():
            r = call(url, token)
            assert r.status_code == 401, (name, r.text)
            assert needle in r.json()["error"]["message"], (name, r.json())
            assert r.headers["www-authenticate"] == "Bearer"
        assert "missing credentials" in call(url, None).json()["error"]["message"]


def _hs256_with(secret: bytes, payload: dict[str, Any]) -> str:
    """A token HMAC-signed with `secret`, made by hand: PyJWT refuses to use a PEM as one."""
    import base64
    import hashlib
    import hmac
    import json

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    head = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = b64(json.dumps(payload).encode())
    sig = hmac.new(secret, f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{b64(sig)}"


def test_api_key_and_jwt_together(tmp_path: Path) -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    (tmp_path / "jwt.pub").write_bytes(pem_public(key))
    (tmp_path / "api.key").write_text("k-from-file\n")
    with serve(api_key_file=tmp_path / "api.key", jwt_public_key_file=tmp_path / "jwt.pub") as url:
        assert call(url, "k-from-file").status_code == 200
        assert call(url, jwt.encode(claims(), key, algorithm="EdDSA")).status_code == 200
        r = call(url, "wrong")
        assert r.status_code == 401 and "API key or JWT" in r.json()["error"]["message"]


def test_jwt_key_files_are_checked_at_start(tmp_path: Path) -> None:
    bad = {
        "text": b"not a key",
        "p384": pem_public(ec.generate_private_key(ec.SECP384R1())),
        "rsa1024": pem_public(rsa.generate_private_key(public_exponent=65537, key_size=1024)),
    }
    needles = {"text": "not a PEM public key", "p384": "P-256", "rsa1024": "at least 2048"}
    for name, data in bad.items():
        (tmp_path / name).write_bytes(data)
        worker = LocalWorker(FakeGenerator, measure_rates=False)
        cfg = Config(server=ServerConfig(jwt_public_key_file=tmp_path / name))
        with pytest.raises(ConfigError, match=needles[name]):
            create_app(worker, MODEL, cfg)
    with pytest.raises(ConfigError, match=r"cannot read server\.jwt_public_key_file"):
        create_app(LocalWorker(FakeGenerator), MODEL,
                   Config(server=ServerConfig(jwt_public_key_file=tmp_path / "absent")))


def test_api_key_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(API_KEY_ENV, "k-from-env")
    with serve() as url:
        assert call(url, None).status_code == 401
        assert call(url, "k-from-env").status_code == 200
        assert httpx.get(f"{url}/readyz").json() == {"status": "ready"}


def test_server_config_keys(tmp_path: Path) -> None:
    (tmp_path / "edge.toml").write_text(
        '[server]\nallowed_hosts = ["jetson.lan"]\ncors_origins = ["https://app.example"]\n'
        'docs = true\ntls_cert_file = "c.pem"\ntls_key_file = "k.pem"\n'
        'jwt_public_key_file = "jwt.pub"\njwt_audience = "edge"\n')
    s = load_config(tmp_path / "edge.toml").server
    assert s.allowed_hosts == ("jetson.lan",) and s.cors_origins == ("https://app.example",)
    assert s.docs and s.tls_cert_file == tmp_path / "c.pem" and s.jwt_audience == "edge"
    with pytest.raises(ConfigError, match="go together"):
        ServerConfig(tls_cert_file=tmp_path / "c.pem")
    with pytest.raises(ConfigError, match="is not an origin"):
        ServerConfig(cors_origins=("https://app.example/path",))


# -- HTTPS through the CLI, a real port, a generated certificate ---------------------------


def _read_line(proc: subprocess.Popen[str], timeout: float) -> str:
    deadline = time.monotonic() + timeout
    assert proc.stdout is not None
    os.set_blocking(proc.stdout.fileno(), False)
    buf = ""
    while time.monotonic() < deadline:
        chunk = proc.stdout.readline()
        buf += chunk or ""
        if buf.endswith("\n"):
            return buf
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    err = proc.stderr.read() if proc.stderr else ""
    raise AssertionError(f"no line from edge-runtime serve: {buf!r} {err[-2000:]}")


def test_serve_over_tls_with_a_key_file(tiny_bundle: Any, pki: Pki, tmp_path: Path) -> None:
    exe = Path(sys.executable).with_name("edge-runtime")
    (tmp_path / "api.key").write_text("tls-key\n")
    proc = subprocess.Popen(
        [str(exe), "serve", "--bundle", str(tiny_bundle.path), "--pubkey",
         str(tiny_bundle.pubkey), "--port", "0", "--threads", "1", "--log-level", "warning",
         "--api-key-file", str(tmp_path / "api.key"), "--tls-cert", str(pki.server_cert),
         "--tls-key", str(pki.server_key), "--access-log", ""],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        line = _read_line(proc, 120)
        match = re.search(r"serving (\S+) \S+ at (https://127\.0\.0\.1:(\d+))/v1", line)
        assert match, line
        model, url, port = match.groups()
        with httpx.Client(verify=str(pki.ca), timeout=60) as client:
            r = client.post(f"{url}/v1/completions", headers={"Authorization": "Bearer tls-key"},
                            json={"model": model, "prompt": "def ", "max_tokens": 2})
            assert r.status_code == 200, r.text
            assert client.get(f"{url}/v1/models").status_code == 401
        with pytest.raises(httpx.HTTPError):  # the certificate is checked: no other CA
            httpx.get(f"{url}/healthz", timeout=10)
        with pytest.raises(httpx.HTTPError):  # plain HTTP on the TLS port gets nowhere
            httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=10)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 130
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    err = proc.stderr.read() if proc.stderr else ""
    assert "Traceback" not in err and "tls-key" not in err


def test_api_key_on_argv_warns_and_bad_tls_is_one_line(tiny_bundle: Any, tmp_path: Path) -> None:
    exe = Path(sys.executable).with_name("edge-runtime")
    (tmp_path / "c.pem").write_text("not a certificate")
    out = subprocess.run(
        [str(exe), "serve", "--bundle", str(tiny_bundle.path), "--pubkey",
         str(tiny_bundle.pubkey), "--api-key", "visible", "--tls-cert", str(tmp_path / "c.pem"),
         "--tls-key", str(tmp_path / "c.pem")],
        capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 1, out
    lines = out.stderr.strip().splitlines()
    warning = next(line for line in lines if "--api-key is visible to every user" in line)
    assert API_KEY_ENV in warning
    assert lines[-1].startswith("edge-runtime: error: cannot load server.tls_cert_file")
    assert "Traceback" not in out.stderr
