"""`edge-runtime verify` and `edge-runtime serve`: exit codes, one-line errors, a real daemon."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest

from edge_runtime import cli
from edge_runtime.signing import generate_keypair


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_verify_ok(tiny_bundle: Any, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(
        ["verify", str(tiny_bundle.path), "--pubkey", str(tiny_bundle.pubkey)], capsys
    )
    assert code == 0, err
    manifest = json.loads((tiny_bundle.path / "manifest.json").read_text())
    assert re.fullmatch(
        rf"OK {re.escape(manifest['name'])} {re.escape(manifest['version'])}: signed by "
        rf"[0-9a-f]{{16}}, {len(manifest['files'])} files verified\n",
        out,
    )


def test_verify_names_the_tampered_file(
    tiny_bundle: Any, bundle_copy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    victim = next(p for p in sorted(bundle_copy.rglob("*.json")) if p.name != "manifest.json")
    victim.write_bytes(victim.read_bytes() + b" ")
    code, out, err = run(["verify", str(bundle_copy), "--pubkey", str(tiny_bundle.pubkey)], capsys)
    rel = victim.relative_to(bundle_copy).as_posix()
    assert code == 1 and out == ""
    assert err.startswith(f"edge-runtime: error: {rel}: size") and err.count("\n") == 1
    assert "Traceback" not in err


def test_verify_with_an_untrusted_key(
    tiny_bundle: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    generate_keypair(tmp_path / "other.key", tmp_path / "other.pub")
    code, _, err = run(
        ["verify", str(tiny_bundle.path), "--pubkey", str(tmp_path / "other.pub")], capsys
    )
    assert code == 1 and "not trusted" in err and err.count("\n") == 1


def test_verify_without_any_key(
    tiny_bundle: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("EDGE_RUNTIME_TRUST_DIR", str(tmp_path))
    code, _, err = run(["verify", str(tiny_bundle.path)], capsys)
    assert code == 1 and "pass --pubkey PEM" in err and str(tmp_path) in err


def test_verify_missing_dir_and_unreadable_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    generate_keypair(tmp_path / "k.key", tmp_path / "k.pub")
    code, _, err = run(
        ["verify", str(tmp_path / "nope"), "--pubkey", str(tmp_path / "k.pub")], capsys
    )
    assert code == 1 and "is not a directory" in err
    code, _, err = run(["verify", str(tmp_path), "--pubkey", str(tmp_path / "missing.pub")], capsys)
    assert code == 1 and "cannot read public key" in err and "Traceback" not in err


def test_python_dash_m_runs_the_same_command_line(tmp_path: Path) -> None:
    """`python -m edge_runtime` (a source tree without the console script, as on the GPU
    benchmark machine) is the same program: same version line, same exit status on error."""
    ok = subprocess.run([sys.executable, "-m", "edge_runtime", "--version"],
                        check=False, capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0 and ok.stdout.startswith("edge-runtime ")
    bad = subprocess.run([sys.executable, "-m", "edge_runtime", "verify", str(tmp_path / "nope"),
                          "--pubkey", str(tmp_path / "missing.pub")],
                         check=False, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and "edge-runtime: error:" in bad.stderr


def test_usage_error_is_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main([])
    assert info.value.code == 2


def test_serve_with_a_bad_config_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "c.toml").write_text("[server]\nport = 'eighty'\n")
    code, _, err = run(["serve", "--config", str(tmp_path / "c.toml")], capsys)
    assert code == 1 and "'server.port' must be int" in err and err.count("\n") == 1


def test_serve_without_bundle_or_builder_explains_what_to_install(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "edge_build.demo", None)  # makes the import fail
    code, _, err = run(["serve"], capsys)
    assert code == 1
    assert "pip install 'edge-runtime[build]'" in err and "--bundle" in err


@pytest.mark.parametrize(
    ("host", "key", "warned"),
    [("0.0.0.0", None, True), ("0.0.0.0", "k", False), ("127.0.0.1", None, False)],
)
def test_serve_warns_when_exposed_without_a_key(
    tiny_bundle: Any,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    host: str,
    key: str | None,
    warned: bool,
) -> None:
    seen: dict[str, Any] = {}
    def fake_run_server(cfg: Any, bundle: Any, sock: Any, *fleet: Any) -> int:
        sock.close()  # serve bound it before loading anything
        seen.update(cfg=cfg)
        return 0

    monkeypatch.setattr(cli, "_run_server", fake_run_server)
    argv = [
        "serve",
        "--bundle",
        str(tiny_bundle.path),
        "--pubkey",
        str(tiny_bundle.pubkey),
        "--host",
        host,
        "--port",
        "0",
        "--threads",
        "1",
    ]
    with caplog.at_level(logging.WARNING, logger="edge_runtime"):
        assert cli.main(argv + (["--api-key", key] if key else [])) == 0
    assert ("without an API key" in caplog.text) is warned
    assert seen["cfg"].server.host == host and seen["cfg"].model.threads == 1


def test_serve_end_to_end(tiny_bundle: Any, tmp_path: Path) -> None:
    """The console script as a user runs it: prints the URL when ready, serves, stops on ^C."""
    exe = Path(sys.executable).with_name("edge-runtime")
    log_path = tmp_path / "access.jsonl"
    proc = subprocess.Popen(
        [
            str(exe),
            "serve",
            "--bundle",
            str(tiny_bundle.path),
            "--pubkey",
            str(tiny_bundle.pubkey),
            "--port",
            "0",
            "--threads",
            "1",
            "--api-key",
            "tok",
            "--access-log",
            str(log_path),
            "--log-level",
            "warning",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        line = _read_line(proc, timeout=120)
        match = re.search(r"serving (\S+) \S+ at (http://127\.0\.0\.1:\d+)/v1", line)
        assert match, line
        model, url = match.groups()
        assert httpx.get(f"{url}/readyz").status_code == 200  # printed only once ready
        r = httpx.post(
            f"{url}/v1/completions",
            headers={"Authorization": "Bearer tok"},
            json={"model": model, "prompt": "def ", "max_tokens": 3},
        )
        assert r.status_code == 200 and r.headers["x-served-by"] == "local"
        assert httpx.get(f"{url}/v1/models").status_code == 401
        # uvicorn drains, runs the app's shutdown (worker stopped), then re-raises the
        # signal: ^C ends with the shell's 130; SIGTERM ends by that signal, which systemd
        # counts as a clean stop.
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 130
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    records = [json.loads(x) for x in log_path.read_text().splitlines()]
    assert [(r["path"], r["status"]) for r in records[-2:]] == [
        ("/v1/completions", 200),
        ("/v1/models", 401),
    ]
    assert "Traceback" not in (proc.stderr.read() if proc.stderr else "")


def _read_line(proc: subprocess.Popen[str], timeout: float) -> str:
    """First stdout line, without hanging the test if the daemon never prints one."""
    result: list[str] = []
    reader = threading.Thread(
        target=lambda: result.append(
            proc.stdout.readline()  # type: ignore[union-attr]
        ),
        daemon=True,
    )
    reader.start()
    reader.join(timeout)
    if not result or not result[0]:
        proc.kill()
        _, err = proc.communicate()
        raise AssertionError(f"daemon printed no URL; stderr:\n{err}")
    return result[0]
