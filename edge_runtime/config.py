"""The daemon's configuration: one TOML file, one frozen dataclass per concern.

    [server]   where and how the HTTP API listens
    [model]    which bundle to serve and which keys may sign it
    [queue]    how many requests may wait, and for how long
    [log]      the JSON-lines access log and the log level

Every key is optional; a missing file section means its defaults. Unknown keys are errors
(a typo must not silently fall back to a default). Relative paths are relative to the config
file. CLI flags override keys through `Config.override`, nothing else does.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import sys
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_runtime.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # Jetson's system Python (JetPack 6) is 3.10
    import tomli as tomllib


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    """Address to bind. Loopback by default: the API is for apps on the device itself."""
    port: int = 8000
    """TCP port; 0 picks a free one (the URL printed at start-up says which)."""
    api_key: str | None = None
    """When set, /v1/* and /metrics require `Authorization: Bearer <api_key>`."""
    api_key_file: Path | None = None
    """A file holding the key (first line), so it stays out of `ps` and of this file."""
    max_body_bytes: int = 1 << 20
    """Largest request body accepted; a bigger one gets 413 before it is parsed."""

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"server.port must be in [0, 65535], got {self.port}")
        if self.max_body_bytes < 1:
            raise ConfigError(f"server.max_body_bytes must be >= 1, got {self.max_body_bytes}")
        if self.api_key is not None and not self.api_key.strip():
            raise ConfigError("server.api_key must not be empty")

    def resolved_api_key(self) -> str | None:
        """`api_key`, else the first line of `api_key_file`, else None (no auth)."""
        if self.api_key is not None:
            return self.api_key
        if self.api_key_file is None:
            return None
        try:
            lines = self.api_key_file.read_text().strip().splitlines()
        except OSError as e:
            raise ConfigError(f"cannot read server.api_key_file: {e}") from e
        if not lines or not lines[0].strip():
            raise ConfigError(f"server.api_key_file {self.api_key_file} is empty")
        return lines[0].strip()

    @property
    def is_loopback(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:  # a host name: assume it may be reachable from outside
            return False


@dataclass(frozen=True)
class ModelConfig:
    bundle: Path | None = None
    """Bundle directory to serve; unset serves the demo bundle (built once, then cached)."""
    pubkeys: tuple[Path, ...] = ()
    """Trusted ed25519 public keys (PEM); empty means every *.pub in the trust directory."""
    backend: str = "auto"
    """Engine backend: `auto` picks the best one available on this machine."""
    threads: int | None = None
    """Intra-op threads of the CPU engine; unset lets ONNX Runtime choose."""

    def __post_init__(self) -> None:
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"model.threads must be >= 1, got {self.threads}")


@dataclass(frozen=True)
class QueueConfig:
    max_queued: int = 16
    """Requests that may wait behind the one being served; the next one gets 429."""
    max_wait_s: float = 60.0
    """A request not started after waiting this long gets 429 instead of a late answer."""
    retry_after_s: int = 1
    """The Retry-After header (seconds) sent with 429."""

    def __post_init__(self) -> None:
        if self.max_queued < 1:
            raise ConfigError(f"queue.max_queued must be >= 1, got {self.max_queued}")
        if self.max_wait_s <= 0:
            raise ConfigError(f"queue.max_wait_s must be > 0, got {self.max_wait_s}")
        if self.retry_after_s < 0:
            raise ConfigError(f"queue.retry_after_s must be >= 0, got {self.retry_after_s}")


LOG_LEVELS = ("critical", "error", "warning", "info", "debug")


@dataclass(frozen=True)
class LogConfig:
    access_log: str = "-"
    """JSON-lines access log: a file path, `-` for stdout, empty to turn it off."""
    level: str = "info"
    """Level of the human-readable log on stderr: one of LOG_LEVELS."""

    def __post_init__(self) -> None:
        if self.level not in LOG_LEVELS:
            raise ConfigError(f"log.level must be one of {LOG_LEVELS}, got {self.level!r}")


@dataclass(frozen=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    queue: QueueConfig = field(default_factory=QueueConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def override(self, changes: Mapping[str, Any]) -> Config:
        """A copy with dotted keys (`"server.port"`) replaced; None values are skipped."""
        sections: dict[str, dict[str, Any]] = {}
        for key, value in changes.items():
            if value is None:
                continue
            section, _, name = key.partition(".")
            cls = _SECTIONS.get(section)
            if cls is None or name not in {f.name for f in dataclasses.fields(cls)}:
                raise ConfigError(f"unknown config key {key!r}")
            sections.setdefault(section, {})[name] = value
        return dataclasses.replace(
            self,
            **{s: dataclasses.replace(getattr(self, s), **kv) for s, kv in sections.items()},
        )


_SECTIONS: dict[str, type[Any]] = {
    "server": ServerConfig,
    "model": ModelConfig,
    "queue": QueueConfig,
    "log": LogConfig,
}


def load_config(path: str | Path) -> Config:
    """Read and validate a TOML config file; every problem is a ConfigError naming the key."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e}") from e
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path} is not valid TOML: {e}") from e
    return config_from_dict(data, base_dir=path.resolve().parent, source=str(path))


def config_from_dict(data: Mapping[str, Any], base_dir: Path, source: str = "config") -> Config:
    unknown = sorted(set(data) - set(_SECTIONS))
    if unknown:
        raise ConfigError(f"{source}: unknown section {unknown[0]!r} (known: {sorted(_SECTIONS)})")
    sections: dict[str, Any] = {}
    for name, cls in _SECTIONS.items():
        table = data.get(name, {})
        if not isinstance(table, Mapping):
            raise ConfigError(f"{source}: [{name}] must be a table")
        hints = typing.get_type_hints(cls)
        fields = {f.name for f in dataclasses.fields(cls)}
        for key in table:
            if key not in fields:
                raise ConfigError(
                    f"{source}: unknown key '{name}.{key}' (known: {', '.join(sorted(fields))})"
                )
        values = {
            key: _coerce(value, hints[key], f"{name}.{key}", base_dir, source)
            for key, value in table.items()
        }
        try:
            sections[name] = cls(**values)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from e
    return Config(**sections)


def _coerce(value: Any, tp: Any, key: str, base_dir: Path, source: str) -> Any:
    """Check a TOML value against a field's annotation; resolve paths against base_dir."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):  # `X | None`: TOML has no null
        (tp,) = [a for a in args if a is not type(None)]
        return _coerce(value, tp, key, base_dir, source)
    if origin is tuple:
        if not isinstance(value, list):
            raise ConfigError(f"{source}: '{key}' must be a list, got {value!r}")
        return tuple(_coerce(v, args[0], key, base_dir, source) for v in value)
    ok = {
        bool: lambda v: isinstance(v, bool),
        int: lambda v: isinstance(v, int) and not isinstance(v, bool),
        float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
        str: lambda v: isinstance(v, str),
        Path: lambda v: isinstance(v, str) and v != "",
    }[tp](value)
    if not ok:
        raise ConfigError(f"{source}: '{key}' must be {tp.__name__}, got {value!r}")
    if tp is Path:
        p = Path(value).expanduser()
        return p if p.is_absolute() else base_dir / p
    return float(value) if tp is float else value
