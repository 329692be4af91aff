"""The remote-config overlay: what signed set-config commands changed, kept apart from the
provisioned config and merged over it at every start.

    /etc/edge-runtime/config.toml         provisioned, root's, read-only to the daemon
                                          (ProtectSystem=strict makes /etc read-only anyway)
        +  /var/lib/edge-runtime/remote.toml   written by the agent (fsync + rename), in the
                                          unit's StateDirectory; only REMOTE_KEYS
        =  the config the daemon runs (the command-line flags still on top)

    loaded = load_device_config(base, flags)
    loaded.config       # base + overlay + flags, or base + flags when the overlay is refused
    loaded.ignored      # None, or the one line that says why the overlay was not merged

Why an overlay and not an edit of the base file: the base holds the trust roots, the broker
and the device's key paths; a daemon that can rewrite it can rewrite those, whatever a
check in front of the write says. With the overlay the daemon's user needs no write access
to /etc at all, and the file it can write is checked again at every load: a key outside
REMOTE_KEYS in it (a bug, a hand edit, a compromised daemon that wrote it) makes the whole
overlay refused (RemoteConfigError, named keys), never merged in part — a file that broke
the rule once is not trusted for its other keys either. The daemon then runs on the
provisioned config and logs the reason; the device stays reachable, and the next whole
`toml` set-config replaces the overlay.
"""

from __future__ import annotations

import stat
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_runtime.config import Config, FleetConfig, config_from_dict
from edge_runtime.errors import ConfigError, RemoteConfigError
from edge_runtime.tomlconfig import read_toml

REMOTE_FILE = "remote.toml"
"""The overlay's name under fleet.root when fleet.remote_config is unset."""
MAX_OVERLAY_BYTES = 64 << 10
"""An overlay of allowed keys is a few hundred bytes; a bigger file is not one."""

REMOTE_KEYS: frozenset[str] = frozenset({
    *(f"scheduler.{k}" for k in ("max_batch", "max_queue", "default_deadline_s", "safety",
                                  "offload_enabled", "cloud_p99_prior_s",
                                  "engine_error_limit", "prefill_chunk",
                                  "step_latency_target_ms", "memory_headroom_mb")),
    "log.level",
    *(f"offload.{k}" for k in ("keepalive_s", "failure_rate", "window_s", "min_requests",
                                "open_s", "half_open_probes", "latency_window")),
    "fleet.telemetry_interval_s", "fleet.download_timeout_s", "fleet.download_attempts",
    *(f"fleet.probe_{k}" for k in ("min_greedy_match", "max_perplexity_increase",
                                    "max_ttft_ms", "min_tokens_per_s", "require_reference")),
})
"""What a signed set-config may change, and all the overlay may hold: scheduler knobs,
offload on/off and its breaker, the log level, telemetry interval, download patience and
probe thresholds. No path, broker, credential or trust root."""


def overlay_path(fleet: FleetConfig) -> Path | None:
    """Where the overlay lives: fleet.remote_config, else `{fleet.root}/remote.toml`."""
    if fleet.remote_config is not None:
        return fleet.remote_config
    return fleet.root / REMOTE_FILE if fleet.root is not None else None


def table_keys(table: Mapping[str, Any]) -> list[str]:
    """The `section.key` names of a config-shaped table (a top-level scalar is `key`)."""
    out: list[str] = []
    for key, value in table.items():
        if isinstance(value, Mapping):
            out += [f"{key}.{sub}" for sub in value]
        else:
            out.append(str(key))
    return out


def refused_keys(names: Iterable[str]) -> list[str]:
    return sorted({k for k in names if k not in REMOTE_KEYS})


def merge_tables(base: Mapping[str, Any], overlay: Mapping[str, Any]) -> dict[str, Any]:
    """`base` with the overlay's `section.key`s on top (sections merged, not replaced)."""
    out = {k: dict(v) if isinstance(v, Mapping) else v for k, v in base.items()}
    for section, keys in overlay.items():
        target = out.setdefault(section, {})
        if isinstance(target, dict) and isinstance(keys, Mapping):
            target.update(keys)
        else:  # a shape the loader refuses with the key named
            out[section] = keys
    return out


def read_overlay(path: Path) -> dict[str, Any]:
    """The overlay's table; {} when there is none yet. RemoteConfigError names what is wrong:
    not a regular file, too big, not TOML, or keys only provisioning may set."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return {}
    except OSError as e:
        raise RemoteConfigError(f"cannot read the remote config {path}: {e}") from e
    if not stat.S_ISREG(st.st_mode):  # a symlink could point the loader at any file
        raise RemoteConfigError(f"the remote config {path} is not a regular file")
    if st.st_size > MAX_OVERLAY_BYTES:
        raise RemoteConfigError(f"the remote config {path} is {st.st_size} bytes, more than "
                                f"{MAX_OVERLAY_BYTES}")
    table = read_toml(path, "remote config", RemoteConfigError)
    refused = refused_keys(table_keys(table))
    if refused:
        raise RemoteConfigError(f"the remote config {path} sets {', '.join(refused)}, which "
                                "only provisioning may set")
    return table


def merged_config(base: Mapping[str, Any], base_dir: Path, source: str,
                  path: Path) -> tuple[dict[str, Any], Config]:
    """The overlay at `path` and the config of `base` with it merged; RemoteConfigError when
    the overlay is refused (its keys, or values the loader rejects). `base` must be valid."""
    table = read_overlay(path)
    try:
        return table, config_from_dict(merge_tables(base, table), base_dir,
                                       source=f"{source} with {path}")
    except RemoteConfigError:
        raise
    except ConfigError as e:
        raise RemoteConfigError(f"the remote config {path} is refused: {e}") from e


@dataclass(frozen=True)
class DeviceConfig:
    config: Config
    """What the daemon runs: base + overlay (unless refused) + flags."""
    base: Path | None
    """The provisioned file (read, never written); None: defaults and flags only."""
    overlay: Path | None
    """The overlay set-config writes; None when the fleet agent is off."""
    ignored: str | None = None
    """Why the overlay was not merged (logged by the caller once logging is set up)."""


def load_device_config(base: Path | None, flags: Mapping[str, Any]) -> DeviceConfig:
    """The config of `serve` and `build-engine`: ConfigError for a bad base file or flag
    (the daemon must not start on it), the overlay merged when the fleet agent is on."""
    table = read_toml(base) if base is not None else {}
    base_dir = (base.resolve().parent if base is not None else Path.cwd())
    source = str(base) if base is not None else "the defaults"
    cfg = config_from_dict(table, base_dir, source=source).override(flags)
    path = overlay_path(cfg.fleet) if cfg.fleet.enabled else None
    if path is None:
        return DeviceConfig(cfg, base, None)
    try:
        _, merged = merged_config(table, base_dir, source, path)
        return DeviceConfig(merged.override(flags), base, path)
    except RemoteConfigError as e:
        return DeviceConfig(cfg, base, path, f"{e}: ignored whole, running on {source}; a "
                            "whole-document set-config (toml) replaces it")
