"""Broker credentials from options and the environment (mqtt/auth.py): the password never
from argv, one-line errors for what cannot work."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from edge_runtime.errors import ConfigError
from edge_runtime.mqtt.auth import BrokerAuth, add_auth_options, auth_from_args


def parse(argv: list[str]) -> BrokerAuth:
    p = argparse.ArgumentParser()
    add_auth_options(p, "EDGE_T")
    return auth_from_args(p.parse_args(argv), "EDGE_T")


def test_password_from_a_file_or_the_environment_never_argv(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    pw = tmp_path / "pw"
    pw.write_text("s3cret\nignored\n")
    auth = parse(["--username", "operator-a", "--password-file", str(pw)])
    assert (auth.username, auth.password) == ("operator-a", "s3cret")
    assert "s3cret" not in repr(auth)
    monkeypatch.setenv("EDGE_T_PASSWORD", "from-env")
    monkeypatch.setenv("EDGE_T_USERNAME", "operator-b")
    auth = parse([])
    assert (auth.username, auth.password) == ("operator-b", "from-env")
    with pytest.raises(SystemExit):  # refused, not taken for --password-file
        parse(["--password", "s3cret"])
    err = capsys.readouterr().err
    assert "--password is not accepted" in err and "s3cret" not in err


def test_certificate_files(tmp_path: Path) -> None:
    for name in ("ca.pem", "c.pem", "c.key"):
        (tmp_path / name).write_text("x")
    auth = parse(["--ca-file", str(tmp_path / "ca.pem"), "--cert-file", str(tmp_path / "c.pem"),
                  "--key-file", str(tmp_path / "c.key")])
    assert auth.tls is not None and auth.tls.cert_file == str(tmp_path / "c.pem")
    assert auth.username is None and auth.password is None


@pytest.mark.parametrize("argv, message", [
    (["--cert-file", "/etc/hostname"], "--cert-file and --key-file go together"),
    (["--ca-file", "/nonexistent/ca.pem"], "--ca-file /nonexistent/ca.pem is not a readable"),
    (["--username", "u", "--password-file", "/nonexistent/pw"],
     "cannot read --password-file /nonexistent/pw"),
    (["--password-file", "/etc/hostname"], "a broker password needs --username"),
])
def test_unusable_credentials_are_one_line_errors(argv: list[str], message: str,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EDGE_T_USERNAME", raising=False)
    with pytest.raises(ConfigError, match=message):
        parse(argv)


def test_daemon_sections_read_the_password_file_else_the_environment(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from edge_runtime.mqtt.types import broker_credentials

    monkeypatch.delenv("EDGE_RUNTIME_FLEET_PASSWORD", raising=False)
    assert broker_credentials("fleet", None, None, None, None) == (None, None)
    monkeypatch.setenv("EDGE_RUNTIME_FLEET_PASSWORD", "from-env")
    assert broker_credentials("fleet", None, None, None, None)[0] == "from-env"
    assert broker_credentials("offload", None, None, None, None)[0] is None
    pw = tmp_path / "pw"
    pw.write_text("from-file\n")
    assert broker_credentials("fleet", pw, None, None, None)[0] == "from-file"
