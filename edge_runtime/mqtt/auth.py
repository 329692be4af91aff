"""Broker credentials of the operator tools and the cloud worker, from options and environment.

    p = argparse.ArgumentParser(); add_auth_options(p, "EDGE_FLEET")
    auth = auth_from_args(p.parse_args(), "EDGE_FLEET")
    MqttClient(url, client_id, **auth.mqtt_options())

The password never comes from argv (`ps` shows every process's arguments to every user):
it is the first line of `--password-file`, or the `{PREFIX}_PASSWORD` environment variable.
A client certificate (`--cert-file`, `--key-file`) is the other way in: with the shipped
broker config (deploy/mosquitto/) the certificate's CN is the username the ACL sees.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_runtime.errors import ConfigError
from edge_runtime.mqtt.types import TlsFiles


@dataclass(frozen=True)
class BrokerAuth:
    username: str | None = None
    password: str | None = field(default=None, repr=False)  # never in a log line
    tls: TlsFiles | None = None

    def mqtt_options(self) -> dict[str, Any]:
        """MqttClient's keyword arguments."""
        return {"username": self.username, "password": self.password, "tls": self.tls}


class _NoPasswordInArgv(argparse.Action):
    """`--password` exists only to be refused: without it argparse would take `--password
    SECRET` as an abbreviation of `--password-file` and name the secret in its error."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        parser.error(f"{option_string} is not accepted: a command line is visible to every "
                     f"user (ps); put the password in a file (--password-file) or in "
                     f"${self.metavar}")


def add_auth_options(p: argparse.ArgumentParser, env_prefix: str) -> None:
    """`--username`, `--password-file`, `--ca-file`, `--cert-file`, `--key-file`, each
    defaulting to `{env_prefix}_{NAME}`; the password itself only from a file or the
    environment."""
    env = os.environ.get
    p.add_argument("--username", default=env(f"{env_prefix}_USERNAME"),
                   help=f"broker username (${env_prefix}_USERNAME)")
    p.add_argument("--password-file", default=env(f"{env_prefix}_PASSWORD_FILE"),
                   help=f"file whose first line is the broker password "
                   f"(${env_prefix}_PASSWORD_FILE, or the password in ${env_prefix}_PASSWORD)")
    p.add_argument("--password", action=_NoPasswordInArgv, metavar=f"{env_prefix}_PASSWORD",
                   help=argparse.SUPPRESS)
    p.add_argument("--ca-file", default=env(f"{env_prefix}_CA_FILE"),
                   help=f"CA of the broker's certificate, mqtts (${env_prefix}_CA_FILE)")
    p.add_argument("--cert-file", default=env(f"{env_prefix}_CERT_FILE"),
                   help=f"client certificate, PEM (${env_prefix}_CERT_FILE)")
    p.add_argument("--key-file", default=env(f"{env_prefix}_KEY_FILE"),
                   help=f"the client certificate's key, PEM (${env_prefix}_KEY_FILE)")


def auth_from_args(a: argparse.Namespace, env_prefix: str) -> BrokerAuth:
    """The credentials of parsed options; ConfigError naming an unreadable file or a
    certificate without its key."""
    def path(v: str | None) -> Path | None:
        return Path(v) if v else None

    ca, cert, key = path(a.ca_file), path(a.cert_file), path(a.key_file)
    if (cert is None) != (key is None):
        raise ConfigError("--cert-file and --key-file go together (a client certificate "
                          "needs its private key)")
    for flag, p in (("--ca-file", ca), ("--cert-file", cert), ("--key-file", key)):
        if p is not None and not p.is_file():
            raise ConfigError(f"{flag} {p} is not a readable file")
    password = None
    if a.password_file:
        try:
            password = Path(a.password_file).read_text().splitlines()[0].strip()
        except (OSError, IndexError, UnicodeDecodeError) as e:
            raise ConfigError(f"cannot read --password-file {a.password_file}: {e}") from e
    else:
        password = os.environ.get(f"{env_prefix}_PASSWORD") or None
    tls = TlsFiles(*(str(f) if f else None for f in (ca, cert, key))) if ca or cert else None
    if password is not None and not a.username:
        raise ConfigError(f"a broker password needs --username (or ${env_prefix}_USERNAME)")
    return BrokerAuth(a.username or None, password, tls)
