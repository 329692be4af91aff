"""set-config on a device: validate a change of the remote-config overlay, write it
atomically, diff what the daemon would run.

    update = prepare_config(overlay, base=etc_config, keys={"scheduler": {"max_batch": 4}})
    write_config(update)          # fsync + rename of the overlay: old or new, never half
    update.changed                # {"scheduler.max_batch": [8, 4]}

The agent never writes the provisioned config (`base`, read-only on a device): a change goes
to the overlay (remote_config.py), which holds only REMOTE_KEYS and is merged over the base
at every load. A command carries either a whole overlay document (`toml`: the allowed keys
it sets; every key it leaves out goes back to the base's value) or a table of keys (`set`,
nested `{"section": {"key": v}}` or dotted `{"section.key": v}`) merged into the current
overlay. Either way base + new overlay goes through config.py's own loader
(`config_from_dict`), so the device accepts exactly what `edge-runtime serve` would load,
and a bad key is refused with the loader's message before anything is written.

A remote command may set only REMOTE_KEYS: runtime knobs. Trust roots (bundle signers,
operator keys), brokers and their credentials, the bind address and port, API keys, and
every path the daemon reads keys from, writes to or executes are set by provisioning on the
device alone; a command naming any of them is refused with the key in the reason. Values of
keys that look secret are replaced by `redact` in what an ack or a log line carries.

The `set` form rewrites the overlay from its parsed table: comments in it are not kept (an
operator who cares about them sends the whole document, which is written as sent).
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
from edge_runtime.errors import ConfigError, RemoteConfigError
from edge_runtime.fleet.remote_config import (
    MAX_OVERLAY_BYTES,
    merge_tables,
    merged_config,
    refused_keys,
    table_keys,
)

if sys.version_info >= (3, 11):
    import tomllib
else:  # Jetson's system Python (JetPack 6) is 3.10
    import tomli as tomllib

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")

_SECRET_WORDS = ("api_key", "password", "secret", "token", "private")
REDACTED = "<redacted>"


@dataclass(frozen=True)
class ConfigUpdate:
    path: Path
    """The overlay to write."""
    text: str
    """The overlay document (validated: only REMOTE_KEYS, and base + it loads)."""
    config: Config
    """Base + the new overlay: what the daemon runs after a restart (before its flags)."""
    changed: dict[str, list[Any]]
    """`section.key` → [old, new], JSON-friendly (paths as strings, tuples as lists)."""


def prepare_config(overlay: Path, base: Path | None = None, toml: str | None = None,
                   keys: Mapping[str, Any] | None = None) -> ConfigUpdate:
    """Validate the change of the overlay at `overlay` merged over the base config file
    `base` (read, never written; None or missing: the defaults); ConfigError says what is
    wrong, and nothing is written."""
    if (toml is None) == (keys is None):
        raise ConfigError("set-config needs exactly one of a TOML document or a table of keys")
    base_table = _read_table(base) if base is not None else {}
    base_dir = (base if base is not None else overlay).resolve().parent
    source = str(base) if base is not None else "the defaults"
    base_config = config_from_dict(base_table, base_dir, source=source)
    try:
        current, old = merged_config(base_table, base_dir, source, overlay)
    except RemoteConfigError as e:
        if keys is not None:  # nothing trustworthy to merge the keys into
            raise ConfigError(f"{e}: send a whole document (toml) to replace it") from None
        current, old = {}, base_config  # what the daemon runs: it ignores such an overlay
    if toml is not None:
        try:
            table = tomllib.loads(toml)
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"the new config is not valid TOML: {e}") from None
        text = toml if toml.endswith("\n") else toml + "\n"
        if len(text.encode("utf-8")) > MAX_OVERLAY_BYTES:  # the loader would refuse it
            raise ConfigError(f"the new config is {len(text.encode('utf-8'))} bytes, more "
                              f"than {MAX_OVERLAY_BYTES}")
    else:
        assert keys is not None
        table = _merge(current, keys)
        text = render_toml(table)
        if tomllib.loads(text) != table:  # what we write must read back as what we checked
            raise ConfigError("the new config cannot be written as TOML faithfully")
    check_remote(table_keys(table))
    new = config_from_dict(merge_tables(base_table, table), base_dir, source="the new config")
    return ConfigUpdate(overlay, text, new, diff_configs(old, new))


def check_remote(named: Sequence[str]) -> None:
    """ConfigError naming every key a remote command may not set."""
    refused = refused_keys(named)
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
    out = merge_tables(current, {})
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
