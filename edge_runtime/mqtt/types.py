"""What an MQTT connection is made of, free of paho: the broker's URL, the password and TLS
files of a config section, the Last Will, and a received message.

client.py (the one module that imports paho) builds its client from these and re-exports
them, so callers import them from `edge_runtime.mqtt.client`. `PublishProps` lives here
rather than with the offload messages: the MQTT layer reads and writes it, and the layers
above (offload, fleet, rollouts) only fill it in.
"""

from __future__ import annotations

import os
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from edge_runtime.errors import ConfigError


@dataclass(frozen=True)
class PublishProps:
    """The MQTT 5 PUBLISH properties this project uses, free of any client library."""

    response_topic: str | None = None
    correlation_data: bytes | None = None
    message_expiry_s: int | None = None
    user: tuple[tuple[str, str], ...] = ()

    def user_value(self, key: str) -> str | None:
        """The first user property named `key` (MQTT allows repeats; first one wins)."""
        return next((v for k, v in self.user if k == key), None)



@dataclass(frozen=True)
class BrokerURL:
    host: str
    port: int
    tls: bool

    @classmethod
    def parse(cls, url: str) -> BrokerURL:
        """`mqtt://host[:1883]` or `mqtts://host[:8883]` (`tcp://`, `ssl://` as aliases)."""
        u = urllib.parse.urlsplit(url)
        schemes = {"mqtt": False, "tcp": False, "mqtts": True, "ssl": True}
        if u.scheme not in schemes or not u.hostname:
            raise ConfigError(f"broker URL must look like mqtt://host:port, got {url!r}")
        tls = schemes[u.scheme]
        try:
            port = u.port or (8883 if tls else 1883)
        except ValueError:
            raise ConfigError(f"broker URL {url!r} has a bad port") from None
        return cls(u.hostname, port, tls)


@dataclass(frozen=True)
class TlsFiles:
    ca_file: str | None = None
    """CA bundle that signed the broker's certificate (None: the system's)."""
    cert_file: str | None = None
    """This client's certificate, for brokers that authenticate devices by certificate."""
    key_file: str | None = None


def broker_credentials(
    section: str, password_file: Path | None, ca_file: Path | None, cert_file: Path | None,
    key_file: Path | None,
) -> tuple[str | None, TlsFiles | None]:
    """A config section's broker password (the first line of its file, else the environment
    variable EDGE_RUNTIME_{SECTION}_PASSWORD, for containers that inject secrets that way)
    and TLS files; ConfigError naming `{section}.password_file` when that file cannot be
    read."""
    password = None
    if password_file is not None:
        try:
            password = password_file.read_text().splitlines()[0].strip()
        except (OSError, IndexError) as e:
            raise ConfigError(f"cannot read {section}.password_file: {e}") from e
    elif section.isidentifier():
        password = os.environ.get(f"EDGE_RUNTIME_{section.upper()}_PASSWORD") or None
    tls = None
    if ca_file or cert_file:
        tls = TlsFiles(*(str(p) if p else None for p in (ca_file, cert_file, key_file)))
    return password, tls


def identity_of(username: str | None, tls: TlsFiles | None) -> str:
    """`user NAME`, `certificate CN=NAME` (what `use_identity_as_username` makes the username)
    or `anonymous`."""
    if username:
        return f"user {username!r}"
    if tls is not None and tls.cert_file:
        try:
            from cryptography import x509
            from cryptography.x509.oid import NameOID

            with open(tls.cert_file, "rb") as f:
                cert = x509.load_pem_x509_certificate(f.read())
            cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
            if cn:
                return f"certificate CN={cn[0].value!s}"
        except (OSError, ValueError, ImportError):
            pass  # paho reports an unreadable certificate itself when it connects
        return f"certificate {tls.cert_file}"
    return "anonymous"


@dataclass(frozen=True)
class Message:
    topic: str
    payload: bytes
    props: PublishProps
    received_at: float
    """time.perf_counter() when paho handed the message over."""


Handler = Callable[[Message], None]


@dataclass(frozen=True)
class Will:
    """The Last Will: published by the broker when the connection dies uncleanly."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True
