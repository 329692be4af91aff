"""The daemon's configuration: one TOML file, one frozen dataclass per concern.

    [server]   where and how the HTTP API listens
    [model]    which bundle to serve and which keys may sign it
    [scheduler] batch size, queue bound, default deadline, offload policy (serving/scheduler.py)
    [log]      the JSON-lines access log and the log level
    [offload]  the MQTT broker of the cloud path, and its circuit breaker
    [fleet]    the device agent inside the daemon: broker, identity, bundle slots, and the
               thresholds of the health-check probe a deployed bundle must pass

Every key is optional; a missing file section means its defaults. Unknown keys are errors
(a typo must not silently fall back to a default). Relative paths are relative to the config
file. CLI flags override keys through `Config.override`, nothing else does.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edge_runtime.errors import ConfigError
from edge_runtime.serving.scheduler import SchedulerConfig
from edge_runtime.tomlconfig import TableLoader, read_toml

if TYPE_CHECKING:
    from edge_runtime.model.probe import ProbeThresholds


API_KEY_ENV = "EDGE_RUNTIME_API_KEY"
"""The environment variable read for the API key when neither api_key nor api_key_file is
set (a systemd `Environment=`/`LoadCredential=` or a container secret, never argv)."""


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    """Address to bind. Loopback by default: the API is for apps on the device itself."""
    port: int = 8000
    """TCP port; 0 picks a free one (the URL printed at start-up says which)."""
    api_key: str | None = None
    """When set, /v1/* and /metrics require `Authorization: Bearer <api_key>`. Prefer
    api_key_file or $EDGE_RUNTIME_API_KEY: this file is often world-readable."""
    api_key_file: Path | None = None
    """A file holding the key (first line), so it stays out of `ps` and of this file."""
    max_body_bytes: int = 1 << 20
    """Largest request body accepted; a bigger one gets 413 before it is parsed."""
    allowed_hosts: tuple[str, ...] = ()
    """Host names (or addresses) requests may name in their Host header, besides the loopback
    names when bound to loopback. A foreign Host gets 400: it is how DNS rebinding lets a web
    page reach a loopback service. Empty while bound to a wildcard address (0.0.0.0, ::):
    no check, and a warning at start-up. `*` turns the check off."""
    cors_origins: tuple[str, ...] = ()
    """Web origins (`https://app.example`) whose pages may call the API from a browser. A
    request carrying any other Origin header is refused with 403; none are allowed by
    default."""
    docs: bool = False
    """Serve /docs, /redoc and /openapi.json (behind the API key when one is set)."""
    tls_cert_file: Path | None = None
    """PEM certificate (chain) to serve HTTPS with; needs tls_key_file."""
    tls_key_file: Path | None = None
    """PEM private key of tls_cert_file."""
    jwt_public_key_file: Path | None = None
    """PEM public key (Ed25519, EC P-256 or RSA ≥ 2048) that signs accepted JWT bearer
    tokens (EdDSA, ES256, RS256: the key's type decides); tokens must carry `exp`."""
    jwt_audience: str | None = None
    """When set, a token's `aud` must name it."""
    jwt_issuer: str | None = None
    """When set, a token's `iss` must equal it."""

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"server.port must be in [0, 65535], got {self.port}")
        if self.max_body_bytes < 1:
            raise ConfigError(f"server.max_body_bytes must be >= 1, got {self.max_body_bytes}")
        if self.api_key is not None and not self.api_key.strip():
            raise ConfigError("server.api_key must not be empty")
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ConfigError("server.tls_cert_file and server.tls_key_file go together")
        for origin in self.cors_origins:
            scheme, _, rest = origin.partition("://")
            if scheme not in ("http", "https") or not rest or "/" in rest:
                raise ConfigError(
                    f"server.cors_origins entry {origin!r} is not an origin "
                    "(scheme://host[:port], no path, e.g. https://app.example)"
                )
        for host in self.allowed_hosts:
            if not host or any(c in host for c in "/ "):
                raise ConfigError(f"server.allowed_hosts entry {host!r} is not a host name")

    def resolved_api_key(self) -> str | None:
        """`api_key`, else the first line of `api_key_file`, else $EDGE_RUNTIME_API_KEY, else
        None (no API key)."""
        if self.api_key is not None:
            return self.api_key
        if self.api_key_file is None:
            env = os.environ.get(API_KEY_ENV, "").strip()
            return env or None
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

    @property
    def tls(self) -> bool:
        return self.tls_cert_file is not None


BACKENDS = ("auto", "onnxruntime", "tensorrt")


@dataclass(frozen=True)
class ModelConfig:
    bundle: Path | None = None
    """Bundle directory to serve; unset serves the demo bundle (built once, then cached)."""
    pubkeys: tuple[Path, ...] = ()
    """Trusted ed25519 public keys (PEM); empty means every *.pub in the trust directory."""
    backend: str = "auto"
    """Engine backend: `auto` (TensorRT when a plan for this GPU is built, else ONNX Runtime),
    `onnxruntime` or `tensorrt` (edge_runtime.engines.load_engine)."""
    threads: int | None = None
    """Intra-op threads of the CPU engine; unset lets ONNX Runtime choose."""

    def __post_init__(self) -> None:
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"model.threads must be >= 1, got {self.threads}")
        if self.backend not in BACKENDS:
            raise ConfigError(f"model.backend must be one of {BACKENDS}, got {self.backend!r}")


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
class OffloadConfig:
    broker: str | None = None
    """`mqtt://host:port` or `mqtts://host:port`; unset turns cloud offload off."""
    device_id: str | None = None
    """This device's id in topic names (edge/{device_id}/...); unset: the host name."""
    username: str | None = None
    password_file: Path | None = None
    """A file whose first line is the broker password (kept out of this file and of `ps`)."""
    ca_file: Path | None = None
    """CA of the broker's certificate (mqtts); unset: the system's CAs."""
    cert_file: Path | None = None
    """This device's client certificate, for brokers that authenticate by certificate."""
    key_file: Path | None = None
    keepalive_s: int = 30
    """MQTT keep-alive: how soon a half-open connection is noticed (1.5x this)."""
    failure_rate: float = 0.5
    """The breaker opens when this share of recent offloads failed..."""
    window_s: float = 30.0
    """...over this sliding window..."""
    min_requests: int = 5
    """...and at least this many offloads are in it."""
    open_s: float = 5.0
    """Seconds the breaker stays open before it lets probe requests through."""
    half_open_probes: int = 1
    """Probe requests allowed at once while half-open."""
    latency_window: int = 256
    """Recent round trips kept for the p50/p99 estimates the scheduler reads."""

    def __post_init__(self) -> None:
        if self.keepalive_s < 5:
            raise ConfigError(f"offload.keepalive_s must be >= 5, got {self.keepalive_s}")
        if not 0.0 < self.failure_rate <= 1.0:
            raise ConfigError(f"offload.failure_rate must be in (0, 1], got {self.failure_rate}")
        if self.window_s <= 0 or self.open_s < 0:
            raise ConfigError("offload.window_s must be > 0 and offload.open_s >= 0")
        for key in ("min_requests", "half_open_probes", "latency_window"):
            if getattr(self, key) < 1:
                raise ConfigError(f"offload.{key} must be >= 1, got {getattr(self, key)}")


@dataclass(frozen=True)
class FleetConfig:
    enabled: bool = False
    """Run the device agent in the daemon (`serve --fleet`): it serves the active bundle slot
    and hot-swaps to what the fleet deploys."""
    broker: str | None = None
    """`mqtt://host:port` or `mqtts://host:port` of the fleet broker (required when enabled)."""
    device_id: str | None = None
    """MQTT client id and topic level (fleet/{device_id}/...); unset: offload.device_id, else
    the host name."""
    root: Path | None = None
    """Device directory: bundle slots (`slots/`) and the command journal (required)."""
    remote_config: Path | None = None
    """The overlay a signed set-config writes (only REMOTE_KEYS, fleet/remote_config.py),
    merged over this file at every start; unset: `{root}/remote.toml`. It lives in the
    daemon's writable state, so this file can stay read-only and root's. Never settable by a
    remote command."""
    groups: tuple[str, ...] = ()
    """Device groups whose fleet/group/{group}/cmd commands this device obeys."""
    pubkeys: tuple[Path, ...] = ()
    """Keys trusted to sign deployed bundles; empty: the [model] keys."""
    operator_keys: tuple[Path, ...] = ()
    """Operator public keys (PEM files, or directories of `*.pub`) whose signed commands the
    agent runs; separate from the bundle signers. Empty: every command is refused.
    Provisioned: /etc/edge-runtime/trust/operators. Never settable by a remote command."""
    telemetry_interval_s: float = 30.0
    session_expiry_s: int = 7 * 24 * 3600
    """How long the broker queues commands for this device while it is offline."""
    username: str | None = None
    password_file: Path | None = None
    """A file whose first line is the fleet broker's password."""
    ca_file: Path | None = None
    """CA of the fleet broker's certificate (mqtts); unset: the system's CAs."""
    cert_file: Path | None = None
    """This device's client certificate, for brokers that authenticate by certificate."""
    key_file: Path | None = None
    download_ca_file: Path | None = None
    """CA bundle of the https servers that deploys download bundles from (a fleet's own
    bundle server with a private CA); unset: the system's CAs."""
    download_timeout_s: float = 30.0
    """Socket timeout of one connect or read of a bundle download."""
    download_attempts: int = 8
    """Connections tried in a row without progress before a bundle download fails."""
    tegrastats: str = "auto"
    """Jetson telemetry: "auto" (tegrastats if it is on PATH), "off", or the binary's path."""
    probe_min_greedy_match: float = 0.75
    """Share of the build's greedy reference tokens a deployed bundle must reproduce."""
    probe_max_perplexity_increase: float = 0.05
    """Largest relative perplexity increase over the build's (0.05 = +5 %)."""
    probe_max_ttft_ms: float = 5000.0
    """Largest median time to first token of the probe prompts on this device."""
    probe_min_tokens_per_s: float = 1.0
    """Slowest decode speed of the probe prompts accepted."""
    probe_require_reference: bool = True
    """Roll back a bundle that carries no probe reference (it cannot show its quality)."""

    def __post_init__(self) -> None:
        if self.enabled and (self.broker is None or self.root is None):
            raise ConfigError("fleet.enabled needs fleet.broker and fleet.root")
        if self.telemetry_interval_s <= 0 or self.session_expiry_s < 0:
            raise ConfigError("fleet.telemetry_interval_s must be > 0, session_expiry_s >= 0")
        if self.download_timeout_s <= 0 or self.download_attempts < 1:
            raise ConfigError("fleet.download_timeout_s must be > 0 and download_attempts >= 1, "
                              f"got {self.download_timeout_s} and {self.download_attempts}")
        if not self.tegrastats:
            raise ConfigError('fleet.tegrastats must be "auto", "off" or a path')
        try:
            self.thresholds()
        except ValueError as e:
            raise ConfigError(f"fleet probe thresholds: {e}") from None

    def thresholds(self) -> ProbeThresholds:
        from edge_runtime.model.probe import ProbeThresholds

        return ProbeThresholds(
            min_greedy_match=self.probe_min_greedy_match,
            max_perplexity_increase=self.probe_max_perplexity_increase,
            max_ttft_ms=self.probe_max_ttft_ms, min_tokens_per_s=self.probe_min_tokens_per_s,
            require_reference=self.probe_require_reference,
        )


@dataclass(frozen=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    log: LogConfig = field(default_factory=LogConfig)
    offload: OffloadConfig = field(default_factory=OffloadConfig)
    fleet: FleetConfig = field(default_factory=FleetConfig)

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
    "scheduler": SchedulerConfig,
    "log": LogConfig,
    "offload": OffloadConfig,
    "fleet": FleetConfig,
}


def load_config(path: str | Path) -> Config:
    """Read and validate a TOML config file; every problem is a ConfigError naming the key."""
    path = Path(path)
    data = read_toml(path, "config file")
    return config_from_dict(data, base_dir=path.resolve().parent, source=str(path))


def config_from_dict(data: Mapping[str, Any], base_dir: Path, source: str = "config") -> Config:
    """A Config from a parsed TOML table: its sections checked here, their keys by the shared
    loader (edge_runtime/tomlconfig.py), relative paths resolved against base_dir."""
    unknown = sorted(set(data) - set(_SECTIONS))
    if unknown:
        raise ConfigError(f"{source}: unknown section {unknown[0]!r} (known: {sorted(_SECTIONS)})")
    loader = TableLoader(source, base_dir, ConfigError)
    sections: dict[str, Any] = {}
    for name, cls in _SECTIONS.items():
        table = data.get(name, {})
        if not isinstance(table, Mapping):
            raise ConfigError(f"{source}: [{name}] must be a table")
        sections[name] = loader.build(cls, table, name)
    return Config(**sections)
