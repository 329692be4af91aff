"""set-config on a device: validate a new daemon config, replace the file atomically, diff it.

    update = prepare_config(path, keys={"scheduler": {"max_batch": 4}})
    write_config(update)          # fsync + rename: the old file or the new one, never half
    update.changed                # {"scheduler.max_batch": [8, 4]}

A command carries either a whole TOML document (`toml`) or a table of keys (`set`, nested
`{"section": {"key": v}}` or dotted `{"section.key": v}`) merged into the current file.
Either way the result goes through config.py's own loader (`config_from_dict`), so the
device accepts exactly what `edge-runtime serve --config` would accept, and a bad key is
refused with the loader's message before anything is written. Relative paths resolve
against the config file's directory, as when the daemon reads it.

A remote command may change only REMOTE_KEYS (`check_remote`): runtime knobs. Trust roots
(bundle signers, operator keys), brokers and their credentials, the bind address and port,
API keys, and every path the daemon reads keys from, writes to or executes are set by
provisioning on the device alone; a command naming or changing any of them is refused with
the key in the reason. Values of keys that look secret are replaced by `redact` in what an
ack or a log line carries.

The `set` form rewrites the file from its parsed table: comments in it are not kept (an
operator who cares about them sends the whole document).
"""

from __future__ import annotations

import dataclasses
import json
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_runtime.atomic import atomic_write_bytes
from edge_runtime.config import Config, config_from_dict
from edge_runtime.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # Jetson's system Python (JetPack 6) is 3.10
    import tomli as tomllib

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")

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
"""What a signed set-config may change: scheduler knobs, offload on/off and its breaker, the
log level, telemetry interval, download patience and probe thresholds."""
_SECRET_WORDS = ("api_key", "password", "secret", "token", "private")
REDACTED = "<redacted>"


@dataclass(frozen=True)
class ConfigUpdate:
    path: Path
    text: str
    """The document to write (validated)."""
    config: Config
    changed: dict[str, list[Any]]
    """`section.key` → [old, new], JSON-friendly (paths as strings, tuples as lists)."""


def prepare_config(path: Path, toml: str | None = None,
                   keys: Mapping[str, Any] | None = None) -> ConfigUpdate:
    """Validate the change against the file at `path`; ConfigError says what is wrong."""
    if (toml is None) == (keys is None):
        raise ConfigError("set-config needs exactly one of a TOML document or a table of keys")
    base = path.resolve().parent
    current = _read_table(path)
    old = config_from_dict(current, base, source=str(path))
    if toml is not None:
        try:
            table = tomllib.loads(toml)
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"the new config is not valid TOML: {e}") from None
        text = toml if toml.endswith("\n") else toml + "\n"
    else:
        assert keys is not None
        table = _merge(current, keys)
        text = render_toml(table)
        if tomllib.loads(text) != table:  # what we write must read back as what we checked
            raise ConfigError("the new config cannot be written as TOML faithfully")
    new = config_from_dict(table, base, source="the new config")
    return ConfigUpdate(path, text, new, diff_configs(old, new))


def named_keys(keys: Mapping[str, Any]) -> list[str]:
    """The `section.key` names a `set` table touches (nested or dotted)."""
    out: list[str] = []
    for key, value in keys.items():
        if isinstance(value, Mapping):
            out += [f"{key}.{sub}" for sub in value]
        else:
            out.append(str(key))
    return out


def check_remote(update: ConfigUpdate, named: Sequence[str] = ()) -> None:
    """ConfigError naming every key a remote command may not set or change."""
    refused = sorted({k for k in named if k not in REMOTE_KEYS}
                     | {k for k in update.changed if k not in REMOTE_KEYS})
    if refused:
        raise ConfigError(f"set-config may not change {', '.join(refused)}: only provisioning "
                          "on the device sets trust roots, brokers, credentials, the bind "
                          "address, API keys and paths (remote keys: scheduler.*, log.level, "
                          "offload breaker keys, fleet.telemetry_interval_s, "
                          "fleet.download_*, fleet.probe_*)")


