"""The HTTP rows of the attack matrix: a real `edge-runtime serve` on a loopback port, attacked
the way a web page, a local user or a broken client would.

Two daemons serve the tiny demo bundle, one after the other:

    open     no credentials, bound to 127.0.0.1 (the default install): DNS rebinding (a
             foreign Host), cross-site POSTs (text/plain with and without Origin), text
             Python cannot encode (a lone surrogate), a body nested 100,000 deep
    keyed    API key from a file and a JWT public key: docs and OpenAPI, /readyz details,
             forged and expired tokens, the key in the process's argv (`ps`)

and a bundle with a symlink (its manifest, a directory) is handed to `serve` and `verify`.
A row holds when the attack was refused with the expected status and a reason, and the
daemon went on serving (an honest request right after it gets 200, no 5xx in /metrics).

    python -m scripts.security.http WORKDIR      (from the repository root: the module is
                                                  named http, so never run it by path)
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from .row import Row

AREA = "http"
SERVE = [sys.executable, "-c", "import sys; from edge_runtime.cli import main; sys.exit(main())"]
START_TIMEOUT_S = 180


@dataclass
class Daemon:
    proc: subprocess.Popen[str]
    url: str
    model: str
    headers: dict[str, str]
    """What an honest client sends (its credentials)."""
    log: Path

    def alive(self) -> bool:
        return self.proc.poll() is None

    def serving(self) -> tuple[bool, str]:
        """Whether an honest request right now gets its answer; and server errors so far."""
        if not self.alive():
            return False, f"daemon exited ({self.proc.returncode})"
        r = httpx.post(f"{self.url}/v1/completions", headers=self.headers, timeout=60,
                       json={"model": self.model, "prompt": "def ", "max_tokens": 2})
        metrics = httpx.get(f"{self.url}/metrics", headers=self.headers, timeout=10).text
        errors = sum(float(v) for v in re.findall(
            r'^edge_runtime_requests_total\{[^}]*status="5\d\d"[^}]*\} (\S+)$', metrics, re.M))
        return r.status_code == 200 and errors == 0, f"then 200: {r.status_code == 200}, " \
            f"5xx so far: {errors:g}"


def run(workdir: Path) -> list[Row]:
    workdir.mkdir(parents=True, exist_ok=True)
    bundle, pubkey = _tiny_bundle(workdir)
    rows: list[Row] = []
    with _daemon(workdir / "open", bundle, pubkey, {}) as d:
        rows += _open_attacks(d)
    with _keyed(workdir / "keyed", bundle, pubkey) as (d, jwt_key):
        rows += _keyed_attacks(d, jwt_key)
    rows += _bundle_attacks(workdir / "bundles", bundle, pubkey)
    return rows


# -- the attacks ----------------------------------------------------------------------------


def _open_attacks(d: Daemon) -> list[Row]:
    port = d.url.rsplit(":", 1)[1]
    chat = json.dumps({"model": d.model, "max_tokens": 2,
                       "messages": [{"role": "user", "content": "hi"}]})
    attacks: list[tuple[str, str, Callable[[], httpx.Response], int, str]] = [
        ("DNS rebinding: POST with Host attacker.example (keyless loopback daemon)",
         "400 host_not_allowed", lambda: httpx.post(
             f"{d.url}/v1/chat/completions", content=chat, timeout=30, headers={
                 "Host": f"attacker.example:{port}", "Content-Type": "application/json"}),
         400, "host_not_allowed"),
        ("cross-site simple POST: Origin http://attacker.example, text/plain JSON body",
         "403 origin_not_allowed", lambda: httpx.post(
             f"{d.url}/v1/chat/completions", content=chat, timeout=30, headers={
                 "Origin": "http://attacker.example", "Content-Type": "text/plain"}),
         403, "origin_not_allowed"),
        ("text/plain JSON body without Origin (no preflight would be asked)",
         "415 unsupported_media_type", lambda: httpx.post(
             f"{d.url}/v1/chat/completions", content=chat, timeout=30,
             headers={"Content-Type": "text/plain"}),
         415, "unsupported_media_type"),
        ("CORS preflight from attacker.example", "403 origin_not_allowed", lambda: httpx.options(
            f"{d.url}/v1/chat/completions", timeout=30, headers={
                "Origin": "http://attacker.example", "Access-Control-Request-Method": "POST"}),
         403, "origin_not_allowed"),
        ('lone surrogate "\\ud800" in a prompt (was a 500)', "400 invalid_text, no 5xx",
         lambda: httpx.post(
             f"{d.url}/v1/completions", timeout=30, headers={"Content-Type": "application/json"},
             content='{"model": "%s", "prompt": "a\\ud800b"}' % d.model),  # noqa: UP031
         400, "invalid_text"),
        ("JSON nested 100,000 levels deep", "400 naming the depth", lambda: httpx.post(
            f"{d.url}/v1/completions", content="[" * 100_000 + "]" * 100_000, timeout=30,
            headers={"Content-Type": "application/json"}), 400, "invalid_json"),
    ]
    # The latency budget header: every value that is not a finite budget in (0, 1 day] is a
    # 400 before any admission arithmetic (nan compares false, inf never expires, a negative
    # budget would be refused as "cannot meet the deadline" with a misleading reason).
    for value in ("nan", "inf", "-5", "0", "1e400", "9" * 4000):
        shown = value if len(value) < 12 else f"{value[:4]}... ({len(value)} digits)"
        attacks.append((
            f"x-request-deadline-ms: {shown}", "400 invalid_deadline", lambda v=value: httpx.post(
                f"{d.url}/v1/chat/completions", content=chat, timeout=30, headers={
                    "Content-Type": "application/json", "x-request-deadline-ms": v}),
            400, "invalid_deadline"))
    return [_http_row(d, *a) for a in attacks]


def _keyed_attacks(d: Daemon, jwt_key: Any) -> list[Row]:
    import jwt

    now = int(time.time())
    forged = {
        "alg none": jwt.encode({"sub": "x", "exp": now + 300}, None, algorithm="none"),
        "expired": jwt.encode({"sub": "x", "exp": now - 600}, jwt_key, algorithm="EdDSA"),
        "no exp": jwt.encode({"sub": "x"}, jwt_key, algorithm="EdDSA"),
    }
    rows = []
    for path in ("/docs", "/openapi.json", "/redoc"):
        rows.append(_http_row(d, f"GET {path} without credentials (API key set)",
                              "404: docs are off unless server.docs",
                              lambda p=path: httpx.get(d.url + p, timeout=30), 404, "not_found"))
    rows.append(_readyz_row(d))
    for name, token in forged.items():
        rows.append(_http_row(
            d, f"JWT bearer token, {name}", "401 naming the problem",
            lambda t=token: httpx.get(f"{d.url}/v1/models", timeout=30,
                                      headers={"Authorization": f"Bearer {t}"}),
            401, "invalid_api_key"))
    cmdline = Path(f"/proc/{d.proc.pid}/cmdline").read_bytes().decode(errors="replace")
    secret = d.headers["Authorization"].split()[1]
    leaked = secret in cmdline
    args = " ".join(a for a in cmdline.split("\0")[3:] if a and not a.startswith("/"))
    rows.append(Row(AREA, "read the API key from the daemon's argv (`ps`)",
                    "key not in the command line (server.api_key_file, mode 600)",
                    f"key in argv: {leaked} (argv: {args})", not leaked and d.serving()[0]))
    return rows


def _readyz_row(d: Daemon) -> Row:
    body = httpx.get(f"{d.url}/readyz", timeout=30).json()
    detailed = httpx.get(f"{d.url}/readyz", headers=d.headers, timeout=30).json()
    ok, after = d.serving()
    return Row(AREA, "GET /readyz without credentials (API key set)",
               'only {"status": "ready"}: no model, version or load error',
               f"{json.dumps(body)}; with the key: {sorted(detailed)}; {after}",
               body == {"status": "ready"} and "model" in detailed and ok)


def _http_row(d: Daemon, attack: str, expected: str, send: Callable[[], httpx.Response],
              status: int, code: str) -> Row:
    try:
        r = send()
        error = r.json().get("error", {}) if r.content else {}
        got = f"{r.status_code} {error.get('code')}: {error.get('message', '')[:120]}"
        refused = r.status_code == status and error.get("code") == code and error.get("message")
    except (httpx.HTTPError, ValueError) as e:
        got, refused = f"{type(e).__name__}: {e}", False
    ok, after = d.serving()
    return Row(AREA, attack, expected, f"{got}; {after}", bool(refused) and ok)


def _bundle_attacks(root: Path, bundle: Path, pubkey: Path) -> list[Row]:
    rows = []
    outside = root / "outside"
    for what, rel in (("manifest.json", "manifest.json"), ("directory tokenizer/", "tokenizer")):
        evil = root / f"linked-{rel.replace('.', '-')}"
        shutil.rmtree(evil, ignore_errors=True)
        shutil.copytree(bundle, evil)
        shutil.rmtree(outside, ignore_errors=True)
        outside.mkdir(parents=True)
        (evil / rel).rename(outside / rel)
        (evil / rel).symlink_to(outside / rel)
        for command in ("verify", "serve"):
            args = [command, str(evil), "--pubkey", str(pubkey)] if command == "verify" else [
                command, "--bundle", str(evil), "--pubkey", str(pubkey), "--port", "0"]
            out = subprocess.run([*SERVE, *args], capture_output=True, text=True, timeout=120,
                                 check=False)
            line = (out.stderr.strip().splitlines() or [""])[-1]
            held = out.returncode == 1 and "symbolic link" in line and rel in line
            rows.append(Row(AREA, f"bundle with a symlinked {what}: edge-runtime {command}",
                            "exit 1, the error names the link",
                            f"exit {out.returncode}: {line[:160]}", held))
    return rows


# -- the daemons ----------------------------------------------------------------------------


def _tiny_bundle(workdir: Path) -> tuple[Path, Path]:
    prebuilt = os.environ.get("EDGE_TEST_PREBUILT")
    if prebuilt:
        return Path(prebuilt) / "bundle", Path(prebuilt) / "bundle.work" / "signing.pub"
    bundle, work = workdir / "tiny" / "bundle", workdir / "tiny" / "work"
    if not (bundle / "manifest.json").is_file():
        from edge_build.demo import build_demo

        build_demo(bundle, preset="tiny", work_dir=work, progress=False)
    return bundle, work / "signing.pub"


@contextmanager
def _keyed(root: Path, bundle: Path, pubkey: Path) -> Iterator[tuple[Daemon, Any]]:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    root.mkdir(parents=True, exist_ok=True)
    key = os.urandom(16).hex()
    (root / "api.key").write_text(key + "\n")
    (root / "api.key").chmod(0o600)
    jwt_key = Ed25519PrivateKey.generate()
    (root / "jwt.pub").write_bytes(jwt_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    (root / "edge.toml").write_text(
        '[server]\napi_key_file = "api.key"\njwt_public_key_file = "jwt.pub"\n')
    with _daemon(root, bundle, pubkey, {"Authorization": f"Bearer {key}"},
                 ["--config", str(root / "edge.toml")]) as d:
        yield d, jwt_key


@contextmanager
def _daemon(root: Path, bundle: Path, pubkey: Path, headers: dict[str, str],
            extra: list[str] | None = None) -> Iterator[Daemon]:
    root.mkdir(parents=True, exist_ok=True)
    log = root / "daemon.log"
    cmd = [*SERVE, "serve", "--bundle", str(bundle), "--pubkey", str(pubkey), "--port", "0",
           "--threads", "1", "--access-log", str(root / "access.jsonl"), *(extra or [])]
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True,
                                start_new_session=True)
    try:
        url, model = _wait_ready(proc, log)
        yield Daemon(proc, url, model, headers, log)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def _wait_ready(proc: subprocess.Popen[str], log: Path) -> tuple[str, str]:
    """The URL and model the daemon prints once it listens with the model warmed up."""
    assert proc.stdout is not None
    os.set_blocking(proc.stdout.fileno(), False)
    deadline = time.monotonic() + START_TIMEOUT_S
    buf = ""
    while time.monotonic() < deadline and proc.poll() is None:
        buf += proc.stdout.readline() or ""
        match = re.search(r"serving (\S+) \S+ at (http://127\.0\.0\.1:\d+)/v1", buf)
        if match:
            return match.group(2), match.group(1)
        time.sleep(0.05)
    raise RuntimeError(f"edge-runtime serve did not start: {log.read_text()[-2000:]}")


if __name__ == "__main__":
    for row in run(Path(sys.argv[1] if len(sys.argv) > 1 else "security-http")):
        print(f"{'HELD' if row.held else 'FAIL'} | {row.attack} | {row.expected} | "
              f"{row.observed}")