def is_secret(key: str) -> bool:
    name = key.rpartition(".")[2].lower()
    return any(w in name for w in _SECRET_WORDS)


def redact(changed: Mapping[str, Any]) -> dict[str, Any]:
    """`changed` (or any `key: value` mapping) with the values of secret keys hidden."""
    return {k: ([REDACTED if x is not None else None for x in v] if isinstance(v, list)
                else REDACTED) if is_secret(k) else v
            for k, v in changed.items()}


def write_config(update: ConfigUpdate) -> None:
    atomic_write_bytes(update.path, update.text.encode("utf-8"))


def diff_configs(old: Config, new: Config) -> dict[str, list[Any]]:
    a, b = flatten_config(old), flatten_config(new)
    return {k: [a[k], b[k]] for k in sorted(a) if a[k] != b[k]}


def flatten_config(cfg: Config) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        section = getattr(cfg, f.name)
        for g in dataclasses.fields(section):
            out[f"{f.name}.{g.name}"] = _jsonable(getattr(section, g.name))
    return out


def _jsonable(v: Any) -> Any:
    if isinstance(v, Path):
        return str(v)
    if isinstance(v, (tuple, list)):
        return [_jsonable(x) for x in v]
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    return str(v)


def _read_table(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        return {}  # no file yet: every default applies, as for the daemon
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e}") from e
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"the current {path} is not valid TOML: {e}") from e


def _merge(current: Mapping[str, Any], changes: Mapping[str, Any]) -> dict[str, Any]:
    out = {k: dict(v) if isinstance(v, Mapping) else v for k, v in current.items()}
    for key, value in changes.items():
        if not isinstance(key, str) or not key:
            raise ConfigError(f"config key {key!r} must be a non-empty string")
        if isinstance(value, Mapping):
            for sub, v in value.items():
                _put(out, f"{key}.{sub}", v)
        else:
            _put(out, key, value)
    return out


def _put(table: dict[str, Any], dotted: str, value: Any) -> None:
    section, _, name = dotted.partition(".")
    if not name or "." in name:
        raise ConfigError(f"config key {dotted!r} must be 'section.key'")
    if value is None:
        raise ConfigError(f"config key {dotted!r}: null is not a TOML value (omit the key "
                          "to keep its default)")
    target = table.setdefault(section, {})
    if not isinstance(target, dict):
        raise ConfigError(f"config section {section!r} is not a table")
    target[name] = value


def render_toml(table: Mapping[str, Any]) -> str:
    """TOML for a config-shaped table: scalars first, then one `[section]` per sub-table."""
    lines = [f"{_key(k)} = {_value(v, k)}" for k, v in table.items()
             if not isinstance(v, Mapping)]
    for name, sub in table.items():
        if not isinstance(sub, Mapping):
            continue
        if lines:
            lines.append("")
        lines.append(f"[{_key(name)}]")
        for k, v in sub.items():
            if isinstance(v, Mapping):
                raise ConfigError(f"config key '{name}.{k}' is a table; the config has none")
            lines.append(f"{_key(k)} = {_value(v, f'{name}.{k}')}")
    return "\n".join(lines) + "\n"


def _key(k: str) -> str:
    return k if _BARE_KEY.fullmatch(k) else _string(k)


def _string(s: str) -> str:
    # A JSON string is a TOML basic string, except that TOML also forbids a raw DEL.
    return json.dumps(s, ensure_ascii=False).replace("\x7f", "\\u007F")


def _value(v: Any, key: str) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return _string(v)
    if isinstance(v, list):
        return "[" + ", ".join(_value(x, key) for x in v) + "]"
    raise ConfigError(f"config key {key!r}: {type(v).__name__} {v!r} is not a config value")
